"""Convert a checkpoint of the original EMDR² release into one of our training checkpoints.

    # a released EMDR² model (retriever + reader in one file)
    python tools/convert_original_emdr2.py --load downloads/emdr2-nq --out runs/emdr2-nq-original
    python -m tasks.openqa.evaluate --load runs/emdr2-nq-original --index-dir runs/nq-index ...

    # the MSS pre-trained retriever and reader, released as two checkpoints
    python tools/convert_original_emdr2.py --load mss-emdr2-retriever-base-steps82k \
        --reader-load mss-emdr2-reader-base-steps82k --out runs/mss-original
    python -m tasks.openqa.emdr2 --retriever-load runs/mss-original --reader-load runs/mss-original ...

``--load`` is a checkpoint root (with ``latest_checkpointed_iteration.txt``), an ``iter_*``
directory or a ``model_optim_rng.pt`` file. The output holds models "biencoder" and/or "reader"
built by our builders, and meta with their sizes, so the tasks need no size flags.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="original checkpoint (root, iter_* dir or .pt file)")
    p.add_argument("--iteration", type=int, default=None, help="default: the root's latest")
    p.add_argument("--reader-load", default=None,
                   help="a second original checkpoint holding the reader (when --load has none)")
    p.add_argument("--out", required=True, help="our checkpoint directory to write")
    p.add_argument("--vocab-file", default=None,
                   help="BERT WordPiece vocab the models were trained with (default: bundled uncased)")
    p.add_argument("--num-attention-heads", type=int, default=None,
                   help="default: the checkpoint's args.num_attention_heads")
    p.add_argument("--checkpoint-version", type=float, default=None,
                   help="fused QKV row order (0, 1 or 2); default: the file's checkpoint_version")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def _merge_reader(ckpt, reader_path: str):
    from megatron.emdr2.interop.original import read_original_checkpoint
    from megatron.emdr2.models.convert import ConversionError

    other = read_original_checkpoint(reader_path)
    if other.reader is None:
        raise ConversionError(f"{other.path}: holds no T5 reader")
    if ckpt.reader is not None:
        raise ConversionError(f"{ckpt.path}: already holds a reader; drop --reader-load")
    if other.checkpoint_version != ckpt.checkpoint_version:
        raise ConversionError(f"{ckpt.path} and {other.path}: different checkpoint_version "
                              f"({ckpt.checkpoint_version} vs {other.checkpoint_version})")
    ckpt.reader = other.reader
    return ckpt


def original_reading(args: dict, sizes: dict) -> dict:
    """How the original read and decoded with this checkpoint, for our checkpoint's meta (so
    that `tasks.openqa.evaluate --load` reads the same way): its reader rows ([CLS] q [SEP] title
    [SEP] the passage extended with its article neighbours [SEP]: `postprocess` and
    `query_extended_context_t5_format` in its megatron/model/emdr2_model.py), and the lengths and
    top-K of its run (its args; else the values of its examples/openqa/emdr2_*.sh: --seq-length
    512, --seq-length-ret 256, --decoder-seq-length 32, --topk-retrievals 50, --beam-size 1),
    never longer than the models' position tables."""
    def arg(name, default):
        value = args.get(name)
        return int(value) if isinstance(value, (int, float)) and value > 0 else default

    def positions(role, length):
        return min(length, sizes[role]["seq_length"]) if role in sizes else length

    return {"reader_context": "neighbours", "reader_format": "original",
            "reader_max_len": positions("reader", arg("seq_length", 512)),
            "query_max_len": positions("retriever", arg("seq_length_ret", 256)),
            "context_max_len": positions("retriever", arg("seq_length_ret", 256)),
            # (the decoder reads [BOS] and the answer: one position more than the answer)
            "answer_max_len": positions("reader", arg("max_decode_len", arg("decoder_seq_length", 32)) + 1) - 1,
            "top_k": arg("topk_retrievals", 50), "num_beams": arg("beam_size", 1), "no_repeat_ngram_size": 0}


def _init_single_process() -> None:
    from megatron.emdr2.initialize import free_port, initialize

    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    initialize(seed=1234)


def convert(args) -> str:
    """Returns the written checkpoint directory."""
    from megatron.emdr2.config import ModelSize
    from megatron.emdr2.data.tokenizer import BertWordPieceTokenizer
    from megatron.emdr2.interop.original import convert_original, fill_state, read_original_checkpoint
    from megatron.emdr2.models.convert import ConversionError
    from megatron.emdr2.openqa import builders
    from megatron.emdr2.training import checkpointing as ckpt_io

    if os.path.exists(args.out) and os.listdir(args.out):
        if not args.overwrite:
            raise ConversionError(f"{args.out}: exists (pass --overwrite to replace it)")
        shutil.rmtree(args.out)
    ckpt = read_original_checkpoint(args.load, args.iteration)
    if args.reader_load:
        ckpt = _merge_reader(ckpt, args.reader_load)
    # the tokenizers the tasks build (tasks/openqa/common.py): the reader's vocabulary adds
    # [BOS], [EOS] and 100 sentinels, padded to a multiple of 128 as the original padded it
    rtok = BertWordPieceTokenizer(args.vocab_file)
    tok = BertWordPieceTokenizer(args.vocab_file, t5_extras=True, pad_to_multiple=128)
    conv = convert_original(ckpt, args.num_attention_heads, args.checkpoint_version,
                            retriever_vocab=rtok.vocab_size, reader_vocab=tok.vocab_size,
                            retriever_real_vocab=rtok.real_vocab_size,
                            reader_real_vocab=tok.real_vocab_size)

    _init_single_process()
    models = {}
    if conv.biencoder is not None:
        model = builders.build_biencoder(ModelSize(**conv.sizes["retriever"]), rtok.vocab_size)
        models["biencoder"] = fill_state(model, conv.biencoder, "biencoder")
        eps = model.query_tower.config.layernorm_epsilon
        if eps != conv.info["layernorm_epsilon"]:  # builders do not take it from meta (yet)
            print(f"note: our retriever towers are built with LayerNorm eps {eps:g}, the original "
                  f"used {conv.info['layernorm_epsilon']:g}; embeddings differ slightly", file=sys.stderr)
    if conv.reader is not None:
        model = builders.build_reader(ModelSize(**conv.sizes["reader"]), tok.vocab_size, tok.real_vocab_size)
        models["reader"] = fill_state(model, conv.reader, "reader")
    meta = dict(conv.sizes, shared_towers=False, vocab_file=rtok.vocab_file, converted_from=conv.info,
                **original_reading(ckpt.args, conv.sizes))
    state = {"iteration": ckpt.iteration, "models": models, "meta": meta}
    path = ckpt_io.save_checkpoint(args.out, ckpt.iteration, state, {"converted": True},
                                   meta={"world_size": 1, "converted_from": conv.info})
    return path


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron.emdr2.models.convert import ConversionError

    try:
        path = convert(args)
    except (ConversionError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
