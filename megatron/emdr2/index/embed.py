"""Distributed evidence embedding: every rank embeds its slice and writes its shard.

Protocol (crash-safe): rank 0 unpublishes the target version (removes its manifest) before
anyone writes; each rank streams its embeddings into a temporary memory-mapped shard and
renames it when complete; only after every rank has finished does rank 0 write the manifest
(and then ``LATEST``). Killing the job at any point leaves either the previous state or a
directory without a manifest, which loaders reject.

Tensor parallelism: the ranks of a tensor-parallel group run one sharded encoder together, so
they embed the same rows in lockstep (``tensor_group``); the rows are cut into one slice per
group, and only the group's first rank writes its shard (the encoder's output is replicated).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron.emdr2.index import shard_store
from megatron.emdr2.index.sharded_index import _world, row_range

logger = logging.getLogger(__name__)

Encoder = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, mask) -> [B, H]
Tokenize = Callable[[Sequence[int]], tuple[torch.Tensor, torch.Tensor]]  # evidence rows -> (ids, mask)


def _collective_check(error: str | None, group) -> None:
    """Raise on every rank if rank 0 found a problem (instead of leaving the others in a barrier)."""
    box = [error]
    if _world(group)[1] > 1:
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group else 0, group=group)
    if box[0]:
        raise shard_store.IndexStoreError(box[0])


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


@torch.inference_mode()
def embed_evidence(encoder: Encoder, tokenize: Tokenize, evidence_ids: np.ndarray,
                   out_dir: str | os.PathLike, *, batch_size: int = 128, model_step: int = 0,
                   group=None, device: torch.device | str | None = None,
                   compute_dtype: torch.dtype | None = None, progress: bool = True,
                   overwrite: bool = False, extra: dict | None = None,
                   log_interval_s: float = 30.0, fingerprint: str | None = None,
                   tensor_group=None) -> shard_store.Manifest:
    """Embed all evidence rows over the ranks of ``group`` and publish an index in ``out_dir``.

    ``encoder`` maps a token batch to [B, H] embeddings (e.g. a context tower);
    ``tokenize`` maps evidence row numbers to that batch (``evidence_ids[row]`` is the row's id).
    ``compute_dtype``: autocast dtype (default: fp16 on GPU, fp32 on CPU). Collective.
    ``fingerprint``: ``fingerprint.tower_fingerprint`` of the tower behind ``encoder``, written in
    the manifest (``extra["context_tower_sha256"]``) so that loaders can check which tower
    embedded the index.
    ``tensor_group``: the ranks (inside ``group``) that run a tensor-parallel ``encoder``
    together; None when it is not sharded.
    """
    rank, world = _world(group)
    shard, shards, writes = _shard_layout(group, tensor_group)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if compute_dtype is None:
        compute_dtype = torch.float16 if device.type == "cuda" else torch.float32
    evidence_ids = np.asarray(evidence_ids, dtype=np.int64)
    out_dir = os.fspath(out_dir)
    if fingerprint is not None:
        from megatron.emdr2.index.fingerprint import FINGERPRINT_KEY

        extra = {**(extra or {}), FINGERPRINT_KEY: fingerprint}

    # An overwrite writes beside the published version and swaps in when complete.
    write_dir = os.fspath(shard_store.staging_dir(out_dir)) if overwrite else out_dir
    error = None
    if rank == 0:
        try:
            shard_store.begin_version(out_dir, overwrite)
        except (shard_store.IndexStoreError, OSError) as e:
            error = str(e)
    _collective_check(error, group)

    if hasattr(encoder, "eval"):
        encoder.eval()
    start = row_range(len(evidence_ids), shard, shards)[0]
    writer, error = None, None
    done, t0 = 0, time.perf_counter()
    try:
        writer, done, t0 = _embed_my_rows(encoder, tokenize, evidence_ids, write_dir, out_dir, shard, shards,
                                          batch_size, device, compute_dtype, progress and rank == 0,
                                          log_interval_s, writes, tensor_group, group)
    except OSError as e:  # disk full, permission denied: every rank learns of it and stops
        error = f"{write_dir}: could not write the index ({e})"
    except FloatingPointError as e:  # e.g. an fp16 overflow on one rank: all stop, same message
        error = str(e)
    _raise_agreed(error, out_dir, world, group)

    dim = writer.dim if writer is not None else 0
    if world > 1:  # a rank with no rows still needs the dim for its (empty) shard
        on = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        d = torch.tensor([dim], dtype=torch.long, device=on)
        dist.all_reduce(d, op=dist.ReduceOp.MAX, group=group)
        dim = int(d)
    info = None
    try:
        if writer is None and writes:
            writer = shard_store.ShardWriter(write_dir, shard, shards, 0, dim, start)
        info = writer.close() if writes else None
    except OSError as e:
        error = f"{write_dir}: could not write the index ({e})"
    _raise_agreed(error, out_dir, world, group)
    elapsed = time.perf_counter() - t0
    if writes:
        logger.info("rank %d: embedded %d passages in %.1fs (%.1f passages/s)",
                    rank, done, elapsed, done / max(elapsed, 1e-9))

    infos = [info]
    if world > 1:
        infos = [None] * world
        dist.all_gather_object(infos, info, group=group)
        infos = [i for i in infos if i is not None]  # tensor-parallel peers write nothing
    error = None
    if rank == 0:
        try:
            shard_store.publish(write_dir, infos, dim, model_step, extra, replace=out_dir if overwrite else None)
        except (shard_store.IndexStoreError, OSError) as e:
            error = f"{e}; {_published(out_dir)}"
    _collective_check(error, group)
    return shard_store.read_manifest(out_dir)


def _shard_layout(group, tensor_group) -> tuple[int, int, bool]:
    """(shard, shards, writes): which of ``shards`` slices of the rows this rank embeds, and
    whether it writes them. Without tensor parallelism every rank is its own shard; with it,
    the ranks of a tensor-parallel group share one shard, written by the group's first rank.
    Collective over ``group``."""
    rank, world = _world(group)
    if tensor_group is None or dist.get_world_size(tensor_group) == 1:
        return rank, world, True
    leader = dist.get_global_rank(tensor_group, 0)
    leaders = [None] * world
    dist.all_gather_object(leaders, leader, group=group)
    order = sorted(set(leaders))
    return order.index(leader), len(order), dist.get_rank() == leader


def _peers_failed(failed: bool, group) -> bool:
    """Did any rank of ``group`` fail on this batch (a write error, non-finite embeddings)?
    Asked after every batch so that all stop at once: a rank that gave up alone would leave the
    others embedding for hours and then waiting out the collective timeout (and a
    tensor-parallel peer's next sharded forward would wait for it forever)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return failed
    on = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    flag = torch.tensor([int(failed)], dtype=torch.int32, device=on)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


def _raise_agreed(error, out_dir: str, world: int, group) -> None:
    """Raise on every rank if any rank failed to write (instead of leaving the others waiting)."""
    errors = [error]
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, error, group=group)
    error = next((e for e in errors if e), None)
    if error:
        raise shard_store.IndexStoreError(f"{error}; {_published(out_dir)}")


def _published(out_dir: str) -> str:
    """What is still published beside a failed build, for its error message."""
    root = os.path.dirname(os.path.abspath(out_dir))
    try:
        latest = shard_store.read_latest(root)
    except shard_store.IndexStoreError:
        latest = None
    return (f"the published version {os.path.join(root, latest)} is unchanged" if latest
            else "no version was published")


def _embed_my_rows(encoder, tokenize, evidence_ids, write_dir, out_dir, shard, shards, batch_size, device,
                   compute_dtype, progress, log_interval_s, writes=True, tensor_group=None, group=None):
    """Embed (and, if ``writes``, write) this shard's rows: (writer or None, rows, start time).
    No collective inside but the sharded encoder's and the per-batch failure flag over ``group``
    (every rank runs as many batches as the largest shard, so the flags pair up)."""
    start, end = row_range(len(evidence_ids), shard, shards)
    batches = max(-(-(e - s) // batch_size) for s, e in (row_range(len(evidence_ids), i, shards)
                                                         for i in range(shards)))
    writer, t0, last_log, done = None, time.perf_counter(), time.perf_counter(), 0
    bar = _progress_bar(end - start, enabled=progress)
    for a in range(start, start + batches * batch_size, batch_size):
        b = min(end, a + batch_size)
        failure = None
        try:
            if a < end:
                writer = _embed_batch(encoder, tokenize, evidence_ids, a, b, start, end, device, compute_dtype,
                                      writer, writes, write_dir, out_dir, shard, shards)
        except (OSError, FloatingPointError) as e:
            failure = e
        if _peers_failed(failure is not None, group):
            if failure is not None:
                raise failure
            break  # another rank failed: the agreed error reports it to every rank
        if a >= end:
            continue
        done += b - a
        bar.update(b - a)
        now = time.perf_counter()
        if now - last_log >= log_interval_s:
            logger.info("shard %d: embedded %d/%d passages, %.1f passages/s",
                        shard, done, end - start, done / (now - t0))
            last_log = now
    bar.close()

    return writer, done, t0


def _embed_batch(encoder, tokenize, evidence_ids, a, b, start, end, device, compute_dtype, writer, writes,
                 write_dir, out_dir, shard, shards):
    """Embed rows [a, b) and, if ``writes``, write them; returns the writer (None until this
    rank writes). FloatingPointError for embeddings fp16 cannot hold."""
    ids, mask = tokenize(range(a, b))
    with _autocast(device, compute_dtype):
        emb = encoder(ids.to(device), mask.to(device))
    emb16 = emb.detach().to(torch.float16)
    if not bool(torch.isfinite(emb16).all()):
        dtype = str(compute_dtype or torch.float32).replace("torch.", "")
        raise FloatingPointError(f"{out_dir}: non-finite (or fp16-overflowing) embeddings for evidence rows "
                                 f"[{a}, {b}) (the context tower overflows {dtype}, or it diverged)")
    if not writes:  # a tensor-parallel peer of the writing rank
        return None
    if writer is None:
        writer = shard_store.ShardWriter(write_dir, shard, shards, end - start, emb16.shape[1], start)
    writer.write(a - start, emb16.cpu(), evidence_ids[a:b])
    return writer


def _progress_bar(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    # Into a log file a bar is only noise (the logger reports progress there), as for the trainer's.
    if not enabled or not sys.stderr.isatty():
        return _NoBar()
    return tqdm(total=total, unit="psg", desc="embedding evidence", smoothing=0.05)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass
