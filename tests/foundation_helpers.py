"""Run the synthetic BERT-MLM task as a real command (python or torchrun) and read its metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
              "--seq-length", "32", "--log-interval", "1000", "--no-progress-bar", "--lr", "1e-3",
              "--lr-warmup-iters", "2"]


_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def env() -> dict:
    # A child is a fresh job: no rank/port inherited from an in-process test group.
    e = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + e.get("PYTHONPATH", ""),
             PYTHONWARNINGS="ignore")
    return e


def command(nproc: int, flags: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "tasks.bert_mlm", *TINY_FLAGS, *flags]
    from megatron.emdr2.initialize import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), "-m", "tasks.bert_mlm", *TINY_FLAGS, *flags]


def run(nproc: int, flags: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(command(nproc, flags), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def losses(metrics_file) -> dict[int, float]:
    out = {}
    for line in Path(metrics_file).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            out[rec["iteration"]] = rec["loss"]
    return out
