"""Benchmark: our fp16 tiled index vs faiss.IndexFlatIP (fp32) vs torch matmul + topk.

All on the same vectors, in the same run, interleaved (one of each per repeat) so a shared
machine's load hits them alike; figures are medians. Recall@k is measured against exact fp32
search on the fp32 vectors (torch fp32 matmul + topk). The sharded runs write the fp16 index
to disk once and load it on 2..4 real gloo ranks (each rank gets threads // ranks threads,
at least 1).

    python bench/bench_index.py --rows 1000000 --dim 768 --queries 64 --k 100 --threads 2 \
        --ranks 2 4 --json bench_index.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.emdr2.index import ShardedIndex, TiledSearcher, write_index  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def recall(ids: torch.Tensor, ref: torch.Tensor) -> float:
    """|ids ∩ ref| / |ref| per query, averaged (vectorised: [Q, k, 1] == [Q, 1, k])."""
    hits = (ids.unsqueeze(2) == ref.unsqueeze(1)).any(2).sum(1)
    return float(hits.sum()) / ref.numel()


def make_data(rows: int, dim: int, queries: int, seed: int):
    """Gaussian fp32 vectors, generated in chunks straight into one array."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(rows, dim)
    for a in range(0, rows, 1 << 17):
        x[a:a + (1 << 17)] = torch.randn(min(1 << 17, rows - a), dim, generator=g)
    return x, torch.randn(queries, dim, generator=g)


def _rank_bench(rank, world, index_dir, queries_path, k, repeats, threads):
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method="env://")
    t_load, idx = timed(lambda: ShardedIndex.load(index_dir, verify=False))
    q_all = torch.from_numpy(np.load(queries_path))
    lo, hi = q_all.shape[0] * rank // world, q_all.shape[0] * (rank + 1) // world
    mine = q_all[lo:hi]  # the training case: each rank brings its share of the batch
    idx.search(mine, k)  # warm-up (buffers, page faults)
    times = []
    for _ in range(repeats):
        dist.barrier()
        t, (scores, ids) = timed(lambda: idx.search(mine, k))
        dist.barrier()
        times.append(t)
    dist.destroy_process_group()
    return {"times": times, "ids": ids, "load_s": t_load, "shard_bytes": idx.memory_bytes}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tile-rows", type=int, default=None)
    p.add_argument("--ranks", type=int, nargs="*", default=[2, 4], help="gloo world sizes for sharded runs")
    p.add_argument("--no-prune", action="store_true", help="top-k every tile instead of pruning by threshold")
    p.add_argument("--no-faiss", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=str, default=None, help="write the figures here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    rows, dim, k = args.rows, args.dim, args.k
    print(f"data: {rows} x {dim} gaussian, {args.queries} queries, k={k}, {args.threads} threads", flush=True)
    x32, q = make_data(rows, dim, args.queries, args.seed)
    res = {"rows": rows, "dim": dim, "queries": args.queries, "k": k, "threads": args.threads,
           "repeats": args.repeats, "cpu": _cpu_name()}

    # ours: fp16 copy of the same vectors
    before = rss_bytes()
    x16 = x32.half()
    ours = TiledSearcher(x16, args.tile_rows, prune=not args.no_prune)
    ours.search(q, k)  # warm-up allocates the tile buffers
    res["ours_storage_bytes"] = x16.nbytes
    res["ours_buffer_bytes"] = ours._scores.nbytes + (ours._tile.nbytes if ours._tile is not None else 0)
    res["ours_memory_bytes"] = res["ours_storage_bytes"] + res["ours_buffer_bytes"]
    res["ours_rss_delta_bytes"] = rss_bytes() - before
    res["ours_tile_rows"], res["ours_prune"] = ours.tile_rows, ours.prune

    flat = None
    if not args.no_faiss:
        import faiss

        faiss.omp_set_num_threads(args.threads)
        before = rss_bytes()
        flat = faiss.IndexFlatIP(dim)
        flat.add(x32.numpy())
        res["faiss_memory_bytes"] = flat.ntotal * dim * 4
        res["faiss_rss_delta_bytes"] = rss_bytes() - before
        flat.search(q.numpy(), k)

    runs = {"ours": [], "faiss_flat": [], "torch_fp32": []}
    out = {}
    for rep in range(args.repeats):  # interleaved
        t, out["ours"] = timed(lambda: ours.search(q, k))
        runs["ours"].append(t)
        if flat is not None:
            t, fr = timed(lambda: flat.search(q.numpy(), k))
            out["faiss_flat"] = torch.from_numpy(fr[1])
            runs["faiss_flat"].append(t)
        t, tr = timed(lambda: torch.topk(q @ x32.t(), k, dim=1))
        out["torch_fp32"] = tr.indices  # exact fp32 search on the fp32 vectors: the reference
        runs["torch_fp32"].append(t)
        print(f"repeat {rep}: " + ", ".join(f"{n} {v[-1]:.3f}s" for n, v in runs.items() if v), flush=True)
    ref = out["torch_fp32"]
    for name, times in runs.items():
        if times:
            res[f"{name}_s_per_batch"] = statistics.median(times)
            res[f"{name}_times"] = times
    res["torch_fp32_memory_bytes"] = x32.nbytes + args.queries * rows * 4
    res["recall"] = recall(out["ours"][1], ref)
    res[f"recall@{k}"] = res["recall"]
    if flat is not None:
        res["faiss_recall"] = recall(out["faiss_flat"], ref)
        res["speedup_vs_faiss_flat"] = res["faiss_flat_s_per_batch"] / res["ours_s_per_batch"]
        res["memory_ratio_vs_faiss_flat"] = res["ours_memory_bytes"] / res["faiss_memory_bytes"]
        res["storage_ratio_vs_faiss_flat"] = res["ours_storage_bytes"] / res["faiss_memory_bytes"]
    res["speedup_vs_torch_fp32"] = res["torch_fp32_s_per_batch"] / res["ours_s_per_batch"]
    del flat

    if args.ranks:
        res["sharded"] = bench_sharded(args, x16, q, ref, out["ours"][1])
    _report(res)
    if args.json:
        tmp = Path(args.json).with_suffix(".partial")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, args.json)
    return res


def bench_sharded(args, x16, q, ref, single_ids) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from spawn import run_ranks

    found = {}
    with tempfile.TemporaryDirectory(prefix="bench_index_") as tmp:
        ids = np.arange(x16.shape[0], dtype=np.int64)  # id == row, so recall compares directly
        write_index(Path(tmp) / "v", x16, ids, num_shards=1)
        np.save(Path(tmp) / "q.npy", q.numpy())
        for world in args.ranks:
            threads = max(1, args.threads // world)
            per_rank = run_ranks(_rank_bench, world, str(Path(tmp) / "v"), str(Path(tmp) / "q.npy"),
                                 args.k, args.repeats, threads, timeout=1800)
            got = torch.cat([r["ids"] for r in per_rank])
            times = [max(r["times"][i] for r in per_rank) for i in range(args.repeats)]
            found[str(world)] = {
                "s_per_batch": statistics.median(times), "threads_per_rank": threads,
                "recall": recall(got, ref), "same_ids_as_single_process": float((got == single_ids).float().mean()),
                "shard_bytes_per_rank": [r["shard_bytes"] for r in per_rank],
                "load_s": max(r["load_s"] for r in per_rank)}
            print(f"sharded over {world} gloo ranks: {found[str(world)]}", flush=True)
    return found


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _report(res: dict) -> None:
    gib = 1 / 2**30
    print(f"\n{res['rows']} x {res['dim']}, {res['queries']} queries, k={res['k']}, {res['threads']} threads "
          f"(medians of {res['repeats']})")
    print(f"  ours fp16 tiled : {res['ours_s_per_batch']:.3f} s/batch, {res['ours_memory_bytes'] * gib:.3f} GiB "
          f"({res['ours_buffer_bytes'] / 2**20:.0f} MiB of it search buffers), "
          f"recall@{res['k']} {res['recall']:.5f}")
    if "faiss_flat_s_per_batch" in res:
        print(f"  faiss FlatIP f32: {res['faiss_flat_s_per_batch']:.3f} s/batch, {res['faiss_memory_bytes'] * gib:.3f} GiB, "
              f"recall {res['faiss_recall']:.5f}  -> speedup {res['speedup_vs_faiss_flat']:.2f}x, "
              f"memory {res['memory_ratio_vs_faiss_flat']:.3f}x (storage {res['storage_ratio_vs_faiss_flat']:.3f}x)")
    print(f"  torch fp32 mm+topk: {res['torch_fp32_s_per_batch']:.3f} s/batch (the recall reference), "
          f"{res['torch_fp32_memory_bytes'] * gib:.2f} GiB incl. the [Q, N] score matrix")


if __name__ == "__main__":
    main()
