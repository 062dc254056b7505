"""The weighted-mean retriever tower and its lexical (LSA) initialisation: the pooling's
arithmetic, the tool's tower computing the LSA it was built from, and the pooling travelling
with the weights through ICT into MSS/EMDR² and the index tools."""

import json
import subprocess
import sys

import pytest
import torch

from openqa_helpers import NQ_MINI, ROOT, env, small_evidence

TOWER = ["--retriever-num-layers", "2", "--retriever-hidden-size", "64", "--retriever-num-attention-heads", "4",
         "--retriever-seq-length", "128", "--query-max-len", "32", "--context-max-len", "96",
         "--retriever-hidden-dropout", "0", "--retriever-attention-dropout", "0", "--shared-towers"]


def _run(args, timeout=240):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env(2), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("lexical")
    evidence = small_evidence(d, rows=300)
    dev = d / "dev.tsv"  # dev questions whose gold passage is in the slice
    rows = [json.loads(l) for l in (NQ_MINI / "dev.jsonl").read_text().splitlines()]
    dev.write_text("".join([f"{r['question']}\t{json.dumps(r['answers'])}\n" for r in rows
                            if r["gold_passage_id"] <= 300][:20]))
    return {"evidence": evidence, "dev": dev, "dir": d}


@pytest.fixture(scope="module")
def lexical(data):
    out = data["dir"] / "lexical.pt"
    proc = _run(["tools/init_lexical_retriever.py", "--evidence", str(data["evidence"]), "--hidden-size", "64",
                 "--num-layers", "2", "--num-attention-heads", "4", "--seq-length", "128", "--context-max-len", "96",
                 "--shared-towers", "--output", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture()
def megatron_cpu():
    from megatron.emdr2 import initialize

    initialize.initialize(tensor_parallel=1, seed=1)
    yield
    initialize.shutdown()


def _tower(pooling, vocab=50):
    from megatron.emdr2.config import ModelSize
    from megatron.emdr2.openqa.builders import build_tower

    size = ModelSize(num_layers=2, hidden_size=16, num_attention_heads=2, seq_length=16, hidden_dropout=0.0,
                     attention_dropout=0.0, pooling=pooling)
    return build_tower(size, vocab).eval()


def test_weighted_mean_pooling_weights_tokens_ignores_padding_and_has_length_sqrt_hidden(megatron_cpu):
    tower = _tower("weighted-mean")
    ids = torch.tensor([[2, 7, 9, 4, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        tower.token_weight.copy_(torch.rand(50) + 0.5)
        out = tower(ids, mask)
        hidden = tower.hidden_states(ids, mask)[0, :4]
        w = tower.token_weight[ids[0, :4]]
        expected = (w[:, None] * hidden).sum(0) / w.sum()
        assert out.norm().item() == pytest.approx(16 ** 0.5, rel=1e-5)
        assert torch.nn.functional.cosine_similarity(out[0], expected, dim=0).item() == pytest.approx(1, abs=1e-5)
        # whatever the padded positions hold, they do not count
        assert torch.allclose(tower(torch.tensor([[2, 7, 9, 4, 33, 41]]), mask), out, atol=1e-5)
        # a token with weight 0 drops out of the mean (attention still sees it)
        tower.token_weight[9] = 0
        kept = hidden[[0, 1, 3]]
        w_kept = tower.token_weight[torch.tensor([2, 7, 4])]
        expected = (w_kept[:, None] * kept).sum(0) / w_kept.sum()
        without = tower(ids, mask)
        assert torch.nn.functional.cosine_similarity(without[0], expected, dim=0).item() == pytest.approx(1, abs=1e-5)
        assert not torch.allclose(without, out)
    assert "token_weight" in tower.state_dict()
    assert "token_weight" not in _tower("cls").state_dict()


def _assert_tower_computes_its_lsa(checkpoint, evidence_file):
    from megatron.emdr2.data.evidence import load_evidence
    from megatron.emdr2.data.inputs import encode_context
    from tools import build_index

    model, tok, _ = build_index.load_retriever(str(checkpoint))
    assert model.shared and model.query_tower.pooling == "weighted-mean"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["config"]["pooling"] == "weighted-mean"
    state = saved["model"]
    vectors, weights = state["query_tower.embedding.word_embeddings.weight"], state["query_tower.token_weight"]
    assert all(weights[i] == 0 for i in tok.special_ids)
    evidence = load_evidence(str(evidence_file))
    ids, mask = encode_context(tok, evidence.passages(list(range(40))), 96, pad_to="longest")
    with torch.no_grad():
        got = model.embed_contexts(ids, mask)
    # by hand: idf-weighted mean of the LayerNorm-ed (centred, unit-scale) LSA token vectors
    ln = torch.nn.functional.layer_norm(vectors[ids].float(), (64,), eps=1e-5)
    w = weights[ids].float() * mask.float()
    expected = (w[..., None] * ln).sum(1)
    cos = torch.nn.functional.cosine_similarity(got, expected, dim=1)
    assert cos.min().item() > 0.999
    # and the LSA is a retriever: most passages are their own nearest neighbour
    scores = model.score(got, got)
    assert (scores.argmax(1) == torch.arange(40)).float().mean().item() >= 0.9
    return vectors


def test_the_lexical_tower_computes_the_idf_weighted_lsa_it_was_built_from(lexical, data, megatron_cpu):
    _assert_tower_computes_its_lsa(lexical, data["evidence"])


def test_fewer_lsa_dimensions_fill_the_first_coordinates_and_the_tower_still_computes_them(data, megatron_cpu):
    out = data["dir"] / "lexical-16.pt"
    proc = _run(["tools/init_lexical_retriever.py", "--evidence", str(data["evidence"]), "--hidden-size", "64",
                 "--lsa-dim", "16", "--num-layers", "2", "--num-attention-heads", "4", "--seq-length", "128",
                 "--context-max-len", "96", "--shared-towers", "--output", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "16 LSA dimensions in a 64-wide tower" in proc.stdout
    vectors = _assert_tower_computes_its_lsa(out, data["evidence"])
    assert vectors[:, 16:].abs().max().item() == 0
    used = vectors[:, :16].norm(dim=1)
    assert torch.allclose(used[used > 0], torch.full_like(used[used > 0], 4.0), atol=1e-3)  # sqrt(16)


def test_ict_keeps_the_pooling_and_the_openqa_tasks_rebuild_it(lexical, data, tmp_path):
    save = tmp_path / "ict"
    proc = _run(["-m", "tasks.openqa.ict", *TOWER, "--retriever-load", str(lexical), "--evidence",
                 str(data["evidence"]), "--dev-data", str(data["dev"]), "--train-iters", "2", "--eval-interval", "2",
                 "--global-batch-size", "8", "--micro-batch-size", "8", "--lr", "1e-4", "--no-progress-bar",
                 "--embed-batch-size", "64", "--save", str(save)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((save / "retriever_config.json").read_text())["pooling"] == "weighted-mean"
    evals = [json.loads(l) for l in (save / "metrics.jsonl").read_text().splitlines() if '"top20"' in l]
    assert evals and evals[-1]["top5"] >= 0.5  # the lexical start retrieves from step one

    import argparse

    from tasks.openqa import common

    args = argparse.Namespace(**{"retriever_load": str(save), "reader_load": None, "retriever_pooling": None,
                                 **{f"{r}_{k}": v for r in ("retriever", "reader") for k, v in
                                    dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=None,
                                         seq_length=128, hidden_dropout=0.0, attention_dropout=0.0).items()}})
    assert common.role_sizes(args)["retriever"].pooling == "weighted-mean"


def test_pooling_flags_that_contradict_the_weights_are_one_line_errors(lexical, data, tmp_path):
    common_flags = [*TOWER, "--evidence", str(data["evidence"]), "--train-iters", "1", "--global-batch-size", "8",
                    "--micro-batch-size", "8", "--no-progress-bar", "--save", str(tmp_path / "x")]
    proc = _run(["-m", "tasks.openqa.ict", *common_flags, "--retriever-load", str(lexical),
                 "--retriever-pooling", "cls"])
    assert proc.returncode == 2
    assert "contradicts --retriever-load" in proc.stderr and "weighted-mean" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_tool_refuses_bad_input_in_one_line(data, tmp_path):
    tiny = tmp_path / "tiny.tsv"
    tiny.write_text("id\ttext\ttitle\n1\tone passage only\tT\n2\tand a second\tU\n")
    out = tmp_path / "x.pt"
    for args, message in (
            (["--evidence", str(tiny)], "exceeds the TF-IDF matrix's rank bound"),
            (["--evidence", str(tmp_path / "missing.tsv")], "no such file"),
            (["--evidence", str(data["evidence"]), "--hidden-size", "63"], "not divisible"),
            (["--evidence", str(data["evidence"]), "--hidden-size", "64", "--lsa-dim", "128"],
             "--lsa-dim 128 exceeds --hidden-size 64"),
    ):
        proc = _run(["tools/init_lexical_retriever.py", *args, "--output", str(out)])
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert not out.exists() and not list(tmp_path.glob("x.pt.tmp*"))


def test_emdr2_trains_from_the_lexical_start_and_evaluate_rebuilds_its_pooling(lexical, data, tmp_path):
    from openqa_helpers import TINY_OPENQA

    save = tmp_path / "emdr2"
    proc = _run(["-m", "tasks.openqa.emdr2", *TINY_OPENQA, "--retriever-seq-length", "128", "--shared-towers",
                 "--retriever-load", str(lexical), "--evidence", str(data["evidence"]), "--train-data",
                 str(data["dev"]), "--index-dir", str(tmp_path / "index"), "--top-k", "2", "--train-iters", "2",
                 "--global-batch-size", "2", "--micro-batch-size", "2", "--lr", "1e-4", "--save", str(save)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    from megatron.emdr2.openqa.builders import load_checkpoint_meta

    assert load_checkpoint_meta(str(save))["retriever"]["pooling"] == "weighted-mean"
    metrics = tmp_path / "m.json"
    proc = _run(["-m", "tasks.openqa.evaluate", "--load", str(save), "--index-dir", str(tmp_path / "eval-index"),
                 "--rebuild-index", "--evidence", str(data["evidence"]), "--qa-file", str(data["dev"]),
                 "--metrics-out", str(metrics)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(metrics.read_text())["top5"] >= 0.5  # a [CLS] tower rebuilt from these weights would not


@pytest.mark.parametrize("settings, message", [
    ({"RETRIEVER_INIT": "bert"}, "RETRIEVER_INIT=bert: expected random or lexical"),
    ({"READER": "large"}, "READER=large: expected small or quickstart"),
    ({"LSA_DIM": "32"}, "LSA_DIM is for RETRIEVER_INIT=lexical"),
])
def test_the_study_script_refuses_bad_settings_before_making_a_run_directory(tmp_path, settings, message):
    run = tmp_path / "run"
    proc = subprocess.run(["bash", "examples/nq_mini_unsupervised_study.sh"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**env(2), **settings, "RUN": str(run)})
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not run.exists()
