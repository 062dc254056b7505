import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Commands the tests start run fp32 unless a test asks for --autocast: `auto` would pick bf16 on
# CPUs with native bf16 only, and a test's numbers must not depend on the CPU running it
# (tests/test_autocast.py tests `auto` itself).
os.environ.setdefault("EMDR2_AUTOCAST", "none")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs (minutes); deselect with -m 'not slow'")


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (only the project's workplace has ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def nq_mini():
    """The vendored nq-mini dataset (present in every clone)."""
    return ROOT / "data" / "nq-mini"


@pytest.fixture(scope="session", autouse=True)
def _cpu_compat():
    from megatron.emdr2 import cpu_compat

    cpu_compat.apply()
