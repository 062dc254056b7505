"""Tiny EMDR²-family runs on a slice of nq-mini, as real commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NQ_MINI = ROOT / "data" / "nq-mini"

TINY_OPENQA = [
    "--retriever-num-layers", "2", "--retriever-hidden-size", "64", "--retriever-num-attention-heads", "4",
    "--reader-num-layers", "2", "--reader-hidden-size", "64", "--reader-num-attention-heads", "4",
    "--context-max-len", "96", "--reader-max-len", "128", "--query-max-len", "32", "--answer-max-len", "16",
    "--no-progress-bar", "--log-interval", "1000", "--embed-batch-size", "64",
]


def small_evidence(tmp_path: Path, rows: int = 300) -> Path:
    """The first `rows` passages of nq-mini (a real, small evidence file)."""
    out = tmp_path / "evidence.tsv"
    with open(NQ_MINI / "evidence.tsv", encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
        for i, line in enumerate(f):
            if i > rows:
                break
            g.write(line)
    return out


_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def env(threads: int = 1) -> dict:
    # A child is a fresh job: no rank/port inherited from an in-process test group.
    e = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    e.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT) + os.pathsep + e.get("PYTHONPATH", ""),
             PYTHONWARNINGS="ignore")
    return e


def records(metrics_file, kind="train") -> list[dict]:
    return [r for r in (json.loads(l) for l in Path(metrics_file).read_text().splitlines()) if r["kind"] == kind]


def launch_ranks(module: str, flags: list[str], world: int, port: int, log_dir: Path) -> list[subprocess.Popen]:
    """Start `world` ranks as independent processes (as srun does): one can die alone."""
    procs = []
    for rank in range(world):
        e = env()
        e.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port))
        out = open(log_dir / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", module, *flags], cwd=ROOT, env=e,
                                      stdout=out, stderr=subprocess.STDOUT))
    return procs
