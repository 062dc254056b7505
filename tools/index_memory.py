"""Evidence-embedding memory (the paper's Table 9), computed from this code's index layout.

    python tools/index_memory.py --rows 5000000 --dim 768 --ranks 8        # your corpus, on 8 ranks
    python tools/index_memory.py --index-dir runs/index --ranks 4           # an index you built

Prints REALM's corpus (13M x 128), EMDR²'s (21,015,324 x 768) and yours, each as this code stores
it: float16 vectors + int64 ids per row (``shard_store``), each rank holding its ``row_range``
slice (``ShardedIndex.load``) plus the search buffers of one batch of --queries queries
(``TiledSearcher``), and the bytes on disk of one index version. The numbers come from
``sharded_index.memory_footprint`` and ``shard_store.storage_bytes``; with --index-dir the rows
and dimension are read from the manifest and the disk bytes are also measured. GB = 10^9 bytes.
--json-out writes the same as JSON (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (label, rows, dim): REALM's 13M Wikipedia blocks embedded in 128 dimensions; EMDR²'s DPR
# psgs_w100.tsv (21,015,324 passages) in 768 (BERT-base).
REFERENCES = (("REALM (13M x 128)", 13_000_000, 128), ("EMDR2 (21M x 768)", 21_015_324, 768))


def fail(message: str) -> None:
    print(f"index_memory: error: {message}", file=sys.stderr)
    sys.exit(2)


def corpus_row(label: str, rows: int, dim: int, ranks: int, queries: int, device: str, shards: int,
               measured: dict | None = None, manifest=None) -> dict:
    from megatron.emdr2.index import shard_store, sharded_index

    mem = sharded_index.memory_footprint(rows, dim, ranks, queries, device)
    row = {"corpus": label, **{k: mem[k] for k in ("rows", "dim", "ranks", "queries", "vector_bytes",
                                                    "id_bytes", "total_bytes", "max_rank_bytes")},
           "max_rank_buffer_bytes": max(r["buffer_bytes"] for r in mem["per_rank"]),
           "disk_bytes": shard_store.storage_bytes(rows, dim, shards, *(
               (manifest.model_step, manifest.extra) if manifest is not None else ()))["total_bytes"],
           "disk_shards": shards}
    if measured is not None:
        row["measured_disk_bytes"] = measured["total_bytes"]
    return row


def human(n: int) -> str:
    """Decimal units, as the paper counts (32 GB for 21M x 768 fp16)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if n < 100 * size else f"{n / size:.0f} {unit}"
    return f"{n} B"


def format_table(rows: list[dict]) -> str:
    head = (f"{'corpus':<24}{'rows':>14}{'dim':>6}{'vectors':>10}{'ids':>10}{'total':>10}"
            f"{'ranks':>7}{'per rank':>10}{'disk':>10}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['corpus']:<24}{r['rows']:>14,}{r['dim']:>6}{human(r['vector_bytes']):>10}"
                     f"{human(r['id_bytes']):>10}{human(r['total_bytes']):>10}{r['ranks']:>7}"
                     f"{human(r['max_rank_bytes']):>10}{human(r['disk_bytes']):>10}")
    return "\n".join(lines)


def _atomic_json(path: str, obj) -> None:
    tmp = f"{path}.partial-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="index_memory", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=None, help="passages in your corpus")
    p.add_argument("--dim", type=int, default=None, help="embedding dimension (hidden size of the context tower)")
    p.add_argument("--index-dir", default=None, help="a built index (root, version directory or manifest): "
                                                     "rows and dim from its manifest, disk bytes measured")
    p.add_argument("--ranks", type=int, default=1, help="ranks the index is split over (default 1)")
    p.add_argument("--queries", type=int, default=64,
                   help="questions searched at once (the all-gathered batch) for the search buffers; 0: none")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="sets the search tile (131072 rows on GPUs, 16384 on CPUs)")
    p.add_argument("--shards", type=int, default=None, help="shards on disk (default: --ranks)")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.index_dir is None and (args.rows is None) != (args.dim is None):
        fail("give --rows and --dim together (or --index-dir)")
    if args.index_dir is not None and (args.rows is not None or args.dim is not None):
        fail("give --index-dir or --rows/--dim, not both")
    for flag, value, low in (("--rows", args.rows, 0), ("--dim", args.dim, 1), ("--ranks", args.ranks, 1),
                             ("--queries", args.queries, 0), ("--shards", args.shards, 1)):
        if value is not None and value < low:
            fail(f"{flag} must be >= {low}, got {value}")
    shards = args.shards or args.ranks
    rows = [corpus_row(label, n, d, args.ranks, args.queries, args.device, shards) for label, n, d in REFERENCES]
    if args.index_dir is not None:
        from megatron.emdr2.index import shard_store

        try:
            measured = shard_store.measured_storage_bytes(args.index_dir)
            manifest = shard_store.read_manifest(args.index_dir)
        except shard_store.IndexStoreError as e:
            fail(str(e))
        rows.append(corpus_row(f"yours ({Path(args.index_dir).name})", measured["rows"], measured["dim"],
                               args.ranks, args.queries, args.device, measured["shards"], measured, manifest))
    elif args.rows is not None:
        rows.append(corpus_row("yours", args.rows, args.dim, args.ranks, args.queries, args.device, shards))

    print(f"Table 9: evidence-embedding memory in this code's layout (fp16 vectors + int64 ids; per rank: "
          f"its slice + search buffers for {args.queries} queries on {args.device}; disk: one index version "
          f"in {shards} shard(s), metadata included); GB = 1e9 bytes")
    print(format_table(rows))
    for r in rows:
        if "measured_disk_bytes" in r:
            print(f"{r['corpus']}: on disk {r['measured_disk_bytes']:,} bytes measured, "
                  f"{r['disk_bytes']:,} predicted")
    if args.json_out:
        _atomic_json(args.json_out, {"ranks": args.ranks, "queries": args.queries, "device": args.device,
                                     "corpora": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
