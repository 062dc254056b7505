"""Loading a file never runs its code (issue 18).

A checkpoint, tower snapshot or converter output whose pickle would run code on load (its
``__reduce__`` calls ``os.system`` / ``open``) is refused by every loader with one line naming
the file, the exit code is 2, and the payload's marker file is never created. Checkpoints
written before weights-only loading (numpy RNG state) still load; manifests that verify nothing,
index pointers that leave the index root and negative model steps are refused.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from openqa_helpers import NQ_MINI, ROOT, env, small_evidence


class RunsShell:
    """Unpickling this calls os.system (what a malicious shared checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class OpensFile:
    """Unpickling this calls the builtin open(marker, "w"), creating the marker."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _meta():
    size = {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "ffn_hidden_size": 64,
            "seq_length": 64}
    return {"retriever": size, "reader": size, "shared_towers": False}


def _write_checkpoint(root: Path, payload, manifest: bool = True) -> Path:
    """A training-checkpoint directory (latest -> iter_0000001) whose files carry `payload`;
    with `manifest`, a self-consistent one (sizes and sha256 match: integrity is not origin)."""
    from megatron.emdr2.training import checkpointing as ckpt

    it = Path(ckpt.iteration_dir(str(root), 1))
    it.mkdir(parents=True)
    torch.save({"iteration": 1, "models": {"biencoder": {}, "reader": {}}, "meta": _meta(), "x": payload},
               it / ckpt.model_file(0))
    torch.save({"rng": payload, "sampler": {"consumed_samples": 0}}, it / ckpt.rank_file(0))
    if manifest:
        files = {n: {"bytes": (it / n).stat().st_size, "sha256": ckpt._sha256(it / n)}
                 for n in sorted(os.listdir(it))}
        (it / ckpt.MANIFEST).write_text(json.dumps({"iteration": 1, "world_size": 1, "files": files}))
    (root / ckpt.LATEST).write_text("1")
    return root


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "MARKER"
    yield m
    assert not m.exists(), "the payload ran: a loader unpickled code from a file"


@pytest.fixture
def fresh_port(monkeypatch):
    from megatron.emdr2.initialize import free_port

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


def _one_line_error(err: str, *needles: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert lines, "no error message"
    assert "Traceback" not in err, err[-3000:]
    last = lines[-1]
    assert "error" in last, err[-2000:]
    for n in needles:
        assert n in last, (n, last)
    return last


def _call(main, argv, capsys) -> tuple[int, str]:
    """An entry point's main() as the command would run it: (exit code, stderr)."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


# ------------------------------------------------------------------ the safe loader itself

@pytest.mark.parametrize("legacy_format", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload", [RunsShell, OpensFile])
def test_loaders_refuse_files_that_run_code(tmp_path, marker, payload, legacy_format):
    from megatron.emdr2 import safe_load
    from megatron.emdr2.openqa import builders

    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "x": payload(marker)}, evil,
               _use_new_zipfile_serialization=not legacy_format)
    with pytest.raises(safe_load.UnsafeFileError) as e:
        safe_load.load(evil)
    msg = str(e.value)
    assert msg.startswith(f"{evil}: refused: loading it would import or call ") and "\n" not in msg
    assert ("system" in msg) if payload is RunsShell else ("open" in msg)
    with pytest.raises(builders.PretrainedError, match="refused"):
        builders.load_model_state(str(evil), "biencoder")


def test_tower_snapshot_with_a_payload_is_refused(tmp_path, marker):
    from megatron.emdr2.index import shard_store
    from megatron.emdr2.openqa.index_refresh import Exchange

    ex = Exchange(tmp_path / "index")
    ex.towers.mkdir(parents=True)
    torch.save({"step": 4, "state_dict": {"w": torch.zeros(1)}, "x": RunsShell(marker)},
               ex.towers / f"{shard_store.version_name(4)}.pt")
    (ex.towers / "LATEST").write_text("4\n")
    assert ex.latest_tower_step() == 4
    with pytest.raises(Exception, match="posix.system|system"):
        ex.load_tower(4)


def test_garbage_and_truncated_files_are_one_line_errors(tmp_path):
    from megatron.emdr2 import safe_load

    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(4)}, good)
    assert torch.equal(safe_load.load(good)["w"], torch.arange(4))
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:100])
    for name in ("garbage.pt", "cut.pt"):
        with pytest.raises(safe_load.UnsafeFileError) as e:
            safe_load.load(tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path / name}: cannot be read as a torch checkpoint")
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------ checkpoints: old and new

def _old_style_rank_state() -> dict:
    """What get_rng_state saved before weights-only loading: numpy's legacy tuple (an ndarray)."""
    from megatron.core import tensor_parallel

    return {"rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()},
            "sampler": {"consumed_samples": 8}}


@pytest.mark.parametrize("style", ["before", "now"])
def test_checkpoints_written_before_and_now_load_and_restore_rng(tmp_path, style):
    from megatron.emdr2.training import checkpointing as ckpt

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.random(5)  # a mid-stream position, so "pos" matters
    if style == "before":
        rank_state = _old_style_rank_state()
        model_state = {"iteration": 2, "models": {"m": {"w": torch.ones(3)}},
                       "train_state": {"best_score": np.float64(0.25), "best_iteration": 2}}
    else:
        rank_state = {"rng": ckpt.get_rng_state(), "sampler": {"consumed_samples": 8}}
        model_state = {"iteration": 2, "models": {"m": {"w": torch.ones(3)}},
                       "train_state": {"best_score": 0.25, "best_iteration": 2}}
        # plain data: torch's default weights-only loader reads it without our allow-list
        torch.save(rank_state, tmp_path / "plain.pt")
        torch.load(tmp_path / "plain.pt", weights_only=True)
    expected = (random.random(), float(np.random.random()), torch.rand(1).item())
    ckpt.save_checkpoint(str(tmp_path / "ckpt"), 2, model_state, rank_state)

    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    it, model, rank = ckpt.load_checkpoint(str(tmp_path / "ckpt"))
    assert it == 2 and torch.equal(model["models"]["m"]["w"], torch.ones(3))
    assert model["train_state"]["best_score"] == 0.25 and rank["sampler"]["consumed_samples"] == 8
    ckpt.set_rng_state(rank["rng"])
    assert (random.random(), float(np.random.random()), torch.rand(1).item()) == expected


def test_checkpoint_with_a_payload_and_a_consistent_manifest_is_refused(tmp_path, marker):
    from megatron.emdr2.training import checkpointing as ckpt

    root = _write_checkpoint(tmp_path / "ckpt", RunsShell(marker))
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_checkpoint(str(root))
    assert str(e.value).startswith(f"{ckpt.iteration_dir(str(root), 1)}/mp_rank_00.pt: refused:")


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(files={}), "an empty or malformed 'files' entry"),
    (lambda m: m.pop("files"), "no 'files' entry"),
    (lambda m: m["files"].pop("rank_00000.pt"), "rank_00000.pt: not listed in manifest.json"),
    (lambda m: m["files"].update({"../x.pt": {"bytes": 1, "sha256": "0"}}), "malformed entry for '../x.pt'"),
])
def test_manifests_that_verify_nothing_are_refused(tmp_path, edit, message):
    from megatron.emdr2.openqa import builders
    from megatron.emdr2.training import checkpointing as ckpt

    root = str(tmp_path / "ckpt")
    ckpt.save_checkpoint(root, 1, {"iteration": 1, "models": {"biencoder": {"w": torch.ones(1)}}},
                         {"sampler": {"consumed_samples": 0}})
    mpath = Path(ckpt.iteration_dir(root, 1)) / ckpt.MANIFEST
    manifest = json.loads(mpath.read_text())
    edit(manifest)
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match=message.replace("(", r"\(").replace(".", r"\.")):
        ckpt.load_checkpoint(root)
    with pytest.raises(builders.PretrainedError, match=r"manifest|not listed"):
        builders.load_model_state(root, "biencoder")


# ------------------------------------------------------------------ every entry point

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    evidence = small_evidence(d, rows=40)
    dev = d / "dev.tsv"
    dev.write_text("".join((NQ_MINI / "dev.tsv").read_text().splitlines(keepends=True)[:4]))
    train = d / "train.jsonl"  # questions whose gold passage is in the slice (DPR needs positives)
    lines = [l for l in (NQ_MINI / "train.jsonl").read_text().splitlines() if json.loads(l)["gold_passage_id"] <= 40]
    train.write_text("\n".join(lines[:8]) + "\n")
    return {"evidence": evidence, "dev": dev, "train": train, "dir": d}


TINY_RETRIEVER = ["--retriever-num-layers", "1", "--retriever-hidden-size", "32",
                  "--retriever-num-attention-heads", "2", "--retriever-seq-length", "64", "--query-max-len", "16",
                  "--context-max-len", "48", "--no-progress-bar", "--log-interval", "1000"]


def test_every_entry_point_refuses_a_checkpoint_that_runs_code(tmp_path, marker, data, fresh_port, capsys):
    from tasks.openqa import dpr, evaluate
    from tools import answer, build_index

    evil_dir = str(_write_checkpoint(tmp_path / "evil", RunsShell(marker)))
    iter_file = f"{evil_dir}/iter_0000001/mp_rank_00.pt"
    evil_pt = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {"num_layers": 1}, "x": RunsShell(marker)}, evil_pt)
    no_manifest = str(_write_checkpoint(tmp_path / "no_manifest", RunsShell(marker), manifest=False))
    common = ["--evidence", str(data["evidence"])]

    cases = [
        (build_index.main, ["--checkpoint", str(evil_pt), *common, "--output", str(tmp_path / "i1")], str(evil_pt)),
        (build_index.main, ["--checkpoint", evil_dir, *common, "--output", str(tmp_path / "i2")], iter_file),
        (evaluate.main, ["--load", evil_dir, *common, "--qa-file", str(data["dev"]),
                         "--index-dir", str(tmp_path / "i3")], iter_file),
        # the payload used to run here before the "no manifest" error
        (evaluate.main, ["--load", no_manifest, *common, "--qa-file", str(data["dev"]),
                         "--index-dir", str(tmp_path / "i4")], "no manifest.json"),
        (answer.main, ["--load", evil_dir, *common, "--question", "who", "--index-dir", str(tmp_path / "i5")],
         iter_file),
        (answer.main, ["--load", no_manifest, *common, "--question", "who", "--index-dir", str(tmp_path / "i6")],
         "no manifest.json"),
        (dpr.main, [*TINY_RETRIEVER, *common, "--dev-data", str(data["dev"]), "--train-data", str(data["train"]),
                    "--retriever-load", evil_dir, "--train-iters", "2", "--global-batch-size", "2"], iter_file),
    ]
    for main, argv, where in cases:
        rc, err = _call(main, argv, capsys)
        assert rc == 2, (main.__module__, argv, err[-2000:])
        last = _one_line_error(err, where)
        assert "refused" in last or "no manifest.json" in last, last
    assert not any((tmp_path / f"i{k}").exists() for k in range(1, 7)), "an output was created"


def test_dpr_resume_refuses_a_checkpoint_that_runs_code(tmp_path, marker, data, fresh_port, capsys):
    from tasks.openqa import dpr

    evil_dir = str(_write_checkpoint(tmp_path / "evil", RunsShell(marker)))
    rc, err = _call(dpr.main, [*TINY_RETRIEVER, "--evidence", str(data["evidence"]), "--dev-data", str(data["dev"]),
                               "--train-data", str(data["train"]), "--load", evil_dir, "--train-iters", "2",
                               "--global-batch-size", "2"], capsys)
    assert rc == 2, err[-2000:]
    _one_line_error(err, f"{evil_dir}/iter_0000001/mp_rank_00.pt: refused")


def test_evaluate_as_a_command_refuses_before_the_manifest_check(tmp_path, marker, data):
    """A real process: exit code 2, one line on stderr, no traceback, nothing ran."""
    no_manifest = _write_checkpoint(tmp_path / "ckpt", OpensFile(marker), manifest=False)
    proc = subprocess.run([sys.executable, "-m", "tasks.openqa.evaluate", "--load", str(no_manifest),
                           "--evidence", str(data["evidence"]), "--qa-file", str(data["dev"]),
                           "--index-dir", str(tmp_path / "index")],
                          cwd=ROOT, env=env(1), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0, proc.stderr[-2000:]
    assert "no manifest.json" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ other findings of the issue

def test_index_latest_cannot_point_outside_the_index_root(tmp_path):
    from megatron.emdr2.index import shard_store

    outside = tmp_path / "elsewhere"
    shard_store.write_index(outside / "step-00000001", np.ones((2, 4), np.float16), np.arange(2))
    root = tmp_path / "a" / "index"
    root.mkdir(parents=True)
    (root / "LATEST").write_text("../../elsewhere/step-00000001\n")
    assert (root / "../../elsewhere/step-00000001/manifest.json").exists()  # it would be followed
    with pytest.raises(shard_store.IndexStoreError, match=r"LATEST: names '\.\./\.\./elsewhere"):
        shard_store.resolve(root)
    (root / "LATEST").write_text("..\n")
    with pytest.raises(shard_store.IndexStoreError, match="not a version directory inside"):
        shard_store.read_manifest(root)


def test_index_manifest_cannot_name_shard_files_outside_its_directory(tmp_path):
    from megatron.emdr2.index import shard_store

    version = tmp_path / "index" / "step-00000001"
    shard_store.write_index(version, np.ones((2, 4), np.float16), np.arange(2))
    m = json.loads((version / "manifest.json").read_text())
    m["shards"][0]["ids_file"] = "../../secret.ids"
    (version / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(shard_store.IndexStoreError, match="is not a file name inside"):
        shard_store.read_manifest(version)


def test_negative_model_step_and_header_only_evidence_are_refused(tmp_path, data, fresh_port, capsys):
    from megatron.emdr2.data.errors import DataError
    from megatron.emdr2.data.evidence import load_evidence
    from megatron.emdr2.index import shard_store
    from tools import build_index

    with pytest.raises(ValueError, match="model step must be >= 0"):
        shard_store.version_name(-1)
    header_only = tmp_path / "header.tsv"
    header_only.write_text("id\ttext\ttitle\n")
    with pytest.raises(DataError, match="no passages"):
        load_evidence(header_only)

    cfg = build_index.RetrieverConfig(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64,
                                      max_sequence_length=64)
    from megatron.emdr2 import initialize
    from megatron.emdr2.models.biencoder import BiEncoder

    initialize.initialize(1, 1, seed=0)
    try:
        torch.save({"model": BiEncoder(build_index._tower(cfg)).state_dict(), "config": vars(cfg)},
                   tmp_path / "retriever.pt")
    finally:
        initialize.shutdown()
    base = ["--checkpoint", str(tmp_path / "retriever.pt"), "--no-progress-bar"]
    rc, err = _call(build_index.main, [*base, "--evidence", str(data["evidence"]), "--output",
                                       str(tmp_path / "neg"), "--model-step", "-1"], capsys)
    assert rc == 2 and not (tmp_path / "neg").exists()
    assert err.count("\n") == 1 and _one_line_error(err, "--model-step must be >= 0")
    rc, err = _call(build_index.main, [*base, "--evidence", str(header_only), "--output",
                                       str(tmp_path / "empty")], capsys)
    assert rc == 2, err[-2000:]
    _one_line_error(err, f"{header_only}: no passages")
    assert not (tmp_path / "empty").exists()
