"""Compare two runs' answers to the same questions: exact match of each, and whether the difference
is more than noise.

    python tools/compare_predictions.py runs/fid.dev-predictions.jsonl runs/emdr2.dev-predictions.jsonl

Reads the prediction files that `tasks.openqa.evaluate --predictions-file` (and in-training
evaluation) write, one JSON object per question with "question" and "em". Prints each run's EM,
the questions only one of them gets right, and McNemar's exact two-sided p-value on those
(binomial, p = 1/2): on a few hundred questions a one-point EM gap is usually noise, and only the
questions the runs disagree on carry information. `--json` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def read_predictions(path: str) -> list[tuple[str, bool]]:
    """[(question, em)] in file order; a bad line exits with the file and line named."""
    rows = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise SystemExit(f"compare_predictions: error: {path}: {e.strerror}")
    with f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"compare_predictions: error: {path}:{line_no}: not JSON ({e.msg})")
            if not isinstance(rec, dict) or "question" not in rec or not isinstance(rec.get("em"), bool):
                raise SystemExit(f"compare_predictions: error: {path}:{line_no}: needs \"question\" and a "
                                 f"true/false \"em\" (a predictions file of questions with gold answers)")
            rows.append((rec["question"], rec["em"]))
    if not rows:
        raise SystemExit(f"compare_predictions: error: {path}: no predictions")
    return rows


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: P(a split at least this uneven | each discordant question
    is a fair coin)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def compare(a: list[tuple[str, bool]], b: list[tuple[str, bool]], path_a: str, path_b: str) -> dict:
    if len(a) != len(b):
        raise SystemExit(f"compare_predictions: error: {path_a} has {len(a)} questions, {path_b} has {len(b)}")
    for i, ((qa, _), (qb, _)) in enumerate(zip(a, b), 1):
        if qa != qb:
            raise SystemExit(f"compare_predictions: error: record {i} differs: {path_a} asks {qa[:60]!r}, "
                             f"{path_b} asks {qb[:60]!r} (same QA file and order needed)")
    only_a = sum(x and not y for (_, x), (_, y) in zip(a, b))
    only_b = sum(y and not x for (_, x), (_, y) in zip(a, b))
    both = sum(x and y for (_, x), (_, y) in zip(a, b))
    n = len(a)
    return {"questions": n, "em_a": (both + only_a) / n, "em_b": (both + only_b) / n, "both": both,
            "only_a": only_a, "only_b": only_b, "p_value": mcnemar_exact_p(only_a, only_b)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="compare_predictions", description=__doc__.split("\n")[0])
    parser.add_argument("a", help="predictions JSON lines of run A")
    parser.add_argument("b", help="predictions JSON lines of run B (same questions, same order)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    r = compare(read_predictions(args.a), read_predictions(args.b), args.a, args.b)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"{r['questions']} questions | EM A {r['em_a']:.4f} | EM B {r['em_b']:.4f} | both right {r['both']} | "
          f"only A {r['only_a']} | only B {r['only_b']} | McNemar exact p {r['p_value']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
