"""bf16 autocast on CPUs (``--autocast``): fp32 weights and optimizer, bf16 matrix multiplies.

``--autocast auto`` (the default) picks bf16 only where this CPU multiplies bf16 natively and
fast, and fp32 elsewhere: CPUs with AMX or AVX512-BF16 multiply bf16 matrices several times
faster than fp32, but a CPU without them (AVX2 only: most laptops) has torch emulate bf16,
tens of times *slower* than fp32. ``resolve_autocast`` decides from the CPU's instruction set
and a short measured probe (``probe_cpu_bf16``), and says what it chose and why.

Why the wrapper below: ``torch.autocast("cpu")`` gets that speed
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
import dataclasses
import functools
import os
import sys
import time

import torch

AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16}
AUTOCAST_CHOICES = ("auto", *AUTOCAST_DTYPES)
# auto takes bf16 only if the probe's bf16 product is at least this much faster than fp32:
# native bf16 measures ~0.2x fp32's time, emulated bf16 ~40x, so noise cannot flip the choice.
NATIVE_BF16_MAX_RATIO = 0.8
_INSTALLED = False
_WARNED = False


@dataclasses.dataclass(frozen=True)
class Bf16Probe:
    """One measured bf16 vs fp32 matrix product on this CPU (best of a few repeats)."""

    instructions: bool  # the CPU reports AVX512-BF16 or AMX-BF16
    fp32_ms: float
    bf16_ms: float

    @property
    def ratio(self) -> float:
        """bf16 time / fp32 time: < 1 where bf16 is faster."""
        return self.bf16_ms / self.fp32_ms

    @property
    def native(self) -> bool:
        return self.instructions and self.ratio <= NATIVE_BF16_MAX_RATIO

    def describe(self) -> str:
        speed = (f"{1 / self.ratio:.1f}x faster" if self.ratio < 1 else f"{self.ratio:.0f}x slower")
        return (f"a 256x384x1536 bf16 product took {self.bf16_ms:.1f} ms against {self.fp32_ms:.1f} ms "
                f"in fp32 ({speed}; CPU capability {torch.backends.cpu.get_cpu_capability()}, "
                f"{torch.get_num_threads()} threads)")


def cpu_bf16_instructions() -> bool:
    """Whether the CPU reports bf16 matrix instructions (AVX512-BF16 or AMX). The probe still
    decides: ``ONEDNN_MAX_CPU_ISA`` or a VM can hide them from the kernels."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    checks = [c for c in checks if c is not None]
    if not checks:  # an older torch without these queries: let the measurement decide
        return True
    return any(c() for c in checks)


def _best_ms(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - start) * 1e3)
    return best


@functools.lru_cache(maxsize=None)
def probe_cpu_bf16() -> Bf16Probe:
    """Time one bf16 and one fp32 product of the shape of a small model's MLP (~0.5 s at most
    where bf16 is emulated; once per process)."""
    instructions = cpu_bf16_instructions()
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(256, 384, generator=gen)
    b = torch.randn(384, 1536, generator=gen)
    a16, b16 = a.bfloat16(), b.bfloat16()
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        _best_ms(lambda: a @ b, 1)  # warm-up
        fp32_ms = _best_ms(lambda: a @ b, 5)
        first = _best_ms(lambda: a16 @ b16, 1)
        # Emulated bf16 is obvious from the first (warm-up) product: skip the repeats.
        bf16_ms = first if first > 4 * fp32_ms else _best_ms(lambda: a16 @ b16, 5)
    return Bf16Probe(instructions, fp32_ms, bf16_ms)


def _say(message: str, stream=None) -> None:
    """One line from the first rank (every rank decides alike: see NATIVE_BF16_MAX_RATIO); the
    decision goes to stdout with the run's log, a warning to stderr."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=stream or sys.stdout, flush=True)


def resolve_autocast(requested: str, device: torch.device | str | None = None,
                     precision: str = "fp32", quiet: bool = False) -> str:
    """The autocast a run uses ("none" or "bf16") for ``--autocast requested``.

    auto: "none" on GPUs (their recipe is ``--bf16``/``--fp16``) and under a half precision;
    on a CPU, "bf16" only where ``probe_cpu_bf16`` finds native, faster bf16. An explicit
    ``bf16`` on a CPU that emulates it is kept, with a warning that gives the measured slowdown.
    """
    if requested not in AUTOCAST_CHOICES:
        raise ValueError(f"--autocast {requested!r} is not one of {', '.join(AUTOCAST_CHOICES)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cpu = torch.device(device).type == "cpu"
    global _DECISION
    if requested == "bf16":
        if on_cpu and not probe_cpu_bf16().native:
            global _WARNED
            if not _WARNED:
                _DECISION = (f"warning: --autocast bf16 on a CPU without fast native bf16: "
                             f"{probe_cpu_bf16().describe()}; --autocast auto (or none) runs fp32 here", sys.stderr)
                if not quiet:
                    announce()
            _WARNED = True
        return "bf16"
    if requested == "none":
        return "none"
    if precision != "fp32":
        choice, why = "none", f"--{precision} sets the precision"
    elif not on_cpu:
        choice, why = "none", "on GPUs the mixed-precision recipe is --bf16 or --fp16"
    elif not cpu_bf16_instructions():
        choice, why = "none", (f"this CPU has no AVX512-BF16 or AMX (capability "
                               f"{torch.backends.cpu.get_cpu_capability()}): torch would emulate bf16")
    else:
        probe = probe_cpu_bf16()
        choice, why = ("bf16" if probe.native else "none"), probe.describe()
    _DECISION = (f"autocast auto: {'bf16' if choice == 'bf16' else 'fp32'} ({why})", None)  # stdout when said
    if not quiet:
        announce()
    return choice


_DECISION: tuple | None = None  # (line, stream): the last decision or warning, for ``announce``


def announce() -> None:
    """Print the last ``auto`` decision and its reason (once). Entry points call it after their
    flags are validated, so a refused command prints only its one-line error."""
    global _DECISION
    if _DECISION is not None:
        _say(*_DECISION)
        _DECISION = None


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
