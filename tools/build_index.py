"""Build an evidence index: embed every passage with a retriever's context tower, write fp16 shards.

    # one process (CPU or one GPU)
    python tools/build_index.py --checkpoint PATH --evidence data/nq-mini/evidence.tsv --output runs/index
    # every rank embeds its slice and writes its shard (gloo on CPU, NCCL on GPUs)
    torchrun --nproc-per-node 4 tools/build_index.py --checkpoint PATH --evidence psgs_w100.tsv --output runs/index

The index is written to OUTPUT/step-XXXXXXXX (the model step, --model-step) and published by
writing its manifest last, then OUTPUT/LATEST; the manifest records the context tower's
fingerprint, which the tools that search the index check. A retriever checkpoint (--checkpoint) is either
  * a Hugging Face BERT directory (config.json + model.safetensors or pytorch_model.bin, its
    vocab.txt is used): both towers are that one model, imported with the converter; or
  * a torch file {"model": BiEncoder state dict, "config": {...}} (see RetrieverConfig), or a
    training checkpoint directory (its "biencoder" model): the architecture comes from --config
    FILE.json, else the directory's retriever_config.json (ICT/DPR write it) or its checkpoint meta.
--random-init keeps the architecture but not the weights (a baseline for evaluations).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("build_index")


_JSON_TYPES = {"int": ((int,), "an integer"), "float": ((int, float), "a number"), "bool": ((bool,), "true or false"),
               "str": ((str,), "a string")}


@dataclasses.dataclass
class RetrieverConfig:
    """Architecture of a BiEncoder stored as a state dict (the "config" of a .pt checkpoint)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int | None = None
    vocab_size: int = 30522
    max_sequence_length: int = 512
    num_tokentypes: int = 2
    post_layernorm: bool = False  # True for towers imported from Hugging Face BERT
    layernorm_epsilon: float = 1e-12
    shared: bool = False  # one tower for questions and passages
    pooling: str = "cls"  # or "weighted-mean" (models/bert_tower.py)
    vocab_file: str | None = None
    lower_case: bool = True

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "RetrieverConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{where}: unknown retriever config keys {unknown}")
        try:
            cfg = cls(**d)
        except TypeError as e:
            raise ValueError(f"{where}: incomplete retriever config ({e})") from None
        for f in dataclasses.fields(cls):  # JSON gives any type: check before building a model
            value, kind = getattr(cfg, f.name), f.type.split(" ")[0]  # "int | None" -> "int"
            allowed, words = _JSON_TYPES[kind]
            if not ((value is None and "None" in f.type)
                    or (isinstance(value, allowed) and (kind == "bool" or not isinstance(value, bool)))):
                raise ValueError(f"{where}: {f.name} must be {words}, found {value!r}")
        return cfg


class RetrieverLoadError(RuntimeError):
    """A --checkpoint that cannot be turned into a retriever (message names the path)."""


def _hf_config(hf_dir: Path) -> SimpleNamespace:
    cfg = json.loads((hf_dir / "config.json").read_text())
    defaults = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12,
                    hidden_act="gelu", type_vocab_size=2, max_position_embeddings=512)
    return SimpleNamespace(**{**defaults, **cfg})


def _tokenizer(vocab_file: str | None, lower_case: bool = True):
    from megatron.emdr2.data.tokenizer import BertWordPieceTokenizer

    return BertWordPieceTokenizer(vocab_file, lower_case=lower_case)


def load_retriever(checkpoint: str, config_file: str | None = None, random_init: bool = False,
                   seed: int = 1234):
    """(BiEncoder in eval mode, tokenizer, description dict). Needs megatron initialised (TP=1)."""
    from megatron.emdr2.models.biencoder import BiEncoder

    path = Path(checkpoint)
    if (path / "config.json").is_file():  # Hugging Face BERT directory
        from megatron.emdr2.models import checkpoint_io
        from megatron.emdr2.models.convert import bert_tower_from_hf_config, hf_bert_layout, hf_bert_to_megatron

        hf = _hf_config(path)
        sd = checkpoint_io.load_hf_state_dict(str(path))
        layout = hf_bert_layout(sd)
        torch.manual_seed(seed)
        tower = bert_tower_from_hf_config(hf, layout=layout)
        if not random_init:
            tower.load_state_dict(hf_bert_to_megatron(sd, hf.num_hidden_layers, hf.num_attention_heads), strict=True)
        tok_cfg = path / "tokenizer_config.json"
        lower = json.loads(tok_cfg.read_text()).get("do_lower_case", True) if tok_cfg.exists() else True
        vocab = path / "vocab.txt"
        tok = _tokenizer(str(vocab) if vocab.exists() else None, lower)
        return BiEncoder(tower).eval(), tok, {"kind": "hf_bert", "path": str(path), "random_init": random_init}

    from megatron.emdr2.openqa.builders import PretrainedError, load_into, load_model_state

    from megatron.emdr2 import safe_load

    raw = {}
    try:
        if path.is_file():  # read once: the state dict and its "config" live in the same file
            raw = safe_load.load(path, "cpu", error=RetrieverLoadError)  # weights-only: runs nothing
            if not isinstance(raw, dict):
                raise PretrainedError(f"{path}: expected a dict, found {type(raw).__name__}")
            state = raw.get("models", {}).get("biencoder") or raw.get("model") or raw
        else:
            state = load_model_state(str(path), "biencoder")
    except (PretrainedError, RetrieverLoadError) as e:
        raise RetrieverLoadError(str(e)) from None
    except Exception as e:  # unreadable / truncated file
        raise RetrieverLoadError(f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}: {e})") from None
    cfg_dict = raw.get("config") if isinstance(raw, dict) else None
    if config_file:
        cfg_dict = json.loads(Path(config_file).read_text())
    if not cfg_dict and path.is_dir() and (path / "retriever_config.json").exists():  # an ICT/DPR save dir
        cfg_dict = json.loads((path / "retriever_config.json").read_text())
    if not cfg_dict and path.is_dir():
        try:
            cfg_dict = _config_from_meta(str(path), state)
        except PretrainedError as e:
            raise RetrieverLoadError(str(e)) from None
    if not cfg_dict:
        raise RetrieverLoadError(f"{path}: no 'config' in the checkpoint; pass --config FILE.json "
                                 f"with the retriever's architecture")
    cfg = RetrieverConfig.from_dict(dict(cfg_dict), config_file or str(path))
    shared = cfg.shared or not any(k.startswith("context_tower.") for k in state)
    torch.manual_seed(seed)
    model = BiEncoder(_tower(cfg), None if shared else _tower(cfg))
    if not random_init:
        try:
            load_into(model, state, str(path))
        except PretrainedError as e:
            source = f"--config {config_file}" if config_file else "its recorded config"
            raise RetrieverLoadError(f"{e} ({source} does not match the weights)") from None
    return model.eval(), _tokenizer(cfg.vocab_file, cfg.lower_case), {
        "kind": "state_dict", "path": str(path), "random_init": random_init}


def _config_from_meta(path: str, state: dict) -> dict | None:
    """A training checkpoint records its retriever's size in its metadata (see the tasks'
    ``checkpoint_meta``): enough to rebuild the towers without a --config file."""
    from megatron.emdr2.openqa.builders import load_checkpoint_meta

    meta = load_checkpoint_meta(path)
    size = meta.get("retriever")
    if not size:
        return None
    emb = next((v for k, v in state.items() if k.endswith("word_embeddings.weight")), None)
    cfg = {"num_layers": size["num_layers"], "hidden_size": size["hidden_size"],
           "num_attention_heads": size["num_attention_heads"], "ffn_hidden_size": size.get("ffn_hidden_size"),
           "max_sequence_length": size.get("seq_length", 512),
           # MSS/EMDR² record the layout with the sizes (meta["retriever"]); a post-LN tower (BERT
           # warm start) rebuilt pre-LN loads without complaint and embeds everything alike
           "post_layernorm": bool(size.get("post_layernorm", meta.get("post_layernorm", False))),
           "shared": bool(meta.get("shared_towers", False)), "vocab_file": meta.get("vocab_file"),
           "pooling": size.get("pooling", "cls")}
    if emb is not None:
        cfg["vocab_size"] = int(emb.shape[0])
    if size.get("layernorm_epsilon") is not None:
        cfg["layernorm_epsilon"] = size["layernorm_epsilon"]
    return cfg


def _tower(cfg: RetrieverConfig):
    from megatron.emdr2.models.bert_tower import BertTower
    from megatron.emdr2.models.config import bert_config

    config = bert_config(cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.ffn_hidden_size,
                         layernorm_epsilon=cfg.layernorm_epsilon, post_layernorm=cfg.post_layernorm)
    return BertTower(config, cfg.vocab_size, cfg.max_sequence_length, cfg.num_tokentypes, pooling=cfg.pooling)


def add_retriever_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="HF BERT directory, or a BiEncoder .pt / checkpoint dir")
    p.add_argument("--config", default=None, help="JSON retriever config for a checkpoint without one")
    p.add_argument("--random-init", action="store_true", help="same architecture, random weights")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank (CPU)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_retriever_args(p)
    p.add_argument("--evidence", required=True, help="DPR evidence .tsv (or a preprocessed mmap prefix)")
    p.add_argument("--output", required=True, help="index root; the version goes to OUTPUT/step-XXXXXXXX")
    p.add_argument("--model-step", type=int, default=0, help="training step of the tower (names the version)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing version of this step")
    p.add_argument("--faiss", default=None, metavar="FACTORY",
                   help="also write a FAISS index (e.g. Flat, IVF1024,Flat, IVF4096,PQ64) as faiss.index")
    p.add_argument("--no-progress-bar", action="store_true")
    args = p.parse_args(argv)
    from megatron.emdr2.arguments import fail

    if args.model_step < 0:
        fail(f"--model-step must be >= 0 (it names the version step-XXXXXXXX), got {args.model_step}",
             "build_index")
    if args.batch_size < 1:
        fail(f"--batch-size must be >= 1, got {args.batch_size}", "build_index")
    if args.max_seq_length < 1:
        fail(f"--max-seq-length must be >= 1, got {args.max_seq_length}", "build_index")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    from megatron.emdr2 import initialize
    from megatron.emdr2.data.evidence import load_evidence
    from megatron.emdr2.data.inputs import encode_context
    from megatron.emdr2.index import embed_evidence, shard_store
    from megatron.emdr2.index.fingerprint import tower_fingerprint

    launch = initialize.initialize(tensor_parallel=1, seed=args.seed)
    try:
        model, tok, desc = load_retriever(args.checkpoint, args.config, args.random_init, args.seed)
        device = initialize.device()
        tower = model.context_encoder.to(device)
        evidence = load_evidence(args.evidence)
        max_len = min(args.max_seq_length, tower.max_sequence_length)

        def tokenize(rows):
            return encode_context(tok, evidence.passages(list(rows)), max_len, pad_to="longest")

        out = Path(args.output) / shard_store.version_name(args.model_step)
        manifest = embed_evidence(
            lambda ids, mask: tower(ids, mask), tokenize, evidence.ids, out,
            batch_size=args.batch_size, model_step=args.model_step, device=device,
            progress=not args.no_progress_bar, overwrite=args.overwrite, fingerprint=tower_fingerprint(tower),
            extra={"retriever": desc, "evidence": os.path.abspath(args.evidence), "max_seq_length": max_len,
                   "tokenizer": tok.name})
        if launch.rank == 0:
            print(f"published {manifest.num_rows} x {manifest.dim} fp16 in {len(manifest.shards)} shard(s) at {out}")
            if args.faiss:
                from megatron.emdr2.index.faiss_backend import FaissIndex

                FaissIndex.from_store(out, args.faiss).save(out / "faiss.index")
                print(f"wrote FAISS {args.faiss} index to {out / 'faiss.index'}")
    except (RetrieverLoadError, shard_store.IndexStoreError, ValueError, FileNotFoundError) as e:
        print(f"build_index: error: {e}", file=sys.stderr)
        return 2
    finally:
        initialize.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
