"""The evidence index: fp16 shards on disk, exact sharded MIPS search, distributed embedding.

- ``shard_store``: on-disk format (fp16 matrix + int64 ids per shard, manifest written last).
- ``search``: tiled running top-k over one shard with fp32 scores.
- ``sharded_index.ShardedIndex``: the index across a process group (load, search).
- ``embed.embed_evidence``: each rank embeds its slice of the evidence and writes its shard.
- ``faiss_backend.FaissIndex``: optional FAISS serving backend (flat, IVF, PQ).
- ``fingerprint``: which context tower embedded an index (recorded in the manifest, checked at load).
"""

from megatron.emdr2.index.embed import embed_evidence
from megatron.emdr2.index.search import TiledSearcher, exact_search, merge_topk
from megatron.emdr2.index.shard_store import (
    IndexStoreError,
    Manifest,
    ShardWriter,
    open_shard,
    publish,
    read_manifest,
    version_name,
    write_index,
)
from megatron.emdr2.index.sharded_index import ShardedIndex, row_range

__all__ = [
    "IndexStoreError", "Manifest", "ShardWriter", "ShardedIndex", "TiledSearcher", "embed_evidence",
    "exact_search", "merge_topk", "open_shard", "publish", "read_manifest", "row_range",
    "version_name", "write_index",
]
