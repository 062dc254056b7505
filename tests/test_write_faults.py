"""Faults while writing: a disk that fills up or a permission refused while a checkpoint is saved
or an index version is published leaves the previous one loadable and is reported in one line.

The faults are injected with write hooks (the function that writes a file raises the OSError the
kernel would: ENOSPC, EACCES): a small real filesystem needs a mount, which a test may not do."""

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron.emdr2.index import IndexStoreError, ShardedIndex, embed_evidence, read_manifest, write_index
from megatron.emdr2.training import checkpointing as ckpt
from openqa_helpers import ROOT, env, small_evidence

DISK_FULL = OSError(errno.ENOSPC, "No space left on device")
DENIED = PermissionError(errno.EACCES, "Permission denied")


def _state(x):
    return {"models": {"m": {"w": torch.full((4,), float(x))}}, "iteration": x}


def _entries(root):
    return sorted(os.listdir(root))


def test_checkpoint_write_fails_leaving_the_last_one_loadable(tmp_path, monkeypatch):
    root = str(tmp_path / "save")
    ckpt.save_checkpoint(root, 1, _state(1), {"rng": 1})
    real = ckpt._torch_save

    def full(obj, path):
        with open(path, "wb") as f:
            f.write(b"x" * 100)  # a partial file, then the disk is full
        raise DISK_FULL

    monkeypatch.setattr(ckpt, "_torch_save", full)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.save_checkpoint(root, 2, _state(2), {"rng": 2})
    msg = str(e.value)
    assert "\n" not in msg and "iter_0000002: could not be written ([Errno 28] No space left on device)" in msg
    assert f"the last complete checkpoint, {root}/iter_0000001, is intact" in msg
    assert _entries(root) == ["iter_0000001", "latest"]  # the partial save was removed
    it, state, _ = ckpt.load_checkpoint(root)
    assert it == 1 and torch.equal(state["models"]["m"]["w"], torch.full((4,), 1.0))

    # re-saving iteration 1 (e.g. a resumed run that saves at once), refused at the rename:
    # the old copy is never deleted before its replacement is in place
    monkeypatch.setattr(ckpt, "_torch_save", real)
    real_replace = os.replace

    def denied(src, dst):
        if str(dst).endswith("iter_0000001") and ".tmp-" in str(src):
            raise DENIED
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", denied)
    with pytest.raises(ckpt.CheckpointError, match=r"iter_0000001: could not be written \(\[Errno 13\] Permission denied"):
        ckpt.save_checkpoint(root, 1, _state(7), {"rng": 7})
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    # the aside copy is what a load finds (the kill-between-renames case), and the next save
    # puts it back in place before writing
    it, state, _ = ckpt.load_checkpoint(root)
    assert it == 1 and torch.equal(state["models"]["m"]["w"], torch.full((4,), 1.0))
    ckpt.save_checkpoint(root, 3, _state(3), {"rng": 3})
    assert _entries(root) == ["iter_0000001", "iter_0000003", "latest"]


def test_leftovers_of_crashed_saves_are_removed(tmp_path):
    root = tmp_path / "save"
    ckpt.save_checkpoint(str(root), 1, _state(1), {})
    (root / "iter_0000002.tmp-4242").mkdir()  # a save killed before its manifest
    (root / "iter_0000002.tmp-4242" / "mp_rank_00.pt").write_bytes(b"half")
    ckpt.save_checkpoint(str(root), 3, _state(3), {}, keep_last=1)
    assert _entries(root) == ["iter_0000003", "latest"]


class _Encoder(torch.nn.Module):
    def forward(self, ids, mask):
        return torch.nn.functional.one_hot(ids[:, 0] % 8, 8).float()


def _tokenize(rows):
    ids = torch.tensor(list(rows)).unsqueeze(1)
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("fault", ["disk-full-while-writing", "denied-at-publish"])
def test_index_build_fails_leaving_the_published_version(tmp_path, monkeypatch, fault):
    from megatron.emdr2.index import shard_store

    version = tmp_path / "step-00000005"
    old = torch.randn(30, 8)
    write_index(version, old, np.arange(30), model_step=5)
    if fault == "disk-full-while-writing":
        def write(self, *a, **k):
            raise DISK_FULL
        monkeypatch.setattr(shard_store.ShardWriter, "write", write)
        match = r"could not write the index \(\[Errno 28\] No space left on device\)"
    else:
        real = shard_store.atomic_write_text

        def atomic(path, text):
            if str(path).endswith("manifest.json"):
                raise DENIED
            return real(path, text)
        monkeypatch.setattr(shard_store, "atomic_write_text", atomic)
        match = r"Permission denied"
    with pytest.raises(IndexStoreError, match=match) as e:
        embed_evidence(_Encoder(), _tokenize, np.arange(30), version, batch_size=8, model_step=5,
                       progress=False, overwrite=True)
    assert "\n" not in str(e.value) and f"the published version {version} is unchanged" in str(e.value)
    monkeypatch.undo()
    m = read_manifest(tmp_path)
    assert m.directory.name == "step-00000005" and m.num_rows == 30
    assert ShardedIndex.load(tmp_path).num_rows == 30
    # a first build of a new version that fails publishes nothing and moves no pointer
    with pytest.raises(IndexStoreError):
        monkeypatch.setattr(shard_store.ShardWriter, "write", lambda self, *a, **k: (_ for _ in ()).throw(DISK_FULL))
        embed_evidence(_Encoder(), _tokenize, np.arange(30), tmp_path / "step-00000010", batch_size=8,
                       model_step=10, progress=False)
    assert (tmp_path / "LATEST").read_text().strip() == "step-00000005"


def test_training_run_whose_disk_fills_stops_in_one_line_and_resumes(tmp_path):
    """ICT through its real entry point, with the third checkpoint save failing as on a full
    disk: the run stops with one line naming both checkpoints, and a rerun with --load resumes
    from the last complete one."""
    from megatron.emdr2.initialize import free_port

    evidence = small_evidence(tmp_path, 60)
    save = tmp_path / "save"
    flags = ["--retriever-num-layers", "1", "--retriever-hidden-size", "32", "--retriever-num-attention-heads", "2",
             "--retriever-seq-length", "64", "--query-max-len", "16", "--context-max-len", "48",
             "--no-progress-bar", "--evidence", str(evidence), "--dev-data", "", "--global-batch-size", "4",
             "--micro-batch-size", "4", "--train-iters", "4", "--save-interval", "1", "--save", str(save),
             "--lr", "1e-3"]
    hook = f"""
import errno, sys
from megatron.emdr2.training import checkpointing as c
real, calls = c._torch_save, [0]
def save(obj, path):
    if "iter_0000003" in path:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(obj, path)
c._torch_save = save
from tasks.openqa import ict
sys.argv[0] = ict.__file__
ict.main({flags!r})
"""
    e = dict(env(1), MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-c", hook], cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{save}/iter_0000003: could not be written ([Errno 28] No space left on device); the last complete " \
           f"checkpoint, {save}/iter_0000002, is intact" in err[-1], err[-3:]
    assert [n for n in _entries(save) if n.startswith("iter_")] == ["iter_0000001", "iter_0000002"], _entries(save)
    assert (save / "latest").read_text().strip() == "2"
    proc = subprocess.run([sys.executable, "-m", "tasks.openqa.ict", *flags, "--load", str(save)], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout + proc.stderr and (save / "latest").read_text().strip() == "4"
