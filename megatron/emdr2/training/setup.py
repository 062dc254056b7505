"""Wrap a task's models for training: precision, megatron-core DDP, optimizer, LR schedule."""

from __future__ import annotations

from typing import Mapping

import torch

from megatron.emdr2.config import TrainingConfig


def has_trainable_params(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def cast_to_precision(module: torch.nn.Module, cfg: TrainingConfig) -> torch.nn.Module:
    """Half-precision parameters for fp16/bf16 (the optimizer keeps fp32 master copies).

    Unlike megatron's Float16Module we cast the module itself, so tasks can call any of its
    methods (``embed_queries``, ``encode``...) and not only ``forward``.
    """
    if cfg.precision.fp16:
        module.half()
    elif cfg.precision.bf16:
        module.bfloat16()
    if torch.cuda.is_available():
        module.cuda()
    return module


def wrap_ddp(module: torch.nn.Module, cfg: TrainingConfig):
    """megatron-core DDP: gradients accumulate in fp32 buffers and are averaged over DP ranks."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.utils import get_model_config

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    return DistributedDataParallel(get_model_config(module), ddp_config, module)


def build_optimizer(ddp_models: list, cfg: TrainingConfig):
    """megatron-core's optimizer: AdamW (decoupled weight decay), fp16 dynamic loss scaling
    (overflowing steps are skipped), bf16 with fp32 master weights, global-norm clipping."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o, p = cfg.optimizer, cfg.precision
    config = OptimizerConfig(
        optimizer=o.optimizer,
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        fp16=p.fp16,
        bf16=p.bf16,
        params_dtype=p.params_dtype,
        loss_scale=p.loss_scale,
        initial_loss_scale=p.initial_loss_scale,
        min_loss_scale=p.min_loss_scale,
        loss_scale_window=p.loss_scale_window,
        hysteresis=p.hysteresis,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, ddp_models)


def build_scheduler(optimizer, cfg: TrainingConfig):
    """Linear (or cosine) warm-up then decay, megatron-core's scheduler (resumable state)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    s, o = cfg.schedule, cfg.optimizer
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=s.warmup_steps(),
        lr_decay_steps=max(s.decay_steps(), 1),
        lr_decay_style=s.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(s.decay_steps(), 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )


def prepare_models(models: Mapping[str, torch.nn.Module], cfg: TrainingConfig):
    """Cast every model; DDP-wrap those with trainable parameters.

    Returns (models, ddp_models): the former maps names to the (cast) modules that tasks call,
    the latter lists the DDP wrappers the optimizer steps.
    """
    cast = {name: cast_to_precision(m, cfg) for name, m in models.items()}
    ddp = [wrap_ddp(m, cfg) for m in cast.values() if has_trainable_params(m)]
    if not ddp:
        raise ValueError("no trainable parameters: every model is frozen")
    return cast, ddp
