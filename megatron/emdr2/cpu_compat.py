"""Let megatron-core's models, DDP and mixed-precision optimizer run where CUDA is absent.

megatron-core assumes a GPU in a handful of places: it allocates helper tensors with
``device='cuda'`` or ``torch.cuda.current_device()``, keeps dropout RNG states on the CUDA
generator, and checks ``param.type() == 'torch.cuda.FloatTensor'`` in its optimizer wrappers.
On a machine without CUDA every one of those calls would raise, so redirecting them to the
CPU changes nothing that could otherwise work. ``apply()`` is a no-op when CUDA is available,
so GPU runs use megatron-core exactly as shipped.

All patches live here, in one place, and are applied once per process.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys

import torch

_APPLIED = False

# Factory functions that megatron-core calls with device='cuda'.
_FACTORIES = (
    "tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor",
)

# Optimizer methods that compare ``param.type()`` with CUDA type names.
_TYPE_CHECKING_METHODS = (
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", "__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "_build_model_and_main_param_groups"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "_get_main_param_and_optimizer_states"),
    ("megatron.core.optimizer.clip_grads", None, "clip_grad_by_total_norm_fp32"),
)


def cuda_absent() -> bool:
    return not torch.cuda.is_available()


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True  # a bare ordinal means a CUDA device in torch's API
    return torch.device(device).type == "cuda"


def _redirect_device(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return wrapper


def _tensor_cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    return self


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _cuda_type_names():
    """Within this block, ``tensor.type()`` reports CPU tensors under their CUDA names."""
    original = torch.Tensor.type

    def patched(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            return _CUDA_TYPE_NAMES.get(name, name)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = patched
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    return wrapper


def _patch_rng_tracker():
    """Keep megatron's named RNG states (tensor-parallel dropout) on the CPU generator."""
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(*args, clone=False, **kwargs):
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def set_state(new_state, *args, **kwargs):
        torch.set_rng_state(new_state)

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """The CUDA tracker's bookkeeping, forking the CPU generator instead."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            original = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            # Same as the parent minus its "CPU RNG state changed" warning, which
            # would fire on every dropout call because the forked generator *is* the CPU one.
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            original = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(original)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom.initialize_rng_tracker(force_reset=True)


def _block_apex():
    """megatron-core probes ``import apex``. Without CUDA, NVIDIA's apex has nothing to offer,
    and PyPI's unrelated 'apex' package must never be picked up: make the import fail."""
    if "apex" not in sys.modules:
        sys.modules["apex"] = None  # `import apex` now raises ImportError


def apply() -> bool:
    """Install the CPU redirects if CUDA is absent. Returns True when they are active."""
    global _APPLIED
    if _APPLIED:
        return True
    if not cuda_absent():
        return False
    _block_apex()

    for name in _FACTORIES:
        setattr(torch, name, _redirect_device(getattr(torch, name)))
    torch.Tensor.cuda = _tensor_cuda
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None

    import importlib

    for module_name, class_name, method in _TYPE_CHECKING_METHODS:
        module = importlib.import_module(module_name)
        owner = getattr(module, class_name) if class_name else module
        if hasattr(owner, method):
            static = inspect.getattr_static(owner, method)
            if isinstance(static, classmethod):  # e.g. DistributedOptimizer's group builder
                setattr(owner, method, classmethod(_with_cuda_type_names(static.__func__)))
            else:
                setattr(owner, method, _with_cuda_type_names(getattr(owner, method)))
    # Modules that imported clip_grad_by_total_norm_fp32 by name keep the unpatched one.
    from megatron.core.optimizer import clip_grads, optimizer as moptimizer

    moptimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32

    _patch_rng_tracker()
    _APPLIED = True
    return True
