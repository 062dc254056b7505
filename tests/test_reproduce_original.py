"""examples/reproduce_original.sh end to end, on a synthetic release in the original's layout.

The "release" is built by tests/test_interop_original.py's helpers (our tiny models written
through the inverse mapping as iter_XXXXXXX/mp_rank_00/model_optim_rng.pt, the legacy torch
format, a foreign loss-scaler object), an evidence tsv in DPR's layout, the original's embedding
pickle and its QA csv files (Python list literals). The script must pre-tokenise the evidence,
convert checkpoint and embeddings, evaluate every test file and print the published numbers
beside ours; a second run reuses what the first converted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from openqa_helpers import NQ_MINI, ROOT, env  # noqa: E402
from test_interop_original import _original_model_dict, megatron_single_rank, ours, save_original  # noqa: E402,F401

QUESTIONS = 3


def _release(tmp_path, bi, reader):
    from megatron.emdr2.interop.original import save_original_embeddings

    orig = tmp_path / "orig"
    save_original(orig / "iter_0009896", _original_model_dict(bi, reader, 1), iteration=9896)
    lines = (NQ_MINI / "evidence.tsv").read_text(encoding="utf-8").splitlines()[1:61]
    # DPR's layout: articles are runs of consecutive ids (here two passages each)
    (orig / "psgs_w100.tsv").write_text("id\ttext\ttitle\n" + "".join(
        "{}\t{}\tArticle {}\n".format(*l.split("\t")[:2], k // 2) for k, l in enumerate(lines)), encoding="utf-8")
    ids = [int(l.split("\t")[0]) for l in lines]
    vecs = np.random.default_rng(0).standard_normal((len(ids), 32)).astype(np.float32)
    save_original_embeddings(str(orig / "nq-ssm-step9000.pkl"), ids, vecs)
    (orig / "qas").mkdir()
    dev = [l.split("\t") for l in (NQ_MINI / "dev.tsv").read_text(encoding="utf-8").splitlines()[:QUESTIONS]]
    for name in ("nq", "trivia", "webq"):
        (orig / "qas" / f"{name}-test.csv").write_text(
            "".join(f"{q}\t{repr(json.loads(a))}\n" for q, a in dev), encoding="utf-8")
    return orig


def _run(orig, out, datasets):
    from megatron.emdr2.initialize import free_port

    e = env(threads=2)
    e.update(ORIG=str(orig), OUT=str(out), DATASETS=datasets, NPROC_PER_NODE="1", EMDR2_NO_SLURM="1",
             MASTER_PORT=str(free_port()), WORKERS="1",
             # one released checkpoint and embedding file stands in for all three datasets
             TRIVIA_CKPT=str(orig / "iter_0009896"), WEBQ_CKPT=str(orig / "iter_0009896"),
             TRIVIA_EMB=str(orig / "nq-ssm-step9000.pkl"), WEBQ_EMB=str(orig / "nq-ssm-step9000.pkl"))
    e.pop("SLURM_JOB_ID", None)
    res = subprocess.run(["bash", "examples/reproduce_original.sh"], cwd=ROOT, env=e, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res.stdout + res.stderr


@pytest.mark.slow
def test_reproduce_original_script(tmp_path, ours):
    from megatron.emdr2.index import read_manifest
    from megatron.emdr2.openqa.builders import load_checkpoint_meta

    orig = _release(tmp_path, *ours)
    out = tmp_path / "out"
    log = _run(orig, out, "nq trivia webq")

    # evidence pre-tokenised once; each dataset converted and evaluated
    assert (out / "evidence" / "psgs_w100_meta.json").exists()
    for d in ("nq", "trivia", "webq"):
        meta = load_checkpoint_meta(str(out / d / "checkpoint"))
        assert (meta["reader_context"], meta["reader_format"]) == ("neighbours", "original")
        assert (meta["top_k"], meta["num_beams"], meta["reader_max_len"]) == (50, 1, 24)  # 24: the tiny model's positions
        manifest = read_manifest(out / d / "index")
        assert (manifest.num_rows, manifest.dim, manifest.model_step) == (60, 32, 9000)
        m = json.loads((out / d / "test.json").read_text())
        assert m["questions"] == QUESTIONS and {"em", "top1", "top5", "top20", "top50"} <= set(m)
        preds = (out / d / "test.predictions.jsonl").read_text().splitlines()
        assert len(preds) == QUESTIONS
    assert log.count("neighbour map of") == 3 and "in 30 articles" in log  # the reader read neighbours

    # the table: published numbers beside ours
    table = (out / "table.md").read_text().splitlines()
    assert table[0].split("|")[1:5] == [" dataset      ", " questions ", " published EM ", " our EM "]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in table[2:]}
    assert [rows[k][1] for k in ("NQ", "TriviaQA", "WebQuestions")] == ["52.49", "71.43", "48.67"]
    em = 100 * json.loads((out / "nq" / "test.json").read_text())["em"]
    assert rows["NQ"][:3] == [str(QUESTIONS), "52.49", f"{em:.2f}"]
    assert "\n".join(table) in log

    # a second run converts and evaluates nothing again, and prints the same table
    again = _run(orig, out, "nq trivia webq")
    assert "converting" not in again and "pre-tokenising" not in again and "evaluating" not in again
    assert "\n".join(table) in again
