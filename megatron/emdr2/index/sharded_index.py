"""The evidence index spread over the ranks of a process group.

Each rank holds a contiguous slice of the rows (fp16, on its GPU or in RAM). A search
all-gathers the ranks' queries, scores them against the local slice with the tiled running
top-k, all-gathers the k candidates per shard and merges them into the exact global top-k.
The slice a rank holds depends only on the world size at load time, not on how many shards
the index was written with, so an index built on 16 ranks loads on 4 (or on 1).
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import torch
import torch.distributed as dist

from megatron.emdr2.index import shard_store
from megatron.emdr2.index.search import TiledSearcher, merge_topk

_COPY_ROWS = 1 << 16  # rows per host->device copy when loading (bounds temporary memory)
VECTOR_DTYPE, ID_DTYPE = torch.float16, torch.long  # what a rank holds per row (see memory_footprint)


def _world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def row_range(num_rows: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, end) held by ``rank``: balanced contiguous slices."""
    return num_rows * rank // world, num_rows * (rank + 1) // world


def _all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def _all_gather_rows(t: torch.Tensor, group) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every rank's [n_r, ...] tensor (n_r may differ) in rank order."""
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = torch.cat(_all_gather(n, group)).tolist()  # one small host sync per search
    padded = t.new_zeros((max(sizes),) + tuple(t.shape[1:]))
    padded[:t.shape[0]] = t
    parts = _all_gather(padded, group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), sizes


class ShardedIndex:
    """Exact MIPS over evidence embeddings sharded across a process group (or one process)."""

    def __init__(self, vectors: torch.Tensor, ids: torch.Tensor, num_rows: int | None = None,
                 group=None, tile_rows: int | None = None, model_step: int = 0):
        if vectors.shape[0] != ids.shape[0]:
            raise ValueError(f"{vectors.shape[0]} vectors but {ids.shape[0]} ids")
        self.vectors = vectors
        self.ids = ids.to(vectors.device, torch.long)
        self.group = group
        self.model_step = model_step
        self.rank, self.world = _world(group)
        self.num_rows = num_rows if num_rows is not None else self._global_rows()
        self.searcher = TiledSearcher(vectors, tile_rows)

    def _global_rows(self) -> int:
        n = torch.tensor([self.vectors.shape[0]], dtype=torch.long, device=self.vectors.device)
        if self.world > 1:
            dist.all_reduce(n, group=self.group)
        return int(n)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def local_rows(self) -> int:
        return self.vectors.shape[0]

    @property
    def memory_bytes(self) -> int:
        """Bytes this rank holds for its shard (vectors + ids)."""
        return self.vectors.nbytes + self.ids.nbytes

    @classmethod
    def load(cls, path: str | os.PathLike, group=None, device: torch.device | str | None = None,
             verify: bool = True, in_memory: bool = True, tile_rows: int | None = None) -> "ShardedIndex":
        """Load this rank's slice of a published index (any number of stored shards).

        ``verify`` checks the sha256 of every stored shard this rank reads; sizes are always
        checked. ``in_memory=False`` keeps a CPU shard memory-mapped (pages on demand), which
        only works when the slice lies inside one stored shard.
        """
        manifest = shard_store.read_manifest(path)
        rank, world = _world(group)
        device = torch.device(device or "cpu")
        start, end = row_range(manifest.num_rows, rank, world)
        pieces = _overlapping(manifest, start, end)
        if not in_memory and device.type == "cpu" and len(pieces) == 1:
            shard, a, b = pieces[0]
            emb, ids = shard_store.open_shard(manifest, shard, verify)
            vectors, id_t = torch.from_numpy(emb[a:b]), torch.from_numpy(ids[a:b])
        else:
            vectors = torch.empty(end - start, manifest.dim, dtype=VECTOR_DTYPE, device=device)
            id_t = torch.empty(end - start, dtype=ID_DTYPE, device=device)
            at = 0
            for shard, a, b in pieces:
                emb, ids = shard_store.open_shard(manifest, shard, verify)
                for c in range(a, b, _COPY_ROWS):
                    d = min(b, c + _COPY_ROWS)
                    vectors[at + c - a:at + d - a].copy_(torch.from_numpy(emb[c:d]))
                    id_t[at + c - a:at + d - a].copy_(torch.from_numpy(ids[c:d]))
                    _drop_pages(emb, c, d)
                    _drop_pages(ids, c, d)
                at += b - a
                del emb, ids
        return cls(vectors, id_t, manifest.num_rows, group, tile_rows, manifest.model_step)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int, gather_queries: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact global top-k: (scores fp32 [Q, k'], evidence ids int64 [Q, k']), k' = min(k, N).

        With ``gather_queries`` (the training case) each rank passes its own queries and gets
        results for them; otherwise every rank passes the same queries and gets all results.
        Collective: every rank of the group must call it.
        """
        q = queries.to(self.vectors.device, torch.float32)
        k_out = min(k, self.num_rows)
        if self.world == 1:
            scores, rows = self.searcher.search(q, k_out)
            return scores, self.ids[rows]
        if gather_queries:
            q, sizes = _all_gather_rows(q, self.group)
            offset = sum(sizes[:self.rank])
            mine = slice(offset, offset + sizes[self.rank])
        else:
            mine = slice(0, q.shape[0])
        scores, rows = self.searcher.search(q, k_out)
        cand_s = torch.full((q.shape[0], k_out), float("-inf"), device=q.device)
        cand_i = torch.full((q.shape[0], k_out), -1, dtype=torch.long, device=q.device)
        cand_s[:, :scores.shape[1]] = scores  # a shard with fewer than k rows pads with -inf
        cand_i[:, :scores.shape[1]] = self.ids[rows]
        all_s = torch.cat([s[mine] for s in _all_gather(cand_s, self.group)], dim=1)
        all_i = torch.cat([i[mine] for i in _all_gather(cand_i, self.group)], dim=1)
        return merge_topk(all_s, all_i, k_out)

    @torch.no_grad()
    def vectors_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The stored vectors (fp32 ``[*ids.shape, dim]``) of evidence ``ids``, this rank's own
        ids; an id the index lacks raises KeyError on every rank. Collective like ``search``: a
        frozen context tower's embeddings are already here, so nothing needs embedding again."""
        flat = ids.reshape(-1).to(self.ids.device, torch.long)
        if self.world > 1:
            wanted, sizes = _all_gather_rows(flat, self.group)
            offset = sum(sizes[:self.rank])
            mine = slice(offset, offset + sizes[self.rank])
        else:
            wanted, mine = flat, slice(0, flat.shape[0])
        if not hasattr(self, "_id_order"):  # built once: ids are fixed for the index's life
            self._id_order = torch.argsort(self.ids)
            self._sorted_ids = self.ids[self._id_order]
        pos = torch.searchsorted(self._sorted_ids, wanted).clamp_(max=max(self._sorted_ids.numel() - 1, 0))
        found = (self._sorted_ids[pos] == wanted) if self._sorted_ids.numel() else torch.zeros_like(wanted, dtype=torch.bool)
        out = torch.zeros(wanted.shape[0], self.dim, dtype=torch.float32, device=self.vectors.device)
        out[found] = self.vectors[self._id_order[pos[found]]].float()
        hits = found.to(torch.int32)
        if self.world > 1:  # each id lives on exactly one shard: the sum is that shard's row
            dist.all_reduce(out, group=self.group)
            dist.all_reduce(hits, group=self.group)
        missing = wanted[hits == 0]
        if missing.numel():
            raise KeyError(f"evidence ids not in the index: {missing[:5].tolist()}")
        return out[mine].view(*ids.shape, self.dim)


def memory_footprint(num_rows: int, dim: int, ranks: int = 1, queries: int = 0, device_type: str = "cuda",
                     tile_rows: int | None = None) -> dict:
    """Bytes an index of ``num_rows`` x ``dim`` occupies in memory when ``ranks`` ranks load it
    (``ShardedIndex.load``): each rank holds its ``row_range`` slice as VECTOR_DTYPE vectors and
    ID_DTYPE ids (``ShardedIndex.memory_bytes``), plus, once it has searched ``queries`` queries
    at a time (the all-gathered batch), the reusable buffers of its ``TiledSearcher``
    (``TiledSearcher.buffer_shapes``; tile size by ``device_type`` unless ``tile_rows``).

    Returns {"rows", "dim", "ranks", "queries", "vector_bytes", "id_bytes", "total_bytes"
    (vectors + ids over all ranks), "per_rank": [{"rows", "vector_bytes", "id_bytes",
    "buffer_bytes", "bytes"}], "max_rank_bytes"}. Table 9 of the paper, in this code's layout
    (docs/paper_tables.md, tools/index_memory.py)."""
    if num_rows < 0 or dim < 1 or ranks < 1 or queries < 0:
        raise ValueError(f"need rows >= 0, dim >= 1, ranks >= 1, queries >= 0; got {num_rows}, {dim}, "
                         f"{ranks}, {queries}")
    vec_item = torch.empty((), dtype=VECTOR_DTYPE).element_size()
    id_item = torch.empty((), dtype=ID_DTYPE).element_size()
    f32 = torch.empty((), dtype=torch.float32).element_size()
    per_rank = []
    for r in range(ranks):
        start, end = row_range(num_rows, r, ranks)
        n = end - start
        buffers = 0
        if queries:
            tile_shape, score_elems = TiledSearcher.buffer_shapes(n, dim, queries, VECTOR_DTYPE, tile_rows, device_type)
            buffers = (int(np.prod(tile_shape)) if tile_shape else 0) * f32 + score_elems * f32
        entry = {"rows": n, "vector_bytes": n * dim * vec_item, "id_bytes": n * id_item, "buffer_bytes": buffers}
        entry["bytes"] = entry["vector_bytes"] + entry["id_bytes"] + buffers
        per_rank.append(entry)
    return {"rows": num_rows, "dim": dim, "ranks": ranks, "queries": queries,
            "vector_bytes": num_rows * dim * vec_item, "id_bytes": num_rows * id_item,
            "total_bytes": num_rows * (dim * vec_item + id_item), "per_rank": per_rank,
            "max_rank_bytes": max(e["bytes"] for e in per_rank)}


def _drop_pages(arr, start: int, end: int) -> None:
    """Unmap the pages of rows [start, end) of a memory-mapped shard once they are copied.

    Touched pages of a mapping stay in the process's resident set until it is unmapped, so
    without this a load peaks at twice its slice (the copy plus the whole mapped shard:
    bench/bench_sharded_memory.py measured it). MADV_DONTNEED on this read-only private
    (copy-on-write, never written) mapping only drops the page-table entries; the data stays
    in the file and the page cache, and a later touch would fault it back in."""
    mm = getattr(arr, "_mmap", None)  # np.memmap's mapping of the whole file (offset 0)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    row_bytes = arr.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64))
    lo = start * row_bytes // mmap.PAGESIZE * mmap.PAGESIZE
    hi = min(len(mm), -(-end * row_bytes // mmap.PAGESIZE) * mmap.PAGESIZE)
    if hi > lo:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _overlapping(manifest: shard_store.Manifest, start: int, end: int) -> list[tuple[int, int, int]]:
    """(stored shard, first row, end row) pieces, local to each shard, covering global [start, end)."""
    offsets = np.cumsum([0] + [s.rows for s in manifest.shards])
    pieces = []
    for i, s in enumerate(manifest.shards):
        a, b = max(start, offsets[i]), min(end, offsets[i + 1])
        if a < b:
            pieces.append((i, int(a - offsets[i]), int(b - offsets[i])))
    return pieces
