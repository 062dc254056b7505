"""Benchmark: the sharded index's memory per rank, measured, against the layout's prediction.

1. Writes a synthetic index of --rows x --dim (Gaussian fp16 rows, int64 ids 21e9 + 7·row) as
   --ranks shards with the real ``ShardWriter`` / ``publish`` code, chunk by chunk (the writer
   never holds more than one chunk of rows in memory).
2. Spawns --ranks gloo processes; each loads its slice with ``ShardedIndex.load(group=...)`` and
   searches --queries queries (each rank brings its share; the search all-gathers them, as in
   training), k = --k. Each reports /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile) before
   the load, after it and after the first search, and the load and search times. ``--modes copy``
   is the default load (the slice copied into RAM); ``mmap`` is ``in_memory=False`` (the slice
   stays a memory-mapped view of the file: RSS then counts the file pages a search has touched,
   which after one full search is every page of the slice).
3. One process loads the whole index (all shards) and searches the same queries: the sharded
   ids must be identical, and every score within the fp32 dot-product error bound
   2·γ_d·Σ|q_i·x_i| (γ_d = d·u / (1 − d·u), u = 2^-24) of the single process's, and within
   γ_d·Σ|q_i·x_i| of the float64 score of the same id (recomputed from the stored fp16 row).
   Where ids differ at a rank the two float64 scores must tie within that bound.
4. Prints per rank the measured growth vs ``sharded_index.memory_footprint`` (vectors N·d·2/ranks
   + ids 8 bytes/row + the searcher's fp32 tile and score buffers: the Table 9 layout) and the
   load peak vs slice + one copy chunk; writes everything as JSON.

    nice -n 10 python bench/bench_sharded_memory.py --rows 4000000 --ranks 4 --json mem4m.json

The index is written under --tmp-dir (default: the system's) and deleted at the end. Needs about
N·d·2·2 bytes of RAM (the ranks' copies, then the single process's) and N·d·2 bytes of disk.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron.emdr2 import fileio  # noqa: E402
from megatron.emdr2.index import shard_store, sharded_index  # noqa: E402
from megatron.emdr2.index.sharded_index import ShardedIndex, memory_footprint, row_range  # noqa: E402

ID_BASE, ID_STRIDE = 21_000_000_000, 7  # ids beyond 2^32, not equal to rows: the id mapping is checked
U32 = 2.0 ** -24  # unit roundoff of fp32
MIB = 2 ** 20
STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def proc_status() -> dict:
    """This process's VmRSS, VmHWM, RssAnon and RssFile in bytes (/proc/self/status)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in STATUS_FIELDS:
                out[key] = int(value.split()[0]) * 1024  # kB
    return out


def gamma(d: int) -> float:
    """γ_d: |fl(x·y) − x·y| ≤ γ_d Σ|x_i y_i| for an fp32 dot product of d terms, any order."""
    return d * U32 / (1 - d * U32)


def write_synthetic_index(directory, rows: int, dim: int, shards: int, seed: int = 0,
                          chunk_rows: int = 1 << 16) -> shard_store.Manifest:
    """Gaussian fp16 rows and ids ID_BASE + ID_STRIDE·row, written and published as ``shards``
    shards by the real ShardWriter / publish, one chunk of rows in memory at a time."""
    g = torch.Generator().manual_seed(seed)
    work = shard_store.begin_version(directory)
    infos = []
    for s in range(shards):
        a, b = row_range(rows, s, shards)
        w = shard_store.ShardWriter(work, s, shards, b - a, dim, row_offset=a)
        for c in range(a, b, chunk_rows):
            e = min(b, c + chunk_rows)
            w.write(c - a, torch.randn(e - c, dim, generator=g).half(),
                    ID_BASE + ID_STRIDE * torch.arange(c, e, dtype=torch.long))
        infos.append(w.close())
    return shard_store.publish(work, infos, dim)


def predict(rows: int, dim: int, ranks: int, queries: int, copy_rows: int, verify: bool,
            tile_rows: int | None = None) -> list[dict]:
    """Per rank: the steady bytes (``memory_footprint``: vectors + ids + search buffers with CPU
    tiles: the Table 9 layout) and a bound on the load peak of ``ShardedIndex.load`` on CPU: its
    slice, plus one copy chunk of the mapped file (rows x (d·2 + 8) bytes; each chunk's pages are
    unmapped once copied), plus with ``verify`` one 16 MiB sha256 read buffer (glibc may keep a
    freed one in its heap, so it can also stay in the steady RSS: ``slack_bytes``)."""
    mem = memory_footprint(rows, dim, ranks, queries, device_type="cpu", tile_rows=tile_rows)
    hash_buf = fileio._HASH_CHUNK if verify else 0
    out = []
    for r in mem["per_rank"]:
        held = r["vector_bytes"] + r["id_bytes"]
        chunk = min(copy_rows, r["rows"]) * (dim * 2 + 8)
        out.append({**r, "copy_chunk_bytes": chunk, "slack_bytes": hash_buf,
                    "load_peak_bytes": held + chunk + hash_buf})
    return out


def _rank_run(rank, world, index_dir, queries_path, k, threads, modes, verify, repeats, copy_rows, tile_rows):
    """One rank of the sharded run: warm up, then per mode load, search, measure."""
    return _load_and_search(rank, world, index_dir, queries_path, k, threads, modes, verify, repeats, copy_rows,
                            tile_rows)[0]


def _load_and_search(rank, world, index_dir, queries_path, k, threads, modes, verify, repeats, copy_rows,
                     tile_rows):
    """(per-mode measurements, the last mode's index): world 1 is the single process."""
    import torch.distributed as dist

    torch.set_num_threads(threads)
    group = None
    if world > 1:
        dist.init_process_group("gloo", init_method="env://")
        group = dist.group.WORLD
    if copy_rows:
        sharded_index._COPY_ROWS = copy_rows
    q_all = torch.from_numpy(np.load(queries_path))
    lo, hi = q_all.shape[0] * rank // world, q_all.shape[0] * (rank + 1) // world
    mine = q_all[lo:hi]  # the training case: each rank brings its share of the batch
    # warm-up on a tiny index: the GEMM/top-k kernels' code pages, thread pools and gloo's
    # buffers become resident here, so the growth measured below is the index's own
    warm = ShardedIndex(torch.randn(4096, q_all.shape[1]).half(), torch.arange(4096), group=group, tile_rows=512)
    warm.search(mine, k)
    del warm
    out = {"rank": rank, "world": world, "threads": threads, "queries_here": mine.shape[0]}
    idx = None
    for mode in modes:
        idx = None
        gc.collect()
        before = proc_status()
        t = time.perf_counter()
        idx = ShardedIndex.load(index_dir, group=group, verify=verify, in_memory=(mode == "copy"),
                                tile_rows=tile_rows)
        load_s = time.perf_counter() - t
        after_load = proc_status()
        if group is not None:
            dist.barrier(group)
        t = time.perf_counter()
        scores, ids = idx.search(mine, k)
        first_s = time.perf_counter() - t
        after_search = proc_status()
        times = []
        for _ in range(repeats):
            if group is not None:
                dist.barrier(group)
            t = time.perf_counter()
            idx.search(mine, k)
            if group is not None:
                dist.barrier(group)
            times.append(time.perf_counter() - t)
        res = {"rows": idx.local_rows, "memory_bytes": idx.memory_bytes, "before": before,
               "after_load": after_load, "after_search": after_search,
               "load_s": load_s, "first_search_s": first_s, "search_times": times,
               "search_s": statistics.median(times) if times else first_s,
               "scores": scores, "ids": ids}
        out[mode] = res
    if group is not None:
        dist.barrier(group)
        dist.destroy_process_group()
    return out, idx


def _reference_run(rank, world, index_dir, queries_path, k, threads, verify, sharded_ids_path, tile_rows):
    """The single process: the whole index, all queries; plus float64 scores of both results."""
    res, idx = _load_and_search(rank, world, index_dir, queries_path, k, threads, ["copy"], verify, 1, None,
                                tile_rows)
    copy = res["copy"]
    q = torch.from_numpy(np.load(queries_path)).double()
    sharded_ids = torch.from_numpy(np.load(sharded_ids_path))

    def exact(ids):  # float64 score and Σ|q_i x_i| of each returned id, from the stored fp16 row
        rows = (ids - ID_BASE) // ID_STRIDE
        s64 = torch.empty(ids.shape, dtype=torch.float64)
        abs_sum = torch.empty(ids.shape, dtype=torch.float64)
        for i in range(ids.shape[0]):
            x = idx.vectors[rows[i]].double()
            s64[i] = x @ q[i]
            abs_sum[i] = x.abs() @ q[i].abs()
        return s64, abs_sum, bool(torch.equal(idx.ids[rows], ids))

    copy["ref_s64"], copy["ref_abs"], copy["ref_ids_map"] = exact(copy["ids"])
    copy["sharded_s64"], copy["sharded_abs"], copy["sharded_ids_map"] = exact(sharded_ids)
    del idx
    return res


def compare(sharded_scores, sharded_ids, ref: dict, dim: int) -> dict:
    """Identical ids (ties aside) and scores within the fp32 error bound; see the module doc."""
    g = gamma(dim)
    bound = g * torch.maximum(ref["ref_abs"], ref["sharded_abs"])
    same = sharded_ids == ref["ids"]
    diff = (sharded_scores.double() - ref["scores"].double()).abs()
    err64 = (sharded_scores.double() - ref["sharded_s64"]).abs()
    tie_gap = (ref["sharded_s64"] - ref["ref_s64"]).abs()
    out = {
        "gamma_d": g, "identical_ids": bool(same.all()), "same_id_fraction": float(same.double().mean()),
        "mismatches": int((~same).sum()),
        "unexplained_mismatches": int(((~same) & (tie_gap > 2 * bound)).sum()),
        "max_score_diff_vs_single": float(diff[same].max()) if same.any() else 0.0,
        "max_score_diff_bound": float((2 * bound)[same].max()) if same.any() else 0.0,
        "scores_within_bound": bool((diff[same] <= 2 * bound[same]).all()),
        "max_score_err_vs_float64": float(err64.max()),
        "float64_within_bound": bool((err64 <= g * ref["sharded_abs"]).all()),
        "ids_map_to_rows": bool(ref["ref_ids_map"] and ref["sharded_ids_map"]),
    }
    out["ok"] = (out["unexplained_mismatches"] == 0 and out["scores_within_bound"]
                 and out["float64_within_bound"] and out["ids_map_to_rows"])
    return out


def measure(rows: int, dim: int, ranks: int, queries: int, k: int, workdir, threads: int = 2,
            modes=("copy", "mmap"), verify: bool = True, repeats: int = 3, seed: int = 0,
            copy_rows: int | None = None, tile_rows: int | None = None, reference: bool = True,
            timeout: float = 3600.0, log=print) -> dict:
    """The whole benchmark (also what tests/test_index_memory_scale.py runs at a small size)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from spawn import run_ranks

    workdir = Path(workdir)
    copy_rows = copy_rows or sharded_index._COPY_ROWS
    res = {"rows": rows, "dim": dim, "ranks": ranks, "queries": queries, "k": k, "threads": threads,
           "modes": list(modes), "verify": verify, "copy_rows": copy_rows, "cpu": _cpu_name(),
           "torch": torch.__version__, "nproc": os.cpu_count(), "loadavg_start": os.getloadavg()}
    t = time.perf_counter()
    manifest = write_synthetic_index(workdir / "index", rows, dim, ranks, seed)
    res["write_s"] = time.perf_counter() - t
    res["disk_bytes"] = shard_store.measured_storage_bytes(manifest.directory)["total_bytes"]
    log(f"wrote {rows:,} x {dim} as {ranks} shards ({res['disk_bytes'] / 1e9:.2f} GB) in {res['write_s']:.1f} s")
    q = torch.randn(queries, dim, generator=torch.Generator().manual_seed(seed + 1))
    np.save(workdir / "queries.npy", q.numpy())

    per_thread = max(1, threads // ranks)
    per_rank = run_ranks(_rank_run, ranks, str(manifest.directory), str(workdir / "queries.npy"), k, per_thread,
                         list(modes), verify, repeats, copy_rows, tile_rows, timeout=timeout)
    pred = predict(rows, dim, ranks, queries, copy_rows, verify, tile_rows)
    res["per_rank"] = []
    for r, p in zip(per_rank, pred):
        entry = {"rank": r["rank"], "rows": r[modes[0]]["rows"], "predicted": p}
        for mode in modes:
            m = r[mode]
            entry[mode] = {key: m[key] for key in ("memory_bytes", "before", "after_load", "after_search",
                                                   "load_s", "first_search_s", "search_times", "search_s")}
            entry[mode].update(_growth(m))
        res["per_rank"].append(entry)
    if "copy" in modes:
        res["sharded_search_s"] = max(r["copy"]["search_s"] for r in per_rank)
        res["sharded_load_s"] = max(r["copy"]["load_s"] for r in per_rank)
    mode0 = modes[0]
    sharded_scores = torch.cat([r[mode0]["scores"] for r in per_rank])  # rank order == query order
    sharded_ids = torch.cat([r[mode0]["ids"] for r in per_rank])
    if len(modes) > 1:
        res["modes_agree"] = all(torch.equal(torch.cat([r[m]["ids"] for r in per_rank]), sharded_ids)
                                 for m in modes)
    res["sharded_ids"] = sharded_ids.tolist()
    log(f"{ranks} ranks done: search {max(r[mode0]['search_s'] for r in per_rank):.3f} s")
    if reference:
        np.save(workdir / "sharded_ids.npy", sharded_ids.numpy())
        ref = run_ranks(_reference_run, 1, str(manifest.directory), str(workdir / "queries.npy"), k, threads,
                        verify, str(workdir / "sharded_ids.npy"), tile_rows, timeout=timeout)[0]
        single = ref["copy"]
        res["single"] = {key: single[key] for key in ("memory_bytes", "before", "after_load", "after_search",
                                                      "load_s", "first_search_s", "search_times", "search_s")}
        res["single"].update(_growth(single))
        sp = predict(rows, dim, 1, queries, copy_rows, verify, tile_rows)[0]
        res["single"]["predicted"] = sp
        res["check"] = compare(sharded_scores, sharded_ids, single, dim)
    res["loadavg_end"] = os.getloadavg()  # a shared machine: read the times with these in mind
    return res


def _growth(m: dict) -> dict:
    b, l, s = m["before"], m["after_load"], m["after_search"]
    return {"rss_growth": s["VmRSS"] - b["VmRSS"], "anon_growth": s["RssAnon"] - b["RssAnon"],
            "file_growth": s["RssFile"] - b["RssFile"], "load_rss_growth": l["VmRSS"] - b["VmRSS"],
            "load_peak_growth": max(l["VmHWM"], b["VmRSS"]) - b["VmRSS"],
            "peak_growth": max(s["VmHWM"], b["VmRSS"]) - b["VmRSS"], "hwm_rose": l["VmHWM"] > b["VmHWM"]}


def report(res: dict) -> str:
    lines = [f"{res['rows']:,} x {res['dim']} fp16 on {res['ranks']} gloo ranks ({res['threads']} threads in all), "
             f"{res['queries']} queries, k {res['k']}; MiB = 2^20 bytes; growth = after − before the load "
             f"(after a warm-up search on a tiny index)"]
    head = (f"{'rank':>4} {'mode':>5} {'rows':>10} {'predicted':>10} {'VmRSS +':>9} {'ratio':>6} "
            f"{'RssAnon +':>10} {'RssFile +':>10} {'pred peak':>10} {'load peak':>10} {'load s':>7} {'search s':>9}")
    lines.append(head)

    def row(name, mode, rows, p, m):
        pred = p["bytes"]
        lines.append(f"{name:>4} {mode:>5} {rows:>10,} {pred / MIB:>10.1f} {m['rss_growth'] / MIB:>9.1f} "
                     f"{m['rss_growth'] / pred:>6.3f} {m['anon_growth'] / MIB:>10.1f} {m['file_growth'] / MIB:>10.1f} "
                     f"{_mib(p['load_peak_bytes'] if mode == 'copy' else None):>10} "
                     f"{_mib(m['load_peak_growth'] if m['hwm_rose'] else None):>10} {m['load_s']:>7.2f} "
                     f"{m['search_s']:>9.3f}")

    for e in res["per_rank"]:
        for mode in res["modes"]:
            row(str(e["rank"]), mode, e["rows"], e["predicted"], e[mode])
    if "single" in res:
        row("all", "copy", res["rows"], res["single"]["predicted"], res["single"])
        c = res["check"]
        lines.append(f"check vs the single process: ids identical {c['identical_ids']} "
                     f"(mismatches {c['mismatches']}, "
                     f"unexplained by a tie {c['unexplained_mismatches']}); max |score diff| "
                     f"{c['max_score_diff_vs_single']:.3g} (bound 2·γ_d·Σ|q·x| ≤ {c['max_score_diff_bound']:.3g}); "
                     f"max |score − float64| {c['max_score_err_vs_float64']:.3g}; ok {c['ok']}")
    p0 = res["per_rank"][0]["predicted"]
    lines.append(f"predicted per rank = vectors {p0['vector_bytes'] / MIB:.1f} + ids {p0['id_bytes'] / MIB:.2f} + "
                 f"search buffers {p0['buffer_bytes'] / MIB:.1f} MiB (fp32 tile + [Q, tile] scores); pred peak = "
                 f"vectors + ids + one copy chunk of {res['copy_rows']} rows"
                 + (" + one 16 MiB sha256 read" if res["verify"] else "") + " (a bound); "
                 + ("glibc may keep that read buffer, so steady growth can exceed 'predicted' by up to "
                    "16 MiB (seen at small sizes with several shards per process); " if res["verify"] else "")
                 + "mmap: the vectors are file pages (RssFile), only the buffers are anonymous; "
                 "'-': VmHWM did not rise during that load (an earlier peak of the same process)")
    return "\n".join(lines)


def _mib(x) -> str:
    return "-" if x is None else f"{x / MIB:.1f}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--threads", type=int, default=2, help="in all: each rank gets threads // ranks (at least 1)")
    p.add_argument("--modes", nargs="+", choices=("copy", "mmap"), default=["copy", "mmap"])
    p.add_argument("--repeats", type=int, default=3, help="timed searches after the first (median reported)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check at load")
    p.add_argument("--no-reference", action="store_true", help="skip the single-process check")
    p.add_argument("--tmp-dir", default=None, help="where the index is written (deleted at the end)")
    p.add_argument("--keep", action="store_true", help="keep the written index")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="bench_sharded_memory_", dir=args.tmp_dir))
    try:
        res = measure(args.rows, args.dim, args.ranks, args.queries, args.k, workdir, args.threads,
                      tuple(args.modes), not args.no_verify, args.repeats, args.seed,
                      reference=not args.no_reference, log=lambda s: print(s, flush=True))
    finally:
        if args.keep:
            print(f"index kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report(res))
    if args.json:
        fileio.atomic_write_text(args.json, json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
