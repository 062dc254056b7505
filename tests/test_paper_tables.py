"""The paper's appendix C tables as outputs (docs/paper_tables.md):
Table 8 (recall@5 after ICT vs MSS, tools/stage_table.py), Table 9 (index memory: the index
package's prediction against an index written and loaded by the real code, tools/index_memory.py)
and Table 10 (tools/retrieval_confidence.py on tiny random-init checkpoints, against p(z|q)
computed directly from the models)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from megatron.emdr2.index import ShardedIndex, shard_store, sharded_index, write_index


def _run(tool, *args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / tool), *map(str, args)], capture_output=True,
                          text=True)


# ----------------------------------------------------------------------------- Table 8


def _stage_run(run, ict_questions=10):
    (run / "ict").mkdir(parents=True)
    (run / "ict" / "metrics.jsonl").write_text(
        json.dumps({"kind": "eval", "iteration": 50, "top1": 0.5, "top5": 0.7, "top20": 0.9,
                    "questions": ict_questions}) + "\n")
    stage = {"em": 0.1, "top1": 0.6, "top5": 0.8, "top20": 0.95, "questions": 10, "reading_accuracy": 0.12}
    (run / "mss.dev.json").write_text(json.dumps(stage))
    (run / "emdr2.dev.json").write_text(json.dumps({**stage, "top5": 0.85}))


def test_table8_line_in_the_stage_table_and_alone(tmp_path):
    run = tmp_path / "run"
    _stage_run(run)
    out = _run("stage_table.py", "--run", run)
    assert out.returncode == 0, out.stderr
    line = "Table 8 (retrieval recall@5 on dev, 10 questions): after ICT 0.700 | after MSS 0.800"
    assert line in out.stdout.splitlines()
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["table8"] == {"ict_top5": 0.7, "mss_top5": 0.8, "questions": 10}

    # only the line, the MSS metrics from elsewhere (the unsupervised study's case)
    other = tmp_path / "mss-elsewhere.json"
    other.write_text(json.dumps({"top5": 0.25, "questions": 10}))
    out = _run("stage_table.py", "--run", run, "--table8-only", "--mss-metrics", other)
    assert out.returncode == 0 and out.stdout.strip() == line.replace("0.800", "0.250")

    # different question sets are named, not silently compared
    run2 = tmp_path / "run2"
    _stage_run(run2, ict_questions=7)
    out = _run("stage_table.py", "--run", run2, "--table8-only")
    assert out.returncode == 0 and "(ICT on 7 questions: not the same set)" in out.stdout
    out = _run("stage_table.py", "--run", run, "--table8-only", "--mss-metrics", tmp_path / "nope.json")
    assert out.returncode == 2 and "nope.json: no such file" in out.stderr and "Traceback" not in out.stderr


# ----------------------------------------------------------------------------- Table 9


def test_storage_prediction_equals_a_written_index(tmp_path):
    rows, dim, shards = 1003, 48, 3
    emb = torch.randn(rows, dim)
    write_index(tmp_path / "v", emb, torch.arange(rows) + 7, num_shards=shards, model_step=5)
    measured = shard_store.measured_storage_bytes(tmp_path / "v")
    predicted = shard_store.storage_bytes(rows, dim, shards, model_step=5)
    files = sorted((tmp_path / "v").iterdir())
    on_disk = {p.suffix: 0 for p in files}
    for p in files:
        on_disk[p.suffix] += p.stat().st_size
    # data files and shard records: exact; the manifest carries a timestamp of varying width
    assert predicted["emb_bytes"] == on_disk[".emb"] == rows * dim * 2
    assert predicted["ids_bytes"] == on_disk[".ids"] == rows * 8
    assert predicted["shard_record_bytes"] == on_disk[".json"] - measured["manifest_bytes"]
    assert abs(predicted["manifest_bytes"] - measured["manifest_bytes"]) <= 4
    assert measured["total_bytes"] == sum(on_disk.values())
    assert abs(predicted["total_bytes"] - measured["total_bytes"]) <= 4


def test_memory_prediction_equals_what_each_rank_loads_and_searches(tmp_path, monkeypatch):
    rows, dim, ranks, queries = 1003, 48, 3, 5
    write_index(tmp_path / "v", torch.randn(rows, dim), torch.arange(rows), num_shards=2)
    pred = sharded_index.memory_footprint(rows, dim, ranks, queries, device_type="cpu", tile_rows=100)
    assert pred["total_bytes"] == rows * (dim * 2 + 8)
    q = torch.randn(queries, dim)
    for rank in range(ranks):  # each rank's slice, loaded as that rank would (no collective in load)
        monkeypatch.setattr(sharded_index, "_world", lambda group, r=rank: (r, ranks))
        index = ShardedIndex.load(tmp_path / "v", tile_rows=100)
        mine = pred["per_rank"][rank]
        assert index.local_rows == mine["rows"]
        assert index.memory_bytes == mine["vector_bytes"] + mine["id_bytes"]
        index.searcher.search(q, 10)  # allocates its buffers
        buffers = index.searcher._tile.nbytes + index.searcher._scores.nbytes
        assert buffers == mine["buffer_bytes"]
        assert index.memory_bytes + buffers == mine["bytes"]
    assert pred["max_rank_bytes"] == max(r["bytes"] for r in pred["per_rank"])
    # an fp32 shard needs no tile buffer: the helper the searcher allocates from says so too
    assert sharded_index.TiledSearcher.buffer_shapes(10, 4, 2, torch.float32)[0] == ()


def test_index_memory_tool(tmp_path, capsys):
    from tools import index_memory

    out = _run("index_memory.py", "--rows", "1000", "--dim", "128", "--ranks", "4", "--json-out", tmp_path / "t9.json")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Table 9")
    rows = {r["corpus"]: r for r in json.loads((tmp_path / "t9.json").read_text())["corpora"]}
    emdr2 = rows["EMDR2 (21M x 768)"]
    assert emdr2["vector_bytes"] == 21_015_324 * 768 * 2  # the paper's 32 GB
    assert "32.3 GB" in out.stdout and "REALM (13M x 128)" in out.stdout
    assert rows["yours"]["total_bytes"] == 1000 * (128 * 2 + 8) and rows["yours"]["ranks"] == 4

    write_index(tmp_path / "idx" / "step-00000000", torch.randn(50, 16), torch.arange(50), num_shards=2)
    capsys.readouterr()
    assert index_memory.main(["--index-dir", str(tmp_path / "idx"), "--queries", "0"]) == 0
    measured = shard_store.measured_storage_bytes(tmp_path / "idx")
    assert f"on disk {measured['total_bytes']:,} bytes measured" in capsys.readouterr().out

    for bad, message in ((["--index-dir", str(tmp_path / "none")], "no such index directory"),
                         (["--rows", "10"], "give --rows and --dim together"),
                         (["--rows", "10", "--dim", "0"], "--dim must be >= 1")):
        with pytest.raises(SystemExit) as e:
            index_memory.main(bad)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.startswith("index_memory: error: ")
        assert len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- Table 10


@pytest.fixture
def fresh_port(monkeypatch):
    from megatron.emdr2.initialize import free_port

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


def _tiny_retriever(path: Path, seed: int) -> None:
    """A random-init BiEncoder file as tools/build_index.py reads it (architecture in "config")."""
    from megatron.emdr2 import initialize
    from megatron.emdr2.models.biencoder import BiEncoder
    from tools.build_index import RetrieverConfig, _tower

    cfg = RetrieverConfig(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64,
                          max_sequence_length=64)
    initialize.initialize(1, 1, seed=seed)
    try:
        torch.manual_seed(seed)
        model = BiEncoder(_tower(cfg), _tower(cfg))
        torch.save({"model": model.state_dict(), "config": vars(cfg)}, path)
    finally:
        initialize.shutdown()


def _reference(checkpoint, evidence_path, questions, ids):
    """p(z|q) over the tool's K passages, and every passage's score, straight from the model."""
    from megatron.emdr2 import initialize
    from megatron.emdr2.data.evidence import load_evidence
    from megatron.emdr2.data.inputs import encode_context, encode_query
    from tools.build_index import load_retriever

    initialize.initialize(1, 1, seed=0)
    try:
        model, tok, _ = load_retriever(str(checkpoint))
        ev = load_evidence(str(evidence_path))
        with torch.no_grad():
            q = model.embed_queries(*encode_query(tok, questions, 64, pad_to="longest")).double()
            c = model.embed_contexts(*encode_context(tok, ev.passages(range(len(ev))), 64, pad_to="longest")).double()
    finally:
        initialize.shutdown()
    scores = (q @ c.T) * model.score_scale  # [Q, N], float64
    rows = torch.as_tensor(ev.row_of(np.asarray(ids).reshape(-1))).view(len(questions), -1)
    picked = scores.gather(1, rows)
    return torch.softmax(picked, dim=1).numpy(), scores.numpy(), rows.numpy()


def test_retrieval_confidence_before_and_after(tmp_path, nq_mini, fresh_port, capsys):
    from tools import retrieval_confidence

    lines = (nq_mini / "evidence.tsv").read_text().splitlines()
    (tmp_path / "evidence.tsv").write_text("\n".join(lines[:61]) + "\n")
    (tmp_path / "dev.tsv").write_text("\n".join((nq_mini / "dev.tsv").read_text().splitlines()[:6]) + "\n")
    for name, seed in (("before", 1), ("after", 2)):
        _tiny_retriever(tmp_path / f"{name}.pt", seed)
    common = ["--before", str(tmp_path / "before.pt"), "--after", str(tmp_path / "after.pt"),
              "--evidence", str(tmp_path / "evidence.tsv"), "--qa-file", str(tmp_path / "dev.tsv"), "--top-k", "4"]
    work = tmp_path / "work"
    assert retrieval_confidence.main(common + ["--questions", "3", "--work-dir", str(work),
                                               "--json-out", str(tmp_path / "t10.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Table 10") and out.count("\nQ") == 3 and "mean over 3 questions: p(top-1)" in out
    report = json.loads((tmp_path / "t10.json").read_text())
    questions = [r["question"] for r in report["questions"]]
    assert questions == [line.split("\t")[0] for line in (tmp_path / "dev.tsv").read_text().splitlines()[:3]]

    for name in ("before", "after"):
        got = report["questions"]
        ids = [r[name]["ids"] for r in got]
        probs = np.array([r[name]["probs"] for r in got])
        ref_p, all_scores, rows = _reference(tmp_path / f"{name}.pt", tmp_path / "evidence.tsv", questions, ids)
        np.testing.assert_allclose(probs, ref_p, atol=1e-5)  # p(z|q) as BiEncoder.score defines it
        assert np.allclose(probs.sum(1), 1) and (np.diff(probs, axis=1) <= 1e-6).all()  # best first
        for i in range(len(questions)):  # the K passages are the exact top-K (fp16 index: near-ties aside)
            kth = np.sort(all_scores[i])[::-1][3]
            assert all_scores[i, rows[i]].min() >= kth - 1e-2
        for r in got:
            top = r[name]["top1"]
            assert top["id"] == r[name]["ids"][0] and top["p"] == pytest.approx(r[name]["probs"][0])
            other = "after" if name == "before" else "before"
            if top["id"] in r[other]["ids"]:
                k = r[other]["ids"].index(top["id"])
                assert top["p_other"] == pytest.approx(r[other]["probs"][k]) and top["rank_other"] == k + 1
            else:
                assert top["p_other"] is None
            mass = sum(p for p, h in zip(r[name]["probs"], r[name]["has_answer"]) if h)
            assert r[name]["p_answer"] == pytest.approx(mass)

        # Table 9's storage prediction holds for the indexes build_index wrote (its "extra" included)
        m = shard_store.read_manifest(work / f"{name}-index")
        pred = shard_store.storage_bytes(m.num_rows, m.dim, len(m.shards), m.model_step, m.extra)
        meas = shard_store.measured_storage_bytes(work / f"{name}-index")
        assert (pred["emb_bytes"], pred["ids_bytes"]) == (meas["emb_bytes"], meas["ids_bytes"]) == (60 * 64, 60 * 8)
        assert pred["shard_record_bytes"] == meas["shard_record_bytes"]
        assert abs(pred["total_bytes"] - meas["total_bytes"]) <= 4

    # --question: the built indexes are reused; answers come from --qa-file when the question is
    # there; over all 60 passages (--top-k 60) the answer mass is that of the passages with an answer
    from megatron.emdr2.data.answers import has_answer
    from megatron.emdr2.data.qa import load_qa

    texts = [line.split("\t")[1] for line in lines[1:61]]
    answerable = next(e for e in load_qa(str(nq_mini / "dev.tsv")) if any(has_answer(e.answers, t) for t in texts))
    with open(tmp_path / "dev.tsv", "a") as f:
        f.write(f"{answerable.question}\t{json.dumps(answerable.answers)}\n")
    first = questions[0]
    assert retrieval_confidence.main(common[:-1] + ["60", "--question", first, "--question", answerable.question,
                                                    "--question", "an unseen question",
                                                    "--before-index", str(work / "before-index"),
                                                    "--after-index", str(work / "after-index"),
                                                    "--json-out", str(tmp_path / "q.json")]) == 0
    capsys.readouterr()
    q = json.loads((tmp_path / "q.json").read_text())["questions"]
    assert q[0]["answers"] == report["questions"][0]["answers"]
    assert q[0]["before"]["ids"][:4] == report["questions"][0]["before"]["ids"]
    hits = [has_answer(answerable.answers, texts[i - int(lines[1].split("\t")[0])]) for i in q[1]["after"]["ids"]]
    assert q[1]["after"]["has_answer"] == hits and any(hits)
    assert 0 < q[1]["after"]["p_answer"] < 1 and len(q[1]["after"]["ids"]) == 60
    assert q[2]["answers"] == [] and not any(q[2]["after"]["has_answer"])

    # an index of the other tower is refused by fingerprint; a missing checkpoint is named
    with pytest.raises(SystemExit) as e:
        retrieval_confidence.main(common + ["--before-index", str(work / "after-index"),
                                            "--after-index", str(work / "after-index")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "embedded by another context tower" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        retrieval_confidence.main(common[:1] + [str(tmp_path / "missing.pt")] + common[2:])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert err == f"retrieval_confidence: error: --before {tmp_path / 'missing.pt'}: no such file or directory"
    assert math.isfinite(report["questions"][0]["after"]["top1"]["p"])


def test_a_post_ln_retriever_is_rebuilt_post_ln_from_an_mss_or_emdr2_checkpoint(monkeypatch):
    """MSS/EMDR² checkpoints record the towers' layout under meta["retriever"]; tools reading them
    (build_index, eval_retrieval, retrieval_confidence) once rebuilt a MiniLM-started tower pre-LN,
    which loads without complaint and embeds every text nearly alike (Table 10 showed p = 1/K)."""
    from megatron.emdr2.openqa import builders
    from tools import build_index

    meta = {"retriever": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "ffn_hidden_size": 64,
                          "seq_length": 64, "post_layernorm": True, "layernorm_epsilon": 1e-12},
            "shared_towers": False}
    monkeypatch.setattr(builders, "load_checkpoint_meta", lambda path: meta)
    assert build_index._config_from_meta("run", {})["post_layernorm"] is True
    meta["retriever"]["post_layernorm"] = False
    assert build_index._config_from_meta("run", {})["post_layernorm"] is False
