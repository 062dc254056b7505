"""Benchmark: how costs grow — index search with evidence size, the EMDR² step with top-K.

Index: our fp16 tiled exact search vs ``faiss.IndexFlatIP`` (fp32) on the same Gaussian vectors,
growing the evidence through --rows (each size is a prefix of the largest; FAISS grows by
``add``), 64 queries, k 100; medians over interleaved repeats, memory of each index, and
recall of ours against FAISS's exact result. EMDR² step: one forward + backward of
``bench_emdr2_step.step`` (small models) for each --top-k, our FiD-encoder reuse and the
original's naive per-passage pass, interleaved across K values per repeat.

    python bench/bench_scaling.py                                   # defaults: a few minutes
    python bench/bench_scaling.py --rows 100000 500000 1000000 2000000 --repeats 3 --json scaling.json
    python bench/bench_scaling.py --skip-index --top-k 4 8 16 32 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _fill_fp16(rows: int, dim: int, seed: int) -> torch.Tensor:
    """Gaussian vectors straight into fp16, in chunks (no fp32 copy of the whole matrix)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(rows, dim, dtype=torch.float16)
    for a in range(0, rows, 1 << 16):
        x[a:a + (1 << 16)] = torch.randn(min(1 << 16, rows - a), dim, generator=g)
    return x


def bench_index(args) -> list[dict]:
    import faiss

    from megatron.emdr2.index import TiledSearcher

    faiss.omp_set_num_threads(args.threads)
    sizes = sorted(args.rows)
    x16 = _fill_fp16(sizes[-1], args.dim, args.seed)
    q = torch.randn(args.queries, args.dim, generator=torch.Generator().manual_seed(args.seed + 1))
    flat, added, out = faiss.IndexFlatIP(args.dim), 0, []
    for n in sizes:
        for a in range(added, n, 1 << 16):  # FAISS grows to n rows (fp32 copies of the same fp16 values)
            flat.add(x16[a:min(n, a + (1 << 16))].float().numpy())
        added = n
        ours = TiledSearcher(x16[:n])
        ours.search(q, args.k)  # warm-up: buffers
        flat.search(q.numpy(), args.k)
        times = {"ours": [], "faiss_flat": []}
        for _ in range(args.repeats):
            t = time.perf_counter()
            _, ids = ours.search(q, args.k)
            times["ours"].append(time.perf_counter() - t)
            t = time.perf_counter()
            _, fids = flat.search(q.numpy(), args.k)
            times["faiss_flat"].append(time.perf_counter() - t)
        fids = torch.from_numpy(fids)
        hits = (ids.unsqueeze(2) == fids.unsqueeze(1)).any(2).sum().item()
        row = {"rows": n, "ours_s": statistics.median(times["ours"]),
               "faiss_flat_s": statistics.median(times["faiss_flat"]), "times": times,
               "ours_bytes": n * args.dim * 2 + ours._scores.nbytes + ours._tile.nbytes,
               "faiss_bytes": flat.ntotal * args.dim * 4, "recall_vs_faiss": hits / fids.numel()}
        row["speedup"] = row["faiss_flat_s"] / row["ours_s"]
        out.append(row)
        print(f"index {n:>9} rows: ours {row['ours_s']:.3f} s, faiss {row['faiss_flat_s']:.3f} s", flush=True)
        del ours
    del flat, x16
    return out


def bench_step(args) -> list[dict]:
    import bench_emdr2_step as step_bench

    from megatron.emdr2.initialize import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    cfg = argparse.Namespace(layers=args.step_layers, hidden=args.step_hidden, heads=args.step_heads,
                             vocab=args.step_vocab, reader_len=args.reader_len, context_len=args.context_len,
                             query_len=32, answer_len=16, batch=args.batch, top_k=max(args.top_k))
    biencoder, reader = step_bench.build(cfg)
    inputs = {K: step_bench.inputs(argparse.Namespace(**{**vars(cfg), "top_k": K})) for K in args.top_k}

    def run(K, naive):
        t = time.perf_counter()
        step_bench.step(biencoder, reader, inputs[K], naive)
        biencoder.zero_grad(set_to_none=True)
        reader.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    variants = [(K, naive) for K in args.top_k for naive in (False, True)]
    for v in variants:  # warm-up
        run(*v)
    times = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            times[v].append(run(*v))
    out = []
    for K in args.top_k:
        ours, naive = statistics.median(times[(K, False)]), statistics.median(times[(K, True)])
        out.append({"top_k": K, "ours_s": ours, "naive_s": naive, "speedup": naive / ours,
                    "ours_times": times[(K, False)], "naive_times": times[(K, True)]})
        print(f"step K={K:>3}: ours {ours:.3f} s, naive {naive:.3f} s", flush=True)
    return out


def report(res: dict) -> None:
    if res.get("index"):
        a = res["args"]
        print(f"\nindex search, dim {a['dim']}, {a['queries']} queries, k {a['k']}, {a['threads']} threads "
              f"(median of {a['repeats']})")
        print(f"{'rows':>10} {'ours s':>8} {'faiss s':>8} {'speed-up':>9} {'ours GiB':>9} {'faiss GiB':>10} "
              f"{'recall':>7} {'ours s/M rows':>14}")
        for r in res["index"]:
            print(f"{r['rows']:>10} {r['ours_s']:>8.3f} {r['faiss_flat_s']:>8.3f} {r['speedup']:>8.2f}x "
                  f"{r['ours_bytes'] / 2**30:>9.3f} {r['faiss_bytes'] / 2**30:>10.3f} {r['recall_vs_faiss']:>7.4f} "
                  f"{r['ours_s'] / r['rows'] * 1e6:>14.3f}")
    if res.get("step"):
        a = res["args"]
        print(f"\nEMDR² step (forward + backward), B={a['batch']}, {a['step_layers']} layers x {a['step_hidden']}, "
              f"reader len {a['reader_len']}, context len {a['context_len']} (median of {a['repeats']})")
        print(f"{'K':>4} {'ours s':>8} {'naive s':>8} {'speed-up':>9} {'ours s / K':>11}")
        for r in res["step"]:
            print(f"{r['top_k']:>4} {r['ours_s']:>8.3f} {r['naive_s']:>8.3f} {r['speedup']:>8.2f}x "
                  f"{r['ours_s'] / r['top_k']:>11.4f}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 200_000, 400_000])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--top-k", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--step-layers", type=int, default=2)
    p.add_argument("--step-hidden", type=int, default=128)
    p.add_argument("--step-heads", type=int, default=4)
    p.add_argument("--step-vocab", type=int, default=30592)
    p.add_argument("--context-len", type=int, default=64)
    p.add_argument("--reader-len", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-index", action="store_true")
    p.add_argument("--skip-step", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = {"args": vars(args), "cpu": _cpu_name(), "torch": torch.__version__}
    if not args.skip_index:
        res["index"] = bench_index(args)
    if not args.skip_step:
        res["step"] = bench_step(args)
        from megatron.emdr2.initialize import shutdown

        shutdown()
    report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
