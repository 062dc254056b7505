"""Bad flags fail at start-up with one clear line, before any work."""

import pytest

from foundation_helpers import ROOT, env, run

import subprocess
import sys


def _run_env(flags, extra_env=None):
    e = env()
    e.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "tasks.bert_mlm", *flags], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flags, extra_env, expected", [
    (["--precision", "fp8"], {}, "--precision 'fp8' is not one of fp32, fp16, bf16"),
    (["--num-attention-heads", "4", "--tensor-model-parallel-size", "3"], {"WORLD_SIZE": "3"},
     "does not divide the number of attention heads 4"),
    (["--tensor-model-parallel-size", "2"], {"WORLD_SIZE": "3"}, "does not divide the world size 3"),
    (["--load", "/nonexistent/checkpoints"], {}, "--load /nonexistent/checkpoints: no such directory"),
    (["--global-batch-size", "6", "--micro-batch-size", "4"], {}, "is not a multiple of --micro-batch-size"),
    (["--no-such-flag"], {}, "unrecognized arguments: --no-such-flag"),
    (["--use-distributed-optimizer", "--optimizer", "sgd", "--save", "/tmp/never-written"], {},
     "--use-distributed-optimizer checkpoints (--save/--load) need --optimizer adam, not sgd"),
])
def test_bad_flags_fail_with_one_line(flags, extra_env, expected):
    proc = _run_env(flags, extra_env)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip() and "warn" not in l.lower()]
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""  # nothing ran
