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
                       training_world: Callable[[argparse.Namespace, int], int] = lambda a, world: world,
                       ) -> tuple[argparse.Namespace, TrainingConfig]:
    """``training_world(args, world)``: how many of the launched ranks train (the rest may index)."""
    args = parser.parse_args(argv)
    cfg = training_config_from_args(args)
    try:
        world = training_world(args, world_size_from_env())
        if world < 1:
            raise ConfigError("no rank is left to train")
        validate(cfg, world, list(model_sizes(args)), list(paths(args)))
    except ConfigError as e:
        fail(str(e), parser.prog)
    from megatron.emdr2.autocast import announce

    announce()  # --autocast auto's choice, once the command is known to run
    return args, cfg


def start(cfg: TrainingConfig):
    """Distributed init, megatron-core groups and seeds for a validated config."""
    from megatron.emdr2.initialize import initialize

    return initialize(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.seed)


def _user_errors() -> tuple:
    """Errors about the user's inputs: reported as one line, not a traceback."""
    from megatron.emdr2.data.errors import DataError
    from megatron.emdr2.index.shard_store import IndexStoreError
    from megatron.emdr2.openqa.builders import PretrainedError
    from megatron.emdr2.training.checkpointing import CheckpointError
    from megatron.emdr2.training.loop import TrainingDiverged

    return (ConfigError, DataError, IndexStoreError, PretrainedError, CheckpointError, TrainingDiverged)


def run(task_factory: Callable[[], object], cfg: TrainingConfig, started: bool = False):
    """Train a task built after start-up; always shut the process group down.

    ``started``: the caller has already initialised distributed state (e.g. as a trainer role).
    """
    from megatron.emdr2.initialize import shutdown
    from megatron.emdr2.training.loop import Trainer

    if not started:
        start(cfg)
    try:
        trainer = Trainer(task_factory(), cfg)
        return trainer.train()
    except _user_errors() as e:
        fail(str(e))
    finally:
        shutdown()
