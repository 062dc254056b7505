"""megatron-core's torch AdamW fallback runs torch's fused kernel (training/setup.use_fused_adam):
the same weights as the per-tensor loop it replaces (5x slower on a CPU), and still fused after a
checkpoint's param groups are loaded."""

from spawn import run_ranks


def _train(rank, world, save, load, fused):
    import torch

    from megatron.emdr2.config import (BatchConfig, CheckpointConfig, LoggingConfig, OptimizerSettings,
                                       ScheduleConfig, TrainingConfig)
    from megatron.emdr2.initialize import initialize, shutdown
    from megatron.emdr2.training.loop import Trainer
    from megatron.emdr2.training.setup import _torch_adams
    from tasks.bert_mlm import TINY, SyntheticMLMTask

    cfg = TrainingConfig(
        optimizer=OptimizerSettings(lr=1e-3, weight_decay=0.1),
        schedule=ScheduleConfig(train_iters=4 if load else 2, lr_warmup_fraction=None, lr_decay_style="constant"),
        batch=BatchConfig(micro_batch_size=8, global_batch_size=8),
        logging=LoggingConfig(log_interval=1000, progress_bar=False),
        checkpoint=CheckpointConfig(save=save, load=load, save_interval=2),
    )
    initialize(seed=cfg.seed)
    try:
        trainer = Trainer(SyntheticMLMTask(TINY, cfg, num_samples=32), cfg)
        if not fused:
            for inner in _torch_adams(trainer.optimizer):
                for group in inner.param_groups:
                    group["fused"], group["foreach"] = None, False
        trainer.train()
        flags = {(g["fused"], g["foreach"]) for inner in _torch_adams(trainer.optimizer) for g in inner.param_groups}
        weights = torch.cat([p.detach().flatten() for p in trainer.models["bert"].parameters()])
        return flags, weights
    finally:
        shutdown()


def test_fused_adamw_matches_the_per_tensor_loop_and_survives_a_resume(tmp_path):
    (fused,) = run_ranks(_train, 1, str(tmp_path / "a"), None, True)
    (loop,) = run_ranks(_train, 1, str(tmp_path / "b"), None, False)
    assert fused[0] == {(True, False)}
    assert loop[0] == {(None, False)}
    assert (fused[1] - loop[1]).abs().max().item() < 1e-6
    # Resume from the per-tensor run's checkpoint: its groups say fused=None; the loaded run is fused.
    (resumed,) = run_ranks(_train, 1, str(tmp_path / "b"), str(tmp_path / "b"), True)
    assert resumed[0] == {(True, False)}
