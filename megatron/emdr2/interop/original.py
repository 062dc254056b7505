"""Read the original EMDR² release (Sachan et al.'s 2020 Megatron-LM fork) into our formats.

Checkpoints. The original saves ``<root>/iter_XXXXXXX/mp_rank_00/model_optim_rng.pt`` (and
``<root>/latest_checkpointed_iteration.txt``) holding ``{"model": ..., "checkpoint_version": 1.0,
"args": Namespace, "iteration", "optimizer", rng states}``. ``model`` nests per module::

    "retriever/biencoder_model": {"query_model"|"context_model":
        {"language_model": {"embedding": {"word_embeddings": {"weight"},
                                          "position_embeddings": {"weight"},
                                          "tokentype_embeddings": {"weight"}},
                            "encoder": {"layers.0.input_layernorm.weight", ...}}}}
    "encoder/t5_model": {"language_model": {"embedding", "encoder", "decoder"},
                         "lm_head": {"bias"}}

``tools/save_emdr2_models.py`` of the release writes one of the two under ``model`` alone.
Both models are pre-LN Megatron transformers (residual before the norm, a final norm, no
embedding norm, LayerNorm eps 1e-5, exact GeLU); the T5 reader shares one embedding (word and
learned absolute positions) between encoder and decoder, ties the LM head to the word embedding
and adds ``lm_head.bias``; its token-type table exists but its forward never uses it.

Fused attention rows depend on ``checkpoint_version`` (what the original's loader sets):
0 (key absent): ``[q | k | v]`` each ``[heads, hn]``; 1.0 (what it saves): ``[heads, hn, 3]``
(q, k, v interleaved per element); >= 2.0 (later Megatron-LM, and megatron-core):
``[heads, 3, hn]``. Cross-attention ``key_value`` likewise with 2 parts.

Evidence embeddings: a pickle ``{"embed_data": {row_id: float16 array [d]}}`` (one file per
rank under ``<name>_tmp/<rank>.pkl`` before merging, the merged file otherwise).

Files are unpickled with an allow-list: tensors, numpy arrays, argparse.Namespace and plain
containers load; any other class (the original's optimizer and loss-scaler objects) becomes an
inert ``Placeholder`` in checkpoints and an error in embedding files. No foreign module is
imported, so no code from the file runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from megatron.emdr2.models.convert import ConversionError, check_state_dict

RETRIEVER_KEY = "retriever/biencoder_model"
READER_KEY = "encoder/t5_model"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
TOWERS = {"query_model": "query_tower", "context_model": "context_tower"}
# the original's defaults (megatron/arguments.py of the release)
ORIGINAL_LAYERNORM_EPS = 1e-5


# ============================================================== restricted unpickling
class Placeholder:
    """Stands in for an object of a class we do not import (the original's optimizer state)."""

    origin = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<Placeholder for {self.origin}>"


_NUMPY_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                  "numpy._core.numeric", "numpy.dtypes")
_NUMPY_NAMES = ("_reconstruct", "scalar", "ndarray", "dtype", "_frombuffer")
_SAFE = {("collections", "OrderedDict"), ("argparse", "Namespace"), ("_codecs", "encode"),
         ("copyreg", "_reconstructor"), ("torch", "Size"), ("torch", "device"),
         ("torch.nn.parameter", "Parameter"), ("torch._tensor", "_rebuild_from_type_v2"),
         ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
         ("builtins", "complex"), ("builtins", "bytearray"), ("builtins", "object"),
         ("__builtin__", "set"), ("__builtin__", "frozenset")}


def _allowed(module: str, name: str) -> bool:
    if (module, name) in _SAFE:
        return True
    if module in _NUMPY_MODULES:
        return name in _NUMPY_NAMES or (module == "numpy.dtypes" and name.endswith("DType"))
    if module == "torch._utils":
        return name.startswith("_rebuild_")
    if module == "torch":  # dtypes, layouts, memory formats: plain constants
        return isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))
    return False


def _unpickler_class(lenient: bool, what: str):
    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if _allowed(module, name):
                module = {"__builtin__": "builtins"}.get(module, module)
                return getattr(importlib.import_module(module), name)
            if lenient:
                return type(name, (Placeholder,), {"origin": f"{module}.{name}"})
            raise ConversionError(f"{what}: refuses to unpickle '{module}.{name}' (only tensors, "
                                  f"numpy arrays and plain containers are expected)")
    return RestrictedUnpickler


def _pickle_module(lenient: bool, what: str):
    """A stand-in for the ``pickle`` module, as ``torch.load(pickle_module=...)`` wants it."""
    unpickler = _unpickler_class(lenient, what)
    mod = types.ModuleType("emdr2_restricted_pickle")
    mod.Unpickler = unpickler
    mod.load = lambda f, **kw: unpickler(f, **kw).load()
    mod.loads = lambda b, **kw: unpickler(__import__("io").BytesIO(b), **kw).load()
    mod.__dict__.update(dumps=pickle.dumps, dump=pickle.dump, Pickler=pickle.Pickler)
    return mod


def safe_torch_load(path: str) -> Any:
    """``torch.load`` of an original checkpoint (zip or legacy format) without running its code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False,
                          pickle_module=_pickle_module(True, path))
    except ConversionError:
        raise
    except Exception as err:
        raise ConversionError(f"{path}: cannot be read as a torch checkpoint "
                              f"({type(err).__name__}: {err})") from None


def safe_pickle_load(path: str) -> Any:
    """A plain pickle (the original's embedding store), allow-listed strictly."""
    with open(path, "rb") as f:
        try:
            return _unpickler_class(False, path)(f).load()
        except ConversionError:
            raise
        except Exception as err:
            raise ConversionError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from None


# ============================================================== locating checkpoint files
def find_checkpoint_file(path: str, iteration: Optional[int] = None) -> str:
    """The ``model_optim_rng.pt`` of a checkpoint root, an ``iter_*``/``release`` directory,
    or the file itself. Tensor-parallel checkpoints are refused (the release has none: its
    dual encoder asserts model-parallel size 1)."""
    p = Path(path)
    if p.is_file():
        return str(p)
    if not p.is_dir():
        raise ConversionError(f"{path}: no such file or directory")
    if iteration is None and (p / TRACKER_FILE).exists():
        text = (p / TRACKER_FILE).read_text().strip()
        if text == "release":
            p = p / "release"
        elif text.isdigit():
            p = p / f"iter_{int(text):07d}"
        else:
            raise ConversionError(f"{p / TRACKER_FILE}: expected an iteration or 'release', "
                                  f"found {text[:40]!r}")
    elif iteration is not None:
        p = p / f"iter_{iteration:07d}"
    ranks = sorted(p.glob("mp_rank_[0-9][0-9]"))
    if not ranks:
        raise ConversionError(f"{p}: no mp_rank_00/{MODEL_FILE} (nor a {TRACKER_FILE} naming one)")
    if len(ranks) > 1:
        raise ConversionError(f"{p}: has {len(ranks)} model-parallel ranks; only model-parallel "
                              f"size 1 checkpoints (what the EMDR² release trains) are supported")
    f = ranks[0] / MODEL_FILE
    if not f.exists():
        raise ConversionError(f"{f}: missing")
    return str(f)


# ============================================================== attention layouts
def qkv_layout(version) -> int:
    """0, 1 or 2: which fused-row layout a ``checkpoint_version`` implies (see module doc)."""
    v = float(version)
    return 0 if v < 1 else (1 if v < 2 else 2)


def _head_dim(t: Tensor, num_heads: int, parts: int, name: str) -> int:
    if t.size(0) % (num_heads * parts):
        raise ConversionError(f"parameter '{name}' has {t.size(0)} rows, not divisible into "
                              f"{parts} parts of {num_heads} heads")
    return t.size(0) // (num_heads * parts)


def original_to_core_rows(t: Tensor, num_heads: int, parts: int, layout: int, name: str = "?") -> Tensor:
    """Fused rows of the original (layout 0/1/2) -> megatron-core's ``[heads, parts, hn]``."""
    hn, rest = _head_dim(t, num_heads, parts, name), t.shape[1:]
    if layout == 0:
        g = t.reshape(parts, num_heads, hn, *rest).transpose(0, 1)
    elif layout == 1:
        g = t.reshape(num_heads, hn, parts, *rest).transpose(1, 2)
    else:
        g = t.reshape(num_heads, parts, hn, *rest)
    return g.reshape(t.shape).contiguous()


def core_to_original_rows(t: Tensor, num_heads: int, parts: int, layout: int, name: str = "?") -> Tensor:
    """Inverse of ``original_to_core_rows``."""
    hn, rest = _head_dim(t, num_heads, parts, name), t.shape[1:]
    g = t.reshape(num_heads, parts, hn, *rest)
    if layout == 0:
        g = g.transpose(0, 1)
    elif layout == 1:
        g = g.transpose(1, 2)
    return g.reshape(t.shape).contiguous()


# ============================================================== names
# per-layer: original name -> (our name, fused parts or 0)
_ENCODER_LAYER = {
    "input_layernorm": ("input_layernorm", 0),
    "self_attention.query_key_value": ("self_attention.linear_qkv", 3),
    "self_attention.dense": ("self_attention.linear_proj", 0),
    "post_attention_layernorm": ("pre_mlp_layernorm", 0),
    "mlp.dense_h_to_4h": ("mlp.linear_fc1", 0),
    "mlp.dense_4h_to_h": ("mlp.linear_fc2", 0),
}
_DECODER_LAYER = {
    "input_layernorm": ("input_layernorm", 0),
    "self_attention.query_key_value": ("self_attention.linear_qkv", 3),
    "self_attention.dense": ("self_attention.linear_proj", 0),
    "post_attention_layernorm": ("pre_cross_attn_layernorm", 0),
    "inter_attention.query": ("cross_attention.linear_q", 0),
    "inter_attention.key_value": ("cross_attention.linear_kv", 2),
    "inter_attention.dense": ("cross_attention.linear_proj", 0),
    "post_inter_attention_layernorm": ("pre_mlp_layernorm", 0),
    "mlp.dense_h_to_4h": ("mlp.linear_fc1", 0),
    "mlp.dense_4h_to_h": ("mlp.linear_fc2", 0),
}


def flatten(nested: Mapping, prefix: str = "") -> Dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}."""
    out = {}
    for k, v in nested.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _normalise_old_names(sd: Dict[str, Any]) -> Dict[str, Any]:
    """Older Megatron-LM (2020 BERT) names: "transformer" for "encoder", "attention" for
    "self_attention" (the original's loader accepts the former too)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("transformer."):
            k = "encoder." + k[len("transformer."):]
        k = k.replace(".attention.query_key_value.", ".self_attention.query_key_value.")
        k = k.replace(".attention.dense.", ".self_attention.dense.")
        out[k] = v
    return out


def _count_layers(sd: Mapping[str, Any], stack: str) -> int:
    prefix = f"{stack}.layers."
    ids = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


@dataclass(frozen=True)
class OriginalShape:
    """What a language model's tensors say about its size (heads come from args or the user)."""

    hidden: int
    ffn: int
    vocab_rows: int
    positions: int
    tokentypes: int
    encoder_layers: int
    decoder_layers: int = 0
    projection: int = 0  # num_heads * kv_channels

    @classmethod
    def infer(cls, sd: Mapping[str, Tensor], what: str) -> "OriginalShape":
        def need(name):
            if name not in sd:
                raise ConversionError(f"{what}: missing parameter '{name}'")
            return sd[name]

        word = need("embedding.word_embeddings.weight")
        types_ = sd.get("embedding.tokentype_embeddings.weight")
        return cls(word.size(1), need("encoder.layers.0.mlp.dense_h_to_4h.weight").size(0),
                   word.size(0), need("embedding.position_embeddings.weight").size(0),
                   0 if types_ is None else types_.size(0), _count_layers(sd, "encoder"),
                   _count_layers(sd, "decoder"),
                   need("encoder.layers.0.self_attention.query_key_value.weight").size(0) // 3)


def original_expected(s: OriginalShape, reader: bool) -> Dict[str, Optional[tuple]]:
    """Names and shapes of an original language model (relative to ``language_model.``)."""
    H, F, D = s.hidden, s.ffn, s.projection
    keys = {"embedding.word_embeddings.weight": (s.vocab_rows, H),
            "embedding.position_embeddings.weight": (s.positions, H)}
    if s.tokentypes:
        keys["embedding.tokentype_embeddings.weight"] = (s.tokentypes, H)
    shapes = {"input_layernorm": (H,), "post_attention_layernorm": (H,),
              "post_inter_attention_layernorm": (H,),
              "self_attention.query_key_value": (3 * D, H), "self_attention.dense": (H, D),
              "inter_attention.query": (D, H), "inter_attention.key_value": (2 * D, H),
              "inter_attention.dense": (H, D), "mlp.dense_h_to_4h": (F, H), "mlp.dense_4h_to_h": (H, F)}
    stacks = [("encoder", s.encoder_layers, _ENCODER_LAYER)]
    if reader:
        stacks.append(("decoder", s.decoder_layers, _DECODER_LAYER))
    for stack, n, table in stacks:
        for i in range(n):
            for name in table:
                w = shapes[name]
                keys[f"{stack}.layers.{i}.{name}.weight"] = w
                keys[f"{stack}.layers.{i}.{name}.bias"] = (w[0],)
        keys[f"{stack}.final_layernorm.weight"] = (H,)
        keys[f"{stack}.final_layernorm.bias"] = (H,)
    return keys


def _fit_rows(t: Tensor, rows: Optional[int], name: str, needed: Optional[int] = None) -> Tensor:
    """Drop the original's vocabulary padding rows, or zero-pad to our padded size."""
    if needed is not None and t.size(0) < needed:
        raise ConversionError(f"parameter '{name}' has {t.size(0)} vocabulary rows but the "
                              f"tokenizer has {needed} tokens (another vocabulary?)")
    if rows is None or rows == t.size(0):
        return t
    if rows < t.size(0):
        return t[:rows]
    return torch.cat([t, t.new_zeros(rows - t.size(0), *t.shape[1:])])


def _stack_to_core(sd, stack, n, table, num_heads, layout, what) -> Dict[str, Tensor]:
    out = {}
    for i in range(n):
        for orig, (ours, parts) in table.items():
            for kind in ("weight", "bias"):
                src = f"{stack}.layers.{i}.{orig}.{kind}"
                t = sd[src]
                if parts:
                    t = original_to_core_rows(t, num_heads, parts, layout, f"{what}.{src}")
                out[f"{stack}.layers.{i}.{ours}.{kind}"] = t
    for kind in ("weight", "bias"):
        out[f"{stack}.final_layernorm.{kind}"] = sd[f"{stack}.final_layernorm.{kind}"]
    return out


def _check_heads(s: OriginalShape, num_heads: int, what: str) -> None:
    if s.projection % num_heads or s.hidden % num_heads:
        raise ConversionError(f"{what}: hidden size {s.hidden} / attention width {s.projection} "
                              f"do not divide into {num_heads} heads")
    if s.projection != s.hidden:
        raise ConversionError(f"{what}: attention width {s.projection} differs from hidden size "
                              f"{s.hidden} (kv_channels != hidden/heads is not supported by our builders)")


def bert_from_original(lm: Mapping[str, Any], num_heads: int, layout: int, what: str,
                       vocab_rows: Optional[int] = None, real_vocab: Optional[int] = None
                       ) -> Tuple[Dict[str, Tensor], OriginalShape]:
    """One original BERT tower's ``language_model`` dict (nested or flat) -> a ``BertTower``
    state dict (without ``_extra_state`` entries) and its shape."""
    sd = _normalise_old_names(flatten(lm))
    s = OriginalShape.infer(sd, what)
    _check_heads(s, num_heads, what)
    check_state_dict(sd, original_expected(s, reader=False), what)
    out = {"embedding.word_embeddings.weight": _fit_rows(
               sd["embedding.word_embeddings.weight"], vocab_rows,
               f"{what}.embedding.word_embeddings.weight", real_vocab),
           "embedding.position_embeddings.weight": sd["embedding.position_embeddings.weight"]}
    if s.tokentypes:
        out["embedding.tokentype_embeddings.weight"] = sd["embedding.tokentype_embeddings.weight"]
    out.update(_stack_to_core(sd, "encoder", s.encoder_layers, _ENCODER_LAYER, num_heads, layout, what))
    return out, s


def t5_from_original(t5: Mapping[str, Any], num_heads: int, layout: int, what: str,
                     vocab_rows: Optional[int] = None, real_vocab: Optional[int] = None
                     ) -> Tuple[Dict[str, Tensor], OriginalShape]:
    """The original T5 reader (``{"language_model", "lm_head"}``) -> a ``FiDReader`` state dict
    (canonical names; ``load_reader_state`` fills megatron's aliases) and its shape."""
    if "language_model" not in t5 or "lm_head" not in t5:
        raise ConversionError(f"{what}: expected entries 'language_model' and 'lm_head', found "
                              f"{sorted(t5)[:5]}")
    sd = _normalise_old_names(flatten(t5["language_model"]))
    s = OriginalShape.infer(sd, what)
    _check_heads(s, num_heads, what)
    expected = original_expected(s, reader=True)
    check_state_dict(sd, expected, f"{what}.language_model",
                     optional=["embedding.tokentype_embeddings.weight"])
    bias = flatten(t5["lm_head"])
    check_state_dict(bias, {"bias": (s.vocab_rows,)}, f"{what}.lm_head")
    word_name = f"{what}.language_model.embedding.word_embeddings.weight"
    out = {"embedding.word_embeddings.weight": _fit_rows(sd["embedding.word_embeddings.weight"],
                                                         vocab_rows, word_name, real_vocab),
           "embedding.position_embeddings.weight": sd["embedding.position_embeddings.weight"],
           "lm_head.output_layer.bias": _fit_rows(bias["bias"], vocab_rows, f"{what}.lm_head.bias")}
    # the token-type table (if any) is dropped: the original reader's forward never adds it
    for stack, n, table in (("encoder", s.encoder_layers, _ENCODER_LAYER),
                            ("decoder", s.decoder_layers, _DECODER_LAYER)):
        out.update(_stack_to_core(sd, stack, n, table, num_heads, layout, what))
    return out, s


# ============================================================== inverse (tests, export)
def _stack_to_original(sd, stack, table, num_heads, layout) -> Dict[str, Tensor]:
    out = {}
    for i in range(_count_layers(sd, stack)):
        for orig, (ours, parts) in table.items():
            for kind in ("weight", "bias"):
                t = sd[f"{stack}.layers.{i}.{ours}.{kind}"]
                if parts:
                    t = core_to_original_rows(t, num_heads, parts, layout)
                out[f"layers.{i}.{orig}.{kind}"] = t.clone()
    for kind in ("weight", "bias"):
        out[f"final_layernorm.{kind}"] = sd[f"{stack}.final_layernorm.{kind}"].clone()
    return out


def _embedding_to_original(sd, vocab_rows, tokentypes: Optional[Tensor]) -> dict:
    emb = {"word_embeddings": {"weight": _fit_rows(sd["embedding.word_embeddings.weight"], vocab_rows, "word")},
           "position_embeddings": {"weight": sd["embedding.position_embeddings.weight"].clone()}}
    if tokentypes is not None:
        emb["tokentype_embeddings"] = {"weight": tokentypes.clone()}
    return emb


def bert_to_original(tower_sd: Mapping[str, Tensor], num_heads: int, layout: int = 1,
                     vocab_rows: Optional[int] = None) -> dict:
    """A ``BertTower`` state dict -> the original's nested ``{"language_model": ...}``."""
    if "token_weight" in tower_sd:
        raise ConversionError("a tower with weighted-mean pooling (token_weight) has no counterpart in the "
                              "original's [CLS]-pooled towers")
    return {"language_model": {
        "embedding": _embedding_to_original(tower_sd, vocab_rows,
                                            tower_sd.get("embedding.tokentype_embeddings.weight")),
        "encoder": _stack_to_original(tower_sd, "encoder", _ENCODER_LAYER, num_heads, layout)}}


def t5_to_original(reader_sd: Mapping[str, Tensor], num_heads: int, layout: int = 1,
                   vocab_rows: Optional[int] = None, num_tokentypes: int = 2) -> dict:
    """A ``FiDReader`` (Megatron-style, learned positions) state dict -> the original's T5 dict
    (with a token-type table the original creates but never uses)."""
    hidden = reader_sd["embedding.word_embeddings.weight"].size(1)
    types_ = torch.zeros(num_tokentypes, hidden) if num_tokentypes else None
    return {"language_model": {
                "embedding": _embedding_to_original(reader_sd, vocab_rows, types_),
                "encoder": _stack_to_original(reader_sd, "encoder", _ENCODER_LAYER, num_heads, layout),
                "decoder": _stack_to_original(reader_sd, "decoder", _DECODER_LAYER, num_heads, layout)},
            "lm_head": {"bias": _fit_rows(reader_sd["lm_head.output_layer.bias"], vocab_rows, "bias").clone()}}


# ============================================================== whole checkpoints
@dataclass
class OriginalCheckpoint:
    """The parts of an original checkpoint we convert."""

    path: str
    retriever: Optional[dict]  # {"query_model": ..., "context_model": ...}
    reader: Optional[dict]  # {"language_model": ..., "lm_head": ...}
    checkpoint_version: Optional[float]
    iteration: int
    args: Dict[str, Any] = field(default_factory=dict)


def read_original_checkpoint(path: str, iteration: Optional[int] = None) -> OriginalCheckpoint:
    """Load (safely) and pick apart an EMDR² checkpoint, or one model saved on its own by the
    release's ``tools/save_emdr2_models.py``."""
    f = find_checkpoint_file(path, iteration)
    state = safe_torch_load(f)
    if not isinstance(state, Mapping) or not isinstance(state.get("model"), Mapping):
        raise ConversionError(f"{f}: expected a dict with a 'model' entry (a Megatron checkpoint)")
    model = state["model"]
    if RETRIEVER_KEY in model or READER_KEY in model:
        retriever, reader = model.get(RETRIEVER_KEY), model.get(READER_KEY)
    elif any(k in model for k in TOWERS):
        retriever, reader = model, None
    elif "language_model" in model and "lm_head" in model:
        retriever, reader = None, model
    else:
        raise ConversionError(f"{f}: 'model' holds neither '{RETRIEVER_KEY}' nor '{READER_KEY}' "
                              f"(found {sorted(model)[:5]})")
    args = state.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    version = state.get("checkpoint_version")
    return OriginalCheckpoint(f, retriever, reader, None if version is None else float(version),
                              int(state.get("iteration", 0) or 0), args)


@dataclass
class ConvertedModels:
    biencoder: Optional[Dict[str, Tensor]]  # query_tower.* / context_tower.*
    reader: Optional[Dict[str, Tensor]]
    sizes: Dict[str, dict]  # "retriever"/"reader" -> ModelSize fields
    info: Dict[str, Any]  # provenance, for the checkpoint's meta


def convert_original(ckpt: OriginalCheckpoint, num_heads: Optional[int] = None,
                     checkpoint_version: Optional[float] = None,
                     retriever_vocab: Optional[int] = None, reader_vocab: Optional[int] = None,
                     retriever_real_vocab: Optional[int] = None,
                     reader_real_vocab: Optional[int] = None) -> ConvertedModels:
    """Rename and re-lay-out every tensor; vocabularies are cut/padded to ``*_vocab`` rows.

    ``checkpoint_version``: overrides the file's (needed when the file has none, e.g. after the
    release's ``clean_checkpoints.py``: the original's ``load_checkpoint`` then reads the rows as
    version 0, while its pretrained-model loaders always read them as 1.0).
    """
    args = ckpt.args
    version = checkpoint_version if checkpoint_version is not None else ckpt.checkpoint_version
    if version is None:
        raise ConversionError(f"{ckpt.path}: has no 'checkpoint_version', which decides the fused "
                              f"query/key/value row order; pass --checkpoint-version 1 (a model the "
                              f"original trained or loaded as a pretrained model) or 0 (how its "
                              f"load_checkpoint would read this file)")
    heads = num_heads or args.get("num_attention_heads")
    if not heads:
        raise ConversionError(f"{ckpt.path}: has no args.num_attention_heads; pass --num-attention-heads")
    for flag in ("openai_gelu", "apply_residual_connection_post_layernorm"):
        if args.get(flag):
            raise ConversionError(f"{ckpt.path}: was trained with --{flag.replace('_', '-')}, "
                                  f"which our models do not implement")
    if args.get("num_unique_layers") not in (None, args.get("num_layers")):
        raise ConversionError(f"{ckpt.path}: shares parameters across layers (--num-unique-layers)")
    layout = qkv_layout(version)
    eps = float(args.get("layernorm_epsilon", ORIGINAL_LAYERNORM_EPS))
    dropout = dict(hidden_dropout=float(args.get("hidden_dropout", 0.1)),
                   attention_dropout=float(args.get("attention_dropout", 0.1)))
    sizes, biencoder, reader = {}, None, None

    if ckpt.retriever is not None:
        missing = [k for k in TOWERS if k not in ckpt.retriever]
        if missing:
            raise ConversionError(f"{ckpt.path}: retriever has no '{missing[0]}' (both towers are needed)")
        biencoder, shapes = {}, []
        for orig, ours in TOWERS.items():
            tower = ckpt.retriever[orig]
            if "language_model" not in tower:
                raise ConversionError(f"{ckpt.path}: '{RETRIEVER_KEY}.{orig}' has no 'language_model'")
            sd, s = bert_from_original(tower["language_model"], heads, layout,
                                       f"{RETRIEVER_KEY}.{orig}.language_model",
                                       retriever_vocab, retriever_real_vocab)
            biencoder.update({f"{ours}.{k}": v for k, v in sd.items()})
            shapes.append(s)
        if shapes[0] != shapes[1]:
            raise ConversionError(f"{ckpt.path}: query and context towers differ in size "
                                  f"({shapes[0]} vs {shapes[1]})")
        sizes["retriever"] = _model_size(shapes[0], heads, dropout, eps)
    if ckpt.reader is not None:
        reader, s = t5_from_original(ckpt.reader, heads, layout, READER_KEY, reader_vocab,
                                     reader_real_vocab)
        if s.decoder_layers != s.encoder_layers:
            raise ConversionError(f"{ckpt.path}: reader has {s.encoder_layers} encoder and "
                                  f"{s.decoder_layers} decoder layers; our builders need them equal")
        sizes["reader"] = _model_size(s, heads, dropout, eps)
    info = {"source": os.path.abspath(ckpt.path), "iteration": ckpt.iteration,
            "checkpoint_version": version, "qkv_layout": ["[3, heads, hn]", "[heads, hn, 3]",
                                                          "[heads, 3, hn]"][layout],
            "layernorm_epsilon": eps}
    return ConvertedModels(biencoder, reader, sizes, info)


def _model_size(s: OriginalShape, heads: int, dropout: dict, eps: float) -> dict:
    from dataclasses import asdict

    from megatron.emdr2.config import ModelSize

    # every ModelSize field, so that the checkpoint says exactly what to build (pre-LN, no copy head)
    return asdict(ModelSize(num_layers=s.encoder_layers, hidden_size=s.hidden, num_attention_heads=int(heads),
                            ffn_hidden_size=None if s.ffn == 4 * s.hidden else s.ffn,
                            seq_length=s.positions, layernorm_epsilon=eps, **dropout))


def fill_state(module: torch.nn.Module, canonical: Mapping[str, Tensor], what: str) -> Dict[str, Any]:
    """``module``'s full state dict with every tensor taken from ``canonical`` (megatron's
    aliases, e.g. the T5 ``output_layer.bias`` / ``position_embeddings.weight`` twins, are
    filled from their canonical name). Names the first parameter that does not fit."""
    aliases = {"position_embeddings.weight": "embedding.position_embeddings.weight",
               "output_layer.bias": "lm_head.output_layer.bias"}
    own = module.state_dict()
    out = {}
    for name, value in own.items():
        if name.endswith("._extra_state"):
            out[name] = value
            continue
        src = name if name in canonical else aliases.get(name)
        if src not in canonical:
            raise ConversionError(f"{what}: the converted weights lack '{name}'")
        t = canonical[src]
        if tuple(t.shape) != tuple(value.shape):
            raise ConversionError(f"{what}: parameter '{name}' has shape {tuple(t.shape)}, the "
                                  f"model expects {tuple(value.shape)}")
        out[name] = t.to(value.dtype).clone()
    extra = sorted(set(canonical) - set(own))
    if extra:
        raise ConversionError(f"{what}: converted parameter '{extra[0]}' has no place in the model")
    return out


# ============================================================== evidence embeddings
def read_embedding_pickles(paths: Sequence[str]) -> Dict[Any, np.ndarray]:
    """Merge ``{"embed_data": {id: vector}}`` pickles; an id in two files is an error."""
    merged: Dict[Any, np.ndarray] = {}
    origin: Dict[Any, str] = {}
    for path in paths:
        state = safe_pickle_load(path)
        data = state.get("embed_data") if isinstance(state, dict) else None
        if not isinstance(data, dict):
            raise ConversionError(f"{path}: expected a pickled dict with 'embed_data' "
                                  f"(the original's OpenRetreivalDataStore), found {type(state).__name__}")
        for key in data:
            if key in merged:
                raise ConversionError(f"{path}: evidence id {int(key)} is also in {origin[key]}")
        if len(paths) > 1:
            origin.update(dict.fromkeys(data, path))
        merged.update(data)
    if not merged:
        raise ConversionError(f"{', '.join(paths)}: no embeddings")
    return merged


def write_embeddings_index(embed_data: Dict[Any, np.ndarray], out_dir: str, num_shards: int = 1,
                           model_step: int = 0, overwrite: bool = False, chunk_rows: int = 65536,
                           extra: Optional[dict] = None, source: str = "embed_data"):
    """Our fp16 sharded index from the original's ``{id: vector}``, rows sorted by id.

    Streams through the shard writers (memory-mapped files) a chunk at a time and empties
    ``embed_data`` as it goes, so the peak memory stays about that of the unpickled dict.
    """
    from megatron.emdr2.index import shard_store

    try:
        ids = np.fromiter((int(k) for k in embed_data), dtype=np.int64, count=len(embed_data))
    except (TypeError, ValueError) as err:
        raise ConversionError(f"{source}: evidence ids must be integers ({err})") from None
    keys = list(embed_data)
    order = np.argsort(ids, kind="stable")
    first = np.asarray(embed_data[keys[order[0]]])
    if first.ndim != 1:
        raise ConversionError(f"{source}: evidence id {ids[order[0]]} has an embedding of shape "
                              f"{first.shape}, expected a vector")
    dim = first.shape[0]
    directory = shard_store.begin_version(out_dir, overwrite)
    bounds = np.linspace(0, len(ids), num_shards + 1).astype(np.int64)
    infos = []
    for s in range(num_shards):
        lo, hi = int(bounds[s]), int(bounds[s + 1])
        writer = shard_store.ShardWriter(directory, s, num_shards, hi - lo, dim, row_offset=lo)
        for a in range(lo, hi, chunk_rows):
            rows = order[a:min(hi, a + chunk_rows)]
            chunk = [np.asarray(embed_data.pop(keys[r])) for r in rows]
            for r, v in zip(rows, chunk):
                if v.shape != (dim,):
                    raise ConversionError(f"{source}: evidence id {ids[r]} has an embedding of "
                                          f"shape {v.shape}, expected ({dim},)")
            block = np.stack(chunk).astype(np.float16)
            bad = ~np.isfinite(block).all(axis=1)
            if bad.any():
                raise ConversionError(f"{source}: evidence id {ids[rows[bad.argmax()]]} has a "
                                      f"non-finite embedding")
            writer.write(a - lo, block, ids[rows])
        infos.append(writer.close())
    return shard_store.publish(directory, infos, dim, model_step, extra, replace=out_dir if overwrite else None)


def save_original_embeddings(path: str, ids: Iterable, vectors: np.ndarray) -> None:
    """Write the original's embedding store format (for tests, and for handing our embeddings
    to the original code)."""
    data = {k: np.float16(v) for k, v in zip(ids, vectors)}
    with open(path, "wb") as f:
        pickle.dump({"embed_data": data}, f)
