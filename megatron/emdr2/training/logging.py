"""Training logs: console lines, a tqdm bar, TensorBoard scalars and a metrics JSON-lines file.

Only rank 0 writes. The JSON-lines file (one object per iteration, one per evaluation) is what
plots and tests read; TensorBoard is for people watching a run.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Optional

from megatron.emdr2.config import LoggingConfig


class MetricsLogger:
    def __init__(self, cfg: LoggingConfig, save_dir: Optional[str], enabled: bool):
        self.cfg, self.enabled = cfg, enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        path = cfg.metrics_file or (os.path.join(save_dir, "metrics.jsonl") if save_dir else None)
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._file = open(path, "a", buffering=1)  # appended on resume, one line per record
        if cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(cfg.tensorboard_dir)
        self._bar = None

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def progress(self, total: int, initial: int = 0):
        """A tqdm bar on rank 0 when a person is watching (stderr is a terminal)."""
        if not (self.enabled and self.cfg.progress_bar and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=initial, desc="train", unit="it", dynamic_ncols=True)
        return self._bar

    def _record(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")

    def log_train(self, iteration: int, total: int, metrics: dict, bar=None) -> None:
        if not self.enabled:
            return
        self._record({"kind": "train", "iteration": iteration, **metrics})
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}", v, iteration)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4g}")
        if iteration % self.cfg.log_interval == 0 or iteration == total:
            parts = [f"iteration {iteration:>7}/{total}"]
            for k, v in metrics.items():
                if k in ("lr", "grad_norm"):
                    parts.append(f"{k} {v:.3e}")
                elif k == "step_time":
                    parts.append(f"{k} {v * 1000:.0f} ms")
                elif k == "skipped":
                    if v:
                        parts.append("skipped (overflow)")
                else:
                    parts.append(f"{k} {v:.5g}")
            self.print(" | ".join(parts))

    def log_eval(self, iteration: int, metrics: Optional[dict]) -> None:
        if not self.enabled or not metrics:
            return
        self._record({"kind": "eval", "iteration": iteration, **metrics})
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"eval/{k}", v, iteration)
        self.print(f"evaluation at iteration {iteration}: " +
                   " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in metrics.items()))

    def log_test(self, iteration: int, name: str, metrics: Optional[dict]) -> None:
        """A held-out file scored at the end of training: a "test" record (never used to pick
        checkpoints) and a printed line."""
        if not self.enabled or not metrics:
            return
        self._record({"kind": "test", "iteration": iteration, "name": name, **metrics})
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"test/{name}/{k}", v, iteration)
        self.print(f"test {name} at iteration {iteration}: " +
                   " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in metrics.items() if isinstance(v, (int, float))))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if getattr(self, "_bar", None) is not None:
            self._bar.close()
            self._bar = None
