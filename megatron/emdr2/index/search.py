"""Exact maximum-inner-product top-k over one shard, in tiles, with fp32 scores.

The shard stays in fp16 (half the memory of fp32); a running top-k per query is merged after
each tile, so peak extra memory is one [Q, tile] fp32 score block (plus, on a CPU, one fp32
tile), never [Q, N].

On a GPU each tile is scored in place: the queries are cast to the shard's dtype once per
search and ``torch.mm(q, tile.T, out_dtype=float32)`` runs one fp16 x fp16 GEMM with fp32
accumulation and fp32 output (cuBLAS), so the shard is read once per search and never copied.
CPUs have no fast fp16 GEMM with fp32 accumulation, so there each tile of rows is widened into
a preallocated fp32 buffer (a cheap streaming copy) and scored with sgemm. Measured on the
2-core Xeon here (64 x 1M x 768, quiet machine): ~0.6 s per batch vs ~7 s for
faiss.IndexFlatIP on fp32 (bench/bench_index.py). 16k-row tiles were fastest on the CPU: the
per-tile topk costs less with larger tiles, the copy and GEMM slow down once the tile leaves
the cache; and few large ops hold up best when the cores are shared.
"""

from __future__ import annotations

import torch

DEFAULT_TILE_ROWS = {"cpu": 16384, "cuda": 131072}
HALF_DTYPES = (torch.float16, torch.bfloat16)


def scores_in_half(device_type: str, dtype: torch.dtype) -> bool:
    """Whether a shard of ``dtype`` on ``device_type`` is scored by a half x half GEMM with fp32
    accumulation (GPUs), rather than through an fp32 copy of each tile (CPUs, fp32 shards)."""
    return device_type == "cuda" and dtype in HALF_DTYPES


def merge_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along dim 1 of candidate (scores, ids) [Q, M]; sorted by descending score."""
    k = min(k, scores.shape[1])
    top, pos = torch.topk(scores, k, dim=1)
    return top, ids.gather(1, pos)


class TiledSearcher:
    """Running top-k search over a fixed [N, d] matrix (fp16, bf16 or fp32; CPU or GPU).

    Buffers are allocated once and reused, so repeated searches (one per training step)
    do not allocate inside the loop.
    """

    def __init__(self, vectors: torch.Tensor, tile_rows: int | None = None, prune: bool | None = None,
                 half_scoring: bool | None = None):
        if vectors.dim() != 2:
            raise ValueError(f"expected a [rows, dim] matrix, got shape {tuple(vectors.shape)}")
        self.vectors = vectors
        self.device = vectors.device
        self.tile_rows = max(1, tile_rows or DEFAULT_TILE_ROWS.get(self.device.type, 16384))
        # prune: merge only the columns that beat a query's current k-th score instead of a
        # top-k per tile (one host sync per tile; measured no faster here, so off by default)
        self.prune = bool(prune)
        # half_scoring: fp16/bf16 x the same with fp32 accumulation and output, no tile copy
        # (default: on a GPU). Where torch cannot (an older torch, a CPU) it falls back, once,
        # to widening each tile into the fp32 buffer.
        if half_scoring is None:
            half_scoring = scores_in_half(self.device.type, vectors.dtype)
        self.half_scoring = bool(half_scoring) and vectors.dtype in HALF_DTYPES
        self._half_works = False  # set once a half x half -> fp32 GEMM has run here
        self._tile = None  # fp32 copy of one tile (unused when the shard is fp32 or scored in half)
        self._scores = None  # flat fp32 storage for a [Q, tile] score block

    @property
    def scoring(self) -> str:
        """How tiles are scored, for logs and reports."""
        if self.half_scoring:
            return f"{_short(self.vectors.dtype)} x {_short(self.vectors.dtype)} -> fp32 accumulate"
        if self.vectors.dtype == torch.float32:
            return "fp32 x fp32"
        return f"{_short(self.vectors.dtype)} tile widened to fp32, fp32 x fp32"

    @property
    def num_rows(self) -> int:
        return self.vectors.shape[0]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @staticmethod
    def buffer_shapes(num_rows: int, dim: int, num_queries: int, dtype: torch.dtype = torch.float16,
                      tile_rows: int | None = None, device_type: str = "cpu",
                      half_scoring: bool | None = None) -> tuple[tuple, int]:
        """(shape of the fp32 tile buffer, or () when the vectors are fp32 already or scored in
        half on a GPU; elements of the fp32 score buffer) that a search of ``num_queries`` queries
        over [num_rows, dim] allocates. ``_buffers`` allocates exactly these;
        ``sharded_index.memory_footprint`` counts them."""
        tile = min(max(1, tile_rows or DEFAULT_TILE_ROWS.get(device_type, 16384)), max(num_rows, 1))
        if half_scoring is None:
            half_scoring = scores_in_half(device_type, dtype)
        widen = dtype != torch.float32 and not (half_scoring and dtype in HALF_DTYPES)
        return ((tile, dim) if widen else ()), num_queries * tile

    def _buffers(self, num_queries: int) -> None:
        tile_shape, need = self.buffer_shapes(self.num_rows, self.dim, num_queries, self.vectors.dtype,
                                              self.tile_rows, self.device.type, self.half_scoring)
        if tile_shape and self._tile is None:
            self._tile = torch.empty(tile_shape, dtype=torch.float32, device=self.device)
        if self._scores is None or self._scores.numel() < need:
            self._scores = torch.empty(need, dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (scores fp32 [Q, min(k, N)], row numbers int64 [Q, min(k, N)]), best first."""
        q = queries.to(self.device, torch.float32).contiguous()
        if q.dim() != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries of shape {tuple(q.shape)} do not match the index dim {self.dim}")
        num_q, n_total = q.shape[0], self.num_rows
        k_out = min(k, n_total)
        if k_out == 0 or num_q == 0:
            return (torch.empty(num_q, k_out, device=self.device),
                    torch.empty(num_q, k_out, dtype=torch.long, device=self.device))
        self._buffers(num_q)
        q_half = q.to(self.vectors.dtype) if self.half_scoring else None
        best_s = torch.full((num_q, k_out), float("-inf"), device=self.device)
        best_r = torch.full((num_q, k_out), -1, dtype=torch.long, device=self.device)
        for start in range(0, n_total, self.tile_rows):
            n = min(self.tile_rows, n_total - start)
            rows = self.vectors[start:start + n]
            scores = self._scores[:num_q * n].view(num_q, n)
            if q_half is not None:
                try:  # one GEMM: half inputs, fp32 accumulation, fp32 scores; the shard is not copied
                    torch.mm(q_half, rows.t(), out_dtype=torch.float32, out=scores)
                    self._half_works = True
                except (TypeError, RuntimeError) as e:  # NotImplementedError is a RuntimeError
                    if self._half_works:  # it ran before: a real error, not a missing kernel
                        raise
                    self._fall_back_to_fp32_tiles(num_q, e)  # this torch/device cannot: widen tiles
                    q_half = None
            if q_half is None:
                if self._tile is not None:
                    tile = self._tile[:n]
                    tile.copy_(rows)  # fp16 -> fp32 into the reused buffer
                else:
                    tile = rows
                torch.mm(q, tile.t(), out=scores)
            if self.prune:
                # only columns that beat some query's current k-th score can change a top-k;
                # after the first tiles that is a handful, so the merge costs almost nothing
                cols = (scores > best_s[:, -1:]).any(0).nonzero().squeeze(1)
                if cols.numel() == 0:
                    continue
                tile_s, tile_r = scores.index_select(1, cols), (cols + start).expand(num_q, -1)
            else:
                kk = min(k_out, n)
                tile_s, tile_r = torch.topk(scores, kk, dim=1, sorted=False)
                tile_r = tile_r + start
            best_s, best_r = merge_topk(torch.cat([best_s, tile_s], 1), torch.cat([best_r, tile_r], 1), k_out)
        return best_s, best_r

    def _fall_back_to_fp32_tiles(self, num_queries: int, error: Exception) -> None:
        import logging

        logging.getLogger(__name__).warning(
            "torch.mm(%s, %s, out_dtype=float32) is not available on %s with torch %s (%s): scoring "
            "the index through an fp32 copy of each tile instead", self.vectors.dtype, self.vectors.dtype,
            self.device, torch.__version__, str(error).splitlines()[0][:200] if str(error) else type(error).__name__)
        self.half_scoring = False
        self._buffers(num_queries)


def _short(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))


def exact_search(queries: torch.Tensor, vectors: torch.Tensor, k: int, tile_rows: int | None = None,
                 prune: bool | None = None, half_scoring: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One-off tiled search (builds a TiledSearcher): (scores fp32, row numbers int64)."""
    return TiledSearcher(vectors, tile_rows, prune, half_scoring).search(queries, k)
