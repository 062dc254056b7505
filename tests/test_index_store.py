"""On-disk index format: round trip, truncation and checksum errors, crash safety of embedding."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron.emdr2.index import (IndexStoreError, ShardedIndex, ShardWriter, embed_evidence, open_shard,
                                  publish, read_manifest, write_index)

TESTS = Path(__file__).resolve().parent


def _random_index(path, rows=1001, dim=24, shards=3, step=7):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(rows, dim, generator=g)
    ids = np.arange(rows, dtype=np.int64) * 5 + 11
    return emb, ids, write_index(path, emb, ids, num_shards=shards, model_step=step, extra={"src": "t"})


def test_round_trip_and_latest(tmp_path):
    emb, ids, m = _random_index(tmp_path / "step-00000007")
    assert [s.rows for s in m.shards] == [333, 334, 334]
    assert (tmp_path / "LATEST").read_text().strip() == "step-00000007"
    m2 = read_manifest(tmp_path)  # through LATEST
    assert (m2.dim, m2.num_rows, m2.model_step, m2.dtype, m2.extra) == (24, 1001, 7, "float16", {"src": "t"})
    got_e = np.concatenate([open_shard(m2, s)[0] for s in range(3)])
    got_i = np.concatenate([open_shard(m2, s)[1] for s in range(3)])
    np.testing.assert_array_equal(got_e, emb.half().numpy())
    np.testing.assert_array_equal(got_i, ids)
    assert not list(tmp_path.rglob("*.partial"))
    # single-process load, in RAM and memory-mapped, gives the whole index
    for in_memory in (True, False):
        idx = ShardedIndex.load(tmp_path, in_memory=in_memory)
        assert idx.local_rows == 1001 and idx.model_step == 7
        assert idx.memory_bytes == 1001 * 24 * 2 + 1001 * 8  # fp16: half of an fp32 copy
        _, top = idx.search(emb[[5, 500, 1000]], 1)
        assert top[:, 0].tolist() == [ids[5], ids[500], ids[1000]]


def test_truncated_or_corrupt_shard_fails_clearly(tmp_path):
    _, _, m = _random_index(tmp_path / "v")
    shard = tmp_path / "v" / m.shards[1].emb_file
    data = shard.read_bytes()
    # same size, one flipped byte: only the checksum can tell
    flipped = bytearray(data)
    flipped[1234] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(IndexStoreError, match=rf"{shard.name}: sha256 .* differs"):
        ShardedIndex.load(tmp_path / "v")
    ShardedIndex.load(tmp_path / "v", verify=False)  # opting out of hashing still loads
    shard.write_bytes(data[:-100])
    with pytest.raises(IndexStoreError, match=rf"{shard.name}: {len(data) - 100} bytes, manifest expects {len(data)}"):
        ShardedIndex.load(tmp_path / "v", verify=False)
    (tmp_path / "v" / m.shards[2].ids_file).unlink()
    with pytest.raises(IndexStoreError, match="shard file missing"):
        open_shard(read_manifest(tmp_path / "v"), 2)


def test_publish_refuses_incomplete_shards_and_overwrites(tmp_path):
    w = ShardWriter(tmp_path, 0, 1, rows=10, dim=4)
    w.write(0, torch.ones(6, 4), np.arange(6))
    with pytest.raises(RuntimeError, match="only 6 of 10 rows written"):
        w.close()
    with pytest.raises(IndexStoreError, match="manifest.json: missing, the index is not published"):
        read_manifest(tmp_path)
    # a shard record whose file is shorter than it claims is never published
    w = ShardWriter(tmp_path, 0, 1, rows=10, dim=4)
    w.write(0, torch.ones(10, 4), np.arange(10))
    info = w.close()
    info.rows = 11
    with pytest.raises(IndexStoreError, match="truncated or wrong file"):
        publish(tmp_path, [info], dim=4)
    assert not (tmp_path / "manifest.json").exists()
    write_index(tmp_path / "x", torch.ones(3, 4), np.arange(3))
    with pytest.raises(IndexStoreError, match="already published"):
        write_index(tmp_path / "x", torch.ones(3, 4), np.arange(3))


class _BagEncoder(torch.nn.Module):
    """A small deterministic 'tower': mean of token embeddings (the same weights everywhere)."""

    def __init__(self, vocab=1000, dim=32, delay=0.0):
        super().__init__()
        self.bag = torch.nn.EmbeddingBag(vocab, dim, mode="mean")
        with torch.no_grad():
            self.bag.weight.copy_(torch.randn(vocab, dim, generator=torch.Generator().manual_seed(3)))
        self.delay = delay

    def forward(self, ids, mask):
        if self.delay:
            time.sleep(self.delay)
        return self.bag(ids)


def fake_tokenize(rows, length=8, vocab=1000):
    rows = torch.as_tensor(list(rows), dtype=torch.long)
    ids = (rows[:, None] * 7919 + torch.arange(length) * 104729) % vocab
    return ids, torch.ones_like(ids)


def test_embed_single_process(tmp_path):
    enc = _BagEncoder()
    evid = np.arange(250, dtype=np.int64) + 1
    m = embed_evidence(enc, fake_tokenize, evid, tmp_path / "step-00000003", batch_size=64,
                       model_step=3, progress=False, extra={"checkpoint": "c"})
    assert (m.num_rows, m.dim, m.model_step, len(m.shards)) == (250, 32, 3, 1)
    emb, ids = open_shard(m, 0)
    np.testing.assert_array_equal(ids, evid)
    ref = enc(*fake_tokenize(range(250))).detach().half().numpy()
    np.testing.assert_array_equal(emb, ref)


def _slow_embed_job(out_dir, overwrite=True):
    """Run in a subprocess that the test kills midway."""
    evid = np.arange(4000, dtype=np.int64)
    embed_evidence(_BagEncoder(delay=0.05), fake_tokenize, evid, out_dir, batch_size=50,
                   progress=False, overwrite=overwrite)


def test_killed_overwrite_leaves_the_published_version_loadable(tmp_path):
    """An --overwrite rebuild killed midway: the version published before is untouched and still
    what LATEST names (the new shards were going to a staging sibling); a later rebuild clears
    the leftovers and swaps its complete version in."""
    version = tmp_path / "step-00000001"
    old = torch.randn(100, 32)
    write_index(version, old, np.arange(100))  # a published earlier build
    assert read_manifest(tmp_path).num_rows == 100
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_index_store as t; t._slow_embed_job({str(version)!r})"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    staging = tmp_path / "step-00000001.staging"
    try:
        deadline = time.time() + 60
        while not list(staging.glob("*.emb.partial")):
            assert proc.poll() is None, "embedding job ended before it could be killed"
            assert time.time() < deadline, "embedding job never started writing"
            time.sleep(0.05)
        time.sleep(0.2)  # let it write a few batches
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert list(staging.glob("*.partial")) and not (staging / "manifest.json").exists()
    index = ShardedIndex.load(tmp_path)  # the old version, intact
    assert index.num_rows == 100
    np.testing.assert_array_equal(open_shard(read_manifest(tmp_path), 0)[0], old.half().numpy())
    new = torch.randn(60, 32)
    write_index(version, new, np.arange(60), overwrite=True)
    assert read_manifest(tmp_path).num_rows == 60 and not staging.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step-00000001"]


def test_killed_first_build_is_not_published(tmp_path):
    version = tmp_path / "step-00000001"
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_index_store as t; "
            f"t._slow_embed_job({str(version)!r}, overwrite=False)")
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 60
        while not list(version.glob("*.emb.partial")):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (version / "manifest.json").exists() and not (tmp_path / "LATEST").exists()
    with pytest.raises(IndexStoreError, match=r"missing, the index is not published \(unfinished files"):
        ShardedIndex.load(version)


def test_refresh_never_follows_a_latest_outside_the_index_root(tmp_path):
    from megatron.emdr2.index.shard_store import IndexStoreError
    from megatron.emdr2.openqa.index_refresh import latest_version

    assert latest_version(tmp_path) is None
    (tmp_path / "LATEST").write_text("../..")
    with pytest.raises(IndexStoreError, match="not a version directory inside"):
        latest_version(tmp_path)


def test_prune_versions_keeps_the_newest_latest_and_protected(tmp_path):
    from megatron.emdr2.index import shard_store

    def version(step, complete=True):
        d = tmp_path / shard_store.version_name(step)
        d.mkdir()
        if complete:
            (d / shard_store.MANIFEST).write_text("{}")
        (d / "shard-00000-of-00001.emb").write_bytes(b"x" * 16)

    for step in (0, 100, 200, 300, 400):
        version(step)
    version(500, complete=False)  # an indexer still writing it
    (tmp_path / shard_store.LATEST).write_text("step-00000100\n")  # a lagging pointer is kept
    (tmp_path / "exchange").mkdir()
    removed = shard_store.prune_versions(tmp_path, keep=2, protect={"step-00000000"})
    assert removed == ["step-00000200"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["LATEST", "exchange", "step-00000000", "step-00000100", "step-00000300",
                    "step-00000400", "step-00000500"]
    (tmp_path / shard_store.LATEST).write_text("step-00000400\n")
    assert shard_store.prune_versions(tmp_path, keep=1) == ["step-00000000", "step-00000100", "step-00000300"]
    with pytest.raises(ValueError):
        shard_store.prune_versions(tmp_path, keep=0)
