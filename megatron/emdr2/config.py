"""Typed configuration, one dataclass per concern, passed down explicitly.

Nothing here is global: `arguments.parse_training_args` builds a `TrainingConfig` from flags
and the caller hands the parts to whoever needs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

PRECISIONS = ("fp32", "fp16", "bf16")


class ConfigError(ValueError):
    """A bad flag or combination of flags; its message is one line meant for the user."""


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
    decoder_num_layers: Optional[int] = None  # the reader's decoder depth (default num_layers)
    copy_head: bool = False  # the reader mixes in a copy distribution (models/copy_head.py)
    copy_continuation: bool = False  # ... with the span-continuation bias (models/copy_head.py)

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size


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
    # matrix multiplies on CPUs with AMX/AVX512-BF16; see megatron/emdr2/autocast.py).
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
