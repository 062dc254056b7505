"""The quickstart's closing table: every stage's checkpoint on the same dev questions.

    python tools/stage_table.py --run runs/quickstart-<time> --seconds 1500

Reads the ICT stage's last dev evaluation (``ict/metrics.jsonl``: retrieval only, it has no reader)
and the ``<stage>.dev.json`` files that ``tasks.openqa.evaluate --metrics-out`` wrote for the
stages with a reader (mss, emdr2); prints one row per stage, then the paper's Table 8 as one
line (retrieval recall@5 on the dev questions after ICT and after MSS), and writes
``final_metrics.json`` (the last stage's metrics at the top level, every stage under "stages",
Table 8 under "table8", the run time) atomically. The last line printed is that file's path.

If the run has ``start.dev.json`` (the retriever ICT starts from, evaluated on the same dev
questions before any training, e.g. by ``tools/eval_retrieval.py --metrics-out``), its row comes
first, as stage "start": what the pipeline's own stages add is then the difference from it
(``--start-label`` names it in the printed table, e.g. "MiniLM").

    python tools/stage_table.py --run RUN --table8-only [--mss-metrics M.json]   # only the Table 8 line

(``--table8-only`` needs just ``ict/metrics.jsonl`` and the MSS checkpoint's dev metrics; the
unsupervised study and examples/compare_objectives.sh print it for their ICT + MSS start.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

STAGES = ("ict", "mss", "emdr2")
START = "start"  # optional: the retriever before ICT (RUN/start.dev.json)
COLUMNS = ("top1", "top5", "top20", "em", "reading_accuracy")


def fail(message: str) -> None:
    print(f"stage_table: error: {message}", file=sys.stderr)
    sys.exit(2)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        fail(f"{path}: no such file (did that stage's evaluation run?)")
    except json.JSONDecodeError as e:
        fail(f"{path}: not valid JSON ({e.msg} at line {e.lineno})")


def last_eval(metrics_file: str) -> dict:
    """The last {"kind": "eval"} record of a training run's metrics.jsonl."""
    found = None
    try:
        with open(metrics_file, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    fail(f"{metrics_file}:{n}: not valid JSON ({e.msg})")
                if record.get("kind") == "eval":
                    found = record
    except FileNotFoundError:
        fail(f"{metrics_file}: no such file (did the stage train with --save?)")
    if found is None:
        fail(f"{metrics_file}: no dev evaluation recorded (run the stage with --dev-data and --eval-interval)")
    return found


def stage_metrics(run: str) -> dict[str, dict]:
    out = {}
    start = os.path.join(run, f"{START}.dev.json")
    if os.path.isfile(start):
        out[START] = _read_json(start)
    out["ict"] = last_eval(os.path.join(run, "ict", "metrics.jsonl"))
    for stage in STAGES[1:]:
        out[stage] = _read_json(os.path.join(run, f"{stage}.dev.json"))
    return {s: {k: m[k] for k in (*COLUMNS, "questions", "read_questions") if k in m} for s, m in out.items()}


def table8(ict: dict, mss: dict) -> dict:
    """The paper's Table 8 (retrieval recall@5 after ICT and after MSS pre-training), from the
    ICT run's last dev evaluation and the MSS checkpoint's dev metrics (same questions)."""
    for name, m in (("ICT", ict), ("MSS", mss)):
        if "top5" not in m:
            fail(f"the {name} dev metrics have no top5 (evaluate with k >= 5)")
    out = {"ict_top5": ict["top5"], "mss_top5": mss["top5"], "questions": mss.get("questions")}
    if ict.get("questions") != mss.get("questions"):  # e.g. an ICT run evaluated with --eval-max-questions
        out["ict_questions"] = ict.get("questions")
    return out


def table8_line(t8: dict) -> str:
    n = f", {t8['questions']} questions" if t8.get("questions") is not None else ""
    note = (f" (ICT on {t8['ict_questions']} questions: not the same set)" if "ict_questions" in t8 else "")
    return (f"Table 8 (retrieval recall@5 on dev{n}): after ICT {t8['ict_top5']:.3f} | "
            f"after MSS {t8['mss_top5']:.3f}{note}")


def format_table(stages: dict[str, dict], start_label: str | None = None) -> str:
    labels = {name: (start_label or name) if name == START else name for name in stages}
    width = max([8, *(len(label) + 1 for label in labels.values())])  # the start row's label may be long
    lines = [f"{'stage':<{width}}" + "".join(f"{c:>18}" for c in ("questions",) + COLUMNS)]
    for name, m in stages.items():
        cells = [f"{m.get('questions', ''):>18}"]
        cells += [f"{m[c]:>18.3f}" if c in m else f"{'-':>18}" for c in COLUMNS]
        lines.append(f"{labels[name]:<{width}}" + "".join(cells))
    if START in stages:
        n, last = stages[START].get("questions"), list(stages.values())[-1].get("questions")
        same = "the same questions" if n == last else f"{n} questions: not the same set"
        lines.append(f"({start_label or START}: the retriever before ICT, on {same})")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="stage_table", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="the quickstart's run directory")
    parser.add_argument("--seconds", type=int, default=None, help="the run's wall time, recorded")
    parser.add_argument("--table8-only", action="store_true",
                        help="print only the Table 8 line (needs ict/metrics.jsonl and the MSS dev metrics)")
    parser.add_argument("--mss-metrics", default=None, help="the MSS checkpoint's dev metrics (default RUN/mss.dev.json)")
    parser.add_argument("--start-label", default=None,
                        help="the name printed for RUN/start.dev.json's row (default: start)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.run):
        fail(f"--run {args.run}: no such directory")
    if args.table8_only:
        ict = last_eval(os.path.join(args.run, "ict", "metrics.jsonl"))
        print(table8_line(table8(ict, _read_json(args.mss_metrics or os.path.join(args.run, "mss.dev.json")))))
        return
    stages = stage_metrics(args.run)
    final = dict(stages[STAGES[-1]])
    final["stages"] = stages
    final["table8"] = table8(stages["ict"], stages["mss"])
    if args.seconds is not None:
        final["run_seconds"] = args.seconds
    path = os.path.join(args.run, "final_metrics.json")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(final, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)

    questions = final.get("questions", "?")
    print(f"\nnq-mini dev ({questions} questions), every stage's checkpoint "
          f"(reading accuracy: EM where the answer is in the reader's passages)")
    print(format_table(stages, args.start_label))
    print(table8_line(final["table8"]))
    if args.seconds is not None:
        print(f"run time {args.seconds // 60} min {args.seconds % 60} s")
    print(f"checkpoints: {args.run}/{{ict,mss,emdr2}}   plots: {args.run}/plots   "
          f"predictions: {args.run}/emdr2.dev_predictions.jsonl   answers: {args.run}/answers.jsonl")
    print(path)


if __name__ == "__main__":
    main()
