"""The table of examples/compare_objectives.sh: every training method from one start, against the
frozen-retriever FiD baseline, on the same dev questions.

    python tools/objectives_table.py --run RUN --methods none emdr2 kl --seeds 1 2 [--json-out F]

Reads, per method M and seed S, what the script leaves in RUN: ``M-seedS.dev.json`` (the metrics of
``tasks.openqa.evaluate --metrics-out``: em, top1/5/20, reading_accuracy), ``M-seedS.dev_predictions.jsonl``
(its --predictions-file) and ``M-seedS/metrics.jsonl`` (the training log: step_time). Prints one row
per method: the metrics averaged over the seeds, the median training step time, and for EM and
top-5 the paired counts against the baseline (questions only the method gets right / only the
baseline does, summed over the seeds' pairs) with McNemar's exact p on them
(tools/compare_predictions.py). A method without results (its run failed) is listed as such; the
JSON (--json-out, written atomically) has every seed's metrics and the comparisons for em, top1,
top5 and top20. The last line printed is the JSON's path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import compare_predictions  # noqa: E402

PROG = "objectives_table"
LABELS = {
    "none": "FiD (frozen retriever)",
    "emdr2": "EMDR2 (sequence)",
    "emdr2-token": "EMDR2 (token)",
    "kl": "L_alt-2 (kl)",
    "kl-posterior": "KL to posterior",
    "pdist": "PDist (Atlas)",
    "hard-em": "hard EM",
    "hard-em-mml": "MML -> hard EM",
    "individual-topk": "Individual Top-K",
    "joint-topk": "Joint Top-K",
}
COLUMNS = ("em", "top1", "top5", "top20", "reading_accuracy")
PAIRED = ("em", "top1", "top5", "top20")
SHOWN_PAIRS = ("em", "top5")


def fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        fail(f"{path}: not valid JSON ({e.msg} at line {e.lineno})")
    except OSError as e:
        fail(f"{path}: {e.strerror}")
    if not isinstance(d, dict):
        fail(f"{path}: expected a JSON object of metrics")
    return d


def step_times(metrics_file: str) -> list[float]:
    """step_time of every training record after the first (which pays for warm-up)."""
    out = []
    try:
        f = open(metrics_file, encoding="utf-8")
    except FileNotFoundError:
        return out
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{metrics_file}:{n}: not valid JSON ({e.msg})")
            if rec.get("kind") == "train" and rec.get("iteration", 0) > 1 and "step_time" in rec:
                out.append(float(rec["step_time"]))
    return out


def arm_files(run: str, method: str, seed: str) -> dict:
    stem = os.path.join(run, f"{method}-seed{seed}")
    return {"metrics": f"{stem}.dev.json", "predictions": f"{stem}.dev_predictions.jsonl",
            "train_log": os.path.join(stem, "metrics.jsonl"), "log": f"{stem}.log"}


def paired(baseline_files: list[str], method_files: list[str], metric: str) -> dict:
    """compare_predictions' counts, pooled over the seeds: A = baseline, B = the method."""
    pairs = []
    for a, b in zip(baseline_files, method_files):
        try:
            pairs.append(compare_predictions.compare(compare_predictions.read_predictions(a, metric),
                                                     compare_predictions.read_predictions(b, metric), a, b))
        except SystemExit as e:  # its one-line message, under this tool's name
            fail(str(e.code).replace("compare_predictions: error: ", "", 1))
    r = compare_predictions.pooled(pairs)
    return {"questions": r["questions"], "only_method": r["only_b"], "only_baseline": r["only_a"],
            "both": r["both"], "p_value": r["p_value"]}


def collect(run: str, methods: list[str], seeds: list[str], baseline: str) -> dict:
    arms = {}
    for m in methods:
        files = [arm_files(run, m, s) for s in seeds]
        done = [f for f in files if os.path.exists(f["metrics"])]
        missing = [f["metrics"] for f in files if not os.path.exists(f["metrics"])]
        entry = {"label": LABELS.get(m, m), "seeds": {}, "missing": missing,
                 "logs": [f["log"] for f in files if not os.path.exists(f["metrics"])]}
        for s, f in zip(seeds, files):
            if f in done:
                metrics = _read_json(f["metrics"])
                entry["seeds"][s] = {k: metrics[k] for k in (*COLUMNS, "questions", "read_questions") if k in metrics}
        if entry["seeds"]:
            entry["mean"] = {c: statistics.fmean(v[c] for v in entry["seeds"].values())
                             for c in COLUMNS if all(c in v for v in entry["seeds"].values())}
        times = [t for f in done for t in step_times(f["train_log"])]
        entry["step_time_s"] = statistics.median(times) if times else None
        arms[m] = entry
    if not any(a["seeds"] for a in arms.values()):
        fail(f"{run}: no method has results (no <method>-seed<seed>.dev.json for methods {' '.join(methods)}, "
             f"seeds {' '.join(seeds)})")
    base = arms.get(baseline)
    for m, entry in arms.items():
        if m == baseline or base is None:
            continue
        both = [s for s in seeds if s in entry["seeds"] and s in base["seeds"]]
        if not both:
            continue
        a = [arm_files(run, baseline, s)["predictions"] for s in both]
        b = [arm_files(run, m, s)["predictions"] for s in both]
        for path in a + b:
            if not os.path.exists(path):
                fail(f"{path}: no such file (the arm's evaluation ran without --predictions-file?)")
        entry["vs_baseline"] = {"seeds": both, **{metric: paired(a, b, metric) for metric in PAIRED}}
    return arms


def _cell(x, fmt: str, width: int) -> str:
    return f"{format(x, fmt) if x is not None else '-':>{width}}"


def _pair_cell(p: dict | None) -> str:
    if p is None:
        return f"{'-':>22}"
    return f"{'+' + str(p['only_method']) + '/-' + str(p['only_baseline']) + ' p ' + format(p['p_value'], '.2g'):>22}"


def format_table(arms: dict, baseline: str, start: dict | None = None) -> str:
    base_label = LABELS.get(baseline, baseline)
    head = (f"{'method':<24}" + "".join(f"{c:>9}" for c in ("EM", "top-1", "top-5", "top-20", "read acc"))
            + f"{'step s':>8}" + "".join(f"{n + ' vs ' + baseline:>22}" for n in ("EM", "top-5")))
    lines = [head]
    if start is not None:
        lines.append(f"{'start (MSS checkpoint)':<24}" + "".join(_cell(start.get(c), ".3f", 9) for c in COLUMNS)
                     + f"{'':>8}")
    for m, a in arms.items():
        if not a["seeds"]:
            lines.append(f"{a['label']:<24}  no results: see {', '.join(a['logs'])}")
            continue
        mean = a.get("mean", {})
        row = f"{a['label']:<24}" + "".join(_cell(mean.get(c), ".3f", 9) for c in COLUMNS)
        row += _cell(a["step_time_s"], ".2f", 8)
        if m == baseline:
            row += f"{'(baseline)':>22}"
        else:
            vs = a.get("vs_baseline")
            row += "".join(_pair_cell(vs[p] if vs else None) for p in SHOWN_PAIRS)
        if len(a["seeds"]) > 1 or a["missing"]:
            row += f"   ({len(a['seeds'])} seed{'s' if len(a['seeds']) != 1 else ''})"
        lines.append(row)
    lines.append(f"+a/-b: questions only the method / only {base_label} gets right (EM) or retrieves an answer "
                 f"passage for in its top 5, summed over seeds; p: McNemar's exact two-sided p on them")
    if any(len(a["seeds"]) == 1 for a in arms.values()):
        # Measured on nq-mini: two seeds of one method differed at p 0.018 (docs/paper_tables.md).
        lines.append("one seed: p compares two trained models, not two methods (it leaves out run-to-run "
                     "variance); pool several seeds (SEEDS) before reading a difference as the method's")
    return "\n".join(lines)


def _atomic_json(path: str, obj) -> None:
    tmp = f"{path}.partial-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="the compare_objectives.sh run directory")
    p.add_argument("--methods", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", default=["1"])
    p.add_argument("--baseline", default="none", help="the method the others are paired against (default none)")
    p.add_argument("--start-metrics", default=None, help="the starting checkpoint's dev metrics (a row of its own)")
    p.add_argument("--steps", type=int, default=None, help="training steps per arm (recorded)")
    p.add_argument("--start", default=None, help="the starting run directory (recorded)")
    p.add_argument("--json-out", default=None, help="default RUN/objectives_table.json")
    args = p.parse_args(argv)
    if not os.path.isdir(args.run):
        fail(f"--run {args.run}: no such directory")
    methods = list(dict.fromkeys(args.methods))
    if args.baseline not in methods:
        methods.insert(0, args.baseline)
    arms = collect(args.run, methods, list(dict.fromkeys(args.seeds)), args.baseline)
    start = _read_json(args.start_metrics) if args.start_metrics else None
    print(format_table(arms, args.baseline, start))
    out = args.json_out or os.path.join(args.run, "objectives_table.json")
    _atomic_json(out, {"run": args.run, "start": args.start, "steps": args.steps, "seeds": args.seeds,
                       "baseline": args.baseline, "start_metrics": start, "methods": arms})
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
