"""Export a trained retriever (query and context towers) to Hugging Face format.

    python tools/export_retriever_hf.py --checkpoint save/iter_0001000 --out hf/retriever \
        --key model.retriever --num-heads 12 --layout bert|megatron_bert \
        [--tokenizer-dir path/to/vocab]

``--key`` is where the BiEncoder state dict sits inside each ``mp_rank_XX.pt`` (a dotted path
into the saved dict, whose last part may be a parameter prefix). Separate towers give
``out/query`` and ``out/context``; a shared tower gives ``out/query`` only (and a SHARED_TOWER
note). Post-LN towers (initialised from HF BERT) become
``BertModel``s, Megatron pre-LN towers ``MegatronBertModel``s; either way the [CLS] state of
``last_hidden_state`` is the embedding.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from megatron.emdr2.models import checkpoint_io as io
from megatron.emdr2.models.convert import ConversionError


def _tower(shards, prefix):
    picked = [{k[len(prefix):]: v for k, v in s.items() if k.startswith(prefix)} for s in shards]
    return picked if picked[0] else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="directory of mp_rank_XX.pt, or one .pt")
    p.add_argument("--out", required=True)
    p.add_argument("--key", default=None, help="dotted path/prefix of the BiEncoder state dict")
    p.add_argument("--num-heads", type=int, required=True)
    p.add_argument("--layout", choices=["bert", "megatron_bert"], required=True,
                   help="bert: post-LN towers (bert_config(post_layernorm=True), e.g. imported "
                        "from HF BERT); megatron_bert: Megatron pre-LN towers. The weights "
                        "alone cannot tell them apart.")
    p.add_argument("--vocab-size", type=int, help="drop vocabulary padding beyond this")
    p.add_argument("--tokenizer-dir", help="copy vocab/tokenizer files into each tower")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)

    from tools import convert_hf_bert

    try:
        shards, _ = io.load_megatron(args.checkpoint, args.key)
        towers = {name: _tower(shards, f"{name}_tower.") for name in ("query", "context")}
        if towers["query"] is None:
            raise ConversionError("no 'query_tower.*' parameters under the given --key")
        with io.atomic_dir(args.out, args.overwrite) as tmp:
            for name, tower in towers.items():
                if tower is None:  # shared tower: the query tower embeds passages too
                    continue
                layers = 1 + max(int(k.split(".")[2]) for k in tower[0]
                                 if k.startswith("encoder.layers."))
                stage = os.path.join(tmp, f".{name}_shards")  # the tower alone, all TP ranks
                io.save_megatron(stage, tower, {})
                flags = ["export", "--checkpoint", stage, "--out", os.path.join(tmp, name),
                         "--num-layers", str(layers), "--num-heads", str(args.num_heads),
                         "--layout", args.layout]
                if args.vocab_size:
                    flags += ["--vocab-size", str(args.vocab_size)]
                if args.tokenizer_dir:
                    flags += ["--tokenizer-dir", args.tokenizer_dir]
                if convert_hf_bert.main(flags):
                    raise ConversionError(f"exporting the {name} tower failed")
                shutil.rmtree(stage)
            if towers["context"] is None:
                with open(os.path.join(tmp, "SHARED_TOWER"), "w") as f:
                    f.write("query and context towers are one model: use query/ for both\n")
        print(f"wrote {', '.join(n for n, t in towers.items() if t)} tower(s) to {args.out}")
    except (ConversionError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
