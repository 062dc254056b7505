"""Tensor parallelism: TP=2 on two gloo ranks gives TP=1's outputs and gradients.

The reference runs in the test process (TP=1); one spawn of two ranks runs every TP=2 check
(each rank pays a megatron import), loading its shard of the same weights via the converter's
``tp_split`` and returning outputs and gradient shards that the test merges back.
"""

from __future__ import annotations

import os

import pytest
import torch

from spawn import run_ranks

B, K, S, T, VOCAB = 2, 3, 6, 4, 96


@pytest.fixture(scope="module", autouse=True)
def megatron_single_rank():
    from megatron.core import parallel_state

    from megatron.emdr2.initialize import initialize

    if not parallel_state.model_parallel_is_initialized():
        initialize(1, 1, seed=1234)
    yield


def _build(tp: int):
    """The models under test, at tensor-parallel size ``tp`` (weights are loaded afterwards)."""
    from megatron.emdr2.models.bert_tower import BertTower
    from megatron.emdr2.models.biencoder import BiEncoder
    from megatron.emdr2.models.config import bert_config, t5_config
    from megatron.emdr2.models.fid import FiDReader

    no_drop = dict(hidden_dropout=0.0, attention_dropout=0.0, tensor_parallel=tp)
    query = BertTower(bert_config(2, 64, 4, 128, **no_drop), 100, 16)  # Megatron pre-LN
    context = BertTower(bert_config(2, 64, 4, 128, post_layernorm=True, **no_drop), 100, 16)
    google = FiDReader(t5_config(2, 64, 4, 96, kv_channels=16, style="t5-gated-gelu", **no_drop),
                       VOCAB, 32, position_embedding_type="relative",
                       relative_attention_num_buckets=8, relative_attention_max_distance=16,
                       scale_decoder_output=True)
    megatron_t5 = FiDReader(t5_config(2, 64, 4, 128, **no_drop), VOCAB, 32)
    return BiEncoder(query, context), {"t5-gated-gelu": google, "megatron": megatron_t5}


def _inputs():
    g = torch.Generator().manual_seed(7)
    q = torch.randint(1, 100, (B, 8), generator=g)
    c = torch.randint(1, 100, (B * 2, 10), generator=g)
    qm, cm = torch.ones_like(q), torch.ones_like(c)
    qm[1, 5:] = 0
    cm[2, 4:] = 0
    ids = torch.randint(2, VOCAB, (B, K, S), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 2, 3:] = 0
    dec = torch.randint(2, VOCAB, (B, T), generator=g)
    labels = torch.randint(2, VOCAB, (B, T), generator=g)
    labels[1, 3:] = -100
    return dict(q=q, qm=qm, c=c, cm=cm, ids=ids, mask=mask, dec=dec, labels=labels)


def _run(biencoder, readers, x):
    """Every output and every gradient the comparison looks at."""
    out = {}
    scores = biencoder(x["q"], x["qm"], x["c"], x["cm"])
    torch.nn.functional.cross_entropy(scores, torch.tensor([0, 2])).backward()
    out["scores"] = scores.detach()
    for name, reader in readers.items():
        out[f"{name}/logits"] = reader(x["ids"], x["mask"], x["dec"]).detach()
        reader.loss(x["ids"], x["mask"], x["dec"], x["labels"]).backward()
        states, memory_mask = reader.encode(x["ids"], x["mask"])
        seq, tok = reader.per_passage_log_likelihood(states, memory_mask, K, x["dec"], x["labels"],
                                                     max_logit_elements=100)
        out[f"{name}/per_passage"] = tok
        for beams in (1, 2):
            out[f"{name}/generate{beams}"] = reader.generate(x["ids"], x["mask"], 5, beams, 0, 1)
    grads = {}
    for prefix, module in [("bi", biencoder)] + list(readers.items()):
        for n, p in module.named_parameters():
            grads[f"{prefix}/{n}"] = p.grad.clone()
    return out, grads


def _tp2_rank(rank, world_size, full_state, x):
    from megatron.emdr2.initialize import initialize, shutdown
    from megatron.emdr2.models.convert import tp_split

    initialize(tensor_parallel=2, seed=1234)
    try:
        biencoder, readers = _build(2)
        biencoder.load_state_dict(tp_split(full_state["bi"], 2, rank, num_heads=4), strict=True)
        for name, reader in readers.items():
            reader.load_state_dict(tp_split(full_state[name], 2, rank, gated_mlp=name != "megatron",
                                            num_heads=4), strict=True)
        assert readers["megatron"].output_layer.bias.shape == (VOCAB // 2,)
        return _run(biencoder, readers, x)
    finally:
        shutdown()


def _merge_grad(name: str, shards, gated: bool):
    from megatron.emdr2.models.convert import partition_dim

    dim = partition_dim(name)
    if dim is None:  # replicated: every rank must hold the same full gradient
        assert torch.allclose(shards[0], shards[1], atol=1e-6), name
        return shards[0]
    if gated and name.endswith("linear_fc1.weight"):
        halves = [s.chunk(2, 0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(shards, dim=dim)


def test_tensor_parallel_2_matches_tensor_parallel_1():
    torch.manual_seed(0)
    biencoder, readers = _build(1)
    full_state = {"bi": biencoder.state_dict(), **{n: r.state_dict() for n, r in readers.items()}}
    x = _inputs()
    ref_out, ref_grads = _run(biencoder, readers, x)

    results = run_ranks(_tp2_rank, 2, full_state, x)
    (out0, grads0), (out1, grads1) = results
    for key, ref in ref_out.items():
        for out in (out0, out1):  # both ranks see the full (gathered) result
            if ref.dtype == torch.long:
                assert torch.equal(out[key], ref), key
            else:
                assert out[key].shape == ref.shape, key
                assert (out[key] - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item()), key
    assert ref_out["megatron/per_passage"].abs().sum() > 0

    assert set(grads0) == set(ref_grads)
    for key, ref in ref_grads.items():
        merged = _merge_grad(key.split("/", 1)[1], [grads0[key], grads1[key]],
                             gated=key.startswith("t5-gated-gelu/"))
        assert merged.shape == ref.shape, key
        tol = 1e-5 * max(1.0, ref.abs().max().item())
        assert (merged - ref).abs().max().item() <= tol, key
    # The towers and readers all received gradient (a silent detach would pass the above).
    for key in ("bi/query_tower.encoder.layers.0.self_attention.linear_qkv.weight",
                "bi/context_tower.embedding.word_embeddings.weight",
                "t5-gated-gelu/encoder_relative_pos_emb.relative_attention_bias.weight",
                "t5-gated-gelu/decoder.layers.1.mlp.linear_fc1.weight",
                "megatron/lm_head.output_layer.bias"):
        assert ref_grads[key].abs().sum() > 0, key
