"""The paper's launch scripts on the topologies users launch them with (issue 33), resolved in the
shell as they would run (EMDR2_DRY_RUN prints the python command) and parsed by the real entry
points: defaults follow the ranks actually launched, an impossible topology is refused in one
line before anything loads, and the scripts agree with each other."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NODE_8 = {"GPUS_PER_NODE": "8"}                                          # torchrun on an 8-GPU node
CPU = {"GPUS_PER_NODE": "0"}                                              # a laptop
SLURM_2x8 = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_GPUS_ON_NODE": "8"}  # examples/slurm/*.sbatch
_CLEAR = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_JOB_NUM_NODES", "SLURM_NNODES", "SLURM_TASKS_PER_NODE",
          "SLURM_NTASKS_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "GPUS_PER_NODE", "NPROC_PER_NODE",
          "INDEXERS", "READER_INIT", "RETRIEVER_INIT", "SAVE", "WORLD", "EMDR2_NO_SLURM", "EMDR2_DRY_RUN")


def _run(script, env=None, *args, dry=True, path=None):
    e = {k: v for k, v in os.environ.items() if k not in _CLEAR}
    e.update(env or {})
    if dry:
        e["EMDR2_DRY_RUN"] = "1"
    if path:
        e["PATH"] = f"{path}{os.pathsep}{e['PATH']}"
    return subprocess.run(["bash", f"examples/{script}", *args], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=60)


def _argv(res) -> list[str]:
    assert res.returncode == 0, res.stderr
    argv = shlex.split(res.stdout.strip().splitlines()[-1])
    assert argv[:2] == ["python", "-m"]
    return argv


def _parse(argv):
    import importlib

    return importlib.import_module(argv[2]).build_parser().parse_args(argv[3:])


@pytest.mark.parametrize("script", ["emdr2_nq.sh", "mss_pretrain.sh"])
@pytest.mark.parametrize("topology,world,indexers", [(CPU, 1, 0), (NODE_8, 8, 4), ({**NODE_8, "NPROC_PER_NODE": "4"}, 4, 2),
                                                      (SLURM_2x8, 16, 8)], ids=["cpu", "node8", "node8-nproc4", "slurm2x8"])
def test_indexer_default_follows_the_launched_ranks(script, topology, world, indexers):
    from megatron.emdr2.arguments import training_config_from_args, validate
    from megatron.emdr2.initialize import LaunchEnv
    from megatron.emdr2.roles import assign_role
    from tasks.openqa import common

    res = _run(script, topology)
    args = _parse(_argv(res))
    assert args.num_indexer_ranks == indexers, res.stderr
    assert f"launch: {world} ranks launched" in res.stderr
    # What the entry point then does with them: every role assigned, the trainers' config valid.
    if indexers:
        assert assign_role(LaunchEnv(world - 1, world, 0, "127.0.0.1", 29500), indexers).name == "indexer"
    validate(training_config_from_args(args), common.training_world(args, world))


@pytest.mark.parametrize("env,args,message", [
    ({**NODE_8, "NPROC_PER_NODE": "16"}, [], "16 processes per node would share its 8 GPUs"),  # the old header
    ({**NODE_8, "INDEXERS": "8"}, [], "--num-indexer-ranks 8 leaves no rank to train"),        # the old default
    (CPU, ["--num-indexer-ranks", "1"], "--num-indexer-ranks 1 leaves no rank to train"),      # a flag wins
    (NODE_8, ["--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size 3 does not divide the 4 training"),
    ({**NODE_8, "NPROC_PER_NODE": "6"}, [], "--global-batch-size 64 is not a multiple of --micro-batch-size 1 x 3"),
], ids=["two-per-gpu", "all-indexers", "flag", "tp", "batch"])
def test_an_impossible_topology_is_refused_before_anything_loads(tmp_path, env, args, message):
    # Stand-ins for the launchers: any of them running means something was loaded.
    for tool in ("python", "torchrun", "srun"):
        (tmp_path / tool).write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {tmp_path}/ran\n")
        (tmp_path / tool).chmod(0o755)
    res = _run("emdr2_nq.sh", env, *args, dry=False, path=tmp_path)
    assert res.returncode == 2 and not (tmp_path / "ran").exists(), (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch: error: ") and message in lines[0], res.stderr
    # The same script on a topology that works reaches torchrun, with the count it checked.
    res = _run("emdr2_nq.sh", NODE_8, dry=False, path=tmp_path)
    assert res.returncode == 0, res.stderr
    ran = (tmp_path / "ran").read_text().split()
    assert ran[:3] == ["torchrun", "--nproc_per_node", "8"] and "--num-indexer-ranks" in ran


def test_scripts_agree_with_each_other():
    # MSS starts from the checkpoint ICT saves.
    ict = _parse(_argv(_run("ict_pretrain.sh", NODE_8)))
    mss = _parse(_argv(_run("mss_pretrain.sh", NODE_8)))
    assert mss.retriever_load == ict.save == "checkpoints/ict-base"
    # READER_INIT set empty: a randomly initialised reader, as its comment says; unset: T5.
    assert mss.reader_load == "checkpoints/t5-base.pt"
    random_reader = _parse(_argv(_run("mss_pretrain.sh", {**NODE_8, "READER_INIT": ""})))
    assert random_reader.reader_load is None
    # SLURM opens --output before the script runs: it must not name a folder nobody creates.
    for sbatch in sorted((ROOT / "examples" / "slurm").glob("*.sbatch")):
        outputs = re.findall(r"^#SBATCH --output=(\S+)", sbatch.read_text(), re.M)
        assert outputs and all(os.path.dirname(o) == "" for o in outputs), (sbatch.name, outputs)


@pytest.mark.parametrize("topology,world", [(NODE_8, 8), (SLURM_2x8, 16)], ids=["node8", "slurm2x8"])
def test_ict_fits_a_gpu_with_every_in_batch_negative(topology, world):
    """512 contexts x 256 tokens per GPU needs ~75 GB of BERT-base activations; full recompute
    keeps the layer inputs only, and the micro-batches still span the global batch of 4096."""
    from megatron.emdr2.arguments import model_size_from_args

    args = _parse(_argv(_run("ict_pretrain.sh", topology)))
    assert args.micro_batch_size * world == args.global_batch_size == 4096  # no accumulation
    size = model_size_from_args(args, "retriever")
    assert size.recompute_granularity == "full" and size.recompute_method == "uniform"
    dpr = _parse(_argv(_run("dpr_nq.sh", topology)))
    assert dpr.micro_batch_size * world == dpr.global_batch_size
