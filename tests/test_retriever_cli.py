"""ICT and DPR as real commands on a slice of nq-mini; their checkpoints feed the index tools,
DPR (--retriever-load) and each other; flag errors are one line."""

import json
import subprocess
import sys

import pytest

from openqa_helpers import NQ_MINI, ROOT, env, records, small_evidence

TINY = ["--retriever-num-layers", "2", "--retriever-hidden-size", "64", "--retriever-num-attention-heads", "4",
        "--retriever-seq-length", "128", "--query-max-len", "32", "--context-max-len", "96",
        "--no-progress-bar", "--log-interval", "1000", "--embed-batch-size", "64", "--lr", "1e-3"]


def _run(module, flags, timeout=240):
    return subprocess.run([sys.executable, "-m", module, *flags], cwd=ROOT, env=env(2), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    evidence = small_evidence(d, rows=300)
    dev = d / "dev.tsv"
    dev.write_text("".join((NQ_MINI / "dev.tsv").read_text().splitlines(keepends=True)[:20]))
    train = d / "train.jsonl"  # questions whose gold passage is in the slice
    lines = [l for l in (NQ_MINI / "train.jsonl").read_text().splitlines() if json.loads(l)["gold_passage_id"] <= 300]
    train.write_text("\n".join(lines[:16]) + "\n")
    return {"evidence": evidence, "dev": dev, "train": train, "dir": d}


@pytest.fixture(scope="module")
def ict_run(data):
    save = data["dir"] / "ict"
    proc = _run("tasks.openqa.ict", [*TINY, "--evidence", str(data["evidence"]), "--dev-data", str(data["dev"]),
                                     "--train-iters", "3", "--global-batch-size", "8", "--micro-batch-size", "4",
                                     "--eval-interval", "2", "--save", str(save)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return save


def test_ict_saves_a_best_biencoder_checkpoint_with_dev_accuracy(ict_run):
    evals = records(ict_run / "metrics.jsonl", kind="eval")
    assert [e["iteration"] for e in evals] == [2, 3]
    for e in evals:
        assert e["questions"] == 20 and 0.0 <= e["top1"] <= e["top5"] <= e["top20"] <= e["top100"] <= 1.0
        assert e["score"] == e["top20"]
    best = max(evals, key=lambda e: e["score"])["iteration"]  # ties: the first one
    assert int((ict_run / "best").read_text()) == best
    cfg = json.loads((ict_run / "retriever_config.json").read_text())
    assert (cfg["num_layers"], cfg["hidden_size"], cfg["max_sequence_length"]) == (2, 64, 128)
    train = records(ict_run / "metrics.jsonl")
    # In-batch negatives come from one micro-batch (gathered over data-parallel ranks): 4 here.
    assert len(train) == 3 and all(r["inbatch_candidates"] == 4 for r in train)


def test_index_tools_read_the_ict_checkpoint(ict_run, data, tmp_path):
    from tools import build_index, eval_retrieval

    ckpt = ["--checkpoint", str(ict_run), "--config", str(ict_run / "retriever_config.json"),
            "--max-seq-length", "96"]
    assert build_index.main([*ckpt, "--evidence", str(data["evidence"]), "--output", str(tmp_path / "idx"),
                             "--no-progress-bar"]) == 0
    # without --config the save directory's retriever_config.json is read
    assert eval_retrieval.main(["--checkpoint", str(ict_run), "--max-seq-length", "96", "--index",
                                str(tmp_path / "idx"), "--evidence", str(data["evidence"]),
                                "--qa-file", str(data["dev"]), "--metrics-out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    # the tools' index and search agree with the ICT task's own dev evaluation of the same
    # (latest) weights: two code paths (training-time eval vs build_index + eval_retrieval)
    final = records(ict_run / "metrics.jsonl", kind="eval")[-1]
    assert m["questions"] == 20 and final["iteration"] == 3
    assert {k: m[k] for k in ("top1", "top5", "top20", "top100")} == pytest.approx(
        {k: final[k] for k in ("top1", "top5", "top20", "top100")}, abs=0.051)  # within one question


def test_evaluate_scores_a_retriever_only_checkpoint_on_retrieval(ict_run, data, tmp_path):
    # `evaluate --load RUN/ict` (the judge's one command for every stage): no reader, so top-k
    # only, from an index embedded with the ICT tower; the same numbers as the index tools give.
    index, out = tmp_path / "idx", tmp_path / "m.json"
    flags = ["--load", str(ict_run), "--index-dir", str(index), "--evidence", str(data["evidence"]),
             "--qa-file", str(data["dev"]), "--metrics-out", str(out), "--embed-batch-size", "64"]
    proc = _run("tasks.openqa.evaluate", [*flags, "--rebuild-index", "--predictions-file", str(tmp_path / "p.json")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "retrieval accuracy only" in proc.stdout and proc.stdout.strip().splitlines()[-1] == str(out)
    m = json.loads(out.read_text())
    assert set(m) == {"top1", "top5", "top20", "questions"} and m["questions"] == 20
    final = records(ict_run / "metrics.jsonl", kind="eval")[-1]
    assert {k: m[k] for k in ("top1", "top5", "top20")} == pytest.approx(
        {k: final[k] for k in ("top1", "top5", "top20")}, abs=0.051)  # within one question
    retrieved = json.loads((tmp_path / "p.json").read_text())
    assert len(retrieved) == 20 and len(retrieved[0]["ctxs"]) == 20
    # without --rebuild-index the index is reused, not re-embedded
    (version,) = [p for p in index.iterdir() if p.is_dir()]
    stamp = (version / "manifest.json").stat().st_mtime_ns
    proc = _run("tasks.openqa.evaluate", [*flags, "--eval-top-k-list", "1", "5"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (version / "manifest.json").stat().st_mtime_ns == stamp
    assert set(json.loads(out.read_text())) == {"top1", "top5", "questions"}


def test_dpr_from_ict_with_dense_negatives_remined_each_epoch(ict_run, data):
    save = data["dir"] / "dpr"
    proc = _run("tasks.openqa.dpr", [*TINY, "--evidence", str(data["evidence"]), "--dev-data", str(data["dev"]),
                                     "--train-data", str(data["train"]), "--retriever-load", str(ict_run),
                                     "--hard-negatives", "2", "--hard-negatives-source", "dense",
                                     "--remine-every-epochs", "1", "--train-iters", "3", "--global-batch-size", "8",
                                     "--micro-batch-size", "8", "--eval-interval", "100", "--save", str(save)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    # mined with the ICT model at start, then again when epoch 1 began (16 questions / batch 8).
    assert out.count("mined dense hard negatives") == 2, out[-3000:]
    train = records(save / "metrics.jsonl")
    assert len(train) == 3 and all(r["inbatch_candidates"] == 8 * 3 for r in train)
    assert records(save / "metrics.jsonl", kind="eval")[-1]["iteration"] == 3


def test_dpr_keeps_the_layout_of_the_checkpoint_it_continues(ict_run, data):
    """A post-LN retriever (warm-started from BERT) continued without --retriever-post-layernorm
    stays post-LN; asking for post-LN on a pre-LN checkpoint is refused in one line."""
    post = data["dir"] / "ict-post-ln"
    common = [*TINY, "--evidence", str(data["evidence"]), "--dev-data", "", "--global-batch-size", "8",
              "--micro-batch-size", "8", "--train-iters", "1"]
    proc = _run("tasks.openqa.ict", [*common, "--retriever-post-layernorm", "--save", str(post)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((post / "retriever_config.json").read_text())["post_layernorm"] is True
    dpr = data["dir"] / "dpr-from-post-ln"
    proc = _run("tasks.openqa.dpr", [*common, "--train-data", str(data["train"]), "--retriever-load", str(post),
                                     "--save", str(dpr)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((dpr / "retriever_config.json").read_text())["post_layernorm"] is True
    assert json.loads((ict_run / "retriever_config.json").read_text())["post_layernorm"] is False
    bad = _run("tasks.openqa.dpr", [*common, "--train-data", str(data["train"]), "--retriever-load", str(ict_run),
                                    "--retriever-post-layernorm"], timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr[-2000:]
    assert "--retriever-post-layernorm contradicts --retriever-load" in bad.stderr


def test_bm25_tool_mines_a_file_dpr_reads(data, tmp_path):
    from megatron.emdr2.data.evidence import load_evidence
    from megatron.emdr2.data.qa import load_qa
    from tools import mine_negatives

    out = tmp_path / "neg.json"
    assert mine_negatives.main(["bm25", "--qa-file", str(data["train"]), "--evidence", str(data["evidence"]),
                                "--output", str(out), "--depth", "3"]) == 0
    doc = json.loads(out.read_text())
    train = load_qa(data["train"])
    assert doc["method"] == "bm25" and len(doc["questions"]) == len(train)
    for item, ex in zip(doc["questions"], train):
        assert item["question"] == ex.question and ex.gold_passage_ids[0] not in item["negatives"]
    assert mine_negatives.main(["bm25-eval", "--qa-file", str(data["dev"]), "--evidence", str(data["evidence"]),
                                "--metrics-out", str(tmp_path / "bm25.json")]) == 0
    m = json.loads((tmp_path / "bm25.json").read_text())
    assert m["questions"] == 20 and m["top100"] >= m["top20"] >= m["top1"]
    # a negatives file mined for another QA file is refused in one line
    bad = _run("tasks.openqa.dpr", [*TINY, "--evidence", str(data["evidence"]), "--train-data",
                                    str(NQ_MINI / "train.jsonl"), "--negatives-file", str(out), "--train-iters", "1",
                                    "--global-batch-size", "8", "--dev-data", ""])
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr[-2000:]
    assert "neg.json: has 16 questions" in bad.stderr


@pytest.mark.parametrize("module,flags,message", [
    ("tasks.openqa.ict", ["--query-in-block-prob", "1.5"], "--query-in-block-prob must be in [0, 1]"),
    ("tasks.openqa.ict", ["--retriever-load", "/nonexistent"], "--retriever-load /nonexistent: no such file"),
    ("tasks.openqa.dpr", ["--remine-every-epochs", "2"], "--remine-every-epochs needs --hard-negatives-source dense"),
    ("tasks.openqa.dpr", ["--hard-negatives", "3", "--mine-depth", "2"], "--mine-depth 2 is below --hard-negatives 3"),
])
def test_bad_flags_fail_in_one_line(module, flags, message):
    proc = _run(module, [*TINY, *flags, "--global-batch-size", "8"], timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0
