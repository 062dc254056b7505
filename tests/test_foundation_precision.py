"""fp16 skips a step whose gradients overflow and lowers the loss scale, but stops on a loss that
is not finite (on any rank); bf16 trains (all on CPU)."""

import math

from spawn import run_ranks


def _train(rank, world, precision, overflow_at, iters, nan_loss_at=None):
    from megatron.emdr2.config import BatchConfig, PrecisionConfig, OptimizerSettings, ScheduleConfig, TrainingConfig, LoggingConfig
    from megatron.emdr2.initialize import initialize, shutdown
    from megatron.emdr2.training.loop import Trainer
    from tasks.bert_mlm import TINY, SyntheticMLMTask

    cfg = TrainingConfig(
        precision=PrecisionConfig(precision, initial_loss_scale=2.0**10, hysteresis=1),
        optimizer=OptimizerSettings(lr=3e-3, weight_decay=0.0),
        schedule=ScheduleConfig(train_iters=iters, lr_warmup_fraction=None, lr_decay_style="constant"),
        batch=BatchConfig(micro_batch_size=8 // world, global_batch_size=8),
        logging=LoggingConfig(log_interval=1000, progress_bar=False),
    )
    initialize(seed=cfg.seed)
    try:
        task = SyntheticMLMTask(TINY, cfg, num_samples=8, overflow_at=overflow_at,  # one batch, memorised
                                nan_loss_at=nan_loss_at if rank == world - 1 else None)
        trainer = Trainer(task, cfg)
        dtypes = {p.dtype for p in trainer.models["bert"].parameters()}
        state = trainer.train()
        return dtypes, state.history
    finally:
        shutdown()


def test_fp16_overflow_skips_step_and_lowers_scale_and_bf16_trains():
    import torch

    (fp16_dtypes, fp16), = run_ranks(_train, 1, "fp16", 3, 6)
    assert fp16_dtypes == {torch.float16}
    skipped = [h["iteration"] for h in fp16 if h["skipped"]]
    assert skipped == [3]
    assert fp16[1]["loss_scale"] == 2.0**10 and fp16[2]["loss_scale"] == 2.0**9
    assert math.isfinite(fp16[2]["loss"])  # the gradients overflowed, not the loss
    assert math.isnan(fp16[2]["grad_norm"])  # no update happened
    finite = [h["loss"] for h in fp16 if not h["skipped"]]
    assert finite[-1] < finite[0]

    (bf16_dtypes, bf16), = run_ranks(_train, 1, "bf16", None, 12)
    assert bf16_dtypes == {torch.bfloat16}
    assert not any(h["skipped"] for h in bf16)
    assert bf16[-1]["loss"] < 0.8 * bf16[0]["loss"], [h["loss"] for h in bf16]


def _diverge(rank, world):
    from megatron.emdr2.training.loop import TrainingDiverged

    try:
        _train(rank, world, "fp16", None, 4, nan_loss_at=2)  # the last rank's loss is NaN at step 2
    except TrainingDiverged as e:
        return str(e)
    return None


def test_fp16_stops_on_a_non_finite_loss_on_any_rank():
    """Loss scaling mends overflowing gradients, never a NaN loss: every rank stops, before the
    step is applied, with the one-line error (not a silently skipped step)."""
    other, this = run_ranks(_diverge, 2, timeout=120)
    assert other and this, (other, this)
    assert other.startswith("iteration 2: the loss is not finite (") and "on another rank" in other, other
    assert this.startswith("iteration 2: the loss is not finite (nan) on this rank"), this
