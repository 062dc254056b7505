"""examples/compare_objectives.sh and its table (tools/objectives_table.py).

The table on hand-made metrics, predictions and training logs (means over seeds, median step time,
paired counts and McNemar's exact p computed here by hand); the script's input checks; and (slow)
the script end to end on a slice of nq-mini with a few steps per method."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from openqa_helpers import env

QUESTIONS = [f"q{i}" for i in range(8)]


def _arm(run: Path, name: str, em: list[bool], rank: list[int], metrics: dict, step_times=(9.0, 1.0, 2.0, 3.0)):
    (run / f"{name}.dev.json").write_text(json.dumps(metrics))
    with open(run / f"{name}.dev_predictions.jsonl", "w") as f:
        for q, e, r in zip(QUESTIONS, em, rank):
            f.write(json.dumps({"question": q, "prediction": "x", "answers": ["y"], "em": e,
                                "first_hit_rank": r}) + "\n")
    (run / name).mkdir()
    (run / name / "metrics.jsonl").write_text("".join(
        json.dumps({"kind": "train", "iteration": i + 1, "step_time": t}) + "\n" for i, t in enumerate(step_times))
        + json.dumps({"kind": "eval", "iteration": 4, "em": 0.0}) + "\n")


def _metrics(em, top5, read=0.1):
    return {"em": em, "top1": top5 / 2, "top5": top5, "top20": min(1.0, top5 * 1.5), "reading_accuracy": read,
            "questions": 8, "read_questions": 5}


def _table(run, *args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "objectives_table.py"), "--run", str(run), *args],
                          capture_output=True, text=True)


def test_objectives_table_means_step_time_and_paired_counts(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    F, T = False, True
    # baseline: right on q0 only (seed 1), q0-q1 (seed 2); retrieval hit within 5 on q0-q3
    _arm(run, "none-seed1", [T, F, F, F, F, F, F, F], [1, 2, 5, 6, 0, 0, 0, 0], _metrics(0.1, 0.3))
    _arm(run, "none-seed2", [T, T, F, F, F, F, F, F], [1, 2, 5, 6, 0, 0, 0, 0], _metrics(0.2, 0.3))
    # emdr2: seed 1 right on q1-q5 (only-method 5, only-baseline 1); seed 2 right on q0, q2, q3
    # (only-method 2, only-baseline 1); hits within 5 on q0-q6
    _arm(run, "emdr2-seed1", [F, T, T, T, T, T, F, F], [1, 1, 1, 1, 2, 3, 4, 0], _metrics(0.5, 0.8),
         step_times=(9.0, 4.0, 6.0))
    _arm(run, "emdr2-seed2", [T, F, T, T, F, F, F, F], [1, 1, 1, 1, 2, 3, 4, 0], _metrics(0.4, 0.6, 0.3),
         step_times=(9.0, 5.0))
    out = _table(run, "--methods", "none", "emdr2", "kl", "--seeds", "1", "2", "--steps", "3",
                 "--start-metrics", str(run / "none-seed1.dev.json"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == str(run / "objectives_table.json")
    report = json.loads((run / "objectives_table.json").read_text())
    e = report["methods"]["emdr2"]
    assert e["mean"]["em"] == pytest.approx(0.45) and e["mean"]["top5"] == pytest.approx(0.7)
    assert e["mean"]["reading_accuracy"] == pytest.approx(0.2)
    assert e["step_time_s"] == 5.0  # median of 4, 6, 5 (each run's first step left out)
    assert report["methods"]["none"]["step_time_s"] == 2.0
    em = e["vs_baseline"]["em"]
    assert (em["only_method"], em["only_baseline"], em["both"], em["questions"]) == (7, 2, 1, 16)
    # McNemar exact two-sided on 7 vs 2: 2 * P(X <= 2), X ~ Bin(9, 1/2)
    assert em["p_value"] == pytest.approx(2 * (1 + 9 + 36) / 2 ** 9)
    t5 = e["vs_baseline"]["top5"]
    assert (t5["only_method"], t5["only_baseline"]) == (2 * 4, 0)  # q3-q6 newly within 5, each seed
    assert t5["p_value"] == pytest.approx(2 / 2 ** 8)
    assert e["vs_baseline"]["top1"]["only_method"] == 2 * 3  # q1-q3 now first
    assert report["methods"]["kl"]["seeds"] == {} and report["methods"]["kl"]["missing"]

    row = next(line for line in lines if line.startswith("EMDR2 (sequence)"))
    assert "0.450" in row and "0.700" in row and "5.00" in row and "+7/-2 p 0.18" in row and "+8/-0 p 0.0078" in row
    assert any(line.startswith("FiD (frozen retriever)") and "(baseline)" in line for line in lines)
    assert any(line.startswith("start (MSS checkpoint)") for line in lines)
    assert any(line.startswith("L_alt-2 (kl)") and "no results: see" in line and "kl-seed1.log" in line
               for line in lines)

    # the baseline is paired even when not listed; a method alone still gets its row
    out = _table(run, "--methods", "emdr2", "--seeds", "1", "--json-out", str(tmp_path / "one.json"))
    assert out.returncode == 0, out.stderr
    one = json.loads((tmp_path / "one.json").read_text())
    assert list(one["methods"]) == ["none", "emdr2"]
    assert any(line.startswith("one seed: p compares two trained models") for line in out.stdout.splitlines())
    assert not any(line.startswith("one seed:") for line in lines)  # two seeds each above
    assert one["methods"]["emdr2"]["vs_baseline"]["em"]["only_method"] == 5


def test_objectives_table_bad_inputs_are_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _arm(run, "none-seed1", [True] * 8, [1] * 8, _metrics(1.0, 1.0))
    _arm(run, "emdr2-seed1", [True] * 8, [1] * 8, _metrics(1.0, 1.0))
    cases = []
    # a question list that differs from the baseline's
    preds = (run / "emdr2-seed1.dev_predictions.jsonl").read_text().replace('"q3"', '"other"')
    (run / "emdr2-seed1.dev_predictions.jsonl").write_text(preds)
    cases.append(((["--methods", "none", "emdr2"]), "record 4 differs"))
    cases.append(((["--methods", "kl", "--baseline", "pdist"]), "no method has results"))
    for args, message in cases:
        out = _table(run, *args)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.startswith("objectives_table: error: ") and len(out.stderr.strip().splitlines()) == 1
    (run / "emdr2-seed1.dev.json").write_text("{not json")
    out = _table(run, "--methods", "emdr2")
    assert out.returncode == 2 and f"{run / 'emdr2-seed1.dev.json'}: not valid JSON" in out.stderr
    out = _table(tmp_path / "absent", "--methods", "emdr2")
    assert out.returncode == 2 and "no such directory" in out.stderr


def _script(tmp_path, **overrides):
    e = env(threads=2)
    e.update({k: str(v) for k, v in overrides.items()})
    return subprocess.run(["bash", str(ROOT / "examples" / "compare_objectives.sh")], cwd=ROOT, env=e,
                          capture_output=True, text=True)


def test_compare_objectives_refuses_bad_settings(tmp_path):
    for overrides, message in (
            ({"METHODS": "none bogus"}, "unknown method 'bogus'"),
            ({"STEPS": "0"}, "STEPS=0"),
            ({"START": tmp_path / "nothing"}, f"{tmp_path / 'nothing'}/mss/latest: no such file"),
            ({"DATA": tmp_path / "nodata"}, f"{tmp_path / 'nodata'}/evidence.tsv: no such file")):
        out = _script(tmp_path, RUN=tmp_path / "run", **overrides)
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert out.stderr.startswith("compare_objectives: error: ") and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def _small_nq(nq_mini: Path, out: Path) -> Path:
    out.mkdir()
    for name, n in (("evidence.tsv", 301), ("train.tsv", 40), ("dev.tsv", 16)):
        lines = (nq_mini / name).read_text(encoding="utf-8").splitlines()[:n]
        (out / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


# The new comparison methods (hard EM, its MML warm-up, the two reader modes) next to the paper's
# EMDR² and the baseline; emdr2-token, kl and pdist are older objectives tested elsewhere.
SMOKE_METHODS = "none emdr2 hard-em hard-em-mml individual-topk joint-topk"


@pytest.mark.slow
def test_compare_objectives_end_to_end_tiny(tmp_path, nq_mini):
    data = _small_nq(nq_mini, tmp_path / "data")
    run = tmp_path / "run"
    out = _script(tmp_path, RUN=run, DATA=data, ICT_STEPS=2, MSS_STEPS=2, STEPS=2, METHODS=SMOKE_METHODS)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == str(run / "objectives_table.json")
    assert (run / "start" / "ict" / "latest").exists() and (run / "start" / "mss" / "latest").exists()
    assert sum(line.strip().startswith("[start] Table 8 (retrieval recall@5 on dev, 16 questions)")
               for line in lines) == 1
    assert lines[-3].startswith("Table 8 (retrieval recall@5 on dev, 16 questions): after ICT")
    report = json.loads((run / "objectives_table.json").read_text())
    assert list(report["methods"]) == SMOKE_METHODS.split() and report["steps"] == 2
    for m, entry in report["methods"].items():
        assert list(entry["seeds"]) == ["1"] and entry["seeds"]["1"]["questions"] == 16, m
        assert entry["step_time_s"] and entry["step_time_s"] > 0
        if m != "none":
            assert entry["vs_baseline"]["em"]["questions"] == 16
    meta_modes = {}
    from megatron.emdr2.openqa.builders import load_checkpoint_meta

    for m in ("individual-topk", "joint-topk", "emdr2"):
        meta_modes[m] = load_checkpoint_meta(str(run / f"{m}-seed1")).get("reader_mode", "fid")
    assert meta_modes == {"individual-topk": "individual-topk", "joint-topk": "joint-topk", "emdr2": "fid"}
    # the table's paired counts are compare_predictions' on the same files
    cmp = subprocess.run([sys.executable, str(ROOT / "tools" / "compare_predictions.py"),
                          str(run / "none-seed1.dev_predictions.jsonl"), str(run / "emdr2-seed1.dev_predictions.jsonl"),
                          "--metric", "top5", "--json"], capture_output=True, text=True, env=env())
    ref = json.loads(cmp.stdout)
    got = report["methods"]["emdr2"]["vs_baseline"]["top5"]
    assert (got["only_method"], got["only_baseline"], got["p_value"]) == (ref["only_b"], ref["only_a"], ref["p_value"])
    table = "\n".join(lines)
    for label in ("FiD (frozen retriever)", "EMDR2 (sequence)", "hard EM", "MML -> hard EM", "Individual Top-K",
                  "Joint Top-K", "start (MSS checkpoint)"):
        assert label in table
    assert os.path.exists(run / "start" / "mss.dev.json")  # the start's row and Table 8 came from it

    # from that start (START=), a method whose run fails is a row of its own; the script exits 1
    # after the table (as the new-method arms do where their flags are missing)
    out = _script(tmp_path, RUN=tmp_path / "run2", START=run / "start", DATA=data, STEPS=2, METHODS="hard-em-mml",
                  HARD_EM_AFTER=-1)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "hard-em-mml-seed1: FAILED" in out.stderr and "hard_em_after_steps must be >= 0" in out.stderr
    assert any(line.startswith("MML -> hard EM") and "no results: see hard-em-mml-seed1.log" in line
               for line in out.stdout.splitlines())
    again = json.loads((tmp_path / "run2" / "objectives_table.json").read_text())
    assert again["methods"]["none"]["seeds"]["1"]["questions"] == 16 and again["methods"]["hard-em-mml"]["seeds"] == {}
    assert not (tmp_path / "run2" / "start").exists()  # the given start was used, not rebuilt

    # CONTINUE=1 adds a method to run2: the baseline arm is kept, not retrained; other settings refused
    kept = (tmp_path / "run2" / "none-seed1.dev.json").stat().st_mtime_ns
    out = _script(tmp_path, RUN=tmp_path / "run2", START=run / "start", DATA=data, STEPS=2, METHODS="hard-em",
                  HARD_EM_AFTER=-1, CONTINUE=1)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "none-seed1: kept from the earlier call" in out.stdout
    assert (tmp_path / "run2" / "none-seed1.dev.json").stat().st_mtime_ns == kept
    added = json.loads((tmp_path / "run2" / "objectives_table.json").read_text())
    assert list(added["methods"]) == ["none", "hard-em"] and added["methods"]["hard-em"]["seeds"]["1"]["questions"] == 16
    out = _script(tmp_path, RUN=tmp_path / "run2", START=run / "start", DATA=data, STEPS=3, METHODS="hard-em",
                  CONTINUE=1)
    assert out.returncode == 2 and "CONTINUE: " in out.stderr and "STEPS=2" in out.stderr, out.stderr
    assert out.stderr.startswith("compare_objectives: error: ") and len(out.stderr.strip().splitlines()) == 1

    # seeds added to an earlier study (PRETRAINED=) are pooled with that study's seeds; a seed run in
    # both is left out of the earlier ones. The start stands in for the earlier study, with the first
    # run's predictions copied in as its seeds 1 and 9.
    start = run / "start"
    for seed in ("1", "9"):
        for arm in ("none", "emdr2"):
            shutil.copy(run / f"{arm}-seed1.dev_predictions.jsonl", start / f"{arm}-seed{seed}.dev_predictions.jsonl")
    e = env(threads=2)
    e.update(PRETRAINED=str(start), RUN=str(tmp_path / "more"), SEEDS="1", STEPS="2", DATA=str(data))
    out = subprocess.run(["bash", str(ROOT / "examples" / "nq_mini_unsupervised_study.sh")], cwd=ROOT, env=e,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"with seeds 9 of {start} too; per seed, then pooled:" in out.stdout, out.stdout[-2000:]
    pooled = [line for line in out.stdout.splitlines() if line.startswith("EM: ") and "pooled over" in line]
    assert len(pooled) == 1 and pooled[0].startswith("EM: 32 questions") and "pooled over 2 pairs" in pooled[0]

    # READER_WARMUP= trains the reader alone first and starts both arms from it; the earlier study's
    # seeds started from its MSS reader, so they are not pooled with these
    e.update(RUN=str(tmp_path / "warm"), READER_WARMUP="2")
    out = subprocess.run(["bash", str(ROOT / "examples" / "nq_mini_unsupervised_study.sh")], cwd=ROOT, env=e,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    warm = tmp_path / "warm"
    assert (warm / "reader-warmup" / "latest").exists() and (warm / "reader-warmup.dev.json").exists()
    assert (warm / "reader_start").read_text().strip() == str(warm / "reader-warmup")
    assert "the reader alone, 2 steps with the MSS retriever frozen" in out.stdout
    assert "with seeds" not in out.stdout and (warm / "emdr2-seed1.dev_predictions.jsonl").exists()
    e.update(READER_WARMUP="two")
    out = subprocess.run(["bash", str(ROOT / "examples" / "nq_mini_unsupervised_study.sh")], cwd=ROOT, env=e,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "READER_WARMUP=two: expected a number of steps" in out.stderr

    # BASELINE= reuses that run's reader start and FiD arms (re-evaluated, not retrained) and runs only
    # EMDR², here with its retriever at the reader's learning rate; HELDOUT= evaluates every arm on a
    # second question set and pools both
    heldout = tmp_path / "heldout.tsv"
    heldout.write_text("".join((data / "train.tsv").read_text(encoding="utf-8").splitlines(True)[:8]), encoding="utf-8")
    del e["READER_WARMUP"]
    e.update(RUN=str(tmp_path / "faster"), BASELINE=str(warm), RETRIEVER_LR_MULT="1.0", HELDOUT=str(heldout))
    out = subprocess.run(["bash", str(ROOT / "examples" / "nq_mini_unsupervised_study.sh")], cwd=ROOT, env=e,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    faster = tmp_path / "faster"
    assert f"none-seed1: the FiD run of {warm}" in out.stdout
    assert f"(reader from {warm / 'reader-warmup'}; EMDR²'s retriever at 1.0 × the reader's lr)" in out.stdout
    assert not (faster / "none-seed1").exists() and (faster / "emdr2-seed1" / "latest").exists()
    # the baseline re-evaluated gives the baseline's answers
    assert ((faster / "none-seed1.dev_predictions.jsonl").read_text()
            == (warm / "none-seed1.dev_predictions.jsonl").read_text())
    assert len((faster / "emdr2-seed1.heldout_predictions.jsonl").read_text().splitlines()) == 8
    pooled = out.stdout.split("dev and held-out questions pooled:")[1].splitlines()
    assert pooled[1].startswith("EM: 24 questions") and "pooled over 2 pairs" in pooled[1]
    for bad, message in ((dict(RETRIEVER_LR_MULT="fast"), "RETRIEVER_LR_MULT=fast: expected a number"),
                         (dict(HELDOUT=str(tmp_path / "none.tsv")), "none.tsv: no such file"),
                         (dict(PRETRAINED=""), "BASELINE needs the PRETRAINED"),
                         (dict(BASELINE=str(start)), "no reader_start"),
                         (dict(READER_WARMUP="2"), "leave READER_WARMUP unset")):
        out = subprocess.run(["bash", str(ROOT / "examples" / "nq_mini_unsupervised_study.sh")], cwd=ROOT,
                             env={**e, "RUN": str(tmp_path / "refused"), **bad}, capture_output=True, text=True)
        assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
