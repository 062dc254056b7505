"""Benchmark: one EMDR² training step (forward + backward) with FiD-encoder reuse vs the naive step.

  reuse  (ours)      per-passage likelihoods p(a|q,z_k) come from the FiD encoder states already
                     computed for the reader term: only the decoder runs again, on B*K sequences,
                     in eval mode, keeping gold-token log-probs only.
  naive  (original)  every (question, passage) pair is re-encoded for the per-passage term and the
                     decoder's full [B*K, T, V] log-softmax is materialised before gathering.

Both compute the same loss (up to dropout, off here); they run interleaved, one of each per repeat,
and the table reports medians. Synthetic token ids: the cost does not depend on the text.

    python bench/bench_emdr2_step.py --batch 4 --top-k 8 --layers 4 --hidden 256 --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(args):
    from megatron.emdr2.config import ModelSize
    from megatron.emdr2.initialize import initialize
    from megatron.emdr2.openqa import builders

    initialize(seed=1)
    size = ModelSize(args.layers, args.hidden, args.heads, seq_length=max(args.reader_len, args.context_len),
                     hidden_dropout=0.0, attention_dropout=0.0)
    biencoder = builders.build_biencoder(size, args.vocab)
    reader = builders.build_reader(size, args.vocab, args.vocab)
    return biencoder, reader


def inputs(args):
    g = torch.Generator().manual_seed(0)
    B, K = args.batch, args.top_k
    rnd = lambda *shape: torch.randint(5, args.vocab, shape, generator=g)
    ones = lambda *shape: torch.ones(*shape, dtype=torch.long)
    return dict(q=(rnd(B, args.query_len), ones(B, args.query_len)),
                c=(rnd(B * K, args.context_len), ones(B * K, args.context_len)),
                r=(rnd(B, K, args.reader_len), ones(B, K, args.reader_len)),
                labels=rnd(B, args.answer_len), label_mask=ones(B, args.answer_len).bool(),
                dec=rnd(B, args.answer_len))


def naive_per_passage(reader, r_ids, r_mask, dec, labels, label_mask):
    """The original's way: re-encode each (question, passage) pair, full-vocabulary log-softmax."""
    B, K, S = r_ids.shape
    with torch.no_grad():
        states, mask = reader.encode(r_ids.reshape(B * K, 1, S), r_mask.reshape(B * K, 1, S))
        logits = reader.forward_from_states(states, mask, dec.repeat_interleave(K, 0))  # [B*K, T, V]
        logp = torch.log_softmax(logits.float(), dim=-1)
        gold = logp.gather(-1, labels.repeat_interleave(K, 0).unsqueeze(-1)).squeeze(-1)
        gold = gold * label_mask.repeat_interleave(K, 0)
    return gold.view(B, K, -1)


def step(biencoder, reader, x, naive: bool):
    from megatron.emdr2.objectives import ObjectiveConfig, joint_loss

    B, K = x["r"][0].shape[:2]
    q = biencoder.embed_queries(*x["q"])
    c = biencoder.embed_contexts(*x["c"]).view(B, K, -1)
    scores = biencoder.score(q, c)
    states, mask = reader.encode(*x["r"])
    nll = reader.token_nll(states, mask, x["dec"], x["labels"], x["label_mask"]).sum(-1)
    if naive:
        token_lp = naive_per_passage(reader, *x["r"], x["dec"], x["labels"], x["label_mask"])
    else:
        _, token_lp = reader.per_passage_log_likelihood(states, mask, K, x["dec"], x["labels"], x["label_mask"],
                                                        max_sequences=B)  # as the EMDR² task runs it
    out = joint_loss(ObjectiveConfig(), scores, token_lp, x["label_mask"].float(), nll)
    out.loss.backward()
    return out.loss.item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=30592)
    p.add_argument("--query-len", type=int, default=32)
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument("--reader-len", type=int, default=192)
    p.add_argument("--answer-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    biencoder, reader = build(args)
    x = inputs(args)
    times = {"reuse": [], "naive": []}
    losses = {}
    peaks = {}
    for name in ("reuse", "naive"):  # warm-up, and the peak Python-side allocations of each
        tracemalloc.start()
        losses[name] = step(biencoder, reader, x, name == "naive")
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        biencoder.zero_grad(set_to_none=True)
        reader.zero_grad(set_to_none=True)
    for _ in range(args.repeats):
        for name in ("reuse", "naive"):
            t = time.perf_counter()
            step(biencoder, reader, x, name == "naive")
            times[name].append(time.perf_counter() - t)
            biencoder.zero_grad(set_to_none=True)
            reader.zero_grad(set_to_none=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "config": vars(args), "threads": torch.get_num_threads(),
        "median_step_s": med, "all_step_s": times, "loss": losses,
        "speedup_reuse_vs_naive": med["naive"] / med["reuse"],
        "loss_abs_diff": abs(losses["reuse"] - losses["naive"]),
    }
    print(f"EMDR² step, B={args.batch} K={args.top_k}, {args.layers} layers x {args.hidden}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'variant':<8} {'step (s)':>10} {'loss':>12}")
    for name in ("reuse", "naive"):
        print(f"{name:<8} {med[name]:>10.3f} {losses[name]:>12.5f}")
    print(f"speed-up of encoder reuse: {result['speedup_reuse_vs_naive']:.2f}x "
          f"(loss difference {result['loss_abs_diff']:.2e})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    from megatron.emdr2.initialize import shutdown

    shutdown()
    return result


if __name__ == "__main__":
    main()
