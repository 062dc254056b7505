"""Plot training curves from the metrics JSON-lines files that training runs write.

    python tools/plot_metrics.py --run mss=runs/mss/metrics.jsonl --run emdr2=runs/emdr2/metrics.jsonl \
        --out runs/plots

Writes (only the panels whose metrics exist):
  losses.png      reader and retriever loss terms over steps (smoothed), one line per run
  retrieval.png   evaluation top-k retrieval accuracy (and EM) over steps
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    train, evals = [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"plot_metrics: error: {path}:{line_no}: not JSON ({e.msg})")
            kind = rec.get("kind")
            if kind == "train":
                train.append(rec)
            elif kind != "test":  # test files scored after training are not a curve
                evals.append(rec)
    # A resumed run appends: keep the last record of each iteration.
    dedup = lambda recs: sorted({r["iteration"]: r for r in recs}.values(), key=lambda r: r["iteration"])
    return dedup(train), dedup(evals)


def smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def plot(runs: dict[str, str], out_dir: str, window: int = 10) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {name: read_metrics(path) for name, path in runs.items()}
    written = []

    loss_keys = [("loss", "total loss"), ("reader_loss", "reader loss  −log p(a|q,Z)"),
                 ("retriever_loss", "retriever loss (EMDR² term / in-batch)")]
    present = [(k, t) for k, t in loss_keys if any(any(k in r for r in tr) for tr, _ in data.values())]
    if present:
        fig, axes = plt.subplots(1, len(present), figsize=(5.5 * len(present), 4), squeeze=False)
        for ax, (key, title) in zip(axes[0], present):
            for name, (train, _) in data.items():
                pts = [(r["iteration"], r[key]) for r in train if key in r]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, smooth(list(ys), window), label=name)
            ax.set_title(title)
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"training losses (moving average over {window} steps)")
        _save(fig, out / "losses.png")
        plt.close(fig)
        written.append(str(out / "losses.png"))

    eval_keys = [k for k in ("top1", "top5", "top20", "em") if any(any(k in r for r in ev) for _, ev in data.values())]
    if eval_keys:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, (_, evals) in data.items():
            for key in eval_keys:
                pts = [(r["iteration"], r[key]) for r in evals if key in r]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o", label=f"{name}: {key}")
        ax.set_title("dev retrieval accuracy (top-k) and exact match")
        ax.set_xlabel("training step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        _save(fig, out / "retrieval.png")
        plt.close(fig)
        written.append(str(out / "retrieval.png"))
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", action="append", required=True, help="NAME=metrics.jsonl (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--window", type=int, default=10)
    args = p.parse_args(argv)
    runs = {}
    for spec in args.run:
        name, sep, path = spec.partition("=")
        if not sep or not os.path.exists(path):
            sys.exit(f"plot_metrics: error: --run {spec}: expected NAME=FILE with an existing file")
        runs[name] = path
    for path in plot(runs, args.out, args.window):
        print(path)


if __name__ == "__main__":
    main()
