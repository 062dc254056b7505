"""FAISS serving backend: flat (exact) or compressed (IVF / PQ) inner-product search on CPU.

Not used in training (the sharded fp16 index is faster and exact); for serving a corpus on a
CPU box, or for one that does not fit in RAM as fp16 (``IVF4096,PQ64`` is ~64 bytes/passage).
The FAISS index maps to evidence ids itself (IndexIDMap2), so results match ShardedIndex's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from megatron.emdr2.index import shard_store

_ADD_ROWS = 1 << 16


def _faiss():
    try:
        import faiss
    except ImportError as e:  # optional dependency
        raise ImportError("the FAISS backend needs `pip install faiss-cpu`") from e
    return faiss


class FaissIndex:
    """A FAISS index over evidence embeddings, keyed by evidence id."""

    def __init__(self, index, nprobe: int | None = None):
        self.index = index
        if nprobe is not None:
            self.set_nprobe(nprobe)

    @classmethod
    def create(cls, dim: int, factory: str = "Flat") -> "FaissIndex":
        """``factory``: a faiss.index_factory string, e.g. "Flat", "IVF1024,Flat", "IVF4096,PQ64"."""
        faiss = _faiss()
        base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        return cls(faiss.IndexIDMap2(base))

    @property
    def is_trained(self) -> bool:
        return self.index.is_trained

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def set_nprobe(self, nprobe: int) -> None:
        faiss = _faiss()
        ivf = faiss.try_extract_index_ivf(faiss.downcast_index(self.index.index))
        if ivf is not None:
            ivf.nprobe = nprobe

    def train(self, vectors) -> None:
        if not self.index.is_trained:
            self.index.train(_f32(vectors))

    def add(self, vectors, ids) -> None:
        """Add rows in chunks (fp16 inputs are widened chunk by chunk, not all at once)."""
        vectors, ids = np.asarray(vectors), np.asarray(ids, dtype=np.int64)
        for a in range(0, len(vectors), _ADD_ROWS):
            b = min(len(vectors), a + _ADD_ROWS)
            self.index.add_with_ids(_f32(vectors[a:b]), np.ascontiguousarray(ids[a:b]))

    def search(self, queries, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores fp32 [Q, k], evidence ids int64 [Q, k]); ids are -1 where fewer than k exist."""
        scores, ids = self.index.search(_f32(queries), k)
        return torch.from_numpy(scores), torch.from_numpy(ids)

    @classmethod
    def from_store(cls, path: str | os.PathLike, factory: str = "Flat", train_rows: int = 262144,
                   verify: bool = True, seed: int = 0) -> "FaissIndex":
        """Build from a published shard store (all shards, in this process)."""
        manifest = shard_store.read_manifest(path)
        index = cls.create(manifest.dim, factory)
        shards = [shard_store.open_shard(manifest, s, verify) for s in range(len(manifest.shards))]
        if not index.is_trained:  # IVF/PQ: train on a uniform sample of rows
            rng = np.random.default_rng(seed)
            take = np.sort(rng.choice(manifest.num_rows, min(train_rows, manifest.num_rows), replace=False))
            offsets = np.cumsum([0] + [s.rows for s in manifest.shards])
            sample = np.concatenate([
                emb[take[(take >= offsets[i]) & (take < offsets[i + 1])] - offsets[i]]
                for i, (emb, _) in enumerate(shards)])
            index.train(sample)
        for emb, ids in shards:
            index.add(emb, ids)
        return index

    def save(self, path: str | os.PathLike) -> None:
        faiss = _faiss()
        path = Path(path)
        tmp = path.with_name(path.name + shard_store.PARTIAL)
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, nprobe: int | None = None) -> "FaissIndex":
        if not Path(path).is_file():
            raise shard_store.IndexStoreError(f"{path}: no such FAISS index file")
        return cls(_faiss().read_index(str(path)), nprobe)


def _f32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)
