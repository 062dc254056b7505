"""Reading accuracy (evaluation) and the quickstart's per-stage table (tools/stage_table.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_reading_accuracy_counts_only_questions_the_reader_could_answer():
    from megatron.emdr2.openqa.evaluation import reading_accuracy

    records = [{"em": True, "first_hit_rank": 1}, {"em": False, "first_hit_rank": 4},
               {"em": True, "first_hit_rank": 0},  # right without the answer in its passages
               {"em": False, "first_hit_rank": 7},  # answer retrieved, but beyond the reader's K
               {"em": True, "first_hit_rank": 2}]
    assert reading_accuracy(records, top_k=4) == {"reading_accuracy": 2 / 3, "read_questions": 3}
    assert reading_accuracy(records, top_k=1) == {"reading_accuracy": 1.0, "read_questions": 1}
    assert reading_accuracy([], top_k=4) == {"reading_accuracy": 0.0, "read_questions": 0}


def _write_run(run, with_mss=True):
    (run / "ict").mkdir(parents=True)
    (run / "ict" / "metrics.jsonl").write_text(
        json.dumps({"kind": "train", "iteration": 1, "loss": 3.0}) + "\n"
        + json.dumps({"kind": "eval", "iteration": 100, "top1": 0.5, "top5": 0.7, "top20": 0.9,
                      "questions": 10, "score": 0.9}) + "\n")
    stage = {"em": 0.1, "top1": 0.6, "top5": 0.8, "top20": 0.95, "questions": 10,
             "reading_accuracy": 0.12, "read_questions": 8}
    if with_mss:
        (run / "mss.dev.json").write_text(json.dumps(stage))
    (run / "emdr2.dev.json").write_text(json.dumps({**stage, "em": 0.3, "reading_accuracy": 0.35}))


def _table(run, *extra):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "stage_table.py"), "--run", str(run), *extra],
                          capture_output=True, text=True)


def test_stage_table_prints_every_stage_and_writes_the_final_json(tmp_path):
    run = tmp_path / "run"
    _write_run(run)
    out = _table(run, "--seconds", "125")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == str(run / "final_metrics.json")
    ict = next(line for line in lines if line.startswith("ict"))
    assert "0.900" in ict and ict.split()[-1] == "-"  # no reader: no EM, no reading accuracy
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["em"] == 0.3 and final["reading_accuracy"] == 0.35 and final["run_seconds"] == 125
    assert list(final["stages"]) == ["ict", "mss", "emdr2"]
    assert final["stages"]["ict"]["top20"] == 0.9 and "loss" not in final["stages"]["ict"]


def test_stage_table_names_the_missing_file(tmp_path):
    run = tmp_path / "run"
    _write_run(run, with_mss=False)
    out = _table(run)
    assert out.returncode == 2
    assert "mss.dev.json: no such file" in out.stderr and "Traceback" not in out.stderr
    assert not (run / "final_metrics.json").exists()


def test_heldout_questions_are_new_and_answerable_from_the_evidence(tmp_path, shared_data, nq_mini):
    out = tmp_path / "heldout.tsv"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "heldout_questions.py"), "--nq-open",
                          str(shared_data / "nq-open" / "NQ-open.dev.jsonl"), "--output", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    seen = {line.split("\t")[0].strip().lower()
            for f in ("train.tsv", "dev.tsv") for line in (nq_mini / f).read_text().splitlines()}
    assert len(rows) > 300
    assert not any(q.strip().lower() in seen for q, _ in rows)
    assert all(json.loads(a) for _, a in rows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "not a list"}\n')
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "heldout_questions.py"), "--nq-open", str(bad),
                          "--output", str(tmp_path / "x.tsv")], capture_output=True, text=True)
    assert run.returncode == 2 and f"{bad}:1:" in run.stderr and not (tmp_path / "x.tsv").exists()


def test_heldout_unclaimed_only_looks_past_the_gold_passages_of_train_and_dev(tmp_path, shared_data, nq_mini):
    from megatron.emdr2.data.answers import simple_tokens

    out = tmp_path / "unclaimed.tsv"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "heldout_questions.py"), "--nq-open",
                          str(shared_data / "nq-open" / "NQ-open.dev.jsonl"), "--output", str(out),
                          "--unclaimed-only", "--max-passages", "1"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert len(rows) > 200
    gold = {json.loads(l)["gold_passage_id"] for f in ("train.jsonl", "dev.jsonl")
            for l in (nq_mini / f).read_text().splitlines()}
    lines = (nq_mini / "evidence.tsv").read_text(encoding="utf-8").splitlines()[1:]
    unclaimed = [" " + " ".join(simple_tokens(l.split("\t")[1])) + " " for l in lines
                 if int(l.split("\t")[0]) not in gold]
    for question, answers in rows[:20]:  # each answer is in exactly one passage nobody else claims
        golds = [" " + " ".join(simple_tokens(a)) + " " for a in json.loads(answers)]
        assert sum(any(g in p for g in golds if g.strip()) for p in unclaimed) == 1, question


def test_stage_table_puts_the_starting_retriever_first_when_the_run_has_it(tmp_path):
    run = tmp_path / "run"
    _write_run(run)
    # what tools/eval_retrieval.py --metrics-out writes for the tower ICT starts from
    (run / "start.dev.json").write_text(json.dumps({"top1": 0.55, "top5": 0.75, "top20": 0.85, "top50": 0.9,
                                                    "top100": 0.95, "questions": 10}))
    out = _table(run, "--start-label", "MiniLM")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    rows = [line.split()[0] for line in lines if line.split() and line.split()[0] in ("MiniLM", "ict", "mss", "emdr2")]
    assert rows == ["MiniLM", "ict", "mss", "emdr2"]
    start = next(line for line in lines if line.startswith("MiniLM"))
    assert "0.550" in start and start.split()[-1] == "-"  # a retriever alone: no EM
    assert any("MiniLM: the retriever before ICT, on the same questions" in line for line in lines)
    final = json.loads((run / "final_metrics.json").read_text())
    assert list(final["stages"]) == ["start", "ict", "mss", "emdr2"]
    assert final["stages"]["start"] == {"top1": 0.55, "top5": 0.75, "top20": 0.85, "questions": 10}
    assert final["em"] == 0.3 and final["table8"]["ict_top5"] == 0.7  # the rest as without it
