"""Read our own torch files (checkpoints, tower snapshots, converter outputs) without running code.

``torch.load(weights_only=False)`` unpickles arbitrary objects, so a checkpoint that someone
shares could run any code when it is opened; a manifest's sha256 proves the file is intact, not
who wrote it. Every load of our formats goes through :func:`load`, which uses torch's weights-only
unpickler: tensors, dicts, lists, tuples, numbers, strings, ``None`` and the few types named in
:data:`ALLOWED` below, nothing else. A file that asks for any other global (``os.system``,
``builtins.eval``, a class of ours...) is refused with a one-line error naming it, before that
global is ever imported or called.

What our files hold: model/optimizer/scheduler state (tensors and plain data) and per-rank RNG
state. RNG state is now saved as plain data (see ``checkpointing.get_rng_state``); checkpoints
written before that hold numpy's MT19937 state as a ``numpy.ndarray``, hence the numpy entries
(an array, its dtype, and numpy scalars, none of which can run code). Index versions hold no
pickles at all (raw fp16/int64 shards and JSON manifests). The original EMDR² release's files
are read by ``megatron.emdr2.interop.original`` with its own allow-listed unpickler.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any, Type

import torch


def _allowed() -> list:
    """Globals a weights-only load may resolve, besides torch's own defaults (tensors etc.)."""
    import numpy as np

    try:
        multiarray = np._core.multiarray  # numpy >= 2
    except AttributeError:  # numpy 1.x
        multiarray = np.core.multiarray
    entries: list = [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar,
                     # files written under numpy 1.x name these numpy.core.multiarray.*
                     (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
                     (multiarray.scalar, "numpy.core.multiarray.scalar")]
    dtypes = getattr(np, "dtypes", None)  # the dtype classes (UInt32DType, ...), numpy >= 1.25
    if dtypes is not None:
        entries += [cls for name in dir(dtypes) if isinstance(cls := getattr(dtypes, name), type)
                    and issubclass(cls, np.dtype)]
    return entries


# What a reader is told the allow-list holds (for messages and docs).
ALLOWED = ("torch tensors and dtypes", "dict/list/tuple/set", "int/float/bool/str/bytes/None",
           "numpy.ndarray/dtype/scalar (RNG state of older checkpoints)")

_GLOBAL_RE = re.compile(r"GLOBAL (\S+)")


class UnsafeFileError(RuntimeError):
    """Default error type of :func:`load` (callers pass their own, e.g. CheckpointError)."""


def _offending_globals(path: str, message: str) -> list[str]:
    try:  # a zip checkpoint can be scanned without unpickling it (full names: builtins.eval)
        found = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        found = []
    allowed = {e[1] if isinstance(e, tuple) else f"{e.__module__}.{e.__qualname__}" for e in _allowed()}
    return [n for n in found if n not in allowed] or _GLOBAL_RE.findall(message)


def load(path: str | os.PathLike, map_location: Any = "cpu", error: Type[Exception] = UnsafeFileError) -> Any:
    """``torch.load`` that never runs code from the file; problems raise ``error`` (one line)."""
    path = str(path)
    try:
        with torch.serialization.safe_globals(_allowed()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, expected a torch file") from None
    except pickle.UnpicklingError as e:
        names = _offending_globals(path, str(e))
        if names:
            raise error(f"{path}: refused: loading it would import or call {', '.join(sorted(set(names)))}; "
                        f"our checkpoints hold only tensors and plain data, so this file was not written "
                        f"by this code or was altered (nothing from it was run)") from None
        raise error(f"{path}: cannot be read as a torch checkpoint ({_first_line(e)})") from None
    except Exception as e:  # truncated zip, wrong magic number, ...
        raise error(f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]
