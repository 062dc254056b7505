"""Checkpoints of ``--use-distributed-optimizer`` runs (megatron-core's ZeRO-1 optimizer).

Each data-parallel rank's slice of the Adam moments and fp32 main weights is saved (gathered on
data-parallel rank 0, megatron-core's dp_zero format, ``distopt_mp_rank_XX.pt``), listed in the
manifest, verified on load, and restored so that the resumed run's losses equal the
uninterrupted run's bit for bit (fp16 with its loss scaler, bf16). The format does not depend on
the data-parallel size: a checkpoint loads on another number of ranks, its state resharded
exactly. Real gloo ranks; several runs share one spawn (one megatron-core import per rank).
"""

import dataclasses
import os

import pytest

from foundation_helpers import losses, run
from spawn import run_ranks

ITERS = 8


def _cfg(precision, iters=ITERS, **checkpoint):
    from megatron.emdr2.config import (BatchConfig, CheckpointConfig, LoggingConfig, OptimizerSettings,
                                       ParallelConfig, PrecisionConfig, ScheduleConfig, TrainingConfig)

    return TrainingConfig(
        parallel=ParallelConfig(use_distributed_optimizer=True),
        precision=PrecisionConfig(precision, initial_loss_scale=2.0**19),  # fp16: the first steps overflow
        optimizer=OptimizerSettings(lr=3e-3),
        schedule=ScheduleConfig(train_iters=iters, lr_warmup_fraction=None, lr_warmup_iters=1,
                                lr_decay_iters=ITERS),
        batch=BatchConfig(micro_batch_size=2, global_batch_size=8),
        checkpoint=CheckpointConfig(**checkpoint),
        logging=LoggingConfig(log_interval=1000, progress_bar=False),
    )


def _trainer(cfg, dropout=0.1):
    from megatron.emdr2.initialize import set_seed
    from megatron.emdr2.training.loop import Trainer
    from tasks.bert_mlm import TINY, SyntheticMLMTask

    set_seed(cfg.seed)  # each run in this process starts as a fresh process would
    size = dataclasses.replace(TINY, hidden_dropout=dropout, attention_dropout=dropout)  # RNG state resumes too
    return Trainer(SyntheticMLMTask(size, cfg, num_samples=64), cfg)


def _history(trainer) -> dict:
    state = trainer.train()
    return {h["iteration"]: (h["loss"], h["loss_scale"], h["skipped"]) for h in state.history}


def _saved_vs_loaded(trainer, path) -> list:
    """(name, saved == this run's state after loading, bit for bit) for every tensor of the
    checkpoint's distributed-optimizer file, gathered back from this run's ranks."""
    import torch

    from megatron.emdr2.training import checkpointing as ckpt

    now = ckpt.gather_optimizer_shards(trainer.optimizer)  # a collective: every rank calls it
    if now is None:  # not data-parallel rank 0
        return []
    saved = ckpt.load_file(path)
    out = []
    for i, (a, b) in enumerate(zip(saved["optimizers"], now["optimizers"])):
        for gbuf in (k for k in a if isinstance(k, int)):
            for dtype in a[gbuf]:
                for key in ("param", "exp_avg", "exp_avg_sq"):
                    x, y = a[gbuf][dtype][key], b[gbuf][dtype][key]
                    out.append((f"{i}/{gbuf}/{key}", x.shape == y.shape and torch.equal(x, y)
                                and bool(x.abs().sum() > 0)))
    return out


# --------------------------------------------------------------------------- bit-exact resume

def _resume_runs(rank, world, root):
    from megatron.emdr2.initialize import initialize, shutdown

    initialize(seed=1234)
    out = {}
    try:
        for precision in ("fp16", "bf16"):
            save = os.path.join(root, precision)
            out[precision] = {
                "ref": _history(_trainer(_cfg(precision))),
                # saves at 2 and 4, stops at 5 (--exit-interval) after saving it
                "first": _history(_trainer(_cfg(precision, save=save, save_interval=2, exit_interval=5))),
                "from5": _history(_trainer(_cfg(precision, load=save))),
            }
            if precision == "fp16":  # iteration 2: every step so far skipped, Adam has no state yet
                out[precision]["from2"] = _history(_trainer(_cfg(precision, load=save, load_iteration=2)))
    finally:
        shutdown()
    return out


def test_resume_is_bit_exact_fp16_and_bf16(tmp_path):
    results = run_ranks(_resume_runs, 2, str(tmp_path))
    assert results[0] == results[1]  # both ranks log the losses averaged over data-parallel ranks
    r = results[0]
    for precision in ("fp16", "bf16"):
        ref, first, from5 = r[precision]["ref"], r[precision]["first"], r[precision]["from5"]
        assert sorted(first) == [1, 2, 3, 4, 5] and sorted(from5) == [6, 7, 8], (precision, first, from5)
        assert len({v[0] for v in ref.values()}) == ITERS  # the model moves every step
        for it, rec in {**first, **from5}.items():
            assert rec == ref[it], (precision, it, rec, ref[it])  # loss, loss scale, skipped: bit-exact
        files = sorted(os.listdir(tmp_path / precision / "iter_0000005"))
        assert files == ["distopt_mp_rank_00.pt", "manifest.json", "mp_rank_00.pt", "rank_00000.pt",
                         "rank_00001.pt"]
    fp16 = r["fp16"]
    skipped = [it for it, v in fp16["ref"].items() if v[2]]
    assert skipped[:2] == [1, 2] and len(skipped) < ITERS - 2, skipped  # iteration 2 precedes Adam's first step
    assert len({v[1] for v in fp16["ref"].values()}) > 2  # the loss scale moves: its state must resume too
    assert sorted(fp16["from2"]) == list(range(3, ITERS + 1))
    for it, rec in fp16["from2"].items():
        assert rec == fp16["ref"][it], ("from2", it, rec, fp16["ref"][it])


# --------------------------------------------------------------------------- data-parallel size changes

def _train_and_save(rank, world, save):
    from megatron.emdr2.initialize import initialize, shutdown

    initialize(seed=1234)
    try:
        return _history(_trainer(_cfg("fp32", save=save, save_interval=4), dropout=0.0))
    finally:
        shutdown()


def _load_elsewhere(rank, world, load, save_too):
    """Load a checkpoint saved with another data-parallel size: compare the restored state with
    the saved file exactly, then train on; optionally also train and save at this size."""
    from megatron.emdr2.initialize import initialize, shutdown
    from megatron.emdr2.training import checkpointing as ckpt

    initialize(seed=1234)
    try:
        out = {}
        trainer = _trainer(_cfg("fp32", load=load, load_iteration=4), dropout=0.0)
        out["same"] = _saved_vs_loaded(trainer, os.path.join(load, "iter_0000004", ckpt.optimizer_file(0)))
        out["resumed"] = _history(trainer)
        if save_too:
            out["own"] = _history(_trainer(_cfg("fp32", save=save_too, save_interval=4), dropout=0.0))
        return out
    finally:
        shutdown()


def test_checkpoint_reshards_when_the_data_parallel_size_changes(tmp_path):
    dp1, dp2 = str(tmp_path / "dp1"), str(tmp_path / "dp2")
    (ref1,) = run_ranks(_train_and_save, 1, dp1)
    # dp 1 -> 2: the state each rank receives, gathered back, is the saved one bit for bit
    at2 = run_ranks(_load_elsewhere, 2, dp1, dp2)[0]
    assert at2["same"] and all(ok for _, ok in at2["same"]), at2["same"]
    (at1,) = run_ranks(_load_elsewhere, 1, dp2, None)  # dp 2 -> 1
    assert at1["same"] and all(ok for _, ok in at1["same"]), at1["same"]
    # Training on agrees with the run at the other size up to summation order (dp 1 and dp 2
    # reduce gradients in another order, as in test_foundation_parallel; no dropout, whose
    # streams differ between layouts).
    for resumed, ref in ((at2["resumed"], ref1), (at1["resumed"], at2["own"])):
        assert sorted(resumed) == [5, 6, 7, 8]
        for it, (loss, _, _) in resumed.items():
            assert loss == pytest.approx(ref[it][0], rel=1e-5), (it, loss, ref[it][0])


# --------------------------------------------------------------------------- refusals (the command line)

def test_damaged_or_mismatched_shards_are_refused_in_one_line(tmp_path):
    save = tmp_path / "ckpt"
    flags = ["--train-iters", "3", "--global-batch-size", "4", "--micro-batch-size", "2"]
    proc = run(1, [*flags, "--use-distributed-optimizer", "--save", str(save), "--save-interval", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    shard = save / "iter_0000003" / "distopt_mp_rank_00.pt"
    assert "distopt_mp_rank_00.pt" in (save / "iter_0000003" / "manifest.json").read_text()
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)

    def one_error(proc):
        assert proc.returncode == 2, proc.stderr[-3000:]
        err = [l for l in proc.stderr.splitlines() if "error" in l]
        assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        return err[0]

    err = one_error(run(1, [*flags, "--train-iters", "4", "--use-distributed-optimizer", "--load", str(save)]))
    assert str(shard) in err and "truncated" in err and "--load-iteration" in err and "[1, 2]" in err, err
    # a checkpoint of the distributed optimizer, resumed without it (the states differ in form)
    err = one_error(run(1, [*flags, "--train-iters", "4", "--load", str(save), "--load-iteration", "2"]))
    assert "saved with --use-distributed-optimizer; resume with it, or pass --finetune" in err, err
    proc = run(1, [*flags, "--load", str(save), "--load-iteration", "2", "--finetune",
                   "--metrics-file", str(tmp_path / "ft.jsonl")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(losses(tmp_path / "ft.jsonl")) == [1, 2, 3]
