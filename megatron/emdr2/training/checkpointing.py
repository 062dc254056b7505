"""Atomic, verifiable, resumable checkpoints.

Layout of a save directory::

    save/
      iter_0000200/
        mp_rank_00.pt          model(s) + optimizer + scheduler (one file per tensor-parallel rank)
        distopt_mp_rank_00.pt  with --use-distributed-optimizer: the Adam moments and fp32 main
                               weights that ZeRO-1 shards over data-parallel ranks, gathered
                               (megatron-core's dp_zero format: loads on any data-parallel size)
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


def optimizer_file(tp_rank: int) -> str:
    return f"distopt_mp_rank_{tp_rank:02d}.pt"


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


def _agreed_error(error: Optional[str]) -> Optional[str]:
    """Every rank's write error, agreed on by all ranks (the first one), so that a rank whose
    disk is full does not leave the others waiting in a barrier."""
    if not torch.distributed.is_initialized():
        return error
    errors = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def save_checkpoint(root: str, iteration: int, model_state: dict, rank_state: dict,
                    meta: Optional[dict] = None, keep_last: Optional[int] = None,
                    optimizer_shards: Optional[dict] = None) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    ``model_state`` is what this rank's TP shard needs (models, optimizer, scheduler, iteration);
    it is written by data-parallel rank 0 only. ``rank_state`` (RNG, data position) is per rank.
    ``optimizer_shards`` (``gather_optimizer_shards``, on data-parallel rank 0) is written beside
    the model file as ``distopt_mp_rank_XX.pt``.
    A write that fails (disk full, permission denied) raises a one-line CheckpointError on every
    rank and leaves the previous checkpoints and the ``latest`` pointer as they were.
    """
    ctx = SaveContext.current()
    final = iteration_dir(root, iteration)
    tmp = _broadcast_str(f"{final}.tmp-{os.getpid()}")
    error = None
    if ctx.global_rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            _tidy_interrupted_saves(root)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        except OSError as e:
            error = _describe(e)
    _fail_save_if(_agreed_error(error), root, iteration, tmp)
    try:
        if ctx.dp_rank == 0:
            _torch_save(model_state, os.path.join(tmp, model_file(ctx.tp_rank)))
            if optimizer_shards is not None:
                _torch_save(optimizer_shards, os.path.join(tmp, optimizer_file(ctx.tp_rank)))
        _torch_save(rank_state, os.path.join(tmp, rank_file(ctx.global_rank)))
    except (OSError, RuntimeError) as e:  # torch reports a failed write as RuntimeError
        error = _describe(e)
    _fail_save_if(_agreed_error(error), root, iteration, tmp)
    if ctx.global_rank == 0:
        try:
            files = {name: {"bytes": os.path.getsize(os.path.join(tmp, name)),
                            "sha256": _sha256(os.path.join(tmp, name))}
                     for name in sorted(os.listdir(tmp))}
            manifest = {"iteration": iteration, "world_size": ctx.world_size, "files": files,
                        "meta": meta or {}}
            atomic_write_text(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1))
            if os.path.exists(final):  # re-saving the same iteration (e.g. after a resume)
                # Never delete the old copy before the new one is in place: move it aside,
                # rename, then delete it. A kill between the two renames leaves both complete
                # copies, and loading finds the aside one (``complete_dir``).
                aside = f"{final}.old-{os.getpid()}"
                os.replace(final, aside)
                os.replace(tmp, final)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(root)
            atomic_write_text(os.path.join(root, LATEST), str(iteration))
        except OSError as e:
            error = _describe(e)
    _fail_save_if(_agreed_error(error), root, iteration, tmp)
    if ctx.global_rank == 0 and keep_last:
        prune_checkpoints(root, keep_last)
    _barrier()
    return final


def _describe(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _fail_save_if(error: Optional[str], root: str, iteration: int, tmp: str) -> None:
    if not error:
        return
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # frees what the failed save used
    try:
        last = _read_pointer(root, LATEST)
    except CheckpointError:
        last = None
    kept = f"the last complete checkpoint, {iteration_dir(root, last)}, is intact" if last is not None else \
        "no earlier checkpoint exists"
    raise CheckpointError(f"{iteration_dir(root, iteration)}: could not be written ({error}); {kept}")


_LEFTOVER_RE = re.compile(r"^iter_(\d{7})\.(tmp|old)-\d+$")


def _leftovers(root: str) -> list[tuple[int, str]]:
    """(iteration, path) of the directories an interrupted save left behind."""
    if not os.path.isdir(root):
        return []
    return sorted((int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root)
                  if (m := _LEFTOVER_RE.match(name)))


def complete_dir(root: str, iteration: int) -> Optional[str]:
    """The directory holding iteration's checkpoint: ``iter_N``, or where a save killed between
    its renames left a complete copy (``iter_N.old-PID`` / ``iter_N.tmp-PID`` with a manifest)."""
    final = iteration_dir(root, iteration)
    if os.path.isdir(final):
        return final
    for it, path in _leftovers(root):
        if it == iteration and os.path.exists(os.path.join(path, MANIFEST)):
            return path
    return None


def _tidy_interrupted_saves(root: str) -> None:
    """Before a save (rank 0): a complete copy stranded by a kill between renames becomes
    ``iter_N`` again; any other leftover of a crashed save is deleted (``--keep-last`` only
    counts complete checkpoints, so nothing else would ever remove them)."""
    for it, path in _leftovers(root):
        final = iteration_dir(root, it)
        if not os.path.exists(final) and os.path.exists(os.path.join(path, MANIFEST)):
            os.replace(path, final)
        else:
            shutil.rmtree(path, ignore_errors=True)


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
        if complete_dir(root, iteration) is None:
            have = list_iterations(root)
            raise CheckpointError(f"{iteration_dir(root, iteration)}: no such checkpoint "
                                  f"(available iterations: {have or 'none'})")
        return iteration
    return _read_pointer(root, LATEST)


def load_checkpoint(root: str, iteration: Optional[int] = None, map_location="cpu",
                    read_optimizer_shards: bool = False):
    """Verify, then return (iteration, model_state, rank_state) for this rank; None if nothing to load.

    When the checkpoint holds distributed-optimizer shards for this TP rank, ``model_state`` gets
    the key ``"distributed_optimizer"``: the shards on data-parallel rank 0 if
    ``read_optimizer_shards`` (see ``load_optimizer_shards``), else None."""
    it = resolve_iteration(root, iteration)
    if it is None:
        return None
    path = complete_dir(root, it) or iteration_dir(root, it)
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
    if optimizer_file(ctx.tp_rank) in manifest["files"]:
        model_state["distributed_optimizer"] = None
        if read_optimizer_shards and ctx.dp_rank == 0:  # the others receive their part from it
            model_state["distributed_optimizer"] = load_file(os.path.join(path, optimizer_file(ctx.tp_rank)),
                                                             "cpu")
    rank_path = os.path.join(path, rank_file(ctx.global_rank))
    rank_state = None
    if rank_file(ctx.global_rank) in manifest["files"] and manifest.get("world_size") == ctx.world_size:
        rank_state = load_file(rank_path, "cpu")
    return it, model_state, rank_state


def load_file(path: str, map_location="cpu"):
    """One checkpoint file, read without running code from it (see ``megatron.emdr2.safe_load``)."""
    from megatron.emdr2 import safe_load

    return safe_load.load(path, map_location, error=CheckpointError)


# --------------------------------------------------------------------------- distributed optimizer

DIST_OPT_FORMAT = "megatron-core dp_zero"


def distributed_optimizers(optimizer) -> list:
    """The megatron-core DistributedOptimizers in ``optimizer`` (itself or a ChainedOptimizer's)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(o, DistributedOptimizer)]


def _data_parallel_rank_size() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    if not torch.distributed.is_initialized():
        return 0, 1
    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def _init_adam_state(opt) -> None:
    """Create the Adam state exactly as torch's Adam does lazily at its first step (step 0, zero
    moments) where it is missing: a run whose every step so far was skipped (fp16 overflow) has
    none yet, and megatron-core can neither save nor restore it then. Results do not change."""
    from torch.optim.optimizer import _get_scalar_dtype

    inner = opt.optimizer
    if not isinstance(inner, torch.optim.Adam):  # AdamW included; fused TE/apex optimizers keep other state
        return
    for group in inner.param_groups:
        for p in group["params"]:
            state = inner.state[p]
            if len(state) or p.numel() == 0:
                continue
            if group.get("fused") or group.get("capturable"):
                state["step"] = torch.zeros((), dtype=_get_scalar_dtype(is_fused=group.get("fused")),
                                            device=p.device)
            else:
                state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def gather_optimizer_shards(optimizer) -> Optional[dict]:
    """Collective over data-parallel ranks (all must call it, before ``save_checkpoint``).

    ZeRO-1 keeps each data-parallel rank's slice of the fp32 main weights and Adam moments out of
    ``state_dict()``. They are gathered on data-parallel rank 0 in megatron-core's dp_zero format:
    per gradient buffer, one fp32 tensor each over the buffer's unpadded length, which does not
    depend on the data-parallel size, so the checkpoint loads on any number of data-parallel
    ranks. Returns it on data-parallel rank 0, None elsewhere.
    """
    dp_rank, dp_size = _data_parallel_rank_size()
    states = []
    for opt in distributed_optimizers(optimizer):
        _init_adam_state(opt)
        states.append(opt.get_parameter_state_dp_zero(use_gloo_comm=True))
    if dp_rank != 0:
        return None
    return {"format": DIST_OPT_FORMAT, "data_parallel_size": dp_size, "optimizers": states}


def _shards_mismatch(opts: list, shards: Any) -> Optional[str]:
    """Why ``shards`` do not fit this run's distributed optimizers (None when they do)."""
    if not isinstance(shards, dict) or shards.get("format") != DIST_OPT_FORMAT:
        return "its distributed-optimizer file is not in the expected format"
    saved = shards.get("optimizers")
    if not isinstance(saved, list) or len(saved) != len(opts):
        return (f"it holds {len(saved) if isinstance(saved, list) else 'no'} distributed optimizer(s), "
                f"this run has {len(opts)}")
    for i, (opt, state) in enumerate(zip(opts, saved)):
        for gbuf_idx, gbuf_range_maps in enumerate(opt.gbuf_ranges):
            for dtype in gbuf_range_maps:
                entry = state.get(gbuf_idx, {}).get(dtype) if isinstance(state, dict) else None
                if not isinstance(entry, dict):
                    have = sorted(str(d) for k, v in state.items() if isinstance(v, dict) for d in v) \
                        if isinstance(state, dict) else []
                    return (f"no optimizer state for buffer {gbuf_idx} of (param, grad) dtypes {dtype} "
                            f"(it has {have or 'none'}; saved with another precision?)")
                need = opt.buffers[gbuf_idx].numel_unpadded
                sizes = {entry.get("numel_unpadded")} | {entry[k].numel() if torch.is_tensor(entry.get(k)) else None
                                                         for k in ("param", "exp_avg", "exp_avg_sq")}
                if sizes != {need}:
                    return (f"buffer {gbuf_idx} holds {entry.get('numel_unpadded')} values, this run's "
                            f"parameters need {need}")
    return None


def load_optimizer_shards(optimizer, shards: Optional[dict], where: str) -> Optional[int]:
    """Collective over all ranks (all must call it, after ``optimizer.load_state_dict``, which
    restores the param groups, Adam's step count and the fp16 loss scaler).

    ``shards`` (``gather_optimizer_shards``' output, read on data-parallel rank 0 only; None on
    the others) is checked against this run's parameters, then scattered: each data-parallel
    rank receives its slice for the current data-parallel size, whatever size it was saved with.
    Returns the data-parallel size it was saved with (on data-parallel rank 0; None elsewhere).
    """
    opts = distributed_optimizers(optimizer)
    dp_rank, _ = _data_parallel_rank_size()
    error = None
    if dp_rank == 0:
        why = _shards_mismatch(opts, shards)
        if why:
            error = f"{where}: {why}; resume with the same models and precision, or pass --finetune to load the " \
                    f"weights only"
    error = _agreed_error(error)  # before the scatter: no rank may wait for one that gave up
    if error:
        raise CheckpointError(error)
    for i, opt in enumerate(opts):
        # With torch's Adam (no TransformerEngine/apex) each parameter's state also holds `step`,
        # which megatron-core's loader expects in the file too: set it aside meanwhile (restored
        # by load_state_dict). megatron-core also hands every parameter the same `step` tensor,
        # which torch's Adam would increment once per parameter: each gets its own copy.
        steps = {p: state.pop("step") for p, state in opt.optimizer.state.items() if "step" in state}
        try:
            with torch.no_grad():  # in fp32 the main weights are views of the model's parameters
                opt.load_parameter_state_from_dp_zero(shards["optimizers"][i] if dp_rank == 0 else None)
        finally:
            for p, step in steps.items():
                opt.optimizer.state[p]["step"] = step.clone() if torch.is_tensor(step) else step
    return shards.get("data_parallel_size") if dp_rank == 0 else None
