"""bf16 autocast on CPUs (``--autocast bf16``): fp32 weights and optimizer, bf16 matrix multiplies.

CPUs with AMX or AVX512-BF16 multiply bf16 matrices several times faster than fp32 (5.4x for a
4096x384x1536 product on this project's 2-core Xeon). ``torch.autocast("cpu")`` gets that speed
for torch's own ops, but megatron-core's tensor-parallel linear layers run a custom autograd
function whose ``custom_fwd/custom_bwd`` decorators only restore the *CUDA* autocast state: on a
CPU their backward multiplies a bf16 gradient by an fp32 weight and fails. ``autocast`` below
installs (once) a wrapper that, while CPU autocast is on, casts the layer's input, weight and
bias to the autocast dtype before megatron's function and runs it with autocast off, so both
passes see one dtype; the casts are differentiable, so fp32 weights receive fp32 gradients.
Nothing changes when CPU autocast is off, and nothing changes on GPUs (CUDA autocast already
works there; ``--bf16`` with fp32 master weights is the GPU recipe).
"""

from __future__ import annotations

import contextlib
import functools

import torch

AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16}
_INSTALLED = False


def _cpu_autocast_dtype(tensor: torch.Tensor):
    if tensor.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return None


def _one_dtype(linear):
    @functools.wraps(linear)
    def wrapped(input, weight, bias, *args, **kwargs):
        dtype = _cpu_autocast_dtype(input)
        if dtype is None:
            return linear(input, weight, bias, *args, **kwargs)
        with torch.autocast("cpu", enabled=False):
            return linear(input.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                          *args, **kwargs)

    return wrapped


def install() -> None:
    """Make megatron-core's linear layers autocast-safe on CPU (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from megatron.core.tensor_parallel import layers

    for name in ("linear_with_grad_accumulation_and_async_allreduce", "linear_with_frozen_weight"):
        setattr(layers, name, _one_dtype(getattr(layers, name)))
    _INSTALLED = True


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """``torch.autocast(device, dtype)``, or a no-op context for dtype None / fp32.

    The weight-cast cache is off: autocast keeps its low-precision copies of the weights until
    the outermost autocast region exits, and the training loop runs many optimizer steps inside
    one region, so with the cache on, later forward passes would keep using the weights of the
    first step (the optimizer updates the fp32 weights that the forward never reads again).
    """
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    device = torch.device(device)
    if device.type == "cpu":
        install()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)
