"""2 trainer + 2 indexer ranks on gloo: the index is refreshed while training goes on, an
indexer killed mid-refresh does not stop training, and every rank ends cleanly."""

import os
import re
import signal
import time
from pathlib import Path

import pytest

from openqa_helpers import NQ_MINI, TINY_OPENQA, launch_ranks, records, small_evidence


def _flags(tmp_path, evidence, iters):
    return [*TINY_OPENQA, "--evidence", str(evidence), "--train-data", str(NQ_MINI / "train.tsv"),
            "--dev-data", str(NQ_MINI / "dev.tsv"), "--index-dir", str(tmp_path / "index"),
            "--top-k", "4", "--global-batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3",
            "--train-iters", str(iters), "--index-reload-interval", "4", "--num-indexer-ranks", "2",
            "--keep-index-versions", "0",  # every version stays, so the test can check which were complete
            "--metrics-file", str(tmp_path / "metrics.jsonl")]


def _wait_all(procs, timeout):
    deadline = time.time() + timeout
    for p in procs:
        p.wait(max(1, deadline - time.time()))
    return [p.returncode for p in procs]


def _logs(tmp_path):
    return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(tmp_path.glob("rank*.log")))


@pytest.mark.slow
@pytest.mark.parametrize("kill_indexer", [False, True], ids=["refresh", "indexer-killed"])
def test_async_refresh_with_indexer_ranks(tmp_path, kill_indexer):
    from megatron.emdr2.initialize import free_port

    evidence = small_evidence(tmp_path, 300)
    procs = launch_ranks("tasks.openqa.emdr2", _flags(tmp_path, evidence, 60), 4, free_port(), tmp_path)
    try:
        if kill_indexer:
            # Wait until the indexers are writing a refreshed version, then kill one of them.
            index = tmp_path / "index"
            deadline = time.time() + 240
            while time.time() < deadline:
                partial = sorted(index.glob("step-0*[1-9]*/*.partial"))
                if partial:
                    break
                time.sleep(0.01)
            else:
                pytest.fail("no refresh started:\n" + _logs(tmp_path))
            os.kill(procs[3].pid, signal.SIGKILL)
            killed_step = int(re.match(r"step-(\d+)", partial[0].parent.name).group(1))  # (or its .staging)
        codes = _wait_all(procs, 400)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = _logs(tmp_path)
    assert codes[:2] == [0, 0], logs  # trainers finished
    if kill_indexer:
        assert codes[3] == -signal.SIGKILL and codes[2] == 0, (codes, logs)
    else:
        assert codes == [0, 0, 0, 0], logs

    train = records(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in train] == list(range(1, 61))
    steps = sorted({int(r["index_step"]) for r in train})
    times = sorted(r["step_time"] for r in train)
    median = times[len(times) // 2]
    # Only complete (published) versions are ever searched.
    published = {int(m.parent.name.split("-")[1]) for m in (tmp_path / "index").glob("step-*/manifest.json")}
    assert set(steps) <= published, (steps, sorted(published))
    if kill_indexer:
        # The version being written when an indexer died never appears, the newer ones cannot
        # (one indexer cannot embed alone), and training carried on with what it had.
        assert not (tmp_path / "index" / f"step-{killed_step:08d}" / "manifest.json").exists()
        assert killed_step not in steps and max(steps) < killed_step, (steps, killed_step)
    else:
        assert len(steps) >= 3, f"index versions used: {steps}\n{logs}"  # initial + >= 2 refreshes
        assert all(b > a for a, b in zip(steps, steps[1:]))
    # Never stalled waiting for the indexers: no step is far slower than the typical one.
    assert times[-1] < max(20 * median, 5.0), (times[-5:], median)
    # Staleness is the lag of the searched index behind the towers, step by step.
    assert all(r["index_staleness"] == r["iteration"] - r["index_step"] >= 0 for r in train)
    if not kill_indexer:  # refreshed every 4 steps: the lag stays a few intervals, never the run
        assert max(r["index_staleness"] for r in train) < 30, [r["index_staleness"] for r in train]


@pytest.mark.slow
def test_relaunch_with_load_keeps_its_indexers(tmp_path):
    """The same command launched twice (as every example script relaunches, --load its own
    --save): the second launch finds the first one's STOP and an hour-old heartbeat in the
    exchange, and its indexer must still serve it (it once exited at start, before the trainers
    could clear them, and the index was never refreshed again)."""
    from megatron.emdr2.initialize import free_port

    evidence = small_evidence(tmp_path, 120)
    save = tmp_path / "run"
    flags = [*_flags(tmp_path, evidence, 16), "--index-reload-interval", "2", "--num-indexer-ranks", "1",
             "--save", str(save), "--load", str(save), "--exit-interval", "8"]
    exchange = tmp_path / "index" / "exchange"
    for launch in (1, 2):
        for log in tmp_path.glob("rank*.log"):
            log.rename(log.with_name(f"launch{launch - 1}-{log.name}"))
        procs = launch_ranks("tasks.openqa.emdr2", flags, 2, free_port(), tmp_path)
        try:
            codes = _wait_all(procs, 300)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        assert codes == [0, 0], _logs(tmp_path)
        if launch == 1:
            assert (save / "latest").read_text().strip() == "8" and (exchange / "STOP").exists()
            first = {m.parent.name for m in (tmp_path / "index").glob("step-*/manifest.json")}
            hour_ago = time.time() - 3600  # the heartbeat of a launch that ended long ago
            os.utime(exchange / "heartbeat", (hour_ago, hour_ago))
    assert [r["iteration"] for r in records(tmp_path / "metrics.jsonl")] == list(range(1, 17))
    # The second launch's indexer embedded towers of the second launch's steps (9-16).
    second = {m.parent.name for m in (tmp_path / "index").glob("step-*/manifest.json")} - first
    assert any(8 < int(name.split("-")[1]) <= 16 for name in second), (sorted(first), sorted(second),
                                                                         _logs(tmp_path))
    assert "published index for model step" in (tmp_path / "rank1.log").read_text(), _logs(tmp_path)
