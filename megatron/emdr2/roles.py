"""Split one launched job into trainer ranks and indexer ranks, each with its own world.

The first ``world - num_indexers`` global ranks train, the rest re-embed the evidence. Each
role gets its own torch.distributed default process group, rendezvoused through the job's
store under a role prefix. Why separate worlds rather than sub-groups of one: megatron-core's
parallel state is built over the default group, so trainers need a default group of their
own; and no collective ever spans both roles, so a crashed or slow indexer can never block a
trainer (the roles talk only through files: see ``openqa/index_refresh.py``).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron.emdr2.initialize import LaunchEnv

TRAINER = "trainer"
INDEXER = "indexer"


@dataclass(frozen=True)
class Role:
    name: str          # "trainer" | "indexer"
    rank: int          # rank within the role's world
    world_size: int    # number of ranks in the role
    global_rank: int
    global_world_size: int

    @property
    def is_trainer(self) -> bool:
        return self.name == TRAINER


def assign_role(launch: LaunchEnv, num_indexers: int) -> Role:
    if num_indexers < 0 or num_indexers >= launch.world_size:
        raise ValueError(f"--num-indexer-ranks {num_indexers} must leave at least one trainer "
                         f"among {launch.world_size} ranks")
    trainers = launch.world_size - num_indexers
    if launch.rank < trainers:
        return Role(TRAINER, launch.rank, trainers, launch.rank, launch.world_size)
    return Role(INDEXER, launch.rank - trainers, num_indexers, launch.rank, launch.world_size)


def _job_store(launch: LaunchEnv, timeout: timedelta):
    # Under torchrun the agent already hosts the store on MASTER_PORT; elsewhere (srun, plain
    # processes) global rank 0 hosts it.
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size,
                         is_master=(launch.rank == 0 and not agent_hosts), timeout=timeout,
                         wait_for_workers=False)


def _launch_id(store, launch: LaunchEnv) -> str:
    """One id per launch, the same on every rank of both roles: global rank 0 draws it and the
    others read it from the job's store (which lives as long as this launch). The roles stamp
    their exchange files with it, so that a relaunch (the same command with --load) ignores the
    STOP and heartbeat its previous launch left behind. A torchrun restart is a new launch."""
    key = f"emdr2-launch-id-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if launch.rank == 0:
        store.set(key, uuid.uuid4().hex)
    return store.get(key).decode()


def init_role_process_group(launch: LaunchEnv, role: Role, backend: str | None = None,
                            timeout_minutes: float = 30.0) -> str | None:
    """Make the role's world the default process group of this process; returns this launch's
    id (``_launch_id``), None if a process group existed already."""
    from megatron.emdr2 import cpu_compat

    cpu_compat.apply()
    if dist.is_initialized():
        return None
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    timeout = timedelta(minutes=timeout_minutes)
    job_store = _job_store(launch, timeout)
    launch_id = _launch_id(job_store, launch)
    store = dist.PrefixStore(f"emdr2-{role.name}", job_store)
    dist.init_process_group(backend, store=store, rank=role.rank, world_size=role.world_size,
                            timeout=timeout)
    return launch_id
