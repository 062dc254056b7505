import json

import pytest

from tools.plot_metrics import plot, read_metrics


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_plots_are_written_from_metrics_files(tmp_path):
    a = tmp_path / "a.jsonl"
    _write(a, [{"kind": "train", "iteration": i, "loss": 5 - i * 0.1, "reader_loss": 3 - i * 0.05,
                "retriever_loss": 2 - i * 0.05} for i in range(1, 30)]
           + [{"kind": "eval", "iteration": i, "top1": 0.1 * i / 10, "top5": 0.2, "em": 0.05} for i in (10, 20)])
    written = plot({"emdr2": str(a)}, str(tmp_path / "plots"))
    assert sorted(p.split("/")[-1] for p in written) == ["losses.png", "retrieval.png"]
    import matplotlib.image as mpimg

    for path in written:
        img = mpimg.imread(path)
        assert img.shape[0] > 200 and img.shape[1] > 300


def test_resumed_runs_keep_the_last_record_per_iteration_and_bad_lines_are_named(tmp_path):
    a = tmp_path / "a.jsonl"
    _write(a, [{"kind": "train", "iteration": 1, "loss": 9.0}, {"kind": "train", "iteration": 1, "loss": 1.0}])
    train, evals = read_metrics(str(a))
    assert [r["loss"] for r in train] == [1.0] and evals == []
    a.write_text('{"kind": "train", "iteration": 1}\n{oops\n')
    with pytest.raises(SystemExit, match=r"a.jsonl:2: not JSON"):
        read_metrics(str(a))
