"""The one training loop every task shares.

Per iteration: this rank's share of the global batch is split into micro-batches; each is run
forward and backward (loss / number of micro-batches, so gradients average over the global
batch once megatron-core DDP has averaged them over data-parallel ranks); then the optimizer
steps (fp16 steps that overflow are skipped and the loss scale drops), the LR schedule
advances, and logging, evaluation and checkpointing happen on their intervals.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from megatron.emdr2.autocast import autocast
from megatron.emdr2.config import ConfigError, TrainingConfig
from megatron.emdr2.training import checkpointing as ckpt
from megatron.emdr2.training.logging import MetricsLogger
from megatron.emdr2.training.setup import (build_optimizer, build_scheduler, mark_lr_groups, prepare_models,
                                           use_fused_adam)
from megatron.emdr2.training.task import Task, optional


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite (in any precision): stop before the step is applied."""


@dataclass
class TrainState:
    iteration: int = 0
    best_score: Optional[float] = None
    best_iteration: Optional[int] = None
    history: list = field(default_factory=list)  # per-iteration metrics of this process's run


def _dp_info():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), ps.get_data_parallel_group()


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _average_over_dp(values: dict[str, float], group) -> dict[str, float]:
    """Average logged scalars over data-parallel ranks (one small all-reduce)."""
    if not values or not torch.distributed.is_initialized():
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if torch.cuda.is_available():
        t = t.cuda()
    torch.distributed.all_reduce(t, group=group)
    t /= torch.distributed.get_world_size(group)
    return dict(zip(keys, t.tolist()))


def _to_float(v) -> float:
    return float(v.detach().float().item()) if torch.is_tensor(v) else float(v)


class Trainer:
    """Builds everything from a task and a config, then `train()`s; usable from tests too."""

    def __init__(self, task: Task, cfg: TrainingConfig):
        from megatron.emdr2.data.samplers import ResumableDistributedSampler

        self.task, self.cfg = task, cfg
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        # --autocast: what the task runs (model building and first index build, forward
        # passes, index refreshes, evaluation) under autocast; backward and optimizer steps not.
        self.autocast = lambda: autocast(compute_device(), cfg.precision.autocast_dtype)
        num_samples = task.num_train_samples()
        if num_samples < cfg.batch.global_batch_size:  # before any model is built
            raise ConfigError(f"--global-batch-size {cfg.batch.global_batch_size} is more than the {num_samples} "
                              "training examples: one optimizer step could never be filled")
        with self.autocast():
            models = task.build_models()
        lr_multipliers = optional(task, "lr_multipliers")
        lr_groups = mark_lr_groups(models, lr_multipliers() if lr_multipliers else None)
        self.models, self.ddp_models = prepare_models(models, cfg)
        self.optimizer = build_optimizer(self.ddp_models, cfg, lr_groups)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.dp_rank, self.dp_size, self.dp_group = _dp_info()
        self.num_micro_batches = cfg.batch.num_micro_batches(self.dp_size)
        self.sampler = ResumableDistributedSampler(
            task.num_train_samples(), cfg.batch.global_batch_size, self.dp_rank, self.dp_size,
            seed=cfg.seed, shuffle=True)
        self.state = TrainState()
        self.exited_early = False
        self._saved_at: Optional[int] = None
        self._started = time.monotonic()
        self.logger = MetricsLogger(cfg.logging, save_dir=cfg.checkpoint.save, enabled=_is_rank0())
        self._maybe_resume()
        on_train_start = optional(task, "on_train_start")
        if on_train_start:  # the weights are final now (resumed or fine-tuned from --load)
            with self.autocast():
                on_train_start(self.models, self.state.iteration)

    # ------------------------------------------------------------------ checkpoints
    def _model_state(self) -> dict:
        state = {
            "iteration": self.state.iteration,
            "models": {name: m.state_dict() for name, m in self.models.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "train_state": {"best_score": self.state.best_score, "best_iteration": self.state.best_iteration},
        }
        task_state = optional(self.task, "state_dict")
        if task_state:
            state["task"] = task_state()
        meta = optional(self.task, "checkpoint_meta")  # e.g. model sizes, for tools that load it
        if meta:
            state["meta"] = meta()
        return state

    def _rank_state(self) -> dict:
        return {"rng": ckpt.get_rng_state(), "sampler": self.sampler.state_dict()}

    def save(self) -> Optional[str]:
        c = self.cfg.checkpoint
        if not c.save:
            return None
        # --use-distributed-optimizer: gathered first (a collective, and it creates the Adam state
        # that state_dict() needs if every step so far was skipped)
        shards = ckpt.gather_optimizer_shards(self.optimizer) if self.cfg.parallel.use_distributed_optimizer else None
        return ckpt.save_checkpoint(c.save, self.state.iteration, self._model_state(), self._rank_state(),
                                    meta={"world_size": torch.distributed.get_world_size()
                                          if torch.distributed.is_initialized() else 1,
                                          "data_parallel_size": self.dp_size,
                                          "distributed_optimizer": self.cfg.parallel.use_distributed_optimizer},
                                    keep_last=c.keep_last, optimizer_shards=shards)

    def _maybe_resume(self) -> None:
        c = self.cfg.checkpoint
        if not c.load:
            return
        distributed = self.cfg.parallel.use_distributed_optimizer
        loaded = ckpt.load_checkpoint(c.load, c.load_iteration, read_optimizer_shards=distributed and not c.finetune)
        if loaded is None:
            self.logger.print(f"no checkpoint in {c.load}; starting from scratch")
            return
        iteration, model_state, rank_state = loaded
        for name, m in self.models.items():
            if name not in model_state["models"]:
                raise ckpt.CheckpointError(f"{c.load}: checkpoint has no model {name!r} "
                                           f"(it has {sorted(model_state['models'])})")
            try:
                m.load_state_dict(model_state["models"][name])
            except RuntimeError as e:  # torch lists every mismatch: the first names the problem
                detail = next((l.strip() for l in str(e).splitlines() if "size mismatch" in l or "Missing" in l
                               or "Unexpected" in l), str(e).splitlines()[0])
                raise ckpt.CheckpointError(
                    f"{ckpt.iteration_dir(c.load, iteration)}: its {name} does not fit the model built from the "
                    f"flags ({detail}); give the sizes it was trained with") from None
        if c.finetune:
            self.optimizer.reload_model_params()
            self.logger.print(f"loaded model weights of iteration {iteration} from {c.load} (finetune)")
            return
        where = ckpt.iteration_dir(c.load, iteration)
        if ("distributed_optimizer" in model_state) != distributed:  # the two optimizer states differ in form
            raise ckpt.CheckpointError(
                f"{where}: saved {'with' if not distributed else 'without'} --use-distributed-optimizer; resume "
                f"{'with' if not distributed else 'without'} it, or pass --finetune to load the weights only")
        try:
            self.optimizer.load_state_dict(model_state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise ckpt.CheckpointError(
                f"{ckpt.iteration_dir(c.load, iteration)}: its optimizer state does not fit this run's "
                f"parameter groups (different lr multipliers or frozen parts?): {str(e).splitlines()[0]}; "
                f"pass --finetune to load the weights only") from None
        use_fused_adam(self.optimizer)
        if distributed:
            saved_dp = ckpt.load_optimizer_shards(self.optimizer, model_state["distributed_optimizer"], where)
            if saved_dp is not None and saved_dp != self.dp_size:
                self.logger.print(f"distributed-optimizer state of {saved_dp} data-parallel ranks resharded "
                                  f"over {self.dp_size}")
        self.scheduler.load_state_dict(model_state["scheduler"])
        self.state.iteration = iteration
        ts = model_state.get("train_state", {})
        self.state.best_score, self.state.best_iteration = ts.get("best_score"), ts.get("best_iteration")
        if "task" in model_state and optional(self.task, "load_state_dict"):
            self.task.load_state_dict(model_state["task"])
        if rank_state is not None:
            self.sampler.load_state_dict(rank_state["sampler"])
            ckpt.set_rng_state(rank_state["rng"])
        else:
            # Saved with another world size: derive the data position from the iteration.
            self.sampler.load_state_dict({"consumed_samples": iteration * self.cfg.batch.global_batch_size})
            self.logger.print("world size changed since the checkpoint: RNG streams restart")
        self.logger.print(f"resumed from {ckpt.iteration_dir(c.load, iteration)}")

    # ------------------------------------------------------------------ one step
    def train_step(self, local_indices) -> dict[str, float]:
        for m in self.ddp_models:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        mbs = self.cfg.batch.micro_batch_size
        sums: dict[str, float] = {}
        for mb in range(self.num_micro_batches):
            batch = self.task.make_batch(local_indices[mb * mbs:(mb + 1) * mbs])
            loss, metrics = self.task.forward_step(self.models, batch)
            with precision_off():  # backward follows the forward's dtypes by itself
                self.optimizer.scale_loss(loss.float() / self.num_micro_batches).backward()
            sums["loss"] = sums.get("loss", 0.0) + _to_float(loss)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + _to_float(v)
        self._check_finite(sums["loss"])
        for m in self.ddp_models:
            m.finish_grad_sync()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        with precision_off():
            updated, grad_norm, _ = self.optimizer.step()
        if updated:
            self.scheduler.step(increment=1)  # one optimizer step (the global batch)
        out = {k: v / self.num_micro_batches for k, v in sums.items()}
        out = _average_over_dp(out, self.dp_group)
        out.update(lr=lr,
                   loss_scale=float(self.optimizer.get_loss_scale().item()),
                   grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                   skipped=0.0 if updated else 1.0)
        if torch.cuda.is_available():
            out["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        return out

    def _check_finite(self, loss: float) -> None:
        """A NaN or infinite loss would poison the weights and every later checkpoint, so the run
        stops before this step is applied (all trainer ranks together), naming the last good
        checkpoint. Under fp16 too: its loss scaler skips steps whose *gradients* overflow (the
        loss itself stays finite), but no loss scale can mend a forward pass that is not finite."""
        bad = torch.tensor([0.0 if math.isfinite(loss) else 1.0])
        if torch.distributed.is_initialized():
            if torch.cuda.is_available():
                bad = bad.cuda()
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item() == 0:
            return
        c = self.cfg.checkpoint
        last = ckpt.resolve_iteration(c.save, None) if c.save and os.path.isdir(c.save) else None
        where = (f"the last checkpoint is {ckpt.iteration_dir(c.save, last)}" if last is not None
                 else "no checkpoint was saved")
        raise TrainingDiverged(
            f"iteration {self.state.iteration + 1}: the loss is not finite ({loss}) on "
            f"{'this' if not math.isfinite(loss) else 'another'} rank; stopped before applying the step "
            f"({where}). Lower --lr or --clip-grad, or resume from an earlier checkpoint")

    # ------------------------------------------------------------------ loop
    def evaluate(self) -> Optional[dict]:
        evaluate = optional(self.task, "evaluate")
        if evaluate is None:
            return None
        for m in self.models.values():
            m.eval()
        with torch.no_grad():
            metrics = evaluate(self.models, self.state.iteration)
        for m in self.models.values():
            m.train()
        self.logger.log_eval(self.state.iteration, metrics)
        score = metrics.get("score") if metrics else None
        if score is not None and (self.state.best_score is None or score > self.state.best_score):
            self.state.best_score, self.state.best_iteration = score, self.state.iteration
            if self.cfg.checkpoint.save:
                self.save()
                ckpt.mark_best(self.cfg.checkpoint.save, self.state.iteration)
                self._saved_at = self.state.iteration
        return metrics

    def train(self) -> TrainState:
        cfg = self.cfg
        total = cfg.schedule.train_iters
        for m in self.models.values():
            m.train()
        batches = iter(self.sampler)
        on_step_end = optional(self.task, "on_step_end")
        extra_metrics = optional(self.task, "extra_metrics")
        progress = self.logger.progress(total, initial=self.state.iteration)
        try:
            with self.autocast():
                self._train_iterations(total, batches, on_step_end, extra_metrics, progress)
        finally:
            if progress is not None:
                progress.close()
            close = optional(self.task, "close")
            if close:
                close()  # also on failure: e.g. tells indexer ranks that training has stopped
        if self.exited_early:  # a later run goes on from this checkpoint: no final eval or tests
            if self._saved_at != self.state.iteration:
                self.save()
            self.logger.close()
            return self.state
        if cfg.logging.eval_interval and self.state.iteration % cfg.logging.eval_interval != 0:
            with self.autocast():
                self.evaluate()
        if cfg.checkpoint.save and self._saved_at != self.state.iteration:
            self.save()
        self._train_end()
        self.logger.close()
        return self.state

    def _train_end(self) -> None:
        """The task's ``on_train_end`` on the final model (e.g. scoring test files); what it
        returns ({name: metrics}) is logged as kind "test" records."""
        on_train_end = optional(self.task, "on_train_end")
        if on_train_end is None:
            return
        for m in self.models.values():
            m.eval()
        with self.autocast(), torch.no_grad():
            results = on_train_end(self.models, self.state.iteration)
        for name, metrics in (results or {}).items():
            self.logger.log_test(self.state.iteration, name, metrics)

    def _train_iterations(self, total, batches, on_step_end, extra_metrics, progress) -> None:
        cfg = self.cfg
        while self.state.iteration < total:
            t0 = time.perf_counter()
            metrics = self.train_step(next(batches))
            self.state.iteration += 1
            it = self.state.iteration
            metrics["step_time"] = time.perf_counter() - t0
            if on_step_end:
                on_step_end(self.models, it)
            if extra_metrics:
                metrics.update(extra_metrics(it))
            self.state.history.append({"iteration": it, **metrics})
            self.logger.log_train(it, total, metrics, progress)
            if cfg.logging.eval_interval and it % cfg.logging.eval_interval == 0:
                self.evaluate()
            if cfg.checkpoint.save_interval and it % cfg.checkpoint.save_interval == 0:
                self.save()
                self._saved_at = it
            if it < total and self._should_exit(it):
                self.logger.print(f"exiting at iteration {it} (--exit-interval/--exit-duration-in-mins); "
                                  f"rerun with --load {cfg.checkpoint.save} to continue")
                self.exited_early = True
                return

    def _should_exit(self, iteration: int) -> bool:
        c = self.cfg.checkpoint
        if c.exit_interval and iteration % c.exit_interval == 0:
            return True
        if not c.exit_duration_mins:
            return False
        done = torch.tensor([float(time.monotonic() - self._started >= 60 * c.exit_duration_mins)])
        if torch.distributed.is_initialized():  # every rank must leave at the same step
            if torch.cuda.is_available():
                done = done.cuda()
            torch.distributed.all_reduce(done, op=torch.distributed.ReduceOp.MAX)
        return bool(done.item())


def compute_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def precision_off():
    """Autocast off (backward and optimizer steps under ``--autocast``)."""
    return torch.autocast(compute_device().type, enabled=False)


def train(task: Task, cfg: TrainingConfig) -> TrainState:
    return Trainer(task, cfg).train()
