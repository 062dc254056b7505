"""tools/gpu_check.py, the one-command GPU check, runs every check on the CPU at tiny sizes
(``--device cpu``), so the script a GPU session depends on cannot rot unseen."""

import json
import subprocess
import sys

import pytest

from openqa_helpers import ROOT, env

EXPECTED = [f"train:{t}:{p}:tiny" for t in ("ict", "dpr", "mss", "emdr2") for p in ("fp32", "autocast-bf16", "fp16", "bf16")] + [
    "fp16:overflow", "search:fp16", "embed:distributed", "refresh:async", "checkpoint:resume"]


@pytest.mark.slow
def test_every_check_passes_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--device", "cpu", "--out", str(tmp_path / "w"),
                           "--budget-minutes", "60", "--json", str(tmp_path / "report.json")],
                          cwd=ROOT, env=env(2), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == EXPECTED
    assert all(c["status"] == "ok" for c in checks.values()), checks
    for name in EXPECTED[:16]:
        assert checks[name]["numbers"]["step_ms"] > 0
    overflow = checks["fp16:overflow"]["numbers"]
    assert overflow["skipped_steps"] >= 1 and overflow["last_scale"] < overflow["first_scale"]
    search = checks["search:fp16"]["numbers"]
    assert search["top10_equal_fp32"] >= 0.9 and 0 < search["fraction_of_copy_bw"]
    assert checks["embed:distributed"]["numbers"]["rows"] == 300
    assert checks["refresh:async"]["numbers"]["switches"] >= 1
    assert checks["checkpoint:resume"]["numbers"]["resumed_iterations"] == [3, 4]
    assert "check" in proc.stdout and "JSON:" in proc.stdout  # the printed table


def test_a_failing_check_is_reported_and_sets_the_exit_status(tmp_path):
    # --only selects one check; a 1-second command limit makes it fail: reported in the table, not a crash
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--device", "cpu", "--out", str(tmp_path),
                           "--only", "checkpoint:resume", "--timeout", "1"],
                          cwd=ROOT, env=env(2), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    (check,) = report["checks"]
    assert check["name"] == "checkpoint:resume" and check["status"] == "FAIL"
    assert "timed out after 1 s" in check["detail"]


def test_flop_model_counts_what_it_says():
    sys.path.insert(0, str(ROOT / "tools"))
    from gpu_check import emdr2_model_flops

    base = emdr2_model_flops(50, 256, 256, 512, 32)
    # BERT-base on 50 x 256 context tokens alone is 6 x 85M params x 12.8k tokens ≈ 6.5 TFLOP; the
    # reader's encoder on 50 x 512 tokens twice that; the whole step about 25 TFLOP
    assert 1.5e13 < base < 4e13
    # the reader's encoder dominates: doubling K roughly doubles the count
    assert 1.8 < emdr2_model_flops(100, 256, 256, 512, 32) / base < 2.1
