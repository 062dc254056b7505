"""Import of the original EMDR² release: checkpoints and pickled evidence embeddings.

The "original" checkpoint is built from our randomly initialised (and perturbed) models through
the inverse mapping and saved in the release's directory layout and pickle format (legacy torch
serialisation, argparse args, a loss-scaler object of a module we do not have). Converting it
back must give the same weights, and the converted models must match an independent
re-implementation of the original's forward pass (written here from its math: pre-LN layers,
fused rows split as [heads, hn, 3], FiD memory concatenation, tied head plus bias).
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import random
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

HEADS = 4
ORIG_BERT_ROWS = 30592  # 30522 padded to a multiple of 128, as the original padded it
ORIG_T5_ROWS = 30720  # 30522 + [BOS], [EOS] + 100 sentinels, padded likewise


@pytest.fixture(scope="module", autouse=True)
def megatron_single_rank():
    from megatron.core import parallel_state

    from megatron.emdr2.initialize import initialize

    if not parallel_state.model_parallel_is_initialized():
        initialize(1, 1, seed=1234)
    yield


def _size():
    from megatron.emdr2.config import ModelSize

    return ModelSize(num_layers=2, hidden_size=32, num_attention_heads=HEADS, seq_length=24,
                     hidden_dropout=0.0, attention_dropout=0.0)


def _tokenizers():
    from megatron.emdr2.data.tokenizer import BertWordPieceTokenizer

    return BertWordPieceTokenizer(), BertWordPieceTokenizer(t5_extras=True, pad_to_multiple=128)


@pytest.fixture(scope="module")
def ours():
    """Our biencoder and reader, randomly initialised, every parameter perturbed (so norms are
    not all ones and biases not all zeros: a swapped norm or bias could not go unnoticed)."""
    from megatron.emdr2.openqa import builders

    rtok, tok = _tokenizers()
    torch.manual_seed(0)
    bi = builders.build_biencoder(_size(), rtok.vocab_size).eval()
    reader = builders.build_reader(_size(), tok.vocab_size, tok.real_vocab_size).eval()
    with torch.no_grad():
        for m in (bi, reader):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return bi, reader


class ForeignLossScaler:
    """Pickled under a module name this project does not have (as the original's objects are)."""

    def __init__(self):
        self.cur_scale = 4096.0


def _original_model_dict(bi, reader, layout):
    from megatron.emdr2.interop.original import bert_to_original, t5_to_original

    tower = lambda t: {k: v for k, v in bi.state_dict().items() if k.startswith(t + ".")}
    strip = lambda sd, t: {k[len(t) + 1:]: v for k, v in sd.items() if v is not None}
    return {
        "retriever/biencoder_model": {
            orig: bert_to_original(strip(tower(t), t), HEADS, layout, ORIG_BERT_ROWS)
            for orig, t in (("query_model", "query_tower"), ("context_model", "context_tower"))},
        "encoder/t5_model": t5_to_original({k: v for k, v in reader.state_dict().items() if v is not None},
                                           HEADS, layout, ORIG_T5_ROWS),
    }


def save_original(root, model_dict, version=1.0, iteration=7, extra=None):
    """The release's layout: root/latest_checkpointed_iteration.txt + iter_XXXXXXX/mp_rank_00/model_optim_rng.pt."""
    fake = types.ModuleType("megatron_fp16_loss_scaler_fake")
    ForeignLossScaler.__module__ = fake.__name__
    fake.ForeignLossScaler = ForeignLossScaler
    sys.modules[fake.__name__] = fake
    state = {"model": model_dict, "iteration": iteration,
             "args": argparse.Namespace(num_layers=2, hidden_size=32, num_attention_heads=HEADS,
                                        layernorm_epsilon=1e-5, hidden_dropout=0.1, attention_dropout=0.1,
                                        params_dtype=torch.float, fp16=False),
             "optimizer": {"loss_scaler": ForeignLossScaler(), "state": {}},
             "random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(), **(extra or {})}
    if version is not None:
        state["checkpoint_version"] = version
    path = root / f"iter_{iteration:07d}" / "mp_rank_00" / "model_optim_rng.pt"
    path.parent.mkdir(parents=True)
    try:  # torch 1.5 (the release's container) wrote the legacy, non-zip format
        torch.save(state, path, _use_new_zipfile_serialization=False)
    finally:
        del sys.modules[fake.__name__]
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return path


# ------------------------------------------------------------------ the original's math
def _ln(x, p, name, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], p[name + ".weight"], p[name + ".bias"], eps)


def _lin(x, p, name):
    return F.linear(x, p[name + ".weight"], p[name + ".bias"])


def _split(t, parts):
    """Checkpoint version 1.0: the fused output viewed as [heads, hn, parts]."""
    x = t.view(*t.shape[:-1], HEADS, -1, parts)
    return [x[..., j] for j in range(parts)]


def _attend(q, k, v, allowed):
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.size(-1))
    s = s.masked_fill(~allowed[:, None], -10000.0)
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).flatten(2)


def _layer(x, p, pre, allowed, memory=None, memory_allowed=None):
    q, k, v = _split(_lin(_ln(x, p, pre + "input_layernorm"), p, pre + "self_attention.query_key_value"), 3)
    x = x + _lin(_attend(q, k, v, allowed), p, pre + "self_attention.dense")
    h = _ln(x, p, pre + "post_attention_layernorm")
    if memory is not None:
        q = _lin(h, p, pre + "inter_attention.query").view(*h.shape[:-1], HEADS, -1)
        k, v = _split(_lin(memory, p, pre + "inter_attention.key_value"), 2)
        x = x + _lin(_attend(q, k, v, memory_allowed), p, pre + "inter_attention.dense")
        h = _ln(x, p, pre + "post_inter_attention_layernorm")
    return x + _lin(F.gelu(_lin(h, p, pre + "mlp.dense_h_to_4h")), p, pre + "mlp.dense_4h_to_h")


def _stack(x, p, allowed, layers=2, memory=None, memory_allowed=None):
    for i in range(layers):
        x = _layer(x, p, f"layers.{i}.", allowed, memory, memory_allowed)
    return _ln(x, p, "final_layernorm")


def _embed(lm, ids, types_=None):
    e = lm["embedding"]
    x = e["word_embeddings"]["weight"][ids] + e["position_embeddings"]["weight"][:ids.size(1)]
    return x if types_ is None else x + e["tokentype_embeddings"]["weight"][types_]


def original_bert(lm, ids, mask):
    allowed = mask.bool()[:, None, :].expand(-1, ids.size(1), -1)
    hidden = _stack(_embed(lm, ids, torch.zeros_like(ids)), lm["encoder"], allowed)
    return hidden[:, 0]


def original_fid_logits(t5, ids, mask, dec):
    """FiD as the original ran it: encode each (question, passage) alone, concatenate."""
    lm = t5["language_model"]
    B, K, S = ids.shape
    flat, fmask = ids.reshape(B * K, S), mask.reshape(B * K, S).bool()
    enc = _stack(_embed(lm, flat), lm["encoder"], fmask[:, None, :].expand(-1, S, -1))
    memory, mem_mask = enc.reshape(B, K * S, -1), mask.reshape(B, K * S).bool()
    T = dec.size(1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None].expand(B, -1, -1)
    out = _stack(_embed(lm, dec), lm["decoder"], causal, memory=memory,
                 memory_allowed=mem_mask[:, None, :].expand(-1, T, -1))
    return out @ lm["embedding"]["word_embeddings"]["weight"].t() + t5["lm_head"]["bias"]


def _inputs(rtok, tok):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1000, 29000, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    ids = ids * mask
    r_ids = torch.randint(1000, 29000, (2, 2, 16), generator=g)
    r_mask = torch.ones_like(r_ids)
    r_mask[0, 1, 9:] = 0
    r_ids = r_ids * r_mask
    dec = torch.randint(1000, tok.real_vocab_size, (2, 5), generator=g)
    return ids, mask, r_ids, r_mask, dec


# ------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def converted(tmp_path_factory, ours):
    """(the original-format model dict, our converted checkpoint directory)."""
    from tools.convert_original_emdr2 import main

    tmp_path = tmp_path_factory.mktemp("converted")
    model_dict = _original_model_dict(*ours, layout=1)
    save_original(tmp_path / "orig", model_dict)
    assert main(["--load", str(tmp_path / "orig"), "--out", str(tmp_path / "ours")]) == 0
    return model_dict, tmp_path


def test_converted_checkpoint_matches_original_forward(converted, ours):
    from megatron.emdr2.config import ModelSize
    from megatron.emdr2.models.bert_tower import BertTower
    from megatron.emdr2.models.config import bert_config
    from megatron.emdr2.openqa import builders

    bi, reader = ours
    rtok, tok = _tokenizers()
    model_dict, tmp_path = converted

    # what `tasks.openqa.evaluate --load` reads: sizes from meta, weights by model name
    meta = builders.load_checkpoint_meta(str(tmp_path / "ours"))
    assert meta["retriever"] == {**vars(_size()), "hidden_dropout": 0.1, "attention_dropout": 0.1,
                                 "layernorm_epsilon": 1e-5}
    assert meta["converted_from"]["checkpoint_version"] == 1.0
    bi2 = builders.build_biencoder(ModelSize(**meta["retriever"]), rtok.vocab_size).eval()
    reader2 = builders.build_reader(ModelSize(**meta["reader"]), tok.vocab_size, tok.real_vocab_size).eval()
    for name, model, src in (("biencoder", bi2, bi), ("reader", reader2, reader)):
        builders.load_into(model, builders.load_model_state(str(tmp_path / "ours"), name), name)
        got, want = model.state_dict(), src.state_dict()
        for k, v in want.items():
            if torch.is_tensor(v):
                if k.endswith("word_embeddings.weight") and name == "reader":
                    # rows past the original's vocabulary are padding on both sides
                    v, got[k] = v[:tok.real_vocab_size], got[k][:tok.real_vocab_size]
                assert torch.equal(got[k], v), k

    ids, mask, r_ids, r_mask, dec = _inputs(rtok, tok)
    with torch.no_grad():
        # towers against the original's math; the original's LayerNorm eps (1e-5) in our tower
        for orig, tower in (("query_model", bi2.query_tower), ("context_model", bi2.context_tower)):
            cfg = bert_config(2, 32, HEADS, hidden_dropout=0.0, attention_dropout=0.0, layernorm_epsilon=1e-5)
            twin = BertTower(cfg, rtok.vocab_size, 24).eval()
            twin.load_state_dict(tower.state_dict())
            want = original_bert(model_dict["retriever/biencoder_model"][orig]["language_model"], ids, mask)
            torch.testing.assert_close(twin(ids, mask), want, atol=2e-5, rtol=1e-4)
            assert not torch.allclose(tower(ids, mask), original_bert(
                model_dict["retriever/biencoder_model"]["query_model" if orig == "context_model"
                                                        else "context_model"]["language_model"], ids, mask))
        want = original_fid_logits(model_dict["encoder/t5_model"], r_ids, r_mask, dec)
        got = reader2(r_ids, r_mask, dec)
        real = tok.real_vocab_size
        torch.testing.assert_close(got[..., :real], want[..., :real], atol=1e-4, rtol=1e-4)
        assert torch.isinf(got[..., real:]).all()  # padding ids can never be generated


def test_evaluate_command_loads_the_converted_checkpoint(converted, tmp_path):
    """The real command, sizes from the checkpoint's meta only (no size flags)."""
    import subprocess

    from megatron.emdr2.initialize import free_port

    sys.path.insert(0, os.path.dirname(__file__))
    from openqa_helpers import ROOT, env, small_evidence

    e = env(threads=2)
    e["MASTER_PORT"] = str(free_port())
    out = subprocess.run(
        [sys.executable, "-m", "tasks.openqa.evaluate", "--load", str(converted[1] / "ours"),
         "--index-dir", str(tmp_path / "index"), "--evidence", str(small_evidence(tmp_path, 200)),
         "--eval-max-questions", "3", "--top-k", "2", "--context-max-len", "24", "--reader-max-len", "24",
         "--query-max-len", "16", "--answer-max-len", "6", "--no-repeat-ngram-size", "2",
         "--metrics-out", str(tmp_path / "m.json")],
        cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    assert json.loads((tmp_path / "m.json").read_text())["questions"] == 3
    bad = subprocess.run([sys.executable, "-m", "tasks.openqa.evaluate", "--load", str(converted[1] / "ours"),
                          "--index-dir", str(tmp_path / "index"), "--no-repeat-ngram-size", "-1"],
                         cwd=ROOT, env=e, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--no-repeat-ngram-size must be >= 0" in bad.stderr, bad.stderr[-2000:]
    assert bad.stderr.strip().count("\n") == 0


def test_checkpoint_version_decides_the_row_order(tmp_path, ours):
    from megatron.emdr2.interop.original import (convert_original, core_to_original_rows,
                                                 original_to_core_rows, read_original_checkpoint)
    from megatron.emdr2.models.convert import ConversionError

    bi, reader = ours
    t = torch.arange(3 * 8 * 2).reshape(48, 1).float()  # 4 heads x hn 4 x 3 parts, 2 columns
    t = torch.cat([t, -t], 1)
    for layout in (0, 1, 2):
        assert torch.equal(core_to_original_rows(original_to_core_rows(t, HEADS, 3, layout), HEADS, 3, layout), t)
    # version 1.0 rows are [heads, hn, 3]: row 0 is q of head 0, row 1 its k, row 2 its v
    core = original_to_core_rows(t, HEADS, 3, 1)
    assert core[:4, 0].tolist() == [0, 3, 6, 9] and core[4:8, 0].tolist() == [1, 4, 7, 10]

    v1 = convert_original(read_original_checkpoint(str(save_original(tmp_path / "v1", _original_model_dict(bi, reader, 1)))))
    v0_path = save_original(tmp_path / "v0", _original_model_dict(bi, reader, 0), version=None)
    with pytest.raises(ConversionError, match="checkpoint_version"):
        convert_original(read_original_checkpoint(str(v0_path)))
    v0 = convert_original(read_original_checkpoint(str(tmp_path / "v0")), checkpoint_version=0)
    for a, b in ((v1.biencoder, v0.biencoder), (v1.reader, v0.reader)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert v0.info["qkv_layout"] == "[3, heads, hn]" and v1.info["qkv_layout"] == "[heads, hn, 3]"


def test_bad_checkpoints_name_the_parameter(tmp_path, ours):
    from megatron.emdr2.interop.original import convert_original, read_original_checkpoint
    from megatron.emdr2.models.convert import ConversionError

    bi, reader = ours
    good = _original_model_dict(bi, reader, 1)
    good["retriever/biencoder_model"]["context_model"]["language_model"]["encoder"].pop(
        "layers.1.mlp.dense_4h_to_h.bias")
    path = save_original(tmp_path / "missing", good)
    with pytest.raises(ConversionError, match=r"context_model.*missing parameter 'encoder\.layers\.1\.mlp\.dense_4h_to_h\.bias'"):
        convert_original(read_original_checkpoint(str(path)))

    bad = _original_model_dict(bi, reader, 1)
    bad["encoder/t5_model"]["language_model"]["decoder"]["layers.0.inter_attention.key_value.weight"] = torch.zeros(8, 32)
    path = save_original(tmp_path / "shape", bad)
    with pytest.raises(ConversionError, match=r"'decoder\.layers\.0\.inter_attention\.key_value\.weight' has shape \(8, 32\), expected \(64, 32\)"):
        convert_original(read_original_checkpoint(str(path)))

    with pytest.raises(ConversionError, match="has 100 vocabulary rows but the tokenizer has 30522"):
        _small_vocab(tmp_path, bi, reader)
    from tools.convert_original_emdr2 import main
    assert main(["--load", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 1


def _small_vocab(tmp_path, bi, reader):
    from megatron.emdr2.interop.original import convert_original, read_original_checkpoint

    d = _original_model_dict(bi, reader, 1)
    emb = d["retriever/biencoder_model"]["query_model"]["language_model"]["embedding"]["word_embeddings"]
    emb["weight"] = emb["weight"][:100]
    convert_original(read_original_checkpoint(str(save_original(tmp_path / "small", d))),
                     retriever_vocab=30522, retriever_real_vocab=30522)


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_pickles_cannot_run_code(tmp_path, ours):
    from megatron.emdr2.interop.original import Placeholder, read_original_checkpoint, read_embedding_pickles
    from megatron.emdr2.models.convert import ConversionError

    bi, reader = ours
    target = tmp_path / "pwned"
    path = save_original(tmp_path / "ckpt", _original_model_dict(bi, reader, 1),
                         extra={"evil": _Exploit(target)})
    ckpt = read_original_checkpoint(str(path))  # checkpoints: unknown objects become placeholders
    assert not target.exists()
    assert ckpt.args["num_attention_heads"] == HEADS
    with open(tmp_path / "emb.pkl", "wb") as f:
        pickle.dump({"embed_data": {1: _Exploit(target)}}, f)
    with pytest.raises(ConversionError, match=r"refuses to unpickle '(posix|os)\.system'"):
        read_embedding_pickles([str(tmp_path / "emb.pkl")])  # embedding files: refused outright
    assert not target.exists()
    assert isinstance(ckpt_state_optimizer(path), Placeholder)


def ckpt_state_optimizer(path):
    from megatron.emdr2.interop.original import safe_torch_load

    return safe_torch_load(str(path))["optimizer"]["loss_scaler"]


def test_embedding_pickles_become_a_sharded_index(tmp_path):
    from megatron.emdr2.index import ShardedIndex, open_shard, read_manifest
    from megatron.emdr2.interop.original import save_original_embeddings
    from tools.convert_original_embeddings import main

    rng = np.random.default_rng(0)
    ids = rng.permutation(np.arange(1, 1201)) * 7  # evidence ids, in no particular order
    vecs = rng.standard_normal((1200, 48)).astype(np.float32)
    # two per-rank pickles as the original's indexer leaves them: numpy-int keys and plain ints
    save_original_embeddings(str(tmp_path / "0.pkl"), ids[:700], vecs[:700])
    save_original_embeddings(str(tmp_path / "1.pkl"), [int(i) for i in ids[700:]], vecs[700:])
    out = tmp_path / "index" / "step-00000009"
    assert main(["--pickle", str(tmp_path / "0.pkl"), str(tmp_path / "1.pkl"), "--out", str(out),
                 "--num-shards", "3", "--model-step", "9"]) == 0
    m = read_manifest(tmp_path / "index")
    assert (m.num_rows, m.dim, m.model_step, len(m.shards)) == (1200, 48, 9, 3)
    got_ids = np.concatenate([open_shard(m, s)[1] for s in range(3)])
    got_emb = np.concatenate([open_shard(m, s)[0] for s in range(3)])
    order = np.argsort(ids)
    assert np.array_equal(got_ids, ids[order])
    assert np.array_equal(got_emb, vecs[order].astype(np.float16))
    # and it searches: a stored vector's own id comes first
    idx = ShardedIndex.load(str(tmp_path / "index"))
    q = torch.from_numpy(vecs[[5, 900]].astype(np.float16).astype(np.float32)) * 10
    scores, found = idx.search(q, 3)
    assert found[:, 0].tolist() == [int(ids[5]), int(ids[900])]

    # errors name the evidence id and the file
    save_original_embeddings(str(tmp_path / "dup.pkl"), ids[:3], vecs[:3])
    assert main(["--pickle", str(tmp_path / "0.pkl"), str(tmp_path / "dup.pkl"), "--out",
                 str(tmp_path / "bad")]) == 1
    with open(tmp_path / "dim.pkl", "wb") as f:
        pickle.dump({"embed_data": {1: np.zeros(48, np.float16), 2: np.zeros(47, np.float16)}}, f)
    from megatron.emdr2.interop.original import read_embedding_pickles, write_embeddings_index
    from megatron.emdr2.models.convert import ConversionError

    with pytest.raises(ConversionError, match=r"evidence id 2 has an embedding of shape \(47,\)"):
        write_embeddings_index(read_embedding_pickles([str(tmp_path / "dim.pkl")]), str(tmp_path / "bad2"))
    with pytest.raises(ConversionError, match=r"evidence id \d+ is also in .*0\.pkl"):
        read_embedding_pickles([str(tmp_path / "0.pkl"), str(tmp_path / "dup.pkl")])
