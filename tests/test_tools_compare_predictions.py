"""tools/compare_predictions.py: paired exact-match counts and McNemar's exact p-value, on the
prediction files the evaluation writes; mismatched or malformed files are named in one line."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.compare_predictions import compare, main, mcnemar_exact_p, read_predictions  # noqa: E402


def _write(path, rows):
    path.write_text("".join(json.dumps({"question": q, "prediction": "x", "em": em}) + "\n" for q, em in rows))
    return str(path)


def test_paired_counts_and_exact_p(tmp_path):
    qs = [f"q{i}" for i in range(10)]
    a = _write(tmp_path / "a.jsonl", [(q, i < 6) for i, q in enumerate(qs)])   # right on q0..q5
    b = _write(tmp_path / "b.jsonl", [(q, 4 <= i < 7) for i, q in enumerate(qs)])  # right on q4..q6
    r = compare(read_predictions(a), read_predictions(b), a, b)
    assert (r["both"], r["only_a"], r["only_b"]) == (2, 4, 1)
    assert r["em_a"] == pytest.approx(0.6) and r["em_b"] == pytest.approx(0.3)
    # 5 discordant questions split 4:1 -> 2 * P(X <= 1), X ~ Bin(5, 1/2) = 2 * 6/32
    assert r["p_value"] == pytest.approx(12 / 32)
    assert mcnemar_exact_p(0, 0) == 1.0 and mcnemar_exact_p(3, 3) == 1.0
    assert mcnemar_exact_p(0, 12) == pytest.approx(2 / 2 ** 12)
    assert mcnemar_exact_p(20, 12) == pytest.approx(2 * sum(math.comb(32, i) for i in range(13)) / 2 ** 32)


def test_command_line_and_bad_input(tmp_path, capsys):
    a = _write(tmp_path / "a.jsonl", [("who", True), ("what", False)])
    b = _write(tmp_path / "b.jsonl", [("who", False), ("what", False)])
    assert main([a, b, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["only_a"] == 1
    other = _write(tmp_path / "c.jsonl", [("who", True), ("where", False)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "who", "em": True}) + "\n{not json\n")
    no_em = _write(tmp_path / "noem.jsonl", [("who", True)])
    Path(no_em).write_text(json.dumps({"question": "who", "prediction": "x"}) + "\n")
    for args, message in (([a, other], "record 2 differs"),
                          ([a, str(bad)], "bad.jsonl:2: not JSON"),
                          ([a, no_em], "noem.jsonl:1: needs"),
                          ([a, str(tmp_path / "none.jsonl")], "none.jsonl: No such file")):
        proc = subprocess.run([sys.executable, "tools/compare_predictions.py", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
        assert proc.stderr.strip().count("\n") == 0


def _write_ranked(path, rows):
    path.write_text("".join(json.dumps({"question": q, "prediction": "x", "em": em, "first_hit_rank": r}) + "\n"
                            for q, em, r in rows))
    return str(path)


def test_pairs_are_pooled_and_retrieval_hits_compared(tmp_path, capsys):
    qs = [f"q{i}" for i in range(8)]
    # seed 1: A right on q0..q2, B on q2..q5; seed 2: A right on q0, B on q0..q3
    a1 = _write_ranked(tmp_path / "a1.jsonl", [(q, i < 3, 0 if i < 4 else 3) for i, q in enumerate(qs)])
    b1 = _write_ranked(tmp_path / "b1.jsonl", [(q, 2 <= i < 6, 1) for i, q in enumerate(qs)])
    a2 = _write_ranked(tmp_path / "a2.jsonl", [(q, i == 0, 7) for i, q in enumerate(qs)])
    b2 = _write_ranked(tmp_path / "b2.jsonl", [(q, i < 4, 5 if i % 2 else 20) for i, q in enumerate(qs)])
    assert main([a1, b1, a2, b2, "--metric", "em", "top5", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    em = r["em"]["pooled"]
    assert (em["only_a"], em["only_b"], em["both"]) == (2 + 0, 3 + 3, 1 + 1) and em["questions"] == 16
    assert em["p_value"] == pytest.approx(mcnemar_exact_p(2, 6))
    top5 = r["top5"]
    # top5 hit = 1 <= first_hit_rank <= 5: a1 hits q4..q7, b1 all; a2 none, b2 the odd ones
    assert [p["only_b"] for p in top5["pairs"]] == [4, 4] and top5["pooled"]["only_a"] == 0
    assert top5["pooled"]["p_value"] == pytest.approx(2 / 2 ** 8)
    for args, message in (([a1, b1, a2], "pass them in pairs"), ([a1, b1, "--metric", "top0"], "use em or topK")):
        proc = subprocess.run([sys.executable, "tools/compare_predictions.py", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    no_rank = _write(tmp_path / "norank.jsonl", [(q, False) for q in qs])
    proc = subprocess.run([sys.executable, "tools/compare_predictions.py", no_rank, a1, "--metric", "top5"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "norank.jsonl:1: --metric top5 needs" in proc.stderr


def test_sign_flip_test_by_question():
    from tools.compare_predictions import sign_flip_exact_p

    # differences of +-1 only: the sign-flip test is McNemar's exact test
    assert sign_flip_exact_p([1] * 9 + [-1] * 3) == pytest.approx(mcnemar_exact_p(3, 9))
    assert sign_flip_exact_p([0, 0]) == 1.0 and sign_flip_exact_p([2, -2]) == 1.0
    # {+2, +1}: the four sign patterns sum to 3, 1, -1, -3, so P(|sum| >= 3) = 2/4
    assert sign_flip_exact_p([2, 1, 0]) == pytest.approx(0.5)


def test_pooled_seeds_sharing_questions_are_also_tested_by_question(tmp_path, capsys):
    # two seeds on the same three questions: B alone right on q0 in both seeds and on q1 in one.
    # Pooled McNemar counts 3 discordant pairs (p 0.25); by question the net differences are
    # +2 and +1, whose sign flips give p 0.5
    a1 = _write(tmp_path / "a1.jsonl", [("q0", False), ("q1", False), ("q2", True)])
    b1 = _write(tmp_path / "b1.jsonl", [("q0", True), ("q1", True), ("q2", True)])
    a2 = _write(tmp_path / "a2.jsonl", [("q0", False), ("q1", False), ("q2", True)])
    b2 = _write(tmp_path / "b2.jsonl", [("q0", True), ("q1", False), ("q2", True)])
    assert main([a1, b1, a2, b2, "--json"]) == 0
    pooled = json.loads(capsys.readouterr().out)["em"]["pooled"]
    assert pooled["p_value"] == pytest.approx(0.25)
    assert pooled["by_question"] == {"questions": 3, "b_ahead": 2, "a_ahead": 0, "p_value": pytest.approx(0.5)}
    assert main([a1, b1, a2, b2]) == 0
    assert "EM by question: 3 questions | A ahead on 0 | B ahead on 2 | sign-flip exact p 0.5" in capsys.readouterr().out
    # pairs on different questions (dev and held-out of one seed): no by-question line, McNemar is per question
    c1 = _write(tmp_path / "c1.jsonl", [("r0", False)])
    d1 = _write(tmp_path / "d1.jsonl", [("r0", True)])
    assert main([a1, b1, c1, d1, "--json"]) == 0
    assert "by_question" not in json.loads(capsys.readouterr().out)["em"]["pooled"]
