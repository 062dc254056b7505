"""tools/gpu_check.py, the one-command GPU check: it cannot pass by skipping, it refuses a
CPU-only torch for --device cuda, and its checks (DP = 2, TP = 2, decoding, memory growth, the
asynchronous refresh with its indexer-device assertion) all run on the CPU at tiny sizes
(``--device cpu``, gloo for the multi-rank ones), so the script a GPU session depends on cannot
rot unseen. The full CPU run is slow; the rules are tested fast, in-process where they can be."""

import json
import subprocess
import sys

import pytest
import torch

from openqa_helpers import ROOT, env

sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402

EXPECTED = [f"train:{t}:{p}:tiny" for t in ("ict", "dpr", "mss", "emdr2") for p in ("fp32", "autocast-bf16", "fp16", "bf16")] + [
    "fp16:overflow", "search:fp16", "dp2:ict", "dp2:emdr2", "tp2:emdr2", "embed:distributed", "refresh:async",
    "eval:decode", "memory:growth", "checkpoint:resume"]


def _gpu_check(*args, timeout=300):
    return subprocess.run([sys.executable, "tools/gpu_check.py", *map(str, args)], cwd=ROOT, env=env(2),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_every_check_passes_on_cpu(tmp_path):
    proc = _gpu_check("--device", "cpu", "--out", tmp_path / "w", "--json", tmp_path / "report.json", timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == EXPECTED
    assert all(c["status"] == "ok" for c in checks.values()), checks
    assert report["skipped"] == [] and report["exit_status"] == 0
    for name in EXPECTED[:16]:
        assert checks[name]["numbers"]["step_ms"] > 0
    overflow = checks["fp16:overflow"]["numbers"]
    assert overflow["skipped_steps"] >= 1 and overflow["last_scale"] < overflow["first_scale"]
    search = checks["search:fp16"]["numbers"]
    assert search["top10_equal_fp32"] >= 0.9 and 0 < search["fraction_of_copy_bw"]
    for name, collective in (("dp2:ict", "in-batch gather"), ("dp2:emdr2", "index search sharded")):
        dp = checks[name]["numbers"]
        assert dp["ranks"] == 2 and dp["backend"] == "gloo" and dp["weights_identical"] and collective in dp["collective"]
    tp = checks["tp2:emdr2"]["numbers"]
    assert tp["tp"] == 2 and tp["rel_diff"] <= 1e-4 and tp["weights_per_rank"] < 0.75
    assert checks["embed:distributed"]["numbers"]["rows"] == 300
    refresh = checks["refresh:async"]["numbers"]
    assert refresh["switches"] >= 1 and refresh["indexer_ranks"] == 2 and refresh["indexer_device"] == "cpu"
    decode = checks["eval:decode"]["numbers"]
    assert decode["questions"] == 16 and decode["decode_device"] == "cpu"
    memory = checks["memory:growth"]["numbers"]
    assert memory["steps"] == 50 and "rss_growth_mib" in memory
    assert checks["checkpoint:resume"]["numbers"]["resumed_iterations"] == [3, 4]
    assert "check" in proc.stdout and "JSON:" in proc.stdout and f"PASS: {len(EXPECTED)} of {len(EXPECTED)}" in proc.stdout


def test_a_skipped_check_fails_the_run_unless_allowed(tmp_path):
    # a budget spent before a check starts skips it: a skip is not a pass (exit 1) unless --allow-skip
    for allow, status in (([], 1), (["--allow-skip"], 0)):
        out = tmp_path / f"w{status}"
        proc = _gpu_check("--device", "cpu", "--out", out, "--only", "checkpoint:resume", "--budget-minutes", "0",
                          *allow)
        assert proc.returncode == status, proc.stdout[-3000:] + proc.stderr[-2000:]
        report = json.loads((out / "gpu_check.json").read_text())
        (check,) = report["checks"]
        assert check["status"] == "skipped" and "--budget-minutes 0 spent" in check["detail"]
        assert report["skipped"] == ["checkpoint:resume"] and report["exit_status"] == status
        last = proc.stdout.strip().splitlines()[-1]
        assert last.startswith("FAIL: 0 of 1 checks passed, 1 skipped" if status else "PASS: 0 of 1"), last
        assert ("accept it with --allow-skip" if status else "accepted (--allow-skip)") in last


def test_a_check_that_cannot_run_here_is_skipped_with_its_reason(tmp_path, monkeypatch, capsys):
    # the one-GPU case, in-process: a multi-rank check raises CheckSkipped with the reason before
    # any command runs; main lists it as skipped, and the exit status follows --allow-skip
    ctx = gpu_check.Context("cpu", tmp_path, 10)
    ctx.device, ctx.gpus = "cuda", 1
    for check in (gpu_check.check_dp2("ict"), gpu_check.check_dp2("emdr2"), gpu_check.check_tp2,
                  gpu_check.check_distributed_embedding):
        with pytest.raises(gpu_check.CheckSkipped, match="needs 2 GPUs for 2 NCCL ranks, 1 visible"):
            check(ctx)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # skipped before any run directory was made
    assert gpu_check.multi_rank_skip("cuda", 2) is None and gpu_check.multi_rank_skip("cpu", 0) is None

    def one_gpu_check(ctx):
        raise gpu_check.CheckSkipped(gpu_check.multi_rank_skip("cuda", 1))

    monkeypatch.setattr(gpu_check, "all_checks", lambda ctx, size: [("dp2:ict", one_gpu_check),
                                                                    ("ok:one", lambda ctx: {"x": 1})])
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path / "a")]) == 1
    out = capsys.readouterr().out
    assert "skipped" in out and "needs 2 GPUs" in out and "FAIL: 1 of 2 checks passed, 1 skipped (dp2:ict)" in out
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path / "b"), "--allow-skip"]) == 0


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is a CUDA build")
def test_device_cuda_refuses_a_cpu_only_torch_in_one_line(tmp_path):
    proc = _gpu_check("--device", "cuda", "--out", tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("gpu_check: --device cuda: this torch") and "CPU-only build" in line
    assert not (tmp_path / "gpu_check.json").exists()


def test_the_checks_cover_dp_tp_decoding_memory_and_the_indexer_device(tmp_path):
    proc = _gpu_check("--device", "cpu", "--out", tmp_path, "--list")
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = [l for l in proc.stdout.splitlines() if l and not l.startswith((" ", "device "))]
    assert listed == EXPECTED
    about = proc.stdout
    assert "2 data-parallel ranks" in about and "in-batch gather" in about and "sharded over the ranks" in about
    assert "tensor-parallel size 2" in about and "decoded by beam search" in about
    assert "50 EMDR² steps" in about and "context tower and embeddings were on the check's device" in about
    # the refresh check's layout: 2 indexer ranks wherever each can have its own device
    assert gpu_check.refresh_layout("cpu", 0) == (1, 2)
    assert gpu_check.refresh_layout("cuda", 1) == (1, 1)
    assert gpu_check.refresh_layout("cuda", 2) == (1, 2) and gpu_check.refresh_layout("cuda", 8) == (2, 2)


def _embed(role_rank, tower="cuda:1", emb="cuda:1", current="cuda:1", world=2, backend="nccl", ok=True):
    return {"kind": "embed", "role": "indexer", "role_rank": role_rank, "ok": ok, "tower_devices": [tower],
            "embedding_device": emb, "current_device": current, "world": world, "backend": backend}


def test_the_indexer_device_assertion():
    good = [_embed(0, "cuda:0", "cuda:0", "cuda:0"), _embed(1)]
    assert gpu_check.assert_indexer_devices(good, "cuda", 2, "nccl")["indexer_device"] == ["cuda:0", "cuda:1"]
    trainer = dict(_embed(0, "cpu", "cpu"), role="trainer")  # a trainer's own build does not count
    cases = [
        ([_embed(0, tower="cpu", emb="cpu"), _embed(1)], "context tower's weights are on cpu, not cuda:1"),
        ([_embed(0, emb="cpu"), _embed(1)], "embeddings were computed on cpu, not cuda:1"),
        ([_embed(0)], r"indexer ranks that embedded: \[0\], expected 0..1"),
        ([_embed(0, world=1), _embed(1, world=1)], "embedded in a world of 1 on nccl, expected 2 on nccl"),
        ([_embed(0, backend="gloo"), _embed(1, backend="gloo")], "expected 2 on nccl"),
        ([_embed(0, ok=False), _embed(1)], "embedding the evidence failed"),
        ([trainer], "no indexer rank embedded"),
    ]
    for records, message in cases:
        with pytest.raises(gpu_check.CheckFailed, match=message):
            gpu_check.assert_indexer_devices(records, "cuda", 2, "nccl")
    cpu = [_embed(0, "cpu", "cpu", "cpu", backend="gloo"), _embed(1, "cpu", "cpu", "cpu", backend="gloo")]
    assert gpu_check.assert_indexer_devices(cpu, "cpu", 2, "gloo")["indexer_device"] == "cpu"
    with pytest.raises(gpu_check.CheckFailed, match="current device is cpu, not a cuda device"):
        gpu_check.assert_indexer_devices(cpu, "cuda", 2, "gloo")


def test_memory_growth_rule():
    flat = [100.0 + (i % 3) for i in range(50)]
    assert gpu_check.assert_memory_flat(flat, 20, 0.02, 4, "rss")["rss_growth_mib"] == 0.0
    leak = [100.0 + i for i in range(50)]  # 1 MiB per step
    with pytest.raises(gpu_check.CheckFailed, match=r"rss grew by 30.0 MiB after warm-up \(119.0 -> 149.0 MiB"):
        gpu_check.assert_memory_flat(leak, 20, 0.02, 4, "rss")
    with pytest.raises(gpu_check.CheckFailed, match="need more than the 20 of warm-up"):
        gpu_check.assert_memory_flat(flat[:20], 20, 0.02, 4, "rss")


def test_a_failing_check_is_reported_and_sets_the_exit_status(tmp_path):
    # --only selects one check; a 1-second command limit makes it fail: reported in the table, not a crash
    proc = _gpu_check("--device", "cpu", "--out", tmp_path, "--only", "checkpoint:resume", "--timeout", "1")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    (check,) = report["checks"]
    assert check["name"] == "checkpoint:resume" and check["status"] == "FAIL"
    assert "timed out after 1 s" in check["detail"]


def test_flop_model_counts_what_it_says():
    from gpu_check import emdr2_model_flops

    base = emdr2_model_flops(50, 256, 256, 512, 32)
    # BERT-base on 50 x 256 context tokens alone is 6 x 85M params x 12.8k tokens ≈ 6.5 TFLOP; the
    # reader's encoder on 50 x 512 tokens twice that; the whole step about 25 TFLOP
    assert 1.5e13 < base < 4e13
    # the reader's encoder dominates: doubling K roughly doubles the count
    assert 1.8 < emdr2_model_flops(100, 256, 256, 512, 32) / base < 2.1
