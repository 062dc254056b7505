"""Data- and tensor-parallel runs (torchrun, gloo) reproduce the single-process losses."""

import pytest

from foundation_helpers import losses, run

ITERS = ["--train-iters", "4", "--global-batch-size", "8"]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "metrics.jsonl"
    proc = run(1, [*ITERS, "--micro-batch-size", "4", "--metrics-file", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses(out)


def test_data_parallel_2_matches_one_process(single_process, tmp_path):
    out = tmp_path / "metrics.jsonl"
    # 2 ranks x micro-batch 2 x 2 micro-batches = the same global batch of 8.
    proc = run(2, [*ITERS, "--micro-batch-size", "2", "--metrics-file", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    dp2 = losses(out)
    assert sorted(dp2) == [1, 2, 3, 4]
    for it, loss in single_process.items():
        assert dp2[it] == pytest.approx(loss, rel=1e-5, abs=1e-6), (it, dp2, single_process)
    # The model moved: later losses differ from the first one.
    assert len({round(v, 6) for v in dp2.values()}) > 1


def test_tensor_parallel_2_matches_tensor_parallel_1(single_process, tmp_path):
    out = tmp_path / "metrics.jsonl"
    proc = run(2, [*ITERS, "--micro-batch-size", "4", "--tensor-model-parallel-size", "2",
                   "--metrics-file", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    tp2 = losses(out)
    for it, loss in single_process.items():
        assert tp2[it] == pytest.approx(loss, rel=1e-5, abs=1e-6), (it, tp2, single_process)
