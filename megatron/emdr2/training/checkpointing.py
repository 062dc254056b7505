"""Atomic, verifiable, resumable checkpoints.

Layout of a save directory::

    save/
      iter_0000200/
        mp_rank_00.pt          model(s) + optimizer + scheduler (one file per tensor-parallel rank)
        rank_00000.pt          this rank's RNG states and data position (one per global rank)
        manifest.json          sizes + sha256 of every file above; written last
      latest                   "200": the newest complete checkpoint; replaced atomically
      best                     the iteration with the best evaluation score (optional)

A checkpoint is first written as ``iter_0000200.tmp-<pid>`` and renamed when complete, so a
process killed mid-save leaves either the previous checkpoint or the new one, never half of
one. Loading verifies the manifest and names the file that is missing, truncated or altered,
then reads each file weights-only (``megatron.emdr2.safe_load``): a checkpoint someone shares
cannot run code when it is loaded. Files hold only tensors and plain data (RNG state included).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from megatron.emdr2 import fileio

MANIFEST = "manifest.json"
LATEST = "latest"
BEST = "best"
_ITER_RE = re.compile(r"^iter_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory/file and the problem."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def model_file(tp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}.pt"


def rank_file(global_rank: int) -> str:
    return f"rank_{global_rank:05d}.pt"


_sha256 = fileio.sha256_file
_fsync_dir = fileio.fsync_dir
atomic_write_text = fileio.atomic_write_text


def _torch_save(obj: Any, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------- RNG state

def get_rng_state() -> dict:
    from megatron.core import tensor_parallel

    # Plain data only (tuples, ints, floats, tensors), so a weights-only load reads it back.
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "state": {"key": [int(k) for k in np_state["state"]["key"]],
                            "pos": int(np_state["state"]["pos"])},
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "tracker": {k: v.clone() if torch.is_tensor(v) else v
                    for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np_state = state["numpy"]
    if isinstance(np_state, dict):  # plain data (checkpoints written since weights-only loading)
        np_state = {**np_state, "state": {"key": np.asarray(np_state["state"]["key"], dtype=np.uint32),
                                          "pos": int(np_state["state"]["pos"])}}
    np.random.set_state(np_state)  # else numpy's legacy tuple, as older checkpoints hold it
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["tracker"]))


# --------------------------------------------------------------------------- save

@dataclass
class SaveContext:
    """Who writes what: ranks with data-parallel rank 0 write the model file of their TP rank."""

    global_rank: int = 0
    world_size: int = 1
    tp_rank: int = 0
    dp_rank: int = 0

    @classmethod
    def current(cls) -> "SaveContext":
        from megatron.core import parallel_state as ps

        if not torch.distributed.is_initialized():
            return cls()
        return cls(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                   ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank())


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _broadcast_str(value: str) -> str:
    if not torch.distributed.is_initialized():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def save_checkpoint(root: str, iteration: int, model_state: dict, rank_state: dict,
                    meta: Optional[dict] = None, keep_last: Optional[int] = None) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    ``model_state`` is what this rank's TP shard needs (models, optimizer, scheduler, iteration);
    it is written by data-parallel rank 0 only. ``rank_state`` (RNG, data position) is per rank.
    """
    ctx = SaveContext.current()
    final = iteration_dir(root, iteration)
    tmp = _broadcast_str(f"{final}.tmp-{os.getpid()}")
    if ctx.global_rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    if ctx.dp_rank == 0:
        _torch_save(model_state, os.path.join(tmp, model_file(ctx.tp_rank)))
    _torch_save(rank_state, os.path.join(tmp, rank_file(ctx.global_rank)))
    _barrier()
    if ctx.global_rank == 0:
        files = {name: {"bytes": os.path.getsize(os.path.join(tmp, name)),
                        "sha256": _sha256(os.path.join(tmp, name))}
                 for name in sorted(os.listdir(tmp))}
        manifest = {"iteration": iteration, "world_size": ctx.world_size, "files": files,
                    "meta": meta or {}}
        atomic_write_text(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1))
        if os.path.exists(final):  # re-saving the same iteration (e.g. after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        atomic_write_text(os.path.join(root, LATEST), str(iteration))
        if keep_last:
            prune_checkpoints(root, keep_last)
    _barrier()
    return final


def mark_best(root: str, iteration: int) -> None:
    """Record `iteration` as the best one so far (rank 0 only; pruning never removes it)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        atomic_write_text(os.path.join(root, BEST), str(iteration))


def list_iterations(root: str) -> list[int]:
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(root) if (m := _ITER_RE.match(name)))


def _read_pointer(root: str, name: str) -> Optional[int]:
    path = os.path.join(root, name)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number, found {text[:40]!r}")
    return int(text)


def prune_checkpoints(root: str, keep_last: int) -> None:
    keep = set(list_iterations(root)[-keep_last:])
    for pointer in (LATEST, BEST):
        it = _read_pointer(root, pointer)
        if it is not None:
            keep.add(it)
    for it in list_iterations(root):
        if it not in keep:
            shutil.rmtree(iteration_dir(root, it), ignore_errors=True)


# --------------------------------------------------------------------------- load

def verify_checkpoint(path: str) -> dict:
    """Check every file against the manifest; return the manifest or raise CheckpointError."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.exists(mpath):
        raise CheckpointError(f"{path}: no {MANIFEST}; the checkpoint is incomplete (a save was interrupted?)")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mpath}: unreadable manifest ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        what = "no 'files' entry" if not isinstance(manifest, dict) or "files" not in manifest else \
            "an empty or malformed 'files' entry"
        raise CheckpointError(f"{mpath}: {what}; a manifest must list every checkpoint file with its "
                              f"size and sha256")
    for name, info in files.items():
        if (not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", "..")
                or not isinstance(info, dict) or not isinstance(info.get("bytes"), int)
                or not isinstance(info.get("sha256"), str)):
            raise CheckpointError(f"{mpath}: malformed entry for {name!r} (expected a file name in this "
                                  f"directory with 'bytes' and 'sha256')")
    unlisted = sorted(n for n in os.listdir(path) if n.endswith(".pt") and n not in files)
    if unlisted:
        raise CheckpointError(f"{os.path.join(path, unlisted[0])}: not listed in {MANIFEST}; "
                              f"an unverified file is never loaded")
    for name, info in files.items():
        fpath = os.path.join(path, name)
        if not os.path.exists(fpath):
            raise CheckpointError(f"{fpath}: missing (listed in {MANIFEST})")
        size = os.path.getsize(fpath)
        if size != info["bytes"]:
            raise CheckpointError(f"{fpath}: truncated or altered: {size} bytes, manifest says {info['bytes']}")
        if _sha256(fpath) != info["sha256"]:
            raise CheckpointError(f"{fpath}: checksum differs from {MANIFEST}: the file is corrupt")
    return manifest


def resolve_iteration(root: str, iteration: Optional[int] = None) -> Optional[int]:
    """The iteration to load: the given one, else the `latest` pointer; None when there is none."""
    if iteration is not None:
        if not os.path.isdir(iteration_dir(root, iteration)):
            have = list_iterations(root)
            raise CheckpointError(f"{iteration_dir(root, iteration)}: no such checkpoint "
                                  f"(available iterations: {have or 'none'})")
        return iteration
    return _read_pointer(root, LATEST)


def load_checkpoint(root: str, iteration: Optional[int] = None, map_location="cpu"):
    """Verify, then return (iteration, model_state, rank_state) for this rank; None if nothing to load."""
    it = resolve_iteration(root, iteration)
    if it is None:
        return None
    path = iteration_dir(root, it)
    try:
        manifest = verify_checkpoint(path)
    except CheckpointError as e:
        others = [i for i in list_iterations(root) if i != it]
        hint = f"; other checkpoints: {others} (choose one with --load-iteration)" if others else ""
        raise CheckpointError(f"{e}{hint}") from None
    ctx = SaveContext.current()
    model_path = os.path.join(path, model_file(ctx.tp_rank))
    if model_file(ctx.tp_rank) not in manifest["files"]:
        raise CheckpointError(f"{model_path}: not in {MANIFEST} (a checkpoint of another tensor-parallel size?)")
    model_state = load_file(model_path, map_location)
    rank_path = os.path.join(path, rank_file(ctx.global_rank))
    rank_state = None
    if rank_file(ctx.global_rank) in manifest["files"] and manifest.get("world_size") == ctx.world_size:
        rank_state = load_file(rank_path, "cpu")
    return it, model_state, rank_state


def load_file(path: str, map_location="cpu"):
    """One checkpoint file, read without running code from it (see ``megatron.emdr2.safe_load``)."""
    from megatron.emdr2 import safe_load

    return safe_load.load(path, map_location, error=CheckpointError)
