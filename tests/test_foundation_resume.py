"""A run killed with SIGKILL resumes from its last checkpoint with exactly the same losses;
a damaged checkpoint is refused with a clear message while the previous one still loads."""

import math
import os
import signal
import subprocess
import time

import pytest

from foundation_helpers import ROOT, command, env, losses, run

FLAGS = ["--train-iters", "40", "--global-batch-size", "4", "--micro-batch-size", "2",
         "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]  # dropout on: RNG state must resume too


def _wait_for_iteration(metrics, iteration, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before it was killed: {proc.stderr.read()[-2000:]}")
        if metrics.exists() and max(losses(metrics) or [0]) >= iteration:
            return
        time.sleep(0.02)
    raise AssertionError("run did not reach the iteration in time")


def test_sigkill_then_resume_reproduces_uninterrupted_losses(tmp_path):
    ref_metrics = tmp_path / "ref.jsonl"
    proc = run(1, [*FLAGS, "--metrics-file", str(ref_metrics)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = losses(ref_metrics)

    save = tmp_path / "ckpt"
    killed_metrics = tmp_path / "killed.jsonl"
    victim = subprocess.Popen(command(1, [*FLAGS, "--save", str(save), "--save-interval", "3",
                                          "--metrics-file", str(killed_metrics)]),
                              cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_iteration(killed_metrics, 10, victim)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    reached = max(losses(killed_metrics))
    assert reached < 40, "the run finished before the kill; nothing was tested"
    resumed_from = int((save / "latest").read_text())
    assert 3 <= resumed_from <= reached

    resumed_metrics = tmp_path / "resumed.jsonl"
    proc = run(1, [*FLAGS, "--save", str(save), "--load", str(save), "--metrics-file", str(resumed_metrics)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {save}/iter_{resumed_from:07d}" in proc.stdout
    resumed = losses(resumed_metrics)
    assert sorted(resumed) == list(range(resumed_from + 1, 41))
    for it, loss in resumed.items():
        assert loss == reference[it], (it, loss, reference[it])  # bit-exact on CPU


def test_truncated_checkpoint_is_refused_and_previous_one_loads(tmp_path):
    save = tmp_path / "ckpt"
    proc = run(1, ["--train-iters", "4", "--global-batch-size", "4", "--micro-batch-size", "2",
                   "--save", str(save), "--save-interval", "2", "--metrics-file", str(tmp_path / "m.jsonl")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (save / "latest").read_text() == "4"
    damaged = save / "iter_0000004" / "mp_rank_00.pt"
    with open(damaged, "r+b") as f:
        f.truncate(damaged.stat().st_size // 2)

    proc = run(1, ["--train-iters", "6", "--global-batch-size", "4", "--micro-batch-size", "2",
                   "--load", str(save)])
    assert proc.returncode == 2
    err = [l for l in proc.stderr.splitlines() if "error" in l]
    assert len(err) == 1 and str(damaged) in err[0] and "truncated" in err[0], proc.stderr[-2000:]
    assert "--load-iteration" in err[0] and "[2]" in err[0]
    assert "Traceback" not in proc.stderr

    proc = run(1, ["--train-iters", "6", "--global-batch-size", "4", "--micro-batch-size", "2",
                   "--load", str(save), "--load-iteration", "2", "--metrics-file", str(tmp_path / "r.jsonl")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(losses(tmp_path / "r.jsonl")) == [3, 4, 5, 6]


def test_keep_last_prunes_old_checkpoints(tmp_path):
    save = tmp_path / "ckpt"
    proc = run(1, ["--train-iters", "8", "--global-batch-size", "4", "--micro-batch-size", "2",
                   "--save", str(save), "--save-interval", "2", "--keep-last", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("iter_")) == ["iter_0000006", "iter_0000008"]
    assert not any(".tmp-" in p.name for p in save.iterdir())


def test_non_finite_loss_stops_the_run_before_the_step_and_names_the_last_checkpoint(tmp_path):
    save = tmp_path / "ckpt"
    flags = ["--train-iters", "8", "--global-batch-size", "4", "--micro-batch-size", "2", "--save", str(save),
             "--save-interval", "1"]
    proc = run(1, [*flags, "--lr", "1e12"])  # diverges within a few steps
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = [l for l in proc.stderr.splitlines() if "error" in l]
    assert len(err) == 1 and "the loss is not finite" in err[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = int((save / "latest").read_text())
    assert f"the last checkpoint is {save}/iter_{last:07d}" in err[0]
    failed_at = int(err[0].split("iteration ")[1].split(":")[0])
    assert failed_at == last + 1  # every applied step was saved; the failing one was not applied
    # the step that produced the NaN was not applied, but the update before it already blew the
    # weights up (as the message says): an earlier checkpoint trains on at a sane rate
    proc = run(1, [*flags, "--lr", "1e-3", "--load", str(save), "--load-iteration", "1", "--finetune",
                   "--train-iters", "3",
                   "--metrics-file", str(tmp_path / "after.jsonl")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(math.isfinite(v) for v in losses(tmp_path / "after.jsonl").values())
    proc = run(1, [*flags, "--lr", "1e-3", "--train-iters", "2"])  # warm-up (2) as long as training
    assert proc.returncode == 2 and "--lr-warmup-iters 2 must be below the decay length 2" in proc.stderr
    assert "Traceback" not in proc.stderr
