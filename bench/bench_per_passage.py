"""EMDR²'s per-passage likelihoods: reusing the FiD encoder states vs K separate reader runs.

    python bench/bench_per_passage.py                      # CPU, small reader, prints a table
    python bench/bench_per_passage.py --device cuda --layers 12 --hidden 768 --heads 12 \
        --ffn 2048 --passages 50 --seq 256 --json out.json

Compared, all in eval mode without autograd, all giving log p(answer | question, passage k):
  - "reuse states, B*K at once": ``FiDReader.per_passage_log_likelihood`` on the encoder states
    the FiD forward has already computed for the reader loss (EMDR²'s situation: only the
    decoder runs, on all B*K sequences together, and only gold-token log-probs are formed,
    B*T logit rows at a time);
  - "reuse states, B per pass": the same with ``max_sequences=B`` (K decoder passes of B
    sequences: the memory of one single-passage run, without its encoder and log-softmax);
  - "K separate runs": K single-passage reader calls (encoder + decoder + full log-softmax),
    what the original code did.
Time: median over --repeats after one warm-up. Peak memory: the largest total size of tensors
allocated during one call and alive at once (CUDA: the allocator's peak; CPU: tracked per
storage with a dispatch mode, since the CPU allocator keeps no statistics), weights excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class CpuPeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the block and alive at the same time."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self.live = set()

    def _freed(self, key, nbytes):
        self.current -= nbytes
        self.live.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.live or key in inputs or storage.nbytes() == 0:
                continue  # a view or an in-place result, not a new allocation
            self.live.add(key)
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._freed, key, storage.nbytes())
        return out


def peak_bytes(fn, device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    tracker = CpuPeakMemory()
    with tracker:
        fn()
    return tracker.peak


def median_seconds(fn, device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(args, device):
    from megatron.emdr2.initialize import free_port, initialize
    from megatron.emdr2.models.config import t5_config
    from megatron.emdr2.models.fid import FiDReader

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    initialize(1, 1, seed=args.seed)
    cfg = t5_config(args.layers, args.hidden, args.heads, args.ffn, style="t5-gated-gelu",
                    precision=args.precision)
    reader = FiDReader(cfg, args.vocab, max_sequence_length=args.seq,
                       position_embedding_type="relative", scale_decoder_output=True)
    reader = reader.to(device).eval()
    g = torch.Generator().manual_seed(args.seed)
    B, K, S, T = args.batch, args.passages, args.seq, args.answer
    ids = torch.randint(2, args.vocab, (B, K, S), generator=g)
    lengths = torch.randint(S // 2, S + 1, (B, K), generator=g)
    mask = (torch.arange(S)[None, None] < lengths[..., None]).long()
    dec = torch.randint(2, args.vocab, (B, T), generator=g)
    labels = torch.cat([dec[:, 1:], torch.ones(B, 1, dtype=torch.long)], 1)
    return reader, [t.to(device) for t in (ids * mask, mask, dec, labels)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--passages", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--answer", type=int, default=8)
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    reader, (ids, mask, dec, labels) = build(args, device)
    K = args.passages

    with torch.no_grad():
        states, memory_mask = reader.encode(ids, mask)

    def reuse():
        return reader.per_passage_log_likelihood(states, memory_mask, K, dec, labels)[1]

    def reuse_per_question_batch():
        return reader.per_passage_log_likelihood(states, memory_mask, K, dec, labels,
                                                 max_sequences=args.batch)[1]

    def separate():
        out = []
        with torch.no_grad():
            for k in range(K):
                logits = reader(ids[:, k:k + 1], mask[:, k:k + 1], dec)
                logp = torch.log_softmax(logits.float(), dim=-1)
                out.append(logp.gather(-1, labels[..., None])[..., 0])
        return torch.stack(out, 1)

    methods = {"reuse states, B*K at once": reuse,
               "reuse states, B per pass": reuse_per_question_batch,
               f"K={K} separate runs": separate}
    reference = separate()
    results = []
    for name, fn in methods.items():
        diff = (fn().float() - reference.float()).abs().max().item()
        results.append({"method": name, "median_s": median_seconds(fn, device, args.repeats),
                        "peak_bytes": peak_bytes(fn, device), "max_abs_diff_vs_separate": diff})
    base = results[-1]
    print(f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"{torch.get_num_threads()} threads)  B={args.batch} K={K} S={args.seq} T={args.answer} "
          f"V={args.vocab} layers={args.layers}+{args.layers} hidden={args.hidden} "
          f"{args.precision}, median of {args.repeats}")
    print(f"{'method':30s} {'time (ms)':>10s} {'x faster':>9s} {'peak MB':>9s} {'x less':>7s} "
          f"{'max|diff|':>10s}")
    for r in results:
        print(f"{r['method']:30s} {1e3 * r['median_s']:10.1f} {base['median_s'] / r['median_s']:9.2f} "
              f"{r['peak_bytes'] / 2**20:9.1f} {base['peak_bytes'] / max(r['peak_bytes'], 1):7.2f} "
              f"{r['max_abs_diff_vs_separate']:10.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "device": str(device), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
