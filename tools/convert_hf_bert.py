"""Convert BERT retriever towers between Hugging Face and our megatron-core layout.

    # HF BertModel / MegatronBertModel directory -> our tower, split for tensor parallelism
    python tools/convert_hf_bert.py import --hf path/to/bert-base-uncased --out ckpt/tower --tp 2
    # and back (all ranks' shards are merged)
    python tools/convert_hf_bert.py export --checkpoint ckpt/tower --out hf/tower

The import records the HF config in the checkpoint's meta, so `export` needs no flags; a
post-LN (HF BERT) tower exports as BertModel, a pre-LN (Megatron) one as MegatronBertModel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron.emdr2.models import checkpoint_io as io
from megatron.emdr2.models.convert import (ConversionError, hf_bert_extras, hf_bert_layout,
                                            hf_bert_to_megatron, megatron_to_hf_bert)


def _pad(vocab: int, tp: int, multiple: int) -> int:
    step = tp * multiple
    return ((vocab + step - 1) // step) * step


def import_hf(args) -> None:
    with open(os.path.join(args.hf, "config.json")) as f:
        hf_config = json.load(f)
    hf_sd = io.load_hf_state_dict(args.hf)
    layers, heads = hf_config["num_hidden_layers"], hf_config["num_attention_heads"]
    vocab = hf_config["vocab_size"]
    padded = _pad(vocab, args.tp, args.make_vocab_size_divisible_by)
    shards = [hf_bert_to_megatron(hf_sd, layers, heads, args.tp, r, padded_vocab_size=padded)
              for r in range(args.tp)]
    meta = {"kind": "bert_tower", "layout": hf_bert_layout(hf_sd), "num_layers": layers,
            "num_heads": heads, "vocab_size": vocab, "padded_vocab_size": padded,
            "tensor_parallel": args.tp, "hf_config": hf_config}
    # The pooler is not part of the tower; keep it beside it for a faithful export.
    io.save_megatron(args.out, shards, meta, args.overwrite, hf_extras=hf_bert_extras(hf_sd))
    print(f"wrote {args.tp} tensor-parallel shard(s) of a {meta['layout']} tower to {args.out}")


def export_hf(args) -> None:
    import torch
    from transformers import BertConfig, BertModel, MegatronBertConfig, MegatronBertModel

    shards, meta = io.load_megatron(args.checkpoint, args.key)
    layers = args.num_layers or meta.get("num_layers")
    heads = args.num_heads or meta.get("num_heads")
    if not layers or not heads:
        raise ConversionError("the checkpoint has no meta: pass --num-layers and --num-heads")
    layout = args.layout or meta.get("layout")
    if layout is None:  # pre-LN and post-LN towers have the same parameter names
        raise ConversionError("the checkpoint does not say whether the tower is post-LN or "
                              "pre-LN: pass --layout bert or --layout megatron_bert")
    extras_file = os.path.join(args.checkpoint, "hf_extras.pt") if os.path.isdir(args.checkpoint) else ""
    extras = torch.load(extras_file, weights_only=True) if os.path.exists(extras_file) else {}
    hf_sd = megatron_to_hf_bert(shards, layers, heads, post_layernorm=layout == "bert",
                                vocab_size=args.vocab_size or meta.get("vocab_size"),
                                extras=extras)
    cfg = dict(meta.get("hf_config") or {})
    word = hf_sd["embeddings.word_embeddings.weight"]
    cfg.update(vocab_size=word.size(0), hidden_size=word.size(1), num_hidden_layers=layers,
               num_attention_heads=heads,
               intermediate_size=hf_sd["encoder.layer.0.intermediate.dense.weight"].size(0),
               max_position_embeddings=hf_sd["embeddings.position_embeddings.weight"].size(0),
               type_vocab_size=hf_sd["embeddings.token_type_embeddings.weight"].size(0))
    cfg.pop("architectures", None)
    cfg.pop("model_type", None)
    config_cls, model_cls = ((BertConfig, BertModel) if layout == "bert"
                             else (MegatronBertConfig, MegatronBertModel))
    config = config_cls(**cfg)
    add_pooler = any(k.startswith("pooler.") for k in hf_sd)

    def build(c):
        return model_cls(c, add_pooling_layer=add_pooler)

    build.__name__ = model_cls.__name__
    io.save_hf_model(args.out, build, config, hf_sd, args.overwrite, args.tokenizer_dir)
    print(f"wrote a Hugging Face {model_cls.__name__} to {args.out}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face directory -> our tower checkpoint")
    imp.add_argument("--hf", required=True, help="HF model directory (config.json + weights)")
    imp.add_argument("--out", required=True)
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel size to split for")
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=1,
                     help="pad the vocabulary to a multiple of this times --tp")
    imp.add_argument("--overwrite", action="store_true")
    exp = sub.add_parser("export", help="our tower checkpoint -> Hugging Face directory")
    exp.add_argument("--checkpoint", required=True, help="directory of mp_rank_XX.pt, or one .pt")
    exp.add_argument("--out", required=True)
    exp.add_argument("--key", default=None, help="dotted path/prefix of the tower in the file")
    exp.add_argument("--num-layers", type=int)
    exp.add_argument("--num-heads", type=int)
    exp.add_argument("--layout", choices=["bert", "megatron_bert"],
                     help="bert = post-LN tower, megatron_bert = pre-LN tower")
    exp.add_argument("--vocab-size", type=int, help="drop vocabulary padding beyond this")
    exp.add_argument("--tokenizer-dir", help="copy vocab/tokenizer files from here")
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
