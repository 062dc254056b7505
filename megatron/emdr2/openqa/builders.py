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
                post_layernorm: bool = False, num_tokentypes: int = 2):
    from megatron.emdr2.models.bert_tower import BertTower
    from megatron.emdr2.models.config import bert_config

    eps = {} if size.layernorm_epsilon is None else {"layernorm_epsilon": size.layernorm_epsilon}
    config = bert_config(size.num_layers, size.hidden_size, size.num_attention_heads, size.ffn_hidden_size,
                         size.hidden_dropout, size.attention_dropout, precision, tensor_parallel,
                         post_layernorm=post_layernorm, **eps)
    return BertTower(config, vocab_size, size.seq_length, num_tokentypes=num_tokentypes)


def build_biencoder(size: ModelSize, vocab_size: int, precision: str = "fp32", tensor_parallel: int = 1,
                    shared: bool = False, freeze_query: bool = False, freeze_context: bool = False,
                    score_scale: Optional[float] = None, post_layernorm: bool = False):
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

    def cfg(layers):
        return t5_config(layers, size.hidden_size, size.num_attention_heads, size.ffn_hidden_size,
                         hidden_dropout=size.hidden_dropout, attention_dropout=size.attention_dropout,
                         precision=precision, tensor_parallel=tensor_parallel,
                         layernorm_epsilon=size.layernorm_epsilon)

    decoder = cfg(decoder_layers or size.num_layers)
    return FiDReader(decoder, vocab_size, size.seq_length, encoder_config=cfg(size.num_layers),
                     real_vocab_size=real_vocab_size)


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
    return ckpt.iteration_dir(path, it)


def load_checkpoint_meta(path: str) -> dict:
    """What the task recorded about its models (sizes, vocabulary) in a training checkpoint."""
    if not os.path.isdir(path):
        return {}
    iteration_dir = _resolve_iteration_dir(path)
    state = torch.load(os.path.join(iteration_dir, ckpt.model_file(0)), map_location="cpu", weights_only=False)
    return state.get("meta", {})


def load_model_state(path: str, name: str, tp_rank: int = 0) -> dict:
    """The state dict of model ``name`` (e.g. "biencoder", "reader") stored at ``path``."""
    if not os.path.exists(path):
        raise PretrainedError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        iteration_dir = _resolve_iteration_dir(path)
        try:
            ckpt.verify_checkpoint(iteration_dir)
        except ckpt.CheckpointError as e:
            raise PretrainedError(str(e)) from None
        state = torch.load(os.path.join(iteration_dir, ckpt.model_file(tp_rank)), map_location="cpu",
                           weights_only=False)
        models = state.get("models", {})
        if name not in models:
            raise PretrainedError(f"{iteration_dir}: has no model {name!r} (it has {sorted(models)})")
        return models[name]
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # unreadable / truncated file
        raise PretrainedError(f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}: {e})") from None
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
        raise PretrainedError(f"{path}: does not fit the model: {what} "
                              f"({len(missing)} missing, {len(unexpected)} unexpected keys)")
    for k, v in state.items():
        if k in own and torch.is_tensor(v) and own[k].shape != v.shape:
            raise PretrainedError(f"{path}: parameter {k!r} has shape {tuple(v.shape)}, "
                                  f"the model expects {tuple(own[k].shape)}")
    module.load_state_dict(state, strict=False)
