"""Benchmark: two CPU training-step costs, before and after, side by side in one process.

torch's CPU flash attention backward is much slower in bf16 than in fp32, so
``megatron/emdr2/models/fast_attention.py`` runs differentiated CPU attention in fp32. This prints

  attention     forward + backward of ``scaled_dot_product_attention`` with bf16 inputs, computed in
                bf16 vs cast to fp32, for the quickstart's shapes (reader encoder self-attention,
                query tower, decoder self- and cross-attention, per-passage cross-attention)
  reader step   the quickstart's reader (3 encoder layers x 384, 2 decoder layers, copy head) forward
                + backward under bf16 autocast, with the fp32 attention path off (before) and on

  optimizer     one AdamW step over the reader's parameters (its shapes, random gradients): torch's
                per-tensor loop (megatron-core's fallback without TransformerEngine/apex, before)
                vs torch's fused kernel (``training/setup.use_fused_adam``, after)

Interleaved repeats, medians, and the before/after ratio. Synthetic token ids.

    python bench/bench_cpu_attention.py --repeats 7 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # [batch, heads, query len, key len, head dim]
    "reader encoder (32 x 168)": (32, 12, 168, 168, 32),
    "query tower (8 x 48)": (8, 12, 48, 48, 32),
    "decoder self (8 x 16)": (8, 12, 16, 16, 32),
    "decoder cross (16 -> 4 x 168)": (8, 12, 16, 672, 32),
    "per-passage cross (32 x 16 -> 168)": (32, 12, 16, 168, 32),
}


def attention_times(shape, repeats):
    B, H, Sq, Sk, D = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, s, D, generator=g).bfloat16().requires_grad_() for s in (Sq, Sk, Sk))
    bias = torch.zeros(B, 1, 1, Sk, dtype=torch.bfloat16)
    bias[..., int(Sk * 0.9):] = -10000.0

    def run(fp32):
        if fp32:
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.float())
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out.bfloat16().float().sum().backward()

    times = {"bf16": [], "fp32": []}
    run(False), run(True)
    for _ in range(repeats):
        for label in times:
            t = time.perf_counter()
            run(label == "fp32")
            times[label].append(time.perf_counter() - t)
    return statistics.median(times["bf16"]), statistics.median(times["fp32"])


def reader_step_times(args):
    from megatron.emdr2.autocast import autocast
    from megatron.emdr2.config import ModelSize
    from megatron.emdr2.initialize import initialize
    from megatron.emdr2.models import fast_attention
    from megatron.emdr2.openqa import builders

    initialize(seed=1234)
    size = ModelSize(num_layers=3, hidden_size=384, num_attention_heads=12, ffn_hidden_size=1536,
                     seq_length=256, hidden_dropout=0.0, attention_dropout=0.0, post_layernorm=True,
                     decoder_num_layers=2, copy_head=True, copy_continuation=True)
    reader = builders.build_reader(size, 30592, 30524)
    g = torch.Generator().manual_seed(0)
    B, K, S, T = args.batch, args.top_k, args.seq, args.answer
    ids = torch.randint(1000, 30000, (B, K, S), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.randint(1000, 30000, (B, T), generator=g)
    dec = torch.cat([torch.zeros(B, 1, dtype=torch.long), labels[:, :-1]], 1)
    fp32_attention = fast_attention._cpu_half_backward

    def step(after):
        fast_attention._cpu_half_backward = fp32_attention if after else (lambda q: False)
        reader.zero_grad()
        with autocast("cpu", torch.bfloat16):
            loss = reader.loss(ids, mask, dec, labels)
        loss.backward()
        return loss.item()

    losses = {"before": step(False), "after": step(True)}
    times = {"before": [], "after": []}
    for _ in range(args.repeats):
        for label in times:
            t = time.perf_counter()
            step(label == "after")
            times[label].append(time.perf_counter() - t)
    fast_attention._cpu_half_backward = fp32_attention
    return statistics.median(times["before"]), statistics.median(times["after"]), losses, reader


def optimizer_times(reader, repeats):
    params = {}
    for label in ("before", "after"):
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(p.detach().clone()) for p in reader.parameters()]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        kw = {"fused": True} if label == "after" else {"foreach": False}
        params[label] = (ps, torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, **kw))
    times = {"before": [], "after": []}
    for label in times:  # warm-up: creates the moments
        params[label][1].step()
    for _ in range(repeats):
        for label in times:
            t = time.perf_counter()
            params[label][1].step()
            times[label].append(time.perf_counter() - t)
    diff = max((a - b).abs().max().item() for a, b in zip(params["before"][0], params["after"][0]))
    n = sum(p.numel() for p in params["after"][0])
    return statistics.median(times["before"]), statistics.median(times["after"]), n, diff


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--seq", type=int, default=168)
    parser.add_argument("--answer", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    result = {}
    print(f"{'attention fwd+bwd':<36}{'bf16 ms':>10}{'fp32 ms':>10}{'bf16/fp32':>11}   "
          f"(medians of {args.repeats}, {torch.get_num_threads()} threads)")
    for name, shape in SHAPES.items():
        a, b = attention_times(shape, args.repeats)
        result[name] = {"bf16_ms": a * 1e3, "fp32_ms": b * 1e3, "ratio": a / b}
        print(f"{name:<36}{a * 1e3:>10.1f}{b * 1e3:>10.1f}{a / b:>10.2f}x")
    before, after, losses, reader = reader_step_times(args)
    result["reader step"] = {"before_s": before, "after_s": after, "ratio": before / after, "losses": losses}
    print(f"{'reader step (bf16 autocast)':<36}{'before s':>10}{'after s':>10}{'ratio':>11}")
    print(f"{'':<36}{before:>10.3f}{after:>10.3f}{before / after:>10.2f}x   "
          f"loss {losses['before']:.5f} vs {losses['after']:.5f}")
    before, after, n, diff = optimizer_times(reader, args.repeats)
    result["optimizer"] = {"before_s": before, "after_s": after, "ratio": before / after,
                           "parameters": n, "max_abs_diff": diff}
    print(f"{'AdamW step, ' + format(n / 1e6, '.1f') + 'M parameters':<36}{before:>10.3f}{after:>10.3f}"
          f"{before / after:>10.2f}x   weights after 8 steps differ by at most {diff:.1e}")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump({"args": vars(args), "result": result}, f, indent=1)
        Path(args.json + ".tmp").replace(args.json)


if __name__ == "__main__":
    main()
