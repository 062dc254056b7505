"""The evidence index spread over the ranks of a process group.

Each rank holds a contiguous slice of the rows (fp16, on its GPU or in RAM). A search
all-gathers the ranks' queries, scores them against the local slice with the tiled running
top-k, all-gathers the k candidates per shard and merges them into the exact global top-k.
The slice a rank holds depends only on the world size at load time, not on how many shards
the index was written with, so an index built on 16 ranks loads on 4 (or on 1).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

from megatron.emdr2.index import shard_store
from megatron.emdr2.index.search import TiledSearcher, merge_topk

_COPY_ROWS = 1 << 16  # rows per host->device copy when loading (bounds temporary memory)


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
            vectors = torch.empty(end - start, manifest.dim, dtype=torch.float16, device=device)
            id_t = torch.empty(end - start, dtype=torch.long, device=device)
            at = 0
            for shard, a, b in pieces:
                emb, ids = shard_store.open_shard(manifest, shard, verify)
                for c in range(a, b, _COPY_ROWS):
                    d = min(b, c + _COPY_ROWS)
                    vectors[at + c - a:at + d - a].copy_(torch.from_numpy(emb[c:d]))
                    id_t[at + c - a:at + d - a].copy_(torch.from_numpy(ids[c:d]))
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


def _overlapping(manifest: shard_store.Manifest, start: int, end: int) -> list[tuple[int, int, int]]:
    """(stored shard, first row, end row) pieces, local to each shard, covering global [start, end)."""
    offsets = np.cumsum([0] + [s.rows for s in manifest.shards])
    pieces = []
    for i, s in enumerate(manifest.shards):
        a, b = max(start, offsets[i]), min(end, offsets[i + 1])
        if a < b:
            pieces.append((i, int(a - offsets[i]), int(b - offsets[i])))
    return pieces
