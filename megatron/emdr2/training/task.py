"""What a task hands the shared training loop."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol, Sequence

import torch


class Task(Protocol):
    """A training task (ICT, DPR, MSS, EMDR², ...) is a dataset, a forward step and a loss.

    Required:
      build_models()            -> {name: MegatronModule}, fp32 (on the CPU, or already on the
                                    GPU where the task needs them there early); the loop casts,
                                    moves to the GPU and wraps them.
      num_train_samples()       -> size of the training set (the sampler draws indices from it).
      make_batch(indices)       -> one micro-batch from dataset indices (this rank's share), built
                                    on the CPU.
      forward_step(models, batch) -> (loss, metrics): loss is a scalar averaged over the
                                    micro-batch; metrics maps names to scalar tensors/floats to log.
                                    It moves the batch to its models' device itself (a batch may
                                    hold strings and index ids that stay on the host).
    Optional:
      evaluate(models, iteration) -> {metric: float}; a 'score' key drives best-checkpoint selection.
      on_train_start(models, iteration) -> None, once the weights are final (after a resume or a
                          fine-tuning load), before the first step (e.g. check the index).
      on_step_end(models, iteration) -> None, after each optimizer step (e.g. index refresh).
      on_train_end(models, iteration) -> {name: metrics} or None, after the last step and the
                          final save, on the final model in eval mode (e.g. test files); logged.
      state_dict() / load_state_dict(state) -> task state to checkpoint (e.g. index version).
      close() -> None, at the end of training.
      lr_multipliers() -> {model name: factor}: that model's parameters follow the schedule
                          scaled by the factor (e.g. a gentler retriever than reader).
    """

    def build_models(self) -> Mapping[str, torch.nn.Module]: ...

    def num_train_samples(self) -> int: ...

    def make_batch(self, indices: Sequence[int]) -> Any: ...

    def forward_step(self, models: Mapping[str, torch.nn.Module], batch: Any
                     ) -> tuple[torch.Tensor, Mapping[str, Any]]: ...


def optional(task: Any, name: str) -> Optional[Any]:
    return getattr(task, name, None)
