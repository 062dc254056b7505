"""Per-model / per-prefix learning-rate factors become megatron-core param groups that follow
the schedule scaled, and the tagged parameters really move by less."""

from spawn import run_ranks


def _train(rank, world, multipliers):
    import torch

    from megatron.emdr2.config import (BatchConfig, LoggingConfig, OptimizerSettings, ScheduleConfig,
                                       TrainingConfig)
    from megatron.emdr2.initialize import initialize, shutdown
    from megatron.emdr2.training.loop import Trainer
    from tasks.bert_mlm import TINY, SyntheticMLMTask

    class Task(SyntheticMLMTask):
        def lr_multipliers(self):
            return multipliers

    cfg = TrainingConfig(
        optimizer=OptimizerSettings(lr=1e-3, weight_decay=0.0),
        schedule=ScheduleConfig(train_iters=3, lr_warmup_fraction=None, lr_decay_style="constant"),
        batch=BatchConfig(micro_batch_size=8, global_batch_size=8),
        logging=LoggingConfig(log_interval=1000, progress_bar=False),
    )
    initialize(seed=cfg.seed)
    try:
        trainer = Trainer(Task(TINY, cfg, num_samples=8), cfg)
        model = trainer.models["bert"]
        before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        trainer.train()
        lrs = {}
        for group in trainer.optimizer.param_groups:
            for p in group["params"]:
                lrs[id(p)] = group["lr"]
        moved, lr_of = {}, {}
        for n, p in model.named_parameters():
            moved[n] = (p.detach().float() - before[n]).abs().max().item()
            lr_of[n] = lrs.get(id(p))
        return moved, lr_of
    finally:
        shutdown()


def test_lr_multiplier_groups():
    (result,) = run_ranks(_train, 1, {"bert:embedding.": 0.01})
    moved, lr_of = result
    emb = "embedding.word_embeddings.weight"
    layer = "encoder.layers.0.self_attention.linear_qkv.weight"
    assert abs(lr_of[emb] - 1e-5) < 1e-12 and abs(lr_of[layer] - 1e-3) < 1e-12
    # Adam's first steps move each weight by about lr: the tagged table moves ~100x less
    assert moved[emb] < 0.05 * moved[layer], (moved[emb], moved[layer])


def test_unknown_model_in_lr_multipliers_is_refused():
    import pytest

    from megatron.emdr2.training.setup import mark_lr_groups

    with pytest.raises(ValueError, match="unknown model 'retriever'"):
        mark_lr_groups({"reader": None}, {"retriever": 0.5})
