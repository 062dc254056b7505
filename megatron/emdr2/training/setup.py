"""Wrap a task's models for training: precision, megatron-core DDP, optimizer, LR schedule."""

from __future__ import annotations

from typing import Optional, Mapping

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
    return to_compute_device(module)


def to_compute_device(module: torch.nn.Module) -> torch.nn.Module:
    """Every model every role builds (trainers, indexers, inference) goes through here, so that
    none is left on the host while a GPU waits (``module.to`` keeps the Parameter objects and
    so their lr-group tags). Looked up at call time: tests patch ``loop.compute_device``."""
    from megatron.emdr2.training import loop

    return module.to(loop.compute_device())


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


LR_GROUP_ATTR = "emdr2_lr_group"  # marks the parameters of a model with its own lr factor


def mark_lr_groups(models: dict, multipliers: Optional[dict]) -> dict:
    """Tag parameters so that the optimizer puts them in their own param group.

    ``multipliers`` maps ``"model"`` or ``"model:prefix1,prefix2"`` (parameter-name prefixes
    within that model) to an lr factor; a parameter takes the first entry that matches it.
    Returns {tag: factor} for ``build_optimizer``.
    """
    groups, tagged = {}, set()
    for i, (key, factor) in enumerate((multipliers or {}).items()):
        name, _, prefixes = key.partition(":")
        if name not in models:
            raise ValueError(f"lr multiplier for unknown model {name!r} (models: {sorted(models)})")
        prefixes = tuple(p for p in prefixes.split(",") if p)
        tag = f"{LR_GROUP_ATTR}_{i}"
        for pname, p in models[name].named_parameters():
            if id(p) in tagged or (prefixes and not pname.startswith(prefixes)):
                continue
            tagged.add(id(p))
            if factor != 1.0:
                setattr(p, tag, True)
        if factor != 1.0:
            groups[tag] = float(factor)
    return groups


def build_optimizer(ddp_models: list, cfg: TrainingConfig, lr_groups: Optional[dict] = None):
    """megatron-core's optimizer: AdamW (decoupled weight decay), fp16 dynamic loss scaling
    (overflowing steps are skipped), bf16 with fp32 master weights, global-norm clipping.
    ``lr_groups`` ({parameter tag: factor}, from ``mark_lr_groups``) scale the max and min lr of
    the tagged parameters through megatron-core's param-group overrides."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer import get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import ParamKey

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
    overrides = None
    if lr_groups:
        overrides = get_standard_config_overrides(config)  # keeps no weight decay on biases/norms
        for tag, factor in lr_groups.items():
            # megatron-core's scheduler ignores lr_mult, but its optimizer matches a checkpoint's
            # param groups to this run's by (wd_mult, lr_mult, ...): without a distinct lr_mult,
            # groups differing only in max_lr collide and resuming fails.
            overrides[ParamKey(attr=tag)] = {"max_lr": o.lr * factor, "min_lr": o.min_lr * factor,
                                             "lr_mult": float(factor)}
    optimizer = get_megatron_optimizer(config, ddp_models, config_overrides=overrides)
    use_fused_adam(optimizer)
    return optimizer


def _torch_adams(optimizer):
    """The torch Adam/AdamW instances inside megatron-core's (possibly chained) optimizer."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Adam):  # AdamW is a subclass; TE/apex optimizers are not
            yield inner


def use_fused_adam(optimizer) -> None:
    """Switch megatron-core's torch AdamW fallback (used without TransformerEngine/apex) to torch's
    fused kernel wherever every parameter allows it (fp32 on CPU or CUDA). Its default on a CPU is
    the per-tensor loop, 5.4x slower for the quickstart's 41M parameters (170 vs 32 ms a step,
    bench/bench_cpu_attention.py --optimizer). Called again after a checkpoint's param groups are
    loaded, since loading replaces the groups' flags with the saved ones."""
    for inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            ok = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in group["params"])
            if ok and not group.get("capturable") and not group.get("differentiable"):
                group["fused"], group["foreach"] = True, False


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
