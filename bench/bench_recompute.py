"""Benchmark: activation recompute settings on a FiD reader training step (peak memory, time, loss).

Each setting runs in its own process (peak memory is per process): the reader (dropout 0.1) is
built from the same seed, then trains --steps steps (forward + backward + Adam) on B questions x
K passages x S tokens with a T-token answer; the first step is a warm-up, the table reports the
median step time of the others. Peak memory: on a GPU torch.cuda.max_memory_allocated; on a CPU
the process's peak RSS (ru_maxrss) and its rise over the RSS just before the first step (the
activations, gradients and optimizer state: the model and the imports are in the baseline).
The losses of every step are printed: recompute reproduces the dropout masks and gradients, so
they equal the run without it.

    python bench/bench_recompute.py --batch 2 --top-k 8 --seq 256 --steps 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "none": [],
    "selective": ["--recompute-activations"],
    "selective core_attn+mlp": ["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp"],
    "full block (half)": ["--recompute-granularity", "full", "--recompute-method", "block",
                          "--recompute-num-layers", "HALF"],
    "full uniform 1": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                       "--recompute-num-layers", "1"],
}


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="encoder and decoder layers")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2, help="questions per step (B)")
    parser.add_argument("--top-k", type=int, default=8, help="passages per question (K)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per (question, passage) row (S)")
    parser.add_argument("--answer", type=int, default=16, help="answer tokens (T)")
    parser.add_argument("--vocab", type=int, default=30592)
    parser.add_argument("--steps", type=int, default=4, help="training steps, the first a warm-up")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--json", default=None)
    # the child process's own flags
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--recompute-activations", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--recompute-granularity", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--recompute-method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--recompute-num-layers", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--recompute-modules", nargs="+", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from megatron.emdr2.arguments import recompute_from_args
    from megatron.emdr2.config import ModelSize
    from megatron.emdr2.initialize import device, initialize, set_seed
    from megatron.emdr2.openqa import builders

    initialize(seed=1234)
    dev = device()
    size = ModelSize(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                     seq_length=max(args.seq, args.answer), hidden_dropout=0.1, attention_dropout=0.1,
                     **recompute_from_args(args, "reader"))
    torch.manual_seed(0)
    reader = builders.build_reader(size, args.vocab, args.vocab).to(dev).train()
    optimizer = torch.optim.Adam(reader.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    B, K, S, T = args.batch, args.top_k, args.seq, args.answer
    ids = torch.randint(1000, args.vocab, (B, K, S), generator=g).to(dev)
    mask = torch.ones_like(ids)
    mask[:, :, S - S // 8:] = 0  # some padding, as real rows have
    answer = torch.randint(1000, args.vocab, (B, T + 1), generator=g).to(dev)
    set_seed(1234)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mib()
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = reader.loss(ids, mask, answer[:, :-1], answer[:, 1:])
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mib()
    return {"device": str(dev), "baseline_mib": baseline, "peak_mib": peak, "rise_mib": peak - baseline,
            "step_s": statistics.median(times[1:] or times), "times": times, "losses": losses,
            "recompute": {k: v for k, v in size.recompute.items() if v is not None}}


def main(argv=None) -> None:
    args = parse(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    base = ["--layers", str(args.layers), "--hidden", str(args.hidden), "--heads", str(args.heads),
            "--batch", str(args.batch), "--top-k", str(args.top_k), "--seq", str(args.seq),
            "--answer", str(args.answer), "--vocab", str(args.vocab), "--steps", str(args.steps)]
    if args.threads:
        base += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    results = {}
    for name in args.settings:
        flags = [str(max(1, args.layers // 2)) if f == "HALF" else f for f in SETTINGS[name]]
        proc = subprocess.run([sys.executable, __file__, "--child", *base, *flags], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"{name}: failed\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[len("RESULT "):])
        # (resource.getrusage(RUSAGE_CHILDREN) would give the largest child so far, not this one)
        print(f"  {name}: done", file=sys.stderr, flush=True)

    ref = results.get("none")
    unit = "GPU MiB (max allocated)" if results[args.settings[0]]["device"].startswith("cuda") else "RSS MiB"
    print(f"FiD reader {args.layers}+{args.layers} layers x {args.hidden}, B={args.batch} K={args.top_k} "
          f"S={args.seq} T={args.answer}, dropout 0.1, {args.steps} steps (median of the last "
          f"{max(1, args.steps - 1)}), on {results[args.settings[0]]['device']}")
    print(f"| setting | peak {unit} | rise over baseline | step s | vs none (time) | losses equal to none |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, r in results.items():
        diff = None if ref is None else max(abs(a - b) for a, b in zip(r["losses"], ref["losses"]))
        same = "—" if diff is None or name == "none" else (
            ("yes" if diff <= 1e-6 * max(1.0, abs(ref["losses"][0])) else "NO") + f" (max diff {diff:.1e})")
        speed = "—" if ref is None else f"{r['step_s'] / ref['step_s']:.2f}x"
        print(f"| {name} | {r['peak_mib']:.0f} | {r['rise_mib']:.0f} | {r['step_s']:.2f} | {speed} | {same} |")
    for name, r in results.items():
        print(f"  losses {name}: {' '.join(f'{x:.6f}' for x in r['losses'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if not k.startswith("recompute") and k != "child"},
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
