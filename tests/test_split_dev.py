"""tools/split_dev.py: a seeded dev split carved from a training set (WebQuestions has none), written
atomically, and examples/emdr2_webq.sh choosing checkpoints on it instead of on the test set."""

import json
import os
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron.emdr2.data.qa import load_qa  # noqa: E402
from tools.split_dev import main, split  # noqa: E402

WEBQ_PARTS = ("trainmodel.json", "val.json", "devtest.json")  # brmson's split of the 3,778 train questions


@pytest.fixture
def webq_train(shared_data):
    # shared_data skips the test where ../shared/data is absent (outside the project's workplace).
    d = shared_data / "webquestions"
    if not all((d / p).is_file() for p in WEBQ_PARTS):
        pytest.skip(f"{d} lacks the WebQuestions training files {WEBQ_PARTS}")
    return [str(d / p) for p in WEBQ_PARTS]


def _records(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def test_webq_split_is_a_seeded_partition_of_train(webq_train, tmp_path):
    m = split(webq_train, tmp_path / "a", dev_fraction=0.1, seed=1234)
    assert (m["train_examples"], m["dev_examples"]) == (3400, 378)  # round(0.1 x 3,778) for dev
    train, dev = _records(tmp_path / "a" / "train.json"), _records(tmp_path / "a" / "dev.json")
    every = [r for p in webq_train for r in _records(p)]
    # A partition: every training record once, unchanged (ids and fields kept), none in both.
    assert Counter(json.dumps(r, sort_keys=True) for r in train + dev) == \
        Counter(json.dumps(r, sort_keys=True) for r in every)
    assert not {r["qId"] for r in train} & {r["qId"] for r in dev}
    assert m["dev_ids"] == [f"{os.path.basename(p)}:{r['qId']}" for p in webq_train for r in _records(p)
                            if r["qId"] in {d["qId"] for d in dev}]
    # The files load as WebQuestions, in input order.
    assert load_qa(tmp_path / "a" / "dev.json").fmt == "webq" and len(load_qa(tmp_path / "a" / "train.json")) == 3400
    order = {r["qId"]: i for i, r in enumerate(every)}
    assert [order[r["qId"]] for r in dev] == sorted(order[r["qId"]] for r in dev)
    # Seeded: the same seed gives the same bytes elsewhere; another seed another dev set.
    split(webq_train, tmp_path / "b", dev_fraction=0.1, seed=1234)
    for name in ("train.json", "dev.json", "split.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other = split(webq_train, tmp_path / "c", dev_fraction=0.1, seed=7)
    assert other["dev_ids"] != m["dev_ids"] and other["dev_examples"] == 378
    # Running again is a no-op (files untouched); a different split there is refused without --force.
    stamp = {n: os.stat(tmp_path / "a" / n).st_mtime_ns for n in ("train.json", "dev.json", "split.json")}
    assert split(webq_train, tmp_path / "a", dev_fraction=0.1, seed=1234) == m
    assert stamp == {n: os.stat(tmp_path / "a" / n).st_mtime_ns for n in stamp}
    assert main(webq_train + ["--out-dir", str(tmp_path / "a"), "--seed", "7"]) == 2
    assert split(webq_train, tmp_path / "a", seed=7, force=True)["dev_ids"] == other["dev_ids"]


def test_webq_script_selects_on_the_carved_dev_not_test(webq_train, tmp_path):
    env = {**os.environ, "EMDR2_DRY_RUN": "1", "DATA_DIR": str(tmp_path), "WEBQ_TRAIN": " ".join(webq_train),
           "OMP_NUM_THREADS": "1"}
    for var in ("SLURM_JOB_ID", "TRAIN", "DEV", "TRAIN_EXAMPLES"):
        env.pop(var, None)
    res = subprocess.run(["bash", "examples/emdr2_webq.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    argv = shlex.split(res.stdout.strip().splitlines()[-1])
    flags = dict(zip(argv[3::1], argv[4::1]))
    split_dir = tmp_path / "qas" / "webq-split"
    assert flags["--dev-data"] == str(split_dir / "dev.json")
    assert flags["--train-data"] == str(split_dir / "train.json")
    assert flags["--train-iters"] == str(3400 * 20 // 16)  # 20 epochs of the 3,400 left for training
    assert json.loads((split_dir / "split.json").read_text())["seed"] == 1234
    # A test file as DEV is refused by every EMDR² example script.
    env.update(TRAIN=str(split_dir / "train.json"), DEV=str(Path(webq_train[0]).parent / "test.json"))
    res = subprocess.run(["bash", "examples/emdr2_webq.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "looks like a test set" in res.stderr


def test_tsv_and_triviaqa_layouts_round_trip(nq_mini, tmp_path):
    m = split([str(nq_mini / "train.tsv")], tmp_path / "tsv", dev_fraction=0.2, seed=3)
    lines = (nq_mini / "train.tsv").read_text(encoding="utf-8").splitlines()
    got = (tmp_path / "tsv" / "train.tsv").read_text(encoding="utf-8").splitlines() + \
        (tmp_path / "tsv" / "dev.tsv").read_text(encoding="utf-8").splitlines()
    assert sorted(got) == sorted(lines) and m["dev_examples"] == round(0.2 * len(lines))
    assert load_qa(tmp_path / "tsv" / "dev.tsv").fmt == "tsv"
    trivia = ROOT / "tests" / "fixtures" / "data" / "triviaqa_sample.json"
    m = split([str(trivia)], tmp_path / "tqa", dev_fraction=0.34, seed=0)
    dev = load_qa(tmp_path / "tqa" / "dev.json")
    assert dev.fmt == "triviaqa" and len(dev) == m["dev_examples"] == 1
    assert len(load_qa(tmp_path / "tqa" / "train.json")) == 2


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "split_dev.py"), *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_bad_input_is_one_line_naming_file_and_record(nq_mini, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text('who wrote hamlet\t["Shakespeare"]\nwhere is paris\tParis\n')
    res = _run(bad, "--out-dir", tmp_path / "out")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and res.stderr.startswith(f"split_dev: error: {bad}: line 2:")
    assert not (tmp_path / "out").exists()  # nothing written
    webq = ROOT / "tests" / "fixtures" / "data" / "webq_original.json"
    res = _run(nq_mini / "train.tsv", webq, "--out-dir", tmp_path / "out")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and f"{webq}: layout webq differs" in res.stderr
    res = _run(nq_mini / "train.tsv", "--out-dir", tmp_path / "out", "--dev-fraction", "1.5")
    assert res.returncode == 2 and "--dev-fraction must be between 0 and 1" in res.stderr


def test_an_interrupted_write_is_never_taken_for_a_split(nq_mini, tmp_path):
    out = tmp_path / "out"
    (out / "dev.tsv").mkdir(parents=True)  # the dev file cannot be written: the run stops half-way
    with pytest.raises(OSError):
        split([str(nq_mini / "dev.tsv")], out, seed=1, force=True)
    assert (out / "train.tsv").is_file() and not (out / "split.json").exists()
    (out / "dev.tsv").rmdir()
    res = _run(nq_mini / "dev.tsv", "--out-dir", out, "--seed", 1)
    assert res.returncode == 2 and "split.json does not" in res.stderr  # refuses to trust the leftover
    res = _run(nq_mini / "dev.tsv", "--out-dir", out, "--seed", 1, "--force", "--get", "train_examples", "dev")
    assert res.returncode == 0 and res.stdout.splitlines() == [str(422 - 42), str(out / "dev.tsv")]
