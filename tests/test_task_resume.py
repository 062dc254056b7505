"""Every training task stops cleanly at --exit-interval and resumes from that checkpoint with
exactly the losses of an uninterrupted run: ICT, DPR, MSS and EMDR² (with per-model lr groups,
dropout on and an index refreshed in between, so optimizer groups, RNG streams, data position
and the index version searched must all come back)."""

import json
import subprocess
import sys

import pytest

from openqa_helpers import NQ_MINI, ROOT, TINY_OPENQA, env, records, small_evidence

SENTENCES = ROOT / "tests" / "fixtures" / "mss" / "nq_mini_first80.jsonl"
RETRIEVER = ["--retriever-num-layers", "2", "--retriever-hidden-size", "64", "--retriever-num-attention-heads", "4",
             "--retriever-seq-length", "128", "--query-max-len", "32", "--context-max-len", "96",
             "--no-progress-bar", "--log-interval", "1000", "--embed-batch-size", "64"]
COMMON = ["--train-iters", "6", "--lr", "1e-3", "--lr-warmup-fraction", "0.2"]


def _task_flags(task, data, index_dir):
    if task == "ict":
        return "tasks.openqa.ict", [*RETRIEVER, "--evidence", str(data["evidence"]), "--dev-data", "",
                                    "--global-batch-size", "8", "--micro-batch-size", "4"]
    if task == "dpr":
        return "tasks.openqa.dpr", [*RETRIEVER, "--evidence", str(data["evidence"]), "--dev-data", "",
                                    "--train-data", str(data["train"]), "--global-batch-size", "4",
                                    "--micro-batch-size", "2", "--hard-negatives", "1"]
    joint = [*TINY_OPENQA, "--evidence", str(data["evidence"]), "--index-dir", str(index_dir), "--top-k", "4",
             "--global-batch-size", "4", "--micro-batch-size", "2", "--index-reload-interval", "2",
             "--retriever-lr-mult", "0.1", "--reader-encoder-lr-mult", "0.3"]
    if task == "mss":
        return "tasks.openqa.mss", [*joint, "--mss-data", str(SENTENCES), "--mss-dev-sentences", "4",
                                    "--mss-max-spans", "2"]
    return "tasks.openqa.emdr2", [*joint, "--train-data", str(NQ_MINI / "train.tsv")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume-data")
    evidence = small_evidence(d, rows=120)
    train = d / "train.jsonl"  # questions whose gold passage is in the slice
    lines = [l for l in (NQ_MINI / "train.jsonl").read_text().splitlines() if json.loads(l)["gold_passage_id"] <= 120]
    train.write_text("\n".join(lines[:16]) + "\n")
    return {"evidence": evidence, "train": train}


def _popen(module, flags):
    from megatron.emdr2.initialize import free_port

    e = dict(env(1), MASTER_PORT=str(free_port()))
    return subprocess.Popen([sys.executable, "-m", module, *flags], cwd=ROOT, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _losses(metrics_file):
    return {r["iteration"]: r["loss"] for r in records(metrics_file)}


@pytest.mark.parametrize("task", ["ict", "dpr", "mss", "emdr2"])
def test_exit_interval_then_resume_is_bit_exact(task, data, tmp_path):
    module, ref_flags = _task_flags(task, data, tmp_path / "ref-index")
    _, run_flags = _task_flags(task, data, tmp_path / "run-index")
    ref = _popen(module, [*ref_flags, *COMMON, "--save", str(tmp_path / "ref"),
                          "--metrics-file", str(tmp_path / "ref.jsonl")])
    stop = _popen(module, [*run_flags, *COMMON, "--save", str(tmp_path / "run"), "--exit-interval", "3",
                           "--metrics-file", str(tmp_path / "first.jsonl")])
    _finish(ref)
    out = _finish(stop)
    assert "exiting at iteration 3" in out, out[-2000:]
    assert (tmp_path / "run" / "latest").read_text().strip() == "3"
    reference = _losses(tmp_path / "ref.jsonl")
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    first = _losses(tmp_path / "first.jsonl")
    assert first == {i: reference[i] for i in (1, 2, 3)}

    out = _finish(_popen(module, [*run_flags, *COMMON, "--save", str(tmp_path / "run"), "--load",
                                  str(tmp_path / "run"), "--metrics-file", str(tmp_path / "resumed.jsonl")]))
    assert "resumed from" in out and "iter_0000003" in out, out[-2000:]
    resumed = _losses(tmp_path / "resumed.jsonl")
    assert resumed == {i: reference[i] for i in (4, 5, 6)}, (resumed, reference)
    if task in ("mss", "emdr2"):  # refreshed at steps 0, 2, 4, 6: the oldest was pruned (--keep-index-versions 3)
        assert sorted(p.name for p in (tmp_path / "ref-index").glob("step-*")) == [
            "step-00000002", "step-00000004", "step-00000006"]


def test_exit_flags_are_checked_in_one_line(data, tmp_path):
    module, flags = _task_flags("ict", data, tmp_path / "index")
    for extra, message in ((["--exit-interval", "0", "--save", str(tmp_path / "s")], "--exit-interval must be > 0"),
                           (["--exit-duration-in-mins", "5"], "need --save DIR")):
        proc = subprocess.run([sys.executable, "-m", module, *flags, *COMMON, *extra], cwd=ROOT, env=env(1),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().count("\n") == 0
