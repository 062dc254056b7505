"""Typed configuration, one dataclass per concern, passed down explicitly.

Nothing here is global: `arguments.parse_training_args` builds a `TrainingConfig` from flags
and the caller hands the parts to whoever needs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

PRECISIONS = ("fp32", "fp16", "bf16")


class ConfigError(ValueError):
    """A bad flag or combination of flags; its message is one line meant for the user."""


RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
# megatron-core's selective-recompute modules that exist in a dense (non-MoE, non-MLA) layer.
# Not "layernorm": megatron-core 0.16's CheckpointWithoutOutput takes its fp8 path whenever
# TransformerEngine is absent (``self.fp8 = fp8 is not None``) and fails with a NameError.
RECOMPUTE_MODULES = ("core_attn", "mlp")


def recompute_flags(num_layers: int, granularity: Optional[str] = None, method: Optional[str] = None,
                    recompute_num_layers: Optional[int] = None,
                    modules: Optional[Sequence[str]] = None) -> dict:
    """megatron-core's activation-recompute settings for one stack of ``num_layers`` layers.

    granularity None: keep every activation (the default). "selective": recompute the
    ``modules`` of every layer in backward (default ``("core_attn",)``: the attention scores and
    probabilities, the largest activations at long sequences). "full": keep only the input of
    each chunk of layers and recompute the chunk in backward; ``method`` "uniform" checkpoints
    chunks of ``recompute_num_layers`` layers (it must divide ``num_layers``; a larger value
    means one chunk of the whole stack), "block" recomputes the first ``recompute_num_layers``
    layers only (more is all of them). Dropout masks are reproduced (megatron's RNG tracker),
    so gradients equal those without recompute. Only training forward passes recompute; a
    bad combination raises ValueError with a one-line message.
    """
    if granularity is None:
        given = [flag for flag, value in (("--recompute-method", method), ("--recompute-num-layers",
                 recompute_num_layers), ("--recompute-modules", modules or None)) if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} need{'s' if len(given) == 1 else ''} "
                             f"--recompute-granularity (or --recompute-activations)")
        return {}
    if granularity not in RECOMPUTE_GRANULARITIES:
        raise ValueError(f"--recompute-granularity must be one of {', '.join(RECOMPUTE_GRANULARITIES)}, "
                         f"got {granularity!r}")
    if granularity == "selective":
        if method is not None or recompute_num_layers is not None:
            raise ValueError("--recompute-method and --recompute-num-layers apply to "
                             "--recompute-granularity full only (selective recomputes every layer)")
        modules = list(modules or ("core_attn",))
        bad = sorted(set(modules) - set(RECOMPUTE_MODULES))
        if bad:
            raise ValueError(f"--recompute-modules {' '.join(bad)}: not one of {', '.join(RECOMPUTE_MODULES)}")
        return dict(recompute_granularity="selective", recompute_modules=modules)
    if modules:
        raise ValueError("--recompute-modules applies to --recompute-granularity selective only")
    if method not in RECOMPUTE_METHODS:
        raise ValueError("--recompute-granularity full needs --recompute-method uniform or block")
    if recompute_num_layers is None:
        recompute_num_layers = 1
    if recompute_num_layers < 1:
        raise ValueError(f"--recompute-num-layers must be >= 1, got {recompute_num_layers}")
    chunk = min(recompute_num_layers, num_layers)
    if method == "uniform" and num_layers % chunk:
        raise ValueError(f"--recompute-method uniform: --recompute-num-layers {recompute_num_layers} "
                         f"does not divide a stack of {num_layers} layers")
    return dict(recompute_granularity="full", recompute_method=method, recompute_num_layers=chunk)


@dataclass
class ModelSize:
    """Size of one transformer (a retriever tower or the reader)."""

    num_layers: int = 12
    hidden_size: int = 768
    num_attention_heads: int = 12
    ffn_hidden_size: Optional[int] = None  # default 4 * hidden_size
    seq_length: int = 512
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layernorm_epsilon: Optional[float] = None  # None: the model family's default
    # Original-BERT (post-LN) residual ordering: towers, or the reader's encoder, that start
    # from a Hugging Face BERT checkpoint need it.
    post_layernorm: bool = False
    # A retriever tower's text vector: "cls" (the paper's) or "weighted-mean" (models/bert_tower.py).
    pooling: str = "cls"
    decoder_num_layers: Optional[int] = None  # the reader's decoder depth (default num_layers)
    copy_head: bool = False  # the reader mixes in a copy distribution (models/copy_head.py)
    copy_continuation: bool = False  # ... with the span-continuation bias (models/copy_head.py)
    # Activation recompute (``recompute_flags``; off by default): applied to every stack of
    # this model, in training forward passes only.
    recompute_granularity: Optional[str] = None  # full | selective
    recompute_method: Optional[str] = None  # uniform | block (full only)
    recompute_num_layers: Optional[int] = None  # full only (default 1)
    recompute_modules: Optional[list] = None  # selective only (default ["core_attn"])

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def recompute(self) -> dict:
        """The recompute settings as keyword arguments of ``models.config.transformer_config``."""
        return dict(recompute_granularity=self.recompute_granularity, recompute_method=self.recompute_method,
                    recompute_num_layers=self.recompute_num_layers, recompute_modules=self.recompute_modules)

    def check_recompute(self) -> None:
        """ValueError (one line) if the recompute settings do not fit this model's stacks."""
        for layers in dict.fromkeys((self.num_layers, self.decoder_num_layers or self.num_layers)):
            recompute_flags(layers, self.recompute_granularity, self.recompute_method,
                            self.recompute_num_layers, self.recompute_modules)


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    use_distributed_optimizer: bool = False


@dataclass
class PrecisionConfig:
    precision: str = "fp32"  # fp32 | fp16 | bf16
    initial_loss_scale: float = 2.0**16
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2
    loss_scale: Optional[float] = None  # constant scale instead of dynamic
    # "bf16": forward passes under torch.autocast with fp32 weights and optimizer (fast bf16
    # matrix multiplies on CPUs with AMX/AVX512-BF16). The flag's "auto" is resolved to "none" or
    # "bf16" for this machine before a config is built (megatron/emdr2/autocast.py).
    autocast: str = "none"

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        from megatron.emdr2.autocast import AUTOCAST_DTYPES

        return AUTOCAST_DTYPES[self.autocast]

    @property
    def fp16(self) -> bool:
        return self.precision == "fp16"

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def params_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]


@dataclass
class OptimizerSettings:
    optimizer: str = "adam"  # adam (decoupled weight decay, i.e. AdamW) | sgd
    lr: float = 2e-5
    min_lr: float = 0.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class ScheduleConfig:
    train_iters: int = 1000
    lr_warmup_fraction: Optional[float] = 0.01
    lr_warmup_iters: int = 0
    lr_decay_style: str = "linear"  # linear | cosine | constant
    lr_decay_iters: Optional[int] = None  # default train_iters

    def warmup_steps(self) -> int:
        if self.lr_warmup_fraction is not None:
            return int(self.lr_warmup_fraction * self.decay_steps())
        return self.lr_warmup_iters

    def decay_steps(self) -> int:
        return self.lr_decay_iters or self.train_iters


@dataclass
class BatchConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 8

    def num_micro_batches(self, data_parallel_size: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * data_parallel_size)


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    load: Optional[str] = None
    load_iteration: Optional[int] = None  # default: the `latest` pointer
    save_interval: Optional[int] = None
    keep_last: Optional[int] = None  # prune older checkpoints, keeping this many (and the best)
    finetune: bool = False  # load model weights only: fresh optimizer, schedule and data position
    # Save and stop early (exit status 0) so a scheduler's time limit never kills a run mid-step:
    # at iterations divisible by exit_interval, or once the run has lasted exit_duration_mins.
    exit_interval: Optional[int] = None
    exit_duration_mins: Optional[float] = None


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard_dir: Optional[str] = None
    metrics_file: Optional[str] = None  # JSON lines, one per iteration (default: <save>/metrics.jsonl)
    eval_interval: Optional[int] = None
    progress_bar: bool = True


@dataclass
class TrainingConfig:
    seed: int = 1234
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deterministic: bool = False
