"""Megatron-style command-line flags, turned into the typed configs of `config.py`.

Each task builds one parser from the shared groups below plus its own flags, then calls
`training_config_from_args` and `validate`. Every problem is reported as a single line
(`<prog>: error: ...`) and exit status 2 before any work starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Iterable, Optional, Sequence

from megatron.emdr2.config import (
    PRECISIONS,
    RECOMPUTE_GRANULARITIES,
    RECOMPUTE_METHODS,
    RECOMPUTE_MODULES,
    BatchConfig,
    CheckpointConfig,
    ConfigError,
    LoggingConfig,
    ModelSize,
    OptimizerSettings,
    ParallelConfig,
    PrecisionConfig,
    ScheduleConfig,
    TrainingConfig,
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with errors reduced to one line (no usage dump), so a bad flag is obvious."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(message: str, prog: Optional[str] = None) -> "NoReturn":  # type: ignore[name-defined]
    prog = prog or os.path.splitext(os.path.basename(sys.argv[0]))[0]  # "emdr2" for python -m tasks.openqa.emdr2
    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(2)


def add_model_size_args(parser: argparse.ArgumentParser, prefix: str, defaults: ModelSize,
                        title: Optional[str] = None) -> None:
    """Flags --{prefix}-num-layers, --{prefix}-hidden-size, ... for one transformer."""
    g = parser.add_argument_group(title or f"{prefix} model")
    p = f"--{prefix}-" if prefix else "--"
    g.add_argument(f"{p}num-layers", type=int, default=defaults.num_layers)
    g.add_argument(f"{p}hidden-size", type=int, default=defaults.hidden_size)
    g.add_argument(f"{p}num-attention-heads", type=int, default=defaults.num_attention_heads)
    g.add_argument(f"{p}ffn-hidden-size", type=int, default=defaults.ffn_hidden_size)
    g.add_argument(f"{p}seq-length", type=int, default=defaults.seq_length)
    g.add_argument(f"{p}hidden-dropout", type=float, default=defaults.hidden_dropout)
    g.add_argument(f"{p}attention-dropout", type=float, default=defaults.attention_dropout)
    if prefix == "retriever":
        g.add_argument("--retriever-pooling", choices=("cls", "weighted-mean"), default=None,
                       help="a text's vector: the [CLS] state (default, the paper's) or the token "
                            "states' mean weighted by a learned weight per vocabulary entry, scaled to "
                            "length sqrt(hidden) (scores = sqrt(hidden) x cosine); a checkpoint given "
                            "to --retriever-load keeps the pooling it was trained with")


def model_size_from_args(args: argparse.Namespace, prefix: str) -> ModelSize:
    a = (prefix.replace("-", "_") + "_") if prefix else ""
    return ModelSize(
        num_layers=getattr(args, f"{a}num_layers"),
        hidden_size=getattr(args, f"{a}hidden_size"),
        num_attention_heads=getattr(args, f"{a}num_attention_heads"),
        ffn_hidden_size=getattr(args, f"{a}ffn_hidden_size"),
        seq_length=getattr(args, f"{a}seq_length"),
        hidden_dropout=getattr(args, f"{a}hidden_dropout"),
        attention_dropout=getattr(args, f"{a}attention_dropout"),
        **({"pooling": args.retriever_pooling} if prefix == "retriever" and getattr(args, "retriever_pooling", None)
           else {}),
        **recompute_from_args(args, prefix),
    )


def add_recompute_args(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's activation-recompute flags (every training task; see ``config.recompute_flags``)."""
    g = parser.add_argument_group("activation recompute (trade compute for activation memory)")
    g.add_argument("--recompute-activations", action="store_true",
                   help="selective recompute of the attention core (= --recompute-granularity selective): "
                        "the [B, heads, S, S] scores and probabilities are recomputed in backward")
    g.add_argument("--recompute-granularity", default=None, choices=RECOMPUTE_GRANULARITIES,
                   help="full: keep only each chunk's input and recompute whole layers in backward "
                        "(needs --recompute-method); selective: recompute --recompute-modules only")
    g.add_argument("--recompute-method", default=None, choices=RECOMPUTE_METHODS,
                   help="with full: uniform (checkpoint chunks of --recompute-num-layers layers) or "
                        "block (recompute only the first --recompute-num-layers layers of each stack)")
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="with full: layers per chunk (uniform; must divide each stack's depth) or "
                        "layers recomputed (block); default 1")
    g.add_argument("--recompute-modules", nargs="+", default=None, choices=RECOMPUTE_MODULES,
                   help="with selective: which parts of each layer to recompute (default core_attn)")
    g.add_argument("--checkpoint-activations", action="store_true",
                   help="the original EMDR²/Megatron flag: full recompute of every layer "
                        "(= --recompute-granularity full --recompute-method uniform --recompute-num-layers 1)")


def recompute_from_args(args: argparse.Namespace, prefix: str) -> dict:
    """ModelSize's recompute fields for model ``prefix`` (e.g. "reader"): the --recompute-* flags,
    unless --recompute-models leaves the model out. Contradicting flags raise ConfigError."""
    granularity = getattr(args, "recompute_granularity", None)
    method = getattr(args, "recompute_method", None)
    num_layers = getattr(args, "recompute_num_layers", None)
    modules = getattr(args, "recompute_modules", None)
    if getattr(args, "recompute_activations", False):
        if granularity == "full":
            raise ConfigError("--recompute-activations (selective recompute) contradicts "
                              "--recompute-granularity full; give one of them")
        granularity = "selective"
    if getattr(args, "checkpoint_activations", False):
        if granularity == "selective":
            raise ConfigError("--checkpoint-activations (full recompute) contradicts --recompute-activations / "
                              "--recompute-granularity selective; give one of them")
        granularity, method = "full", method or "uniform"
    only = getattr(args, "recompute_models", None)
    if only is not None:
        if granularity is None:
            raise ConfigError("--recompute-models needs --recompute-activations or --recompute-granularity")
        if prefix not in only:
            return {}
    return dict(recompute_granularity=granularity, recompute_method=method, recompute_num_layers=num_layers,
                recompute_modules=list(modules) if modules else None)


def add_autocast_arg(group, default: str | None = None) -> None:
    """``--autocast``, default auto; ``EMDR2_AUTOCAST`` changes the default (the test suite sets
    it to none, so that its numbers do not depend on the CPU that runs it)."""
    from megatron.emdr2.autocast import AUTOCAST_CHOICES

    if default is None:
        default = os.environ.get("EMDR2_AUTOCAST") or "auto"
        if default not in AUTOCAST_CHOICES:
            raise ConfigError(f"EMDR2_AUTOCAST={default!r} is not one of {', '.join(AUTOCAST_CHOICES)}")
    group.add_argument("--autocast", default=default, choices=list(AUTOCAST_CHOICES),
                       help="auto (default): bf16 matrix multiplies with fp32 weights where this CPU "
                            "runs bf16 natively and faster (AMX/AVX512-BF16, measured at start-up), "
                            "fp32 elsewhere and on GPUs (use --bf16 there); bf16 / none force it "
                            "(see megatron/emdr2/autocast.py, bench/bench_autocast.py)")


def add_training_args(parser: argparse.ArgumentParser, defaults: Optional[TrainingConfig] = None) -> None:
    """Flags shared by every task: parallelism, precision, optimiser, schedule, batch, checkpoints, logs."""
    d = defaults or TrainingConfig()

    g = parser.add_argument_group("distributed")
    g.add_argument("--tensor-model-parallel-size", type=int, default=d.parallel.tensor_parallel)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=d.parallel.pipeline_parallel)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (torch.use_deterministic_algorithms)")

    g = parser.add_argument_group("precision")
    g.add_argument("--precision", default=d.precision.precision,
                   help=f"one of {', '.join(PRECISIONS)}")
    g.add_argument("--fp16", action="store_const", const="fp16", dest="precision")
    g.add_argument("--bf16", action="store_const", const="bf16", dest="precision")
    add_autocast_arg(g)
    g.add_argument("--initial-loss-scale", type=float, default=d.precision.initial_loss_scale)
    g.add_argument("--min-loss-scale", type=float, default=d.precision.min_loss_scale)
    g.add_argument("--loss-scale-window", type=int, default=d.precision.loss_scale_window)
    g.add_argument("--hysteresis", type=int, default=d.precision.hysteresis)
    g.add_argument("--loss-scale", type=float, default=d.precision.loss_scale,
                   help="constant loss scale (fp16); dynamic scaling when unset")

    g = parser.add_argument_group("optimizer")
    g.add_argument("--optimizer", default=d.optimizer.optimizer, choices=["adam", "sgd"])
    g.add_argument("--lr", type=float, default=d.optimizer.lr)
    g.add_argument("--min-lr", type=float, default=d.optimizer.min_lr)
    g.add_argument("--weight-decay", type=float, default=d.optimizer.weight_decay)
    g.add_argument("--adam-beta1", type=float, default=d.optimizer.adam_beta1)
    g.add_argument("--adam-beta2", type=float, default=d.optimizer.adam_beta2)
    g.add_argument("--adam-eps", type=float, default=d.optimizer.adam_eps)
    g.add_argument("--clip-grad", type=float, default=d.optimizer.clip_grad)

    g = parser.add_argument_group("schedule")
    g.add_argument("--train-iters", type=int, default=d.schedule.train_iters)
    g.add_argument("--lr-warmup-fraction", type=float, default=d.schedule.lr_warmup_fraction)
    g.add_argument("--lr-warmup-iters", type=int, default=d.schedule.lr_warmup_iters,
                   help="used when --lr-warmup-fraction is not given")
    g.add_argument("--lr-decay-style", default=d.schedule.lr_decay_style,
                   choices=["linear", "cosine", "constant"])
    g.add_argument("--lr-decay-iters", type=int, default=d.schedule.lr_decay_iters)

    g = parser.add_argument_group("batch")
    g.add_argument("--micro-batch-size", type=int, default=d.batch.micro_batch_size)
    g.add_argument("--global-batch-size", type=int, default=d.batch.global_batch_size)

    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", default=d.checkpoint.save, help="checkpoint directory to write")
    g.add_argument("--load", default=d.checkpoint.load, help="checkpoint directory to resume from")
    g.add_argument("--load-iteration", type=int, default=d.checkpoint.load_iteration)
    g.add_argument("--save-interval", type=int, default=d.checkpoint.save_interval)
    g.add_argument("--keep-last", type=int, default=d.checkpoint.keep_last,
                   help="keep only the newest N checkpoints (plus the best)")
    g.add_argument("--finetune", action="store_true",
                   help="load model weights only; restart optimiser, schedule and data")
    g.add_argument("--exit-interval", type=int, default=d.checkpoint.exit_interval,
                   help="save and exit (status 0) at iterations divisible by N; rerun with --load to go on")
    g.add_argument("--exit-duration-in-mins", dest="exit_duration_mins", type=float,
                   default=d.checkpoint.exit_duration_mins,
                   help="save and exit (status 0) once the run has lasted this long (e.g. under a SLURM limit)")

    g = parser.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=d.logging.log_interval)
    g.add_argument("--tensorboard-dir", default=d.logging.tensorboard_dir)
    g.add_argument("--metrics-file", default=d.logging.metrics_file)
    g.add_argument("--eval-interval", type=int, default=d.logging.eval_interval)
    g.add_argument("--no-progress-bar", dest="progress_bar", action="store_false")

    add_recompute_args(parser)


def training_config_from_args(args: argparse.Namespace) -> TrainingConfig:
    warmup_fraction = args.lr_warmup_fraction
    if args.lr_warmup_iters and warmup_fraction is not None and "--lr-warmup-fraction" not in sys.argv:
        warmup_fraction = None  # an explicit iteration count wins over the default fraction
    return TrainingConfig(
        seed=args.seed,
        deterministic=args.deterministic,
        parallel=ParallelConfig(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                args.use_distributed_optimizer),
        precision=PrecisionConfig(args.precision, args.initial_loss_scale, args.min_loss_scale,
                                  args.loss_scale_window, args.hysteresis, args.loss_scale,
                                  autocast_choice(args.autocast, args.precision)),
        optimizer=OptimizerSettings(args.optimizer, args.lr, args.min_lr, args.weight_decay,
                                    args.adam_beta1, args.adam_beta2, args.adam_eps, args.clip_grad),
        schedule=ScheduleConfig(args.train_iters, warmup_fraction, args.lr_warmup_iters,
                                args.lr_decay_style, args.lr_decay_iters),
        batch=BatchConfig(args.micro_batch_size, args.global_batch_size),
        checkpoint=CheckpointConfig(args.save, args.load, args.load_iteration, args.save_interval,
                                    args.keep_last, args.finetune, args.exit_interval,
                                    args.exit_duration_mins),
        logging=LoggingConfig(args.log_interval, args.tensorboard_dir, args.metrics_file,
                              args.eval_interval, args.progress_bar),
    )


def autocast_choice(requested: str, precision: str) -> str:
    """``--autocast`` resolved for this machine ("none" or "bf16"); an explicit bf16 under a
    half precision is kept, for ``validate`` to refuse."""
    from megatron.emdr2.autocast import resolve_autocast

    if requested == "bf16" and precision != "fp32":
        return requested
    return resolve_autocast(requested, precision=precision, quiet=True)  # said by autocast.announce()


def validate(cfg: TrainingConfig, world_size: int, models: Sequence[ModelSize] = (),
             existing_paths: Iterable[tuple[str, Optional[str]]] = ()) -> None:
    """Raise ConfigError (one line) for anything that would fail later, before work starts.

    ``existing_paths`` holds (flag, path) pairs that must exist when given.
    """
    if cfg.precision.precision not in PRECISIONS:
        raise ConfigError(f"--precision {cfg.precision.precision!r} is not one of {', '.join(PRECISIONS)}")
    if cfg.precision.autocast != "none" and cfg.precision.precision != "fp32":
        raise ConfigError(f"--autocast {cfg.precision.autocast} runs fp32 weights in lower precision; "
                          f"it cannot be combined with --{cfg.precision.precision}")
    tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    if tp < 1 or pp < 1:
        raise ConfigError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    if pp != 1:
        raise ConfigError("--pipeline-model-parallel-size > 1 is not supported (the towers and "
                          "reader are small enough for tensor parallelism)")
    if world_size % (tp * pp) != 0:
        raise ConfigError(f"--tensor-model-parallel-size {tp} does not divide the world size {world_size}")
    for m in models:
        if m.num_attention_heads % tp != 0:
            raise ConfigError(f"--tensor-model-parallel-size {tp} does not divide the number of "
                              f"attention heads {m.num_attention_heads}")
        if m.hidden_size % m.num_attention_heads != 0:
            raise ConfigError(f"hidden size {m.hidden_size} is not a multiple of the number of "
                              f"attention heads {m.num_attention_heads}")
        try:
            m.check_recompute()
        except ValueError as e:
            raise ConfigError(str(e)) from None
    dp = world_size // (tp * pp)
    b = cfg.batch
    if b.micro_batch_size < 1 or b.global_batch_size < 1:
        raise ConfigError("--micro-batch-size and --global-batch-size must be >= 1")
    if b.global_batch_size % (b.micro_batch_size * dp) != 0:
        raise ConfigError(f"--global-batch-size {b.global_batch_size} is not a multiple of "
                          f"--micro-batch-size {b.micro_batch_size} x data-parallel size {dp}")
    if cfg.schedule.train_iters < 0:
        raise ConfigError("--train-iters must be >= 0")
    warmup, decay = cfg.schedule.warmup_steps(), max(cfg.schedule.decay_steps(), 1)
    if warmup > 0 and warmup >= decay:  # megatron-core's scheduler asserts warm-up < decay
        raise ConfigError(f"--lr-warmup-iters {warmup} must be below the decay length {decay} "
                          f"(--lr-decay-iters, else --train-iters)")
    if cfg.optimizer.lr < 0 or cfg.optimizer.min_lr < 0:
        raise ConfigError("--lr and --min-lr must be >= 0")
    if cfg.checkpoint.keep_last is not None and cfg.checkpoint.keep_last < 1:
        raise ConfigError("--keep-last must be >= 1")
    if (cfg.parallel.use_distributed_optimizer and cfg.optimizer.optimizer != "adam"
            and (cfg.checkpoint.save or (cfg.checkpoint.load and not cfg.checkpoint.finetune))):
        # Its sharded state is saved in megatron-core's dp_zero format, which holds Adam's moments only.
        raise ConfigError(f"--use-distributed-optimizer checkpoints (--save/--load) need --optimizer adam, "
                          f"not {cfg.optimizer.optimizer}")
    if cfg.checkpoint.save_interval is not None and not cfg.checkpoint.save:
        raise ConfigError("--save-interval needs --save DIR")
    if cfg.checkpoint.save and os.path.exists(cfg.checkpoint.save) and not os.path.isdir(cfg.checkpoint.save):
        raise ConfigError(f"--save {cfg.checkpoint.save} is a file, not a checkpoint directory")
    for flag, value in (("--save-interval", cfg.checkpoint.save_interval),
                        ("--exit-interval", cfg.checkpoint.exit_interval),
                        ("--exit-duration-in-mins", cfg.checkpoint.exit_duration_mins)):
        if value is not None and value <= 0:
            raise ConfigError(f"{flag} must be > 0 (got {value})")
    if (cfg.checkpoint.exit_interval or cfg.checkpoint.exit_duration_mins) and not cfg.checkpoint.save:
        raise ConfigError("--exit-interval and --exit-duration-in-mins need --save DIR "
                          "(the run saves before it exits)")
    if cfg.checkpoint.load is not None and not os.path.isdir(cfg.checkpoint.load):
        if not (cfg.checkpoint.save and os.path.abspath(cfg.checkpoint.load) == os.path.abspath(cfg.checkpoint.save)):
            raise ConfigError(f"--load {cfg.checkpoint.load}: no such directory")
    for flag, path in existing_paths:
        if path is not None and not path_exists(path):
            raise ConfigError(f"{flag} {path}: no such file or directory")


def path_exists(path: str) -> bool:
    """A file or directory, or a preprocessed evidence prefix (``P`` of ``P_meta.json``)."""
    return os.path.exists(path) or os.path.exists(f"{path}_meta.json")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
