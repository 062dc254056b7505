"""Measured per-rank memory of the sharded index against the layout's prediction (issue #17).

Runs bench/bench_sharded_memory.py's logic at 20,000 x 768 on 2 gloo ranks (one spawn of 2 ranks,
one single process; ~15 s): a real index written by ShardWriter/publish, loaded by
ShardedIndex.load on each rank, searched with 64 queries, k 100. Each rank's RSS growth (from
/proc/self/status, after a warm-up search on a tiny index) must match
``sharded_index.memory_footprint`` within 5% + 4 MiB: holding the slice twice, in fp32, or keeping
the mapped file resident after the copy would each add >= 14.6 MiB here and fail. The load peak
(VmHWM) must stay under slice + one copy chunk (1,024 rows here) + 4 MiB: a load that keeps the
mapped shard's pages resident while it copies peaks at twice the slice and fails. The sharded
results must equal the single process's (ids; scores within the fp32 dot-product bound) and the
float64 exact top-k.
"""

import sys
from pathlib import Path

import numpy as np
import torch

from megatron.emdr2.index import read_manifest, open_shard
from test_index_search import assert_exact_topk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_sharded_memory as bench  # noqa: E402

MIB = 2 ** 20
REL_TOL, ABS_TOL = 0.05, 4 * MIB  # allocator and library workspace (GEMM packing, gloo) slack


def _within(measured, predicted, threads=1):
    # GEMM packing buffers are per thread, so a process searching with 2 threads gets the slack
    # twice: the 2-thread single process measured +9.3 MiB over its 81.4 MiB layout on one of our
    # machines (within 4 MiB on another), while each 1-thread rank stayed within 5 MiB. A slice
    # held twice, or in fp32, adds 29 MiB there and still fails.
    return abs(measured - predicted) <= REL_TOL * predicted + ABS_TOL * threads


def test_measured_memory_matches_layout_and_results_match_single_process(tmp_path):
    rows, dim, ranks, queries, k, copy_rows = 20_000, 768, 2, 64, 100, 1024
    res = bench.measure(rows, dim, ranks, queries, k, tmp_path, threads=2, modes=("copy", "mmap"),
                        verify=False, repeats=1, copy_rows=copy_rows, timeout=240, log=lambda s: None)
    report = bench.report(res)

    for e in res["per_rank"]:
        p, c, m = e["predicted"], e["copy"], e["mmap"]
        held = p["vector_bytes"] + p["id_bytes"]
        assert e["rows"] == rows // ranks and c["memory_bytes"] == held
        # in RAM: vectors + ids + the searcher's fp32 tile and score buffers, all anonymous
        assert _within(c["rss_growth"], p["bytes"]), report
        assert _within(c["anon_growth"], p["bytes"]), report
        # the load's peak: the slice plus one chunk of the mapped file, never slice + whole shard
        assert c["hwm_rose"] and held <= c["load_peak_growth"] <= p["load_peak_bytes"] + ABS_TOL, report
        # memory-mapped: the vectors are file pages, resident once a search has touched them all
        assert _within(m["file_growth"], p["vector_bytes"]), report
        assert m["load_rss_growth"] < ABS_TOL, report  # mapping touches nothing
        assert m["anon_growth"] <= p["buffer_bytes"] + ABS_TOL, report

    single = res["single"]
    assert _within(single["rss_growth"], single["predicted"]["bytes"], threads=2), report

    check = res["check"]
    assert check["ok"] and check["identical_ids"], check
    assert res["modes_agree"]
    # and against an independent float64 exact search of the stored vectors
    m = read_manifest(tmp_path / "index")
    x = torch.cat([torch.from_numpy(np.array(open_shard(m, s)[0])) for s in range(len(m.shards))]).float()
    q = torch.from_numpy(np.load(tmp_path / "queries.npy"))
    ids = torch.tensor(res["sharded_ids"])
    assert_exact_topk((ids - bench.ID_BASE) // bench.ID_STRIDE, x, q, k)
