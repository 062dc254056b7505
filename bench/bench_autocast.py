"""Benchmark: fp32 vs ``--autocast bf16`` on this CPU, side by side in one process.

  reader step   forward + backward of the quickstart's reader (3 encoder layers x 384, 2 decoder
                layers, copy head with span continuation) on B questions x K passages x S tokens
  embedding     the quickstart's 6-layer x 384 context tower over a batch of passages, no autograd

The two precisions run interleaved, one of each per repeat, and the table reports medians and the
fp32/bf16 ratio. Synthetic token ids: the cost does not depend on the text.

    python bench/bench_autocast.py --repeats 7 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(args):
    from megatron.emdr2.config import ModelSize
    from megatron.emdr2.openqa import builders

    reader_size = ModelSize(num_layers=3, hidden_size=384, num_attention_heads=12, ffn_hidden_size=1536,
                            seq_length=256, hidden_dropout=0.0, attention_dropout=0.0, post_layernorm=True,
                            decoder_num_layers=2, copy_head=True, copy_continuation=True)
    tower_size = ModelSize(num_layers=6, hidden_size=384, num_attention_heads=12, ffn_hidden_size=1536,
                           seq_length=256, hidden_dropout=0.1, attention_dropout=0.1, post_layernorm=True)
    reader = builders.build_reader(reader_size, 30592, 30524)
    tower = builders.build_tower(tower_size, 30592).eval()
    return reader, tower


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--seq", type=int, default=168)
    parser.add_argument("--answer", type=int, default=8)
    parser.add_argument("--embed-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from megatron.emdr2.autocast import autocast
    from megatron.emdr2.initialize import initialize

    initialize(seed=1234)
    reader, tower = build(args)
    g = torch.Generator().manual_seed(0)
    B, K, S, T = args.batch, args.top_k, args.seq, args.answer
    ids = torch.randint(1000, 30000, (B, K, S), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.randint(1000, 30000, (B, T), generator=g)
    dec = torch.cat([torch.zeros(B, 1, dtype=torch.long), labels[:, :-1]], 1)
    p_ids = torch.randint(1000, 30000, (args.embed_batch, 160), generator=g)
    p_mask = torch.ones_like(p_ids)

    def reader_step(dtype):
        reader.zero_grad()
        with autocast("cpu", dtype):
            loss = reader.loss(ids, mask, dec, labels)
        loss.backward()

    def embed(dtype):
        with torch.no_grad(), autocast("cpu", dtype):
            tower(p_ids, p_mask)

    times = {(w, d): [] for w in ("reader step", "embedding") for d in ("fp32", "bf16")}
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    work = {"reader step": reader_step, "embedding": embed}
    for name, fn in work.items():  # warm-up
        for d in dtypes.values():
            fn(d)
    for _ in range(args.repeats):
        for name, fn in work.items():
            for label, d in dtypes.items():
                t = time.perf_counter()
                fn(d)
                times[(name, label)].append(time.perf_counter() - t)

    result = {}
    print(f"{'work':<14}{'fp32 s':>10}{'bf16 s':>10}{'fp32/bf16':>11}   "
          f"(medians of {args.repeats}, {torch.get_num_threads()} threads)")
    for name in work:
        a, b = statistics.median(times[(name, "fp32")]), statistics.median(times[(name, "bf16")])
        result[name] = {"fp32_s": a, "bf16_s": b, "ratio": a / b}
        print(f"{name:<14}{a:>10.3f}{b:>10.3f}{a / b:>10.2f}x")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump({"args": vars(args), "result": result}, f, indent=1)
        Path(args.json + ".tmp").replace(args.json)


if __name__ == "__main__":
    main()
