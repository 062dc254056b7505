"""Run a function on N gloo ranks in fresh processes and collect what each returns.

Spawning costs one megatron-core import per rank, so tests group several checks into one
spawned function instead of spawning per assertion.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback

import torch.multiprocessing as mp


def _entry(rank, world_size, port, fn, args, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    try:
        result = fn(rank, world_size, *args)
        payload = ("ok", result)
    except BaseException:  # report every failure, with the rank's traceback
        payload = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(payload, f)


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0):
    """Return [result of fn(rank, world_size, *args) for each rank]; raise on any rank's error.

    ``fn`` must be importable (a module-level function of a test module).
    """
    from megatron.emdr2.initialize import free_port

    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, out_dir))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
                raise TimeoutError(f"rank process {p.pid} did not finish in {timeout}s")
        results = []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} died without a result (exit code {procs[r].exitcode})")
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                raise RuntimeError(f"rank {r} failed:\n{value}")
            results.append(value)
        return results
