"""Benchmark: our EMDR² step vs the equivalent step written on Hugging Face models.

  ours  megatron-core towers + FiDReader (``bench_emdr2_step.step``, encoder-state reuse).
  hf    two HF ``BertModel`` towers ([CLS] states, scores / sqrt(H)) and an HF
        ``T5ForConditionalGeneration`` doing FiD by hand: the B*K (question, passage) sequences
        go through the T5 encoder, each question's K outputs are concatenated into one memory,
        the decoder reads it (teacher forcing, reader NLL); the per-passage likelihoods re-run
        the decoder on the B*K single-passage memories (detached, eval mode, no autograd) and
        take log-softmax over the full vocabulary, as one would with HF's API.
Both use the same objective (``objectives.joint_loss``), batch, lengths, sizes (layers, width,
heads, ffn 4x, vocabulary) and threads, dropout off. The architectures differ only where the
libraries do: HF T5 has RMSNorm, no biases and relative positions; our reader is Megatron's T5
(LayerNorm, biases, learned positions). Interleaved repeats, medians.

    python bench/bench_emdr2_step_hf.py --batch 4 --top-k 8 --layers 4 --hidden 256 --repeats 5 --json hf.json
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_emdr2_step as ours_bench  # noqa: E402  (build, inputs, step: our side)


def build_hf(args):
    from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    bert = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                      max_position_embeddings=max(args.reader_len, args.context_len),
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    towers = [BertModel(bert, add_pooling_layer=False).train() for _ in range(2)]
    t5 = T5Config(vocab_size=args.vocab, d_model=args.hidden, d_kv=args.hidden // args.heads,
                  d_ff=4 * args.hidden, num_layers=args.layers, num_heads=args.heads, dropout_rate=0.0,
                  feed_forward_proj="gelu", decoder_start_token_id=0, pad_token_id=0)
    return towers, T5ForConditionalGeneration(t5).train()


def hf_step(towers, t5, x) -> float:
    from transformers.modeling_outputs import BaseModelOutput

    from megatron.emdr2.objectives import ObjectiveConfig, joint_loss

    query_tower, context_tower = towers
    B, K, S = x["r"][0].shape
    q = query_tower(input_ids=x["q"][0], attention_mask=x["q"][1]).last_hidden_state[:, 0]
    c = context_tower(input_ids=x["c"][0], attention_mask=x["c"][1]).last_hidden_state[:, 0].view(B, K, -1)
    scores = torch.einsum("bh,bkh->bk", q.float(), c.float()) / q.size(-1) ** 0.5

    ids, mask = x["r"]
    enc = t5.encoder(input_ids=ids.view(B * K, S), attention_mask=mask.view(B * K, S)).last_hidden_state
    states = enc.reshape(B, K * S, -1)  # FiD: one memory per question
    logits = t5(encoder_outputs=BaseModelOutput(last_hidden_state=states), attention_mask=mask.view(B, K * S),
                decoder_input_ids=x["dec"]).logits
    nll = F.cross_entropy(logits.float().transpose(1, 2), x["labels"], reduction="none") * x["label_mask"]
    reader_nll = nll.sum(-1)

    t5.eval()  # per-passage likelihoods: stop-gradient, no dropout
    with torch.no_grad():
        single = t5(encoder_outputs=BaseModelOutput(last_hidden_state=enc.detach()),
                    attention_mask=mask.view(B * K, S),
                    decoder_input_ids=x["dec"].repeat_interleave(K, 0)).logits
        logp = torch.log_softmax(single.float(), -1)
        gold = logp.gather(-1, x["labels"].repeat_interleave(K, 0).unsqueeze(-1)).squeeze(-1)
        token_lp = (gold * x["label_mask"].repeat_interleave(K, 0)).view(B, K, -1)
    t5.train()
    out = joint_loss(ObjectiveConfig(), scores, token_lp, x["label_mask"].float(), reader_nll)
    out.loss.backward()
    return out.loss.item()


def main(argv=None) -> dict:
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
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from megatron.emdr2.initialize import free_port, shutdown

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    biencoder, reader = ours_bench.build(args)
    towers, t5 = build_hf(args)
    x = ours_bench.inputs(args)

    def zero():
        for m in (biencoder, reader, t5, *towers):
            m.zero_grad(set_to_none=True)

    runs = {"ours": lambda: ours_bench.step(biencoder, reader, x, naive=False), "hf": lambda: hf_step(towers, t5, x)}
    losses = {k: fn() for k, fn in runs.items()}  # warm-up
    zero()
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
            zero()
    med = {k: statistics.median(v) for k, v in times.items()}
    count = lambda ms: sum(p.numel() for m in ms for p in m.parameters())
    result = {"config": vars(args), "threads": torch.get_num_threads(), "median_step_s": med,
              "all_step_s": times, "loss": losses, "speedup_ours_vs_hf": med["hf"] / med["ours"],
              "params": {"ours": count([biencoder, reader]), "hf": count([*towers, t5])}}
    print(f"EMDR² step, B={args.batch} K={args.top_k}, {args.layers} layers x {args.hidden}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'variant':<6} {'step (s)':>9} {'params (M)':>11} {'loss':>10}")
    for k in runs:
        print(f"{k:<6} {med[k]:>9.3f} {result['params'][k] / 1e6:>11.2f} {losses[k]:>10.4f}")
    print(f"ours vs HF: {result['speedup_ours_vs_hf']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    shutdown()
    return result


if __name__ == "__main__":
    main()
