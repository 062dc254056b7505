"""Deterministic, data-parallel-sharded, resumable batch sampler (Megatron style).

Each epoch is a permutation of 0..N-1 drawn from (seed, epoch) alone, cut into global batches
of `global_batch_size`. A global batch is consumed in micro-steps of `micro_batch_size * dp_size`
samples; in each micro-step rank r takes the r-th slice of `micro_batch_size` indices. So the
samples that make up a global batch do not depend on dp_size or on when the run was resumed:
resuming (even on another number of ranks, with the same global batch size) continues exactly
where the interrupted run stopped.

State: `consumed_samples` counts samples handed out by all ranks together, the way Megatron's
training loop counts them. `state_dict()` reflects what this sampler has yielded; if a DataLoader
prefetches, save the training loop's own count via `state_dict(consumed_samples=...)`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class ResumableDistributedSampler:
    def __init__(self, num_samples: int, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 1234, shuffle: bool = True, micro_batch_size: int | None = None,
                 drop_last: bool = True, consumed_samples: int = 0, num_epochs: int | None = None):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside 0..{dp_size - 1}")
        micro_batch_size = micro_batch_size or global_batch_size // dp_size
        if micro_batch_size <= 0 or global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                             f"micro_batch_size x dp_size = {micro_batch_size} x {dp_size}")
        if drop_last and num_samples < global_batch_size:
            raise ValueError(f"{num_samples} samples cannot fill one global batch of {global_batch_size}")
        self.num_samples, self.global_batch_size = num_samples, global_batch_size
        self.dp_rank, self.dp_size, self.micro_batch_size = dp_rank, dp_size, micro_batch_size
        self.seed, self.shuffle, self.drop_last, self.num_epochs = seed, shuffle, drop_last, num_epochs
        self.consumed_samples = consumed_samples

    # ------------------------------------------------------------------ layout
    @property
    def samples_per_epoch(self) -> int:
        if self.drop_last:
            return self.num_samples // self.global_batch_size * self.global_batch_size
        return self.num_samples

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.samples_per_epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        rng = np.random.default_rng([self.seed, epoch])  # depends on (seed, epoch) only
        return rng.permutation(self.num_samples).astype(np.int64)

    def __len__(self) -> int:
        """Micro-batches this rank yields per epoch."""
        step = self.micro_batch_size * self.dp_size
        full = self.samples_per_epoch // step
        rest = self.samples_per_epoch - full * step
        return full + (1 if rest > self.dp_rank else 0)  # array_split of the last partial step

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.dp_size
        lo = self.dp_rank * self.micro_batch_size
        per_epoch = self.samples_per_epoch
        while self.num_epochs is None or self.epoch < self.num_epochs:
            epoch, offset = divmod(self.consumed_samples, per_epoch)
            order = self.epoch_order(epoch)[:per_epoch]
            while offset < per_epoch:
                chunk = order[offset: offset + step]
                if len(chunk) < step:  # last partial step (drop_last=False): split evenly
                    mine = np.array_split(chunk, self.dp_size)[self.dp_rank]
                else:
                    mine = chunk[lo: lo + self.micro_batch_size]
                offset += len(chunk)
                self.consumed_samples = epoch * per_epoch + offset
                if len(mine):
                    yield mine.tolist()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self, consumed_samples: int | None = None) -> dict:
        return {"consumed_samples": self.consumed_samples if consumed_samples is None else consumed_samples,
                "epoch": self.epoch if consumed_samples is None else consumed_samples // self.samples_per_epoch,
                "seed": self.seed, "num_samples": self.num_samples,
                "global_batch_size": self.global_batch_size, "shuffle": self.shuffle,
                "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_samples", "global_batch_size", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has "
                                 f"{getattr(self, key)!r}: resuming would replay different samples")
        self.consumed_samples = int(state["consumed_samples"])
