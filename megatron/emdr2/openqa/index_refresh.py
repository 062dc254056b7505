"""Keeping the evidence index fresh while the retriever trains.

Synchronous mode (one process, one GPU, a CPU): every ``interval`` steps the trainers
themselves re-embed the evidence with the current context tower and swap to the new index.

Asynchronous mode: trainers and indexers are separate worlds (``roles.py``) that talk through
files only, so an indexer that crashes or lags can never block a trainer::

    <index_dir>/step-00000500/...     index versions, each published atomically (shard_store)
    <index_dir>/LATEST                the newest complete version
    <index_dir>/exchange/towers/step-00000500.pt   context-tower weights handed to the indexers
    <index_dir>/exchange/towers/LATEST
    <index_dir>/exchange/heartbeat    touched by trainer rank 0 every step
    <index_dir>/exchange/STOP         training has ended: indexers exit

Each of these files names the launch that wrote it (``RefreshConfig.launch_id``, agreed by both
roles at start-up: ``roles.py``). A relaunch of the same command (what resuming with --load is)
finds the previous launch's STOP, heartbeat and tower in place; its indexers start before its
trainers are ready to clear them, so they ignore every exchange file of another launch instead.

Trainers publish the tower every ``interval`` steps (a small file, no stall), poll ``LATEST``
between steps, load a new version in a background thread and switch to it at the first step
boundary where every trainer rank has it in memory. Until then they keep searching the old one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron.emdr2.index import shard_store
from megatron.emdr2.index.sharded_index import ShardedIndex

logger = logging.getLogger(__name__)


@dataclass
class RefreshConfig:
    index_dir: str
    interval: int = 500             # steps between refreshes (0: never)
    asynchronous: bool = False      # indexer ranks do the work
    embed_batch_size: int = 128
    poll_seconds: float = 1.0       # indexers' polling period
    heartbeat_timeout: float = 900  # indexers give up when trainers stay silent this long
    keep_versions: int = 3          # complete index versions kept on disk (0: all)
    launch_id: Optional[str] = None  # this launch's stamp on the exchange files (None: unstamped)


class Exchange:
    """The files through which trainers and indexers communicate.

    With a ``launch_id``, the trainers stamp the heartbeat, STOP and the tower pointer with it and
    the indexers read only what carries their own; without one any file counts (one launch)."""

    def __init__(self, index_dir: str | os.PathLike, launch_id: Optional[str] = None):
        self.root = Path(index_dir) / "exchange"
        self.towers = self.root / "towers"
        self.launch_id = launch_id
        self._beating = False    # trainer side: this launch's heartbeat file is written
        self._seen_beat = False  # indexer side: this launch's trainers have beaten

    def prepare(self) -> None:
        self.towers.mkdir(parents=True, exist_ok=True)
        stop = self.root / "STOP"
        if stop.exists():
            stop.unlink()  # a previous run's signal must not stop this one

    # trainer side --------------------------------------------------------------
    def publish_tower(self, step: int, state_dict: dict, meta: Optional[dict] = None) -> Path:
        """``meta``: small JSON-able facts the indexers write into the version's manifest
        (e.g. the training run's id)."""
        self.towers.mkdir(parents=True, exist_ok=True)
        path = self.towers / f"{shard_store.version_name(step)}.pt"
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        tensors = {k: v.detach().cpu() for k, v in state_dict.items() if torch.is_tensor(v)}
        torch.save({"step": step, "state_dict": tensors, "meta": dict(meta or {})}, tmp)
        os.replace(tmp, path)
        shard_store.atomic_write_text(self.towers / "LATEST", self._stamped(str(step)))
        # Indexers want only the newest tower; keep one older file for an indexer that is
        # just about to read it.
        for old in sorted(self.towers.glob("step-*.pt"))[:-2]:
            old.unlink(missing_ok=True)
        return path

    def beat(self) -> None:
        if not self._beating:  # the first beat names the launch; the later ones only touch it
            shard_store.atomic_write_text(self.root / "heartbeat", self._stamped("beat"))
            self._beating = True
        else:
            (self.root / "heartbeat").touch()

    def request_stop(self) -> None:
        shard_store.atomic_write_text(self.root / "STOP", self._stamped("stop"))

    def _stamped(self, word: str) -> str:
        return f"{word} {self.launch_id}\n" if self.launch_id else f"{word}\n"

    # indexer side --------------------------------------------------------------
    def _read_own(self, path: Path) -> Optional[str]:
        """The file's first word ("" if none) if this launch wrote it (without an id: whoever
        did); None if it is absent or another launch's."""
        try:
            words = path.read_text().split()
        except FileNotFoundError:
            return None
        if self.launch_id and words[1:2] != [self.launch_id]:
            return None
        return words[0] if words else ""

    def latest_tower_step(self) -> Optional[int]:
        try:
            return int(self._read_own(self.towers / "LATEST"))
        except (TypeError, ValueError):
            return None

    def load_tower(self, step: int) -> dict:
        """The tower's tensors (megatron's empty ``_extra_state`` entries are not handed over)."""
        return self.load_tower_and_meta(step)[0]

    def load_tower_and_meta(self, step: int) -> tuple[dict, dict]:
        """(the tower's tensors, the meta the trainers published with them)."""
        payload = torch.load(self.towers / f"{shard_store.version_name(step)}.pt", map_location="cpu",
                             weights_only=True)
        return payload["state_dict"], payload.get("meta", {})

    def stop_requested(self) -> bool:
        return self._read_own(self.root / "STOP") is not None

    def heartbeat_age(self) -> float:
        """Seconds since this launch's trainers last beat: 0 until they first do (they may be
        loading models or embedding the first index); infinite once another launch's heartbeat
        replaced theirs (or it was removed): they are gone."""
        path = self.root / "heartbeat"
        try:
            mtime = path.stat().st_mtime
            own = self._read_own(path) is not None
        except FileNotFoundError:
            own = False
        if not own:
            return float("inf") if self._seen_beat else 0.0
        self._seen_beat = True
        return time.time() - mtime


def latest_version(index_dir: str | os.PathLike) -> Optional[str]:
    """The published version's name; a LATEST that points outside index_dir is refused."""
    return shard_store.read_latest(index_dir)


def _broadcast_object(value, group=None):
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group else 0, group=group)
    return box[0]


def _all_true(flag: bool, group=None) -> bool:
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32,
                     device="cuda" if dist.get_backend(group) == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


class IndexManager:
    """The trainers' view: the index in use, and how it is replaced.

    ``build_sync(step)`` re-embeds the evidence on the trainer ranks and returns the published
    version directory (synchronous mode); ``context_state()`` returns the context tower's whole
    weights to hand to the indexers (asynchronous mode). Both are called collectively.
    """

    def __init__(self, cfg: RefreshConfig, build_sync: Callable[[int], str],
                 context_state: Callable[[], dict], group=None, device=None,
                 tower_meta: Optional[Callable[[], dict]] = None):
        self.cfg, self.build_sync, self.context_state = cfg, build_sync, context_state
        self.tower_meta = tower_meta  # published with each tower, written in the indexers' manifests
        self.group, self.device = group, device
        self.exchange = Exchange(cfg.index_dir, cfg.launch_id)
        self.index: Optional[ShardedIndex] = None
        self.version: Optional[str] = None
        self.version_dir: Optional[Path] = None
        self.refreshes = 0
        self._pending: Optional[tuple[str, threading.Thread, dict]] = None
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        if cfg.asynchronous and self.rank == 0:
            self.exchange.prepare()

    def load(self, version_dir: str | os.PathLike) -> None:
        resolved = Path(shard_store.resolve(version_dir))
        self.index = ShardedIndex.load(resolved, group=self.group, device=self.device)
        self.version, self.version_dir = resolved.name, resolved

    def staleness(self, iteration: int) -> int:
        return iteration - (self.index.model_step if self.index is not None else 0)

    # ------------------------------------------------------------------ per step
    def after_step(self, iteration: int) -> None:
        """Called by every trainer rank after each optimizer step."""
        if self.cfg.asynchronous:
            self._after_step_async(iteration)
        elif self.cfg.interval and iteration % self.cfg.interval == 0:
            self.load(self.build_sync(iteration))
            self.refreshes += 1
            if self.rank == 0 and self.cfg.keep_versions:
                shard_store.prune_versions(self.cfg.index_dir, self.cfg.keep_versions, protect={self.version})

    def _after_step_async(self, iteration: int) -> None:
        if self.rank == 0:
            self.exchange.beat()
        if self.cfg.interval and iteration % self.cfg.interval == 0:
            state = self.context_state()  # on every rank: a tensor-parallel tower is gathered
            if self.rank == 0:
                self.exchange.publish_tower(iteration, state, self.tower_meta() if self.tower_meta else None)
        # Which version is newest? Rank 0 reads the pointer; everyone follows its answer.
        newest = _broadcast_object(latest_version(self.cfg.index_dir) if self.rank == 0 else None, self.group)
        if newest and newest != self.version and (self._pending is None or self._pending[0] != newest):
            self._start_loading(newest)
        if self._pending is not None:
            name, thread, box = self._pending
            ready = not thread.is_alive()
            if _all_true(ready, self.group):
                self._pending = None
                if "error" in box:  # a bad version: keep the current one, say why
                    logger.warning("index version %s could not be loaded (%s); keeping %s",
                                   name, box["error"], self.version)
                    return
                self.index, self.version = box["index"], name
                self.version_dir = Path(self.cfg.index_dir) / name
                self.refreshes += 1
                logger.info("switched to index %s (model step %d) at iteration %d",
                            name, self.index.model_step, iteration)

    def _start_loading(self, name: str) -> None:
        box: dict = {}
        path = Path(self.cfg.index_dir) / name

        def load():
            try:
                box["index"] = ShardedIndex.load(path, group=self.group, device=self.device)
            except Exception as e:  # reported at the swap, on every rank
                box["error"] = f"{type(e).__name__}: {e}"

        thread = threading.Thread(target=load, name=f"load-{name}", daemon=True)
        thread.start()
        self._pending = (name, thread, box)

    def close(self) -> None:
        if self.cfg.asynchronous and self.rank == 0:
            self.exchange.request_stop()


# ---------------------------------------------------------------------- indexer ranks

def _watchdog(exchange: Exchange, grace: float, heartbeat_timeout: float) -> None:
    """Exit the process once training has stopped, even if a collective is stuck (a peer
    indexer died mid-refresh): the main loop gets ``grace`` seconds to finish on its own."""
    while True:
        time.sleep(0.5)
        if exchange.stop_requested() or exchange.heartbeat_age() > heartbeat_timeout:
            time.sleep(grace)
            logger.info("indexer: training has stopped; exiting")
            os._exit(0)


def run_indexer(cfg: RefreshConfig, embed_version: Callable[[int, dict, str, dict], None],
                group=None, grace_seconds: float = 5.0) -> int:
    """Indexer ranks' main loop; returns the number of index versions published.

    ``embed_version(step, tower_state, out_dir, meta)`` loads the weights into a context tower
    and runs the (collective) evidence embedding into ``out_dir`` (``meta``: what the trainers
    published with the tower, for the manifest).
    """
    exchange = Exchange(cfg.index_dir, cfg.launch_id)
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    threading.Thread(target=_watchdog, args=(exchange, grace_seconds, cfg.heartbeat_timeout),
                     daemon=True).start()
    done, published = -1, 0
    while True:
        step = None
        if rank == 0:
            if exchange.stop_requested() or exchange.heartbeat_age() > cfg.heartbeat_timeout:
                step = -2
            else:
                latest = exchange.latest_tower_step()
                step = latest if latest is not None and latest > done else -1
        step = _broadcast_object(step, group)
        if step == -2:
            return published
        if step == -1:
            time.sleep(cfg.poll_seconds)
            continue
        try:
            state, meta = exchange.load_tower_and_meta(step)
        except FileNotFoundError:  # replaced by a newer tower meanwhile
            continue
        t0 = time.perf_counter()
        embed_version(step, state, str(Path(cfg.index_dir) / shard_store.version_name(step)), meta)
        done = step
        published += 1
        if rank == 0:
            logger.info("indexer: published index for model step %d in %.1fs", step, time.perf_counter() - t0)
            if cfg.keep_versions:  # trainers switch to the newest; older ones only fill the disk
                shard_store.prune_versions(cfg.index_dir, cfg.keep_versions)
