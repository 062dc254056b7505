"""Convert the T5 reader between Hugging Face and our megatron-core layout.

    # HF T5ForConditionalGeneration directory (t5-base, t5-v1_1, flan-t5 layouts) -> our reader
    python tools/convert_hf_t5.py import --hf path/to/t5-base --out ckpt/reader --tp 2
    # and back
    python tools/convert_hf_t5.py export --checkpoint ckpt/reader --out hf/reader

Build the matching FiDReader with ``convert.reader_from_hf_t5_config`` (the HF config is in the
checkpoint's meta.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron.emdr2.models import checkpoint_io as io
from megatron.emdr2.models.convert import (ConversionError, hf_t5_is_tied, hf_t5_to_megatron,
                                            megatron_to_hf_t5)


def import_hf(args) -> None:
    with open(os.path.join(args.hf, "config.json")) as f:
        hf_config = json.load(f)
    if hf_config.get("feed_forward_proj", "relu") not in ("relu", "gated-gelu"):
        raise ConversionError(f"feed_forward_proj {hf_config['feed_forward_proj']!r} is not "
                              f"supported (relu or gated-gelu)")
    hf_sd = io.load_hf_state_dict(args.hf)
    heads, vocab = hf_config["num_heads"], hf_config["vocab_size"]
    if vocab % args.tp:
        raise ConversionError(f"vocabulary {vocab} does not divide over --tp {args.tp}")
    tied = hf_t5_is_tied(hf_sd)
    shards = [hf_t5_to_megatron(hf_sd, heads, tied, args.tp, r) for r in range(args.tp)]
    meta = {"kind": "t5_reader", "num_heads": heads, "vocab_size": vocab, "tied": tied,
            "gated": hf_config.get("feed_forward_proj") == "gated-gelu",
            "tensor_parallel": args.tp, "hf_config": hf_config}
    io.save_megatron(args.out, shards, meta, args.overwrite)
    print(f"wrote {args.tp} tensor-parallel shard(s) of a T5 reader to {args.out}")


def export_hf(args) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    shards, meta = io.load_megatron(args.checkpoint, args.key)
    heads = args.num_heads or meta.get("num_heads")
    if not heads:
        raise ConversionError("the checkpoint has no meta: pass --num-heads")
    hf_sd = megatron_to_hf_t5(shards, heads, gated=meta.get("gated"),
                              vocab_size=args.vocab_size or meta.get("vocab_size"))
    cfg = dict(meta.get("hf_config") or {})
    if not cfg:
        raise ConversionError("the checkpoint has no HF config in its meta; export needs one")
    for k in ("architectures", "model_type", "transformers_version"):
        cfg.pop(k, None)
    if "scale_decoder_outputs" in cfg:  # transformers >= 5 derives it from tie_word_embeddings
        cfg["tie_word_embeddings"] = cfg.pop("scale_decoder_outputs")
    io.save_hf_model(args.out, T5ForConditionalGeneration, T5Config(**cfg), hf_sd,
                     args.overwrite, args.tokenizer_dir)
    print(f"wrote a Hugging Face T5ForConditionalGeneration to {args.out}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face directory -> our reader checkpoint")
    imp.add_argument("--hf", required=True)
    imp.add_argument("--out", required=True)
    imp.add_argument("--tp", type=int, default=1)
    imp.add_argument("--overwrite", action="store_true")
    exp = sub.add_parser("export", help="our reader checkpoint -> Hugging Face directory")
    exp.add_argument("--checkpoint", required=True)
    exp.add_argument("--out", required=True)
    exp.add_argument("--key", default=None, help="dotted path/prefix of the reader in the file")
    exp.add_argument("--num-heads", type=int)
    exp.add_argument("--vocab-size", type=int, help="drop vocabulary padding beyond this")
    exp.add_argument("--tokenizer-dir")
    exp.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        (import_hf if args.command == "import" else export_hf)(args)
    except (ConversionError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
