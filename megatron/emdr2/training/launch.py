"""Entry-point plumbing shared by every task's `main()`.

parse flags -> validate (one-line errors, before any work) -> distributed start-up -> seed ->
build the task -> train -> clean shutdown.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Iterable, Optional, Sequence

from megatron.emdr2.arguments import fail, training_config_from_args, validate, world_size_from_env
from megatron.emdr2.config import ConfigError, ModelSize, TrainingConfig


def parse_and_validate(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None,
                       model_sizes: Callable[[argparse.Namespace], Iterable[ModelSize]] = lambda a: (),
                       paths: Callable[[argparse.Namespace], Iterable[tuple]] = lambda a: (),
                       ) -> tuple[argparse.Namespace, TrainingConfig]:
    args = parser.parse_args(argv)
    cfg = training_config_from_args(args)
    try:
        validate(cfg, world_size_from_env(), list(model_sizes(args)), list(paths(args)))
    except ConfigError as e:
        fail(str(e), parser.prog)
    return args, cfg


def start(cfg: TrainingConfig):
    """Distributed init, megatron-core groups and seeds for a validated config."""
    from megatron.emdr2.initialize import initialize

    return initialize(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.seed)


def run(task_factory: Callable[[], object], cfg: TrainingConfig):
    """Train a task built after start-up; always shut the process group down."""
    from megatron.emdr2.initialize import shutdown
    from megatron.emdr2.training.checkpointing import CheckpointError
    from megatron.emdr2.training.loop import Trainer

    start(cfg)
    try:
        trainer = Trainer(task_factory(), cfg)
        return trainer.train()
    except CheckpointError as e:
        fail(str(e))
    finally:
        shutdown()
