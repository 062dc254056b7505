"""Process start-up: torch.distributed from torchrun/SLURM, megatron-core parallel state, seeds."""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

from megatron.emdr2 import cpu_compat


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, read from torchrun or SLURM variables."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _first_slurm_host() -> str | None:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return None
    # "node[03-05,07]" -> "node03"; "a,b" -> "a"
    head = nodelist.split(",")[0]
    if "[" in nodelist:
        prefix, rest = nodelist.split("[", 1)
        first = rest.split(",")[0].split("-")[0].rstrip("]")
        head = prefix + first
    return head


def read_launch_env(default_port: int = 29500) -> LaunchEnv:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; `srun` sets SLURM_PROCID/NTASKS/LOCALID."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    addr = env.get("MASTER_ADDR") or _first_slurm_host() or "127.0.0.1"
    if "MASTER_PORT" in env:
        port = int(env["MASTER_PORT"])
    elif world == 1:
        port = free_port()  # a lone process must not collide with other jobs on this machine
    else:
        port = default_port
    return LaunchEnv(rank, world, local, addr, port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None, timeout_minutes: float = 30.0) -> LaunchEnv:
    """Initialise torch.distributed (NCCL with GPUs, gloo otherwise); idempotent."""
    launch = read_launch_env()
    cpu_compat.apply()
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    if not torch.distributed.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        torch.distributed.init_process_group(
            backend=backend,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    return launch


def init_model_parallel(tensor_parallel: int = 1, pipeline_parallel: int = 1) -> None:
    """megatron-core process groups; data-parallel size is whatever the world leaves."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
    )


def set_seed(seed: int, data_parallel_offset: bool = False) -> None:
    """Seed Python, numpy, torch and megatron-core's tensor-parallel RNG tracker.

    With ``data_parallel_offset`` each data-parallel rank gets its own stream (for
    data-side randomness); model-side randomness must stay equal across DP ranks, which
    megatron's tracker guarantees by seeding on the tensor-parallel rank only.
    """
    from megatron.core import parallel_state, tensor_parallel

    base = seed
    if data_parallel_offset and parallel_state.model_parallel_is_initialized():
        base += 100 * parallel_state.get_data_parallel_rank()
    random.seed(base)
    np.random.seed(base % (2**32))
    torch.manual_seed(base)
    if parallel_state.model_parallel_is_initialized():
        tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def initialize(tensor_parallel: int = 1, pipeline_parallel: int = 1, seed: int = 1234,
               backend: str | None = None) -> LaunchEnv:
    """Everything a process needs before it builds a model."""
    launch = init_distributed(backend)
    init_model_parallel(tensor_parallel, pipeline_parallel)
    set_seed(seed)
    return launch


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def device() -> torch.device:
    """The device this rank computes on."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
