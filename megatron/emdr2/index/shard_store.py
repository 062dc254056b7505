"""On-disk format of the evidence index: fp16 shards, int64 ids, a manifest written last.

One index version is a directory::

    <root>/step-00000500/
        shard-00000-of-00004.emb      raw float16, row-major [rows, dim]
        shard-00000-of-00004.ids      raw int64 [rows] (evidence ids, in row order)
        shard-00000-of-00004.json     that shard's sizes and checksums (for the publisher)
        manifest.json                 dim, dtype, model step, every shard's rows and sha256
    <root>/LATEST                     name of the newest published version

Every file is written under a temporary name and renamed when complete; the manifest is
written only after all shards are final, and ``LATEST`` only after the manifest, so a reader
never sees a manifest that points at a half-written shard (a killed job leaves ``*.partial``
files and no manifest). Raw files rather than ``.npy`` so the expected byte count follows
from the manifest alone, which makes truncation checks exact.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from megatron.emdr2 import fileio

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "LATEST"
PARTIAL = ".partial"


class IndexStoreError(RuntimeError):
    """An index on disk is missing, incomplete or corrupt (the message names the file)."""


def version_name(model_step: int) -> str:
    if int(model_step) < 0:
        raise ValueError(f"model step must be >= 0, got {model_step}")
    return f"step-{int(model_step):08d}"


def _plain_name(name: str) -> bool:
    """A file or directory directly inside its parent: no separators, not '.' or '..'."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def read_latest(root: str | os.PathLike) -> str | None:
    """The version name ``root/LATEST`` holds (None without one). It must name a directory
    inside ``root``: a pointer such as ``../..`` is refused, never followed."""
    path = Path(root) / LATEST
    try:
        name = path.read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise IndexStoreError(f"{path}: unreadable ({e})") from None
    if not name:
        return None
    if not _plain_name(name):
        raise IndexStoreError(f"{path}: names {name[:80]!r}, which is not a version directory inside {root}")
    return name


def prune_versions(root: str | os.PathLike, keep: int, protect=()) -> list[str]:
    """Delete complete index versions (``step-*`` with a manifest) under ``root`` except the
    newest ``keep``, the one ``LATEST`` names and the names in ``protect``; returns the deleted
    names. At full scale a version is N·d·2 bytes (32 GB for 21M × 768), so a run that refreshes
    every few hundred steps would otherwise fill its disk. Unfinished versions are left alone (an
    indexer may be writing them); a deleted version that a process still has memory-mapped stays
    readable to it (POSIX)."""
    import re
    import shutil

    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    complete = sorted(p.name for p in root.glob("step-*")
                      if re.fullmatch(r"step-\d+", p.name) and (p / MANIFEST).is_file())
    spared = set(complete[-keep:]) | set(protect)
    try:
        latest = read_latest(root)
    except IndexStoreError:
        latest = None
    if latest:
        spared.add(latest)
    removed = []
    for name in complete:
        if name not in spared:
            shutil.rmtree(root / name, ignore_errors=True)
            removed.append(name)
    return removed


def shard_stem(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}"


sha256_file = fileio.sha256_file
_fsync_dir = fileio.fsync_dir


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Readers see the old file or the whole new one (the temporary is a ``*.partial`` file)."""
    fileio.atomic_write_text(path, text, tmp_suffix=PARTIAL)


@dataclass
class ShardInfo:
    """One shard as recorded in the manifest (paths relative to the version directory)."""

    shard: int
    rows: int
    row_offset: int
    emb_file: str
    ids_file: str
    emb_sha256: str
    ids_sha256: str


@dataclass
class Manifest:
    dim: int
    num_rows: int
    shards: list[ShardInfo]
    model_step: int = 0
    dtype: str = "float16"
    format_version: int = FORMAT_VERSION
    created: float = field(default_factory=time.time)
    extra: dict = field(default_factory=dict)
    directory: Path | None = None  # where it was read from (not serialised)

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("directory")
        return json.dumps(d, indent=1)

    @classmethod
    def from_file(cls, path: Path) -> "Manifest":
        try:
            d = json.loads(path.read_text())
            shards = [ShardInfo(**s) for s in d.pop("shards")]
            m = cls(shards=shards, **d)
        except (ValueError, TypeError, KeyError) as e:
            raise IndexStoreError(f"{path}: not a valid index manifest ({e})") from e
        if m.format_version != FORMAT_VERSION:
            raise IndexStoreError(f"{path}: index format {m.format_version}, this code reads {FORMAT_VERSION}")
        for s in m.shards:
            for name in (s.emb_file, s.ids_file):
                if not isinstance(name, str) or not _plain_name(name):
                    raise IndexStoreError(f"{path}: shard file {str(name)[:80]!r} is not a file name inside "
                                          f"{path.parent}")
        if sum(s.rows for s in m.shards) != m.num_rows:
            raise IndexStoreError(f"{path}: shard rows do not add up to num_rows={m.num_rows}")
        m.directory = path.parent
        return m


class ShardWriter:
    """Writes one shard through memory-mapped temporary files; ``close()`` makes it final.

    Rows may arrive in any order (``write(start, ...)``), which lets the embedding loop write
    each batch in place without holding the shard in memory.
    """

    def __init__(self, directory: str | os.PathLike, shard: int, num_shards: int,
                 rows: int, dim: int, row_offset: int = 0):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard, self.num_shards, self.rows, self.dim = shard, num_shards, rows, dim
        self.row_offset = row_offset
        stem = shard_stem(shard, num_shards)
        self.emb_path = self.directory / f"{stem}.emb"
        self.ids_path = self.directory / f"{stem}.ids"
        self.meta_path = self.directory / f"{stem}.json"
        self._emb_tmp = self.emb_path.with_name(self.emb_path.name + PARTIAL)
        self._ids_tmp = self.ids_path.with_name(self.ids_path.name + PARTIAL)
        for p in (self.emb_path, self.ids_path, self.meta_path):
            p.unlink(missing_ok=True)  # a stale final file must not survive a rebuild
        self.emb = _create_map(self._emb_tmp, np.float16, (rows, dim))
        self.ids = _create_map(self._ids_tmp, np.int64, (rows,))
        self._written = 0

    def write(self, start: int, embeddings, ids) -> None:
        """Store rows ``[start, start + len(embeddings))`` of this shard."""
        emb = _as_numpy(embeddings)
        n = emb.shape[0]
        if emb.shape[1:] != (self.dim,) or start < 0 or start + n > self.rows:
            raise ValueError(f"{self._emb_tmp}: rows [{start}, {start + n}) x {emb.shape[1:]} "
                             f"do not fit a shard of {self.rows} x {self.dim}")
        self.emb[start:start + n] = emb  # casts to float16 here
        self.ids[start:start + n] = _as_numpy(ids)
        self._written += n

    def close(self) -> ShardInfo:
        if self._written < self.rows:
            raise RuntimeError(f"{self._emb_tmp}: only {self._written} of {self.rows} rows written")
        for arr in (self.emb, self.ids):
            if isinstance(arr, np.memmap):
                arr.flush()
        self.emb = self.ids = None  # drop the maps before renaming
        for tmp in (self._emb_tmp, self._ids_tmp):
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        info = ShardInfo(
            shard=self.shard, rows=self.rows, row_offset=self.row_offset,
            emb_file=self.emb_path.name, ids_file=self.ids_path.name,
            emb_sha256=sha256_file(self._emb_tmp), ids_sha256=sha256_file(self._ids_tmp))
        os.replace(self._emb_tmp, self.emb_path)
        os.replace(self._ids_tmp, self.ids_path)
        atomic_write_text(self.meta_path, json.dumps(asdict(info)))
        return info


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:  # numpy has no bfloat16
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _create_map(path: Path, dtype, shape) -> np.ndarray:
    if int(np.prod(shape)) == 0:  # mmap cannot map an empty file
        path.write_bytes(b"")
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="w+", shape=shape)


def staging_dir(directory: str | os.PathLike) -> Path:
    """Where an ``overwrite`` rebuild of ``directory`` writes until it is complete."""
    directory = Path(directory)
    return directory.with_name(directory.name + ".staging")


def begin_version(directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Prepare the directory the shards are written to and return it. Without ``overwrite`` it
    is the version directory itself (refused if a version is published there). With
    ``overwrite`` it is an empty staging sibling (``staging_dir``): the published version stays
    intact and loadable until ``publish(..., replace=directory)`` swaps the complete new one in,
    so a crash mid-build never leaves ``LATEST`` naming a version without a manifest."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if overwrite:
        staging = staging_dir(directory)
        shutil.rmtree(staging, ignore_errors=True)  # a crashed rebuild's leftovers
        staging.mkdir(parents=True)
        return staging
    if manifest.exists():
        raise IndexStoreError(f"{manifest}: an index is already published here (pass overwrite)")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _swap_in(staging: Path, final: Path) -> None:
    """Replace ``final`` by the complete ``staging`` directory: the old version is moved aside
    (never deleted) before the new one takes its name, then removed."""
    aside = final.with_name(f"{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, aside)
    os.replace(staging, final)
    _fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def read_shard_infos(directory: str | os.PathLike, num_shards: int) -> list[ShardInfo]:
    """The per-shard records left by ``ShardWriter.close`` (used by the publisher)."""
    infos = []
    for s in range(num_shards):
        path = Path(directory) / f"{shard_stem(s, num_shards)}.json"
        if not path.exists():
            raise IndexStoreError(f"{path}: shard {s} was never completed")
        infos.append(ShardInfo(**json.loads(path.read_text())))
    return infos


def publish(directory: str | os.PathLike, shards: list[ShardInfo], dim: int, model_step: int = 0,
            extra: dict | None = None, update_latest: bool = True,
            replace: str | os.PathLike | None = None) -> Manifest:
    """Write the manifest (atomically, last) after checking every shard file is complete.
    ``replace``: the version directory an ``overwrite`` build (written in ``directory``, its
    staging sibling) takes the place of, once complete."""
    directory = Path(directory)
    shards = sorted(shards, key=lambda s: s.shard)
    offset = 0
    for s in shards:
        s.row_offset = offset
        offset += s.rows
        for name, itemsize in ((s.emb_file, 2 * dim), (s.ids_file, 8)):
            _check_size(directory / name, s.rows * itemsize)
    m = Manifest(dim=dim, num_rows=offset, shards=shards, model_step=model_step, extra=extra or {})
    atomic_write_text(directory / MANIFEST, m.to_json())
    if replace is not None:
        _swap_in(directory, Path(replace))
        directory = Path(replace)
    if update_latest:
        atomic_write_text(directory.parent / LATEST, directory.name + "\n")
    m.directory = directory
    return m


def resolve(path: str | os.PathLike) -> Path:
    """A version directory, or a root whose ``LATEST`` names one, or a manifest file."""
    path = Path(path)
    if path.is_file() and path.name == MANIFEST:
        return path.parent
    if (path / MANIFEST).exists():
        return path
    latest = read_latest(path) if (path / LATEST).is_file() else None
    if latest is not None:
        target = path / latest
        if not (target / MANIFEST).exists():
            raise IndexStoreError(f"{target / MANIFEST}: LATEST points at a version without a manifest")
        return target
    if not path.exists():
        raise IndexStoreError(f"{path}: no such index directory")
    partial = sorted(p.name for p in path.glob(f"*{PARTIAL}"))
    hint = f" (unfinished files: {', '.join(partial[:3])}: the build was interrupted)" if partial else ""
    raise IndexStoreError(f"{path / MANIFEST}: missing, the index is not published{hint}")


def nothing_published(path: str | os.PathLike) -> bool:
    """True where no index has been published at ``path`` (no directory, or neither a manifest
    nor a ``LATEST`` pointer in it): the case in which a task embeds the evidence itself. A
    pointer or manifest that is there but broken is an error for ``resolve`` to name, never a
    reason to build over it."""
    path = Path(path)
    return not (path / MANIFEST).exists() and not (path / LATEST).exists()


def read_manifest(path: str | os.PathLike) -> Manifest:
    return Manifest.from_file(resolve(path) / MANIFEST)


def _check_size(path: Path, expected: int) -> None:
    if not path.exists():
        raise IndexStoreError(f"{path}: shard file missing")
    actual = path.stat().st_size
    if actual != expected:
        raise IndexStoreError(f"{path}: {actual} bytes, manifest expects {expected} (truncated or wrong file)")


def open_shard(manifest: Manifest, shard: int, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map one shard: (float16 [rows, dim], int64 [rows]); checks sizes and, if ``verify``, sha256."""
    s = manifest.shards[shard]
    d = manifest.directory
    emb_path, ids_path = d / s.emb_file, d / s.ids_file
    _check_size(emb_path, s.rows * manifest.dim * 2)
    _check_size(ids_path, s.rows * 8)
    if verify:
        for path, want in ((emb_path, s.emb_sha256), (ids_path, s.ids_sha256)):
            got = sha256_file(path)
            if got != want:
                raise IndexStoreError(f"{path}: sha256 {got[:12]}… differs from the manifest's {want[:12]}… (corrupt shard)")
    if s.rows == 0:
        return np.zeros((0, manifest.dim), np.float16), np.zeros((0,), np.int64)
    # mode "c" (copy-on-write) so torch.from_numpy gets a writable array without touching the file
    emb = np.memmap(emb_path, dtype=np.float16, mode="c", shape=(s.rows, manifest.dim))
    ids = np.memmap(ids_path, dtype=np.int64, mode="c", shape=(s.rows,))
    return emb, ids


def storage_bytes(num_rows: int, dim: int, num_shards: int = 1, model_step: int = 0,
                  extra: dict | None = None) -> dict:
    """Bytes on disk of one index version of ``num_rows`` x ``dim`` written in ``num_shards``
    shards (``write_index``, or ``embed_evidence`` with one shard per rank): per shard a raw
    float16 ``.emb`` file and an int64 ``.ids`` file (exact, as ``publish`` checks them) and the
    shard's ``.json`` record, plus the manifest. The records are sized by serialising the real
    ``ShardInfo`` / ``Manifest`` with checksum-length placeholders: exact for the shard records;
    the manifest's size also depends on its timestamp and ``extra`` (build_index stores the
    retriever's description there), so it is good to a few bytes with the same ``extra``.

    Returns {"emb_bytes", "ids_bytes", "shard_record_bytes", "manifest_bytes", "total_bytes"}."""
    if num_rows < 0 or dim < 1 or num_shards < 1:
        raise ValueError(f"need rows >= 0, dim >= 1, shards >= 1; got {num_rows}, {dim}, {num_shards}")
    placeholder = "0" * 64  # a sha256 hex digest
    infos = []
    for s in range(num_shards):
        a, b = num_rows * s // num_shards, num_rows * (s + 1) // num_shards
        stem = shard_stem(s, num_shards)
        infos.append(ShardInfo(shard=s, rows=b - a, row_offset=a, emb_file=f"{stem}.emb", ids_file=f"{stem}.ids",
                               emb_sha256=placeholder, ids_sha256=placeholder))
    records = sum(len(json.dumps(asdict(i)).encode()) for i in infos)
    manifest = len(Manifest(dim=dim, num_rows=num_rows, shards=infos, model_step=model_step,
                            extra=extra or {}).to_json().encode())
    emb, ids = num_rows * dim * np.dtype(np.float16).itemsize, num_rows * np.dtype(np.int64).itemsize
    return {"emb_bytes": emb, "ids_bytes": ids, "shard_record_bytes": records, "manifest_bytes": manifest,
            "total_bytes": emb + ids + records + manifest}


def measured_storage_bytes(path: str | os.PathLike) -> dict:
    """The same fields as ``storage_bytes``, measured on a published index version (``path``: a
    version directory, its root or its manifest), plus "shards", "rows" and "dim"."""
    m = read_manifest(path)
    d = m.directory

    def size(name: str, required: bool = True) -> int:
        try:
            return (d / name).stat().st_size
        except FileNotFoundError:
            if required:
                raise IndexStoreError(f"{d / name}: shard file missing") from None
            return 0

    emb = sum(size(s.emb_file) for s in m.shards)
    ids = sum(size(s.ids_file) for s in m.shards)
    records = sum(size(Path(s.emb_file).stem + ".json", required=False) for s in m.shards)
    manifest = size(MANIFEST)
    return {"rows": m.num_rows, "dim": m.dim, "shards": len(m.shards), "emb_bytes": emb, "ids_bytes": ids,
            "shard_record_bytes": records, "manifest_bytes": manifest, "total_bytes": emb + ids + records + manifest}


def write_index(directory: str | os.PathLike, embeddings, ids, num_shards: int = 1,
                model_step: int = 0, extra: dict | None = None, overwrite: bool = False) -> Manifest:
    """Single-process convenience: split in-memory embeddings into shards and publish them."""
    final, directory = directory, begin_version(directory, overwrite)
    emb, ids = _as_numpy(embeddings), _as_numpy(ids)
    bounds = np.linspace(0, len(emb), num_shards + 1).astype(np.int64)
    infos = []
    for s in range(num_shards):
        a, b = int(bounds[s]), int(bounds[s + 1])
        w = ShardWriter(directory, s, num_shards, b - a, emb.shape[1], row_offset=a)
        w.write(0, emb[a:b], ids[a:b])
        infos.append(w.close())
    return publish(directory, infos, emb.shape[1], model_step, extra, replace=final if overwrite else None)
