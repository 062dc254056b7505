"""Run one entry point on many argument lists in one process, as separate user runs would.

    python tests/bad_input_walk.py CASES.json RESULTS.json

CASES.json: [{"id": ..., "entry": "tools.build_index" | "tasks.openqa.emdr2" | ..., "argv": [...]}].
Each case calls the entry point's ``main(argv)`` with file descriptors 1 and 2 redirected to
files, and records what a shell would see: the exit status (a returned int, ``SystemExit``'s
code, or 1 with the traceback printed for any other exception, as the interpreter does), stdout
and stderr. Importing torch and megatron-core once for a whole list is what makes walking a
corpus of bad inputs through every tool affordable in the test suite.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _capture(fd: int):
    saved = os.dup(fd)
    tmp = tempfile.TemporaryFile(mode="w+b")
    os.dup2(tmp.fileno(), fd)
    return saved, tmp


def _release(fd: int, saved: int, tmp) -> str:
    os.dup2(saved, fd)
    os.close(saved)
    tmp.seek(0)
    text = tmp.read().decode("utf-8", "replace")
    tmp.close()
    return text


def run_case(entry: str, argv: list[str]) -> dict:
    module = importlib.import_module(entry)
    sys.argv = [module.__file__, *argv]  # what `python -m entry` / `python tools/x.py` would see
    sys.stdout.flush(), sys.stderr.flush()
    out, err = _capture(1), _capture(2)
    try:
        rc = module.main(argv)
        rc = 0 if rc is None else int(rc)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:  # what the interpreter would print for an uncaught exception
        traceback.print_exc()
        rc = 1
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        stdout, stderr = _release(1, *out), _release(2, *err)
        _reset_process_state()
    return {"rc": rc, "stdout": stdout, "stderr": stderr}


def _reset_process_state() -> None:
    """What a process exit would undo: a process group left behind by a failed run."""
    import torch.distributed as dist

    from megatron.emdr2 import initialize

    try:
        initialize.shutdown()
    except Exception:
        pass
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(cases_file: str, results_file: str) -> None:
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    cases = json.loads(Path(cases_file).read_text())
    results = {c["id"]: run_case(c["entry"], c["argv"]) for c in cases}
    Path(results_file).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
