"""Compare two runs' answers to the same questions: exact match of each, and whether the difference
is more than noise.

    python tools/compare_predictions.py runs/fid.dev-predictions.jsonl runs/emdr2.dev-predictions.jsonl

Reads the prediction files that `tasks.openqa.evaluate --predictions-file` (and in-training
evaluation) write, one JSON object per question with "question" and "em". Prints each run's EM,
the questions only one of them gets right, and McNemar's exact two-sided p-value on those
(binomial, p = 1/2): on a few hundred questions a one-point EM gap is usually noise, and only the
questions the runs disagree on carry information. `--json` prints the same as one JSON object.

    python tools/compare_predictions.py A1 B1 A2 B2 A3 B3 --metric em top5   # several seeds, pooled

Several pairs (e.g. one per seed) are compared pair by pair and pooled: the discordant questions
of all pairs are added up for one McNemar test. That test counts each (question, pair) as
independent; when the same question recurs across pairs (seeds of one study), the pooled line also
gives a test by question: each question's net difference (B right minus A right, summed over the
pairs) is equally likely to take either sign when the arms do not differ, and the exact two-sided p
of the total under those sign flips is reported. A question some seeds get right on either side
then counts once, so this p is the honest one when seeds share questions. `--metric topK` compares retrieval instead of
answers: whether a passage among the first K contains an answer (the records' "first_hit_rank").
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def read_predictions(path: str, metric: str = "em") -> list[tuple[str, bool]]:
    """[(question, right)] in file order, right = "em", or for "topK" a first hit within rank K;
    a bad line exits with the file and line named."""
    k = _top_k(metric)
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
            if k is None:
                rows.append((rec["question"], rec["em"]))
                continue
            rank = rec.get("first_hit_rank")
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
                raise SystemExit(f"compare_predictions: error: {path}:{line_no}: --metric {metric} needs an "
                                 f"integer \"first_hit_rank\" >= 0")
            rows.append((rec["question"], 1 <= rank <= k))
    if not rows:
        raise SystemExit(f"compare_predictions: error: {path}: no predictions")
    return rows


def _top_k(metric: str):
    if metric == "em":
        return None
    if metric.startswith("top") and metric[3:].isdigit() and int(metric[3:]) >= 1:
        return int(metric[3:])
    raise SystemExit(f"compare_predictions: error: --metric {metric}: use em or topK (e.g. top5)")


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: P(a split at least this uneven | each discordant question
    is a fair coin)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def sign_flip_exact_p(differences: list[int]) -> float:
    """Two-sided exact p of |sum(differences)| when each nonzero difference is equally likely to be
    positive or negative (all 2^n sign patterns; with differences of +-1 this is McNemar's test)."""
    sizes = [abs(d) for d in differences if d]
    observed = abs(sum(differences))
    if observed == 0:
        return 1.0
    total = sum(sizes)
    ways = [0] * (2 * total + 1)  # ways[s + total]: sign patterns whose sum is s
    ways[total] = 1
    for size in sizes:
        shifted = [0] * len(ways)
        for s, w in enumerate(ways):
            if w:
                shifted[s - size] += w
                shifted[s + size] += w
        ways = shifted
    extreme = sum(w for s, w in enumerate(ways) if abs(s - total) >= observed)
    return min(1.0, extreme / 2 ** len(sizes))


def by_question(pairs_rows: list[tuple[list, list]]) -> dict | None:
    """The sign-flip test on each question's net difference over all pairs; None when no question
    recurs across pairs (the pooled McNemar test is then already per question)."""
    net: dict[str, int] = {}
    seen = 0
    for a, b in pairs_rows:
        for (q, x), (_, y) in zip(a, b):
            net[q] = net.get(q, 0) + int(y) - int(x)
            seen += 1
    if len(net) == seen:
        return None
    diffs = list(net.values())
    return {"questions": len(net), "b_ahead": sum(d > 0 for d in diffs), "a_ahead": sum(d < 0 for d in diffs),
            "p_value": sign_flip_exact_p(diffs)}


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


def pooled(results: list[dict]) -> dict:
    only_a, only_b = sum(r["only_a"] for r in results), sum(r["only_b"] for r in results)
    n = sum(r["questions"] for r in results)
    both = sum(r["both"] for r in results)
    return {"questions": n, "em_a": (both + only_a) / n, "em_b": (both + only_b) / n, "both": both,
            "only_a": only_a, "only_b": only_b, "p_value": mcnemar_exact_p(only_a, only_b)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="compare_predictions", description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", metavar="A B",
                        help="predictions JSON lines of run A, then of run B (same questions, same order); "
                             "more pairs (A B A B ...) are also pooled")
    parser.add_argument("--metric", nargs="+", default=["em"],
                        help="em (default) and/or topK: retrieval hit within the first K passages")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if len(args.files) % 2:
        parser.error(f"{len(args.files)} files given: pass them in pairs (A B [A B ...])")
    pairs = list(zip(args.files[0::2], args.files[1::2]))
    report = {}
    for metric in args.metric:
        _top_k(metric)
        rows = [(read_predictions(a, metric), read_predictions(b, metric)) for a, b in pairs]
        per_pair = [compare(ra, rb, a, b) for (ra, rb), (a, b) in zip(rows, pairs)]
        if len(pairs) > 1:
            report[metric] = {"pairs": per_pair, "pooled": pooled(per_pair)}
            clustered = by_question(rows)
            if clustered is not None:
                report[metric]["pooled"]["by_question"] = clustered
        else:
            report[metric] = per_pair[0]
    if args.json:
        print(json.dumps(report if len(args.metric) > 1 or len(pairs) > 1 else report[args.metric[0]]))
        return 0
    for metric, r in report.items():
        name = "EM" if metric == "em" else metric
        rows = [(f"{a} vs {b}", x) for (a, b), x in zip(pairs, r["pairs"])] if len(pairs) > 1 else [("", r)]
        if len(pairs) > 1:
            rows.append((f"pooled over {len(pairs)} pairs", r["pooled"]))
        for label, x in rows:
            print(f"{name}: {x['questions']} questions | A {x['em_a']:.4f} | B {x['em_b']:.4f} | both right "
                  f"{x['both']} | only A {x['only_a']} | only B {x['only_b']} | McNemar exact p {x['p_value']:.3g}"
                  + (f" | {label}" if label else ""))
            if "by_question" in x:
                c = x["by_question"]
                print(f"{name} by question: {c['questions']} questions | A ahead on {c['a_ahead']} | B ahead on "
                      f"{c['b_ahead']} | sign-flip exact p {c['p_value']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
