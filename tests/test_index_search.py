"""Tiled running top-k against independent exact searches (float64 formula, FAISS)."""

import faiss
import numpy as np
import pytest
import torch

from megatron.emdr2.index import TiledSearcher, exact_search, merge_topk, write_index
from megatron.emdr2.index.faiss_backend import FaissIndex


def assert_exact_topk(ids, vectors, queries, k, rel_tol=1e-5, id_of_row=None):
    """``ids`` [Q, k] equals the float64 exact top-k, ties aside.

    At every rank j the float64 score of our j-th id must equal the j-th best float64 score
    (within fp32 rounding): a different id is allowed only where two scores tie.
    """
    v64, q64 = torch.as_tensor(vectors).double(), torch.as_tensor(queries).double()
    full = q64 @ v64.t()
    ref_s, ref_rows = full.topk(k, dim=1)
    rows = torch.as_tensor(ids)
    if id_of_row is not None:  # map ids back to rows
        row_of = {int(i): r for r, i in enumerate(id_of_row)}
        rows = torch.tensor([[row_of[int(i)] for i in line] for line in rows.tolist()])
    assert rows.shape == (q64.shape[0], k)
    assert all(len(set(line)) == k for line in rows.tolist()), "duplicate ids in a result"
    ours = full.gather(1, rows)
    tol = rel_tol * full.abs().max()
    assert torch.all((ours - ref_s).abs() <= tol), "not the exact top-k"
    return (rows == ref_rows).float().mean().item()


@pytest.mark.parametrize("prune", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_tiled_matches_float64(dtype, prune):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3001, 48, generator=g).to(dtype)
    q = torch.randn(9, 48, generator=g)
    for tile, k in ((500, 20), (3001, 50), (7, 20), (64, 200)):  # ragged last tile, k > tile
        s, r = TiledSearcher(x, tile_rows=tile, prune=prune).search(q, k)
        assert s.dtype == torch.float32 and r.dtype == torch.int64
        same = assert_exact_topk(r, x.float(), q, k)
        assert same > 0.99
        # fp32 scores of the stored vectors, best first
        ref = (q.double() @ x.double().t()).gather(1, r)
        torch.testing.assert_close(s.double(), ref, atol=1e-4, rtol=1e-5)
        assert torch.all(s[:, :-1] >= s[:, 1:])


def test_edge_cases_and_buffers():
    x = torch.randn(5, 8).half()
    for prune in (True, False):
        s, r = exact_search(torch.randn(3, 8), x, k=10, tile_rows=2, prune=prune)  # k > N: all rows
        assert s.shape == (3, 5) and sorted(r[0].tolist()) == [0, 1, 2, 3, 4]
        assert torch.all(s[:, :-1] >= s[:, 1:])
    # ties: equal rows must all be returned once each, never a duplicate or a -1
    dup = torch.ones(50, 8).half()
    _, r = exact_search(torch.ones(2, 8), dup, k=20, tile_rows=7)
    assert all(len(set(line)) == 20 and min(line) >= 0 for line in r.tolist())
    searcher = TiledSearcher(torch.randn(1000, 8).half(), tile_rows=100)
    searcher.search(torch.randn(4, 8), 3)
    assert searcher._scores.numel() == 4 * 100  # a [Q, tile] block, never [Q, N]
    with pytest.raises(ValueError, match="do not match the index dim 8"):
        searcher.search(torch.randn(2, 9), 3)
    top, ids = merge_topk(torch.tensor([[1.0, 5.0, 3.0]]), torch.tensor([[10, 50, 30]]), 2)
    assert ids.tolist() == [[50, 30]]


def test_same_ids_as_faiss_flat():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((20000, 64)).astype(np.float16).astype(np.float32)
    q = rng.standard_normal((32, 64)).astype(np.float32)
    flat = faiss.IndexFlatIP(64)
    flat.add(x)
    f_s, f_i = flat.search(q, 100)
    s, r = exact_search(torch.from_numpy(q), torch.from_numpy(x).half(), 100, tile_rows=4096)
    assert (r.numpy() == f_i).mean() > 0.99
    np.testing.assert_allclose(s.numpy(), f_s, rtol=1e-5, atol=1e-4)


def test_faiss_backend_flat_ivf_pq(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6000, 32)).astype(np.float32)
    ids = np.arange(6000, dtype=np.int64) * 3 + 100
    q = x[:50] + 0.1 * rng.standard_normal((50, 32)).astype(np.float32)
    write_index(tmp_path / "v", x, ids, num_shards=2)
    x16 = x.astype(np.float16).astype(np.float32)

    flat = FaissIndex.from_store(tmp_path / "v")
    s, got = flat.search(q, 10)
    assert_exact_topk(got, x16, q, 10, id_of_row=ids)
    flat.save(tmp_path / "flat.faiss")
    assert torch.equal(FaissIndex.load(tmp_path / "flat.faiss").search(q, 10)[1], got)

    ivf = FaissIndex.from_store(tmp_path / "v", "IVF16,Flat")
    ivf.set_nprobe(16)  # probing every list is exact
    assert torch.equal(ivf.search(q, 10)[1], got)

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # k-means under OpenMP crawls on a busy 2-core machine
    try:
        pq = FaissIndex.from_store(tmp_path / "v", "IVF16,PQ8x4", train_rows=6000)
    finally:
        faiss.omp_set_num_threads(threads)
    pq.set_nprobe(4)
    top1 = pq.search(q, 10)[1]
    # lossy, but each query's own (perturbed) vector should be found among the top 10
    assert (top1 == torch.from_numpy(ids[:50])[:, None]).any(1).float().mean() > 0.8


def _mm_with_out_dtype(monkeypatch):
    """Emulate CUDA's ``torch.mm(half, half, out_dtype=float32)`` on the CPU (which lacks the
    kernel): products of the half inputs accumulated in fp32, written to ``out``. Records the
    dtypes it was called with."""
    real_mm, calls = torch.mm, []

    def mm(a, b, *args, out_dtype=None, out=None, **kw):
        if out_dtype is None:
            return real_mm(a, b, *args, out=out, **kw) if out is not None else real_mm(a, b, *args, **kw)
        calls.append((a.dtype, b.dtype, out_dtype))
        assert a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16) and out_dtype == torch.float32
        return real_mm(a.float(), b.float(), out=out)

    monkeypatch.setattr(torch, "mm", mm)
    return calls


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_scoring_reads_the_shard_without_an_fp32_tile(monkeypatch, dtype):
    # the GPU path (on by default where vectors are on CUDA): one half x half GEMM per tile with
    # fp32 accumulation and fp32 scores, no fp32 copy of the tile; exact for queries the half
    # dtype represents (the queries are cast to it once per search)
    calls = _mm_with_out_dtype(monkeypatch)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2001, 32, generator=g).to(dtype)
    q = torch.randn(5, 32, generator=g).to(dtype).float()
    searcher = TiledSearcher(x, tile_rows=300, half_scoring=True)
    assert searcher.half_scoring and "-> fp32 accumulate" in searcher.scoring
    s, r = searcher.search(q, 40)
    assert searcher._tile is None and len(calls) == 7  # ceil(2001 / 300) tiles, none widened
    assert s.dtype == torch.float32 and searcher._scores.dtype == torch.float32
    assert assert_exact_topk(r, x.float(), q, 40) > 0.99
    torch.testing.assert_close(s.double(), (q.double() @ x.double().t()).gather(1, r), atol=1e-4, rtol=1e-5)
    # memory_footprint's helper agrees: no tile buffer on the GPU path, one on the CPU's
    assert TiledSearcher.buffer_shapes(2001, 32, 5, dtype, 300, "cuda") == ((), 5 * 300)
    assert TiledSearcher.buffer_shapes(2001, 32, 5, dtype, 300, "cpu") == ((300, 32), 5 * 300)
    assert TiledSearcher(x).half_scoring is False  # on a CPU the default stays the fp32 tile


def test_half_scoring_falls_back_where_torch_has_no_kernel():
    # a CPU (or a torch without mm(out_dtype)): the first tile finds out, the search widens tiles
    # into the fp32 buffer from then on, and the results are the exact ones
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1000, 16, generator=g).half()
    q = torch.randn(3, 16, generator=g)
    searcher = TiledSearcher(x, tile_rows=128, half_scoring=True)
    s, r = searcher.search(q, 10)
    assert not searcher.half_scoring and searcher._tile is not None
    assert assert_exact_topk(r, x.float(), q, 10) > 0.99
    s2, r2 = searcher.search(q, 10)  # and stays on that path
    assert torch.equal(r, r2) and torch.equal(s, s2)
