"""Files of the converter CLIs: per-rank megatron state dicts in, Hugging Face directories out.

A converted checkpoint is a directory::

    out/
      mp_rank_00.pt  ...   {"model": state dict of that tensor-parallel rank, "meta": {...}}
      meta.json            what the model is (kind, layout, heads, sizes, HF config)
      hf_extras.pt         (optional) HF tensors outside the model, e.g. BERT's pooler

Everything is written under a temporary name in the destination's parent and renamed when
complete, so an interrupted conversion never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Tuple

import torch

from megatron.emdr2.models.convert import ConversionError


@contextmanager
def atomic_dir(path: str, overwrite: bool = False):
    """Yield a temporary directory that becomes ``path`` only if the block succeeds."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists (pass --overwrite to replace it)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def save_megatron(out_dir: str, shards: List[Dict], meta: Dict[str, Any],
                  overwrite: bool = False, hf_extras: Optional[Dict] = None) -> None:
    """``hf_extras``: HF tensors the model does not use (a BERT pooler), kept for export."""
    with atomic_dir(out_dir, overwrite) as tmp:
        if hf_extras:
            torch.save(hf_extras, os.path.join(tmp, "hf_extras.pt"))
        for rank, sd in enumerate(shards):
            torch.save({"model": sd, "meta": meta}, os.path.join(tmp, f"mp_rank_{rank:02d}.pt"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)


def _dig(obj, key: Optional[str]):
    """``key`` is a dotted path into nested dicts ("model", "model.retriever"); a trailing
    component may also be a state-dict prefix ("model.context_tower")."""
    if not key:
        return obj["model"] if isinstance(obj, dict) and "model" in obj else obj
    for i, part in enumerate(key.split(".")):
        if isinstance(obj, dict) and part in obj:
            obj = obj[part]
            continue
        prefix = ".".join(key.split(".")[i:]) + "."
        picked = {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
        if not picked:
            raise ConversionError(f"checkpoint has no entry or parameter prefix '{key}'")
        return picked
    return obj


def load_megatron(path: str, key: Optional[str] = None) -> Tuple[List[Dict], Dict[str, Any]]:
    """All tensor-parallel ranks' state dicts (rank order) and the meta of a checkpoint.

    ``path`` is a directory of ``mp_rank_XX.pt`` / ``mp_rank_XX/model_optim_rng.pt`` files or
    one ``.pt`` file; ``key`` selects the model inside each file (default "model").
    """
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "mp_rank_[0-9][0-9].pt")))
        files = files or sorted(glob.glob(os.path.join(path, "mp_rank_[0-9][0-9]", "*.pt")))
    else:
        files = [path]
    if not files:
        raise ConversionError(f"no mp_rank_XX.pt files in {path}")
    shards, meta = [], {}
    for f in files:
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as err:  # a file with arbitrary pickled objects
            raise ConversionError(f"{f} cannot be loaded as plain tensors ({err}); re-save the "
                                  f"model state dict on its own") from err
        if isinstance(obj, dict) and isinstance(obj.get("meta"), dict):
            meta = obj["meta"]
        shards.append(_dig(obj, key))
    meta_file = os.path.join(path, "meta.json") if os.path.isdir(path) else None
    if meta_file and os.path.exists(meta_file) and not meta:
        with open(meta_file) as f:
            meta = json.load(f)
    return shards, meta


def load_hf_state_dict(hf_dir: str) -> Dict[str, torch.Tensor]:
    """Weights of a Hugging Face model directory (safetensors or pytorch_model.bin)."""
    st = os.path.join(hf_dir, "model.safetensors")
    if os.path.exists(st):
        from safetensors.torch import load_file

        return load_file(st)
    pt = os.path.join(hf_dir, "pytorch_model.bin")
    if os.path.exists(pt):
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise ConversionError(f"{hf_dir} has neither model.safetensors nor pytorch_model.bin "
                          f"(sharded checkpoints: merge them first)")


def save_hf_model(out_dir: str, model_cls, config, state_dict: Dict[str, torch.Tensor],
                  overwrite: bool = False, copy_files_from: Optional[str] = None) -> None:
    """Build ``model_cls(config)``, load ``state_dict`` strictly and save_pretrained it
    (so the result is exactly what transformers reads back), plus tokenizer files."""
    model = model_cls(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ConversionError(f"{model_cls.__name__}: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}")
    with atomic_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        if copy_files_from:
            for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                         "special_tokens_map.json", "spiece.model"):
                src = os.path.join(copy_files_from, name)
                if os.path.exists(src):
                    shutil.copy(src, tmp)
