"""Index fingerprints (issue 19): an index records the context tower that embedded it, and every
place that loads an index for a model checks it (evaluate / answer via load_for_inference,
tools/eval_retrieval.py, the EMDR²/MSS task when it starts or resumes from an existing index).
Also: several --qa-file / --test-data files (globs) scored with a configurable top-k list.

Real tiny models (megatron-core towers and FiD reader), real checkpoints, a real slice of
nq-mini; the refusal is checked through the real command (exit 2, one line, no traceback).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from openqa_helpers import NQ_MINI, ROOT, env, records, small_evidence

SIZE = dict(num_layers=1, hidden_size=32, num_attention_heads=2, seq_length=64)
LENS = ["--context-max-len", "48", "--reader-max-len", "64", "--query-max-len", "24", "--answer-max-len", "8"]


@pytest.fixture
def fresh_port(monkeypatch):
    from megatron.emdr2.initialize import free_port

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


def _save_checkpoints(tmp_path, specs: dict) -> dict:
    """{name: (seed, context tower from <name> or None)} -> {name: checkpoint dir}: a tiny EMDR²
    checkpoint (biencoder with separate towers + FiD reader, sizes in its meta) per name."""
    from dataclasses import asdict

    from megatron.emdr2.config import ModelSize
    from megatron.emdr2.initialize import initialize, shutdown
    from megatron.emdr2.openqa import builders
    from megatron.emdr2.training import checkpointing as ckpt
    from tasks.openqa.common import tokenizers

    class Args:
        vocab_file = None

    import os

    from megatron.emdr2.initialize import free_port

    rtok, tok = tokenizers(Args)
    size = ModelSize(**SIZE)
    saved_env = {k: os.environ.pop(k, None) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    os.environ["MASTER_PORT"] = str(free_port())
    initialize(1, 1, seed=0)
    out, states = {}, {}
    try:
        for name, (seed, context_from) in specs.items():
            torch.manual_seed(seed)
            bi = builders.build_biencoder(size, rtok.vocab_size)
            reader = builders.build_reader(size, tok.vocab_size, tok.real_vocab_size)
            bi_state = bi.state_dict()
            if context_from:  # the same context tower as another checkpoint, all else differs
                bi_state.update({k: v for k, v in states[context_from].items() if k.startswith("context_tower.")})
            states[name] = bi_state
            meta = {"retriever": asdict(size), "reader": asdict(size), "shared_towers": False,
                    "vocab_file": rtok.vocab_file, "top_k": 2, "query_max_len": 24, "context_max_len": 48,
                    "reader_max_len": 64, "answer_max_len": 8, "no_repeat_ngram_size": 2,
                    "stop_at_repeated_word": True}
            root = str(tmp_path / name)
            ckpt.save_checkpoint(root, 1, {"iteration": 1, "models": {"biencoder": bi_state,
                                                                        "reader": reader.state_dict()},
                                           "meta": meta}, {}, meta={"world_size": 1})
            out[name] = root
    finally:
        shutdown()
        for k, v in saved_env.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
    return out, states


def _context_fingerprint(bi_state: dict) -> str:
    from megatron.emdr2.index.fingerprint import tower_fingerprint

    p = "context_tower."
    return tower_fingerprint({k[len(p):]: v for k, v in bi_state.items() if k.startswith(p)})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp")
    evidence = small_evidence(tmp, 60)
    dev = NQ_MINI.joinpath("dev.tsv").read_text().splitlines()
    (tmp / "qa").mkdir()
    (tmp / "qa" / "first.tsv").write_text("\n".join(dev[:5]) + "\n")
    (tmp / "qa" / "second.tsv").write_text("\n".join(dev[5:8]) + "\n")
    # A, B: different models; C: B's query tower and reader with A's context tower.
    ckpts, states = _save_checkpoints(tmp, {"A": (1, None), "B": (2, None), "C": (3, "A")})
    return tmp, evidence, ckpts, states


def _evaluate(ckpt, index, evidence, *extra):
    from tasks.openqa import evaluate

    return evaluate.main(["--load", ckpt, "--index-dir", str(index), "--evidence", str(evidence), "--top-k", "2",
                          *LENS, "--eval-batch-size", "4", *extra])


def test_evaluate_answer_and_eval_retrieval_check_the_fingerprint(setup, fresh_port, capsys, caplog):
    from megatron.emdr2.index import read_manifest
    from megatron.emdr2.index.fingerprint import FINGERPRINT_KEY
    from tools import answer, eval_retrieval

    tmp, evidence, ckpts, states = setup
    index = tmp / "index-A"
    # Built by A (no index yet): the manifest records A's context tower; two files (one a glob),
    # the top-k list as asked, one JSON per file.
    _evaluate(ckpts["A"], index, evidence, "--qa-file", str(tmp / "qa" / "first.tsv"), str(tmp / "qa" / "sec*.tsv"),
              "--eval-top-k-list", "1", "2", "10", "--metrics-dir", str(tmp / "m"))
    manifest = read_manifest(index)
    assert manifest.extra[FINGERPRINT_KEY] == _context_fingerprint(states["A"])
    assert _context_fingerprint(states["A"]) != _context_fingerprint(states["B"])
    for name, n in (("first", 5), ("second", 3)):
        m = json.loads((tmp / "m" / f"{name}.json").read_text())
        assert {"em", "top1", "top2", "top10", "reading_accuracy", "read_questions"} <= set(m)
        assert "top5" not in m and "top20" not in m
        assert m["questions"] == n and m["qa_file"].endswith(f"{name}.tsv") and m["checkpoint"].endswith("A")
        assert m["top1"] <= m["top2"] <= m["top10"]
        assert len((tmp / "m" / f"{name}.predictions.jsonl").read_text().splitlines()) == n
    assert not list((tmp / "m").glob("*.partial"))

    # The same model again: accepted, nothing re-embedded.
    _evaluate(ckpts["A"], index, evidence, "--qa-file", str(tmp / "qa" / "second.tsv"),
              "--metrics-out", str(tmp / "again.json"))
    assert read_manifest(index).created == manifest.created
    assert json.loads((tmp / "again.json").read_text())["top1"] == \
        json.loads((tmp / "m" / "second.json").read_text())["top1"]

    # Another model (the real command): one line naming the index and the checkpoint, exit 2.
    from megatron.emdr2.initialize import free_port

    e = dict(env(), MASTER_PORT=str(free_port()))
    res = subprocess.run([sys.executable, "-m", "tasks.openqa.evaluate", "--load", ckpts["B"], "--index-dir",
                          str(index), "--evidence", str(evidence), "--top-k", "2", *LENS,
                          "--qa-file", str(tmp / "qa" / "second.tsv")],
                         cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert str(manifest.directory) in err[0] and ckpts["B"] in err[0] and "--allow-index-mismatch" in err[0]

    # tools/answer.py loads the same way: refused too.
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        answer.main(["--load", ckpts["B"], "--index-dir", str(index), "--evidence", str(evidence), *LENS,
                     "--question", "who wrote hamlet"])
    assert exit_.value.code == 2 and ckpts["B"] in capsys.readouterr().err

    # Opting out: evaluated, with a warning naming both.
    caplog.set_level("WARNING")
    _evaluate(ckpts["B"], index, evidence, "--qa-file", str(tmp / "qa" / "second.tsv"), "--allow-index-mismatch",
              "--metrics-out", str(tmp / "b.json"))
    assert json.loads((tmp / "b.json").read_text())["questions"] == 3
    assert any(str(manifest.directory) in r.getMessage() and ckpts["B"] in r.getMessage() for r in caplog.records)

    # C has A's context tower (B's query tower and reader): the index is A's tower's, accepted.
    _evaluate(ckpts["C"], index, evidence, "--qa-file", str(tmp / "qa" / "second.tsv"))

    # tools/eval_retrieval.py: the same fingerprint from a checkpoint loaded its own way.
    common = ["--index", str(index), "--evidence", str(evidence), "--qa-file", str(tmp / "qa" / "first.tsv"),
              "--max-seq-length", "48", "--topk", "5"]
    assert eval_retrieval.main(["--checkpoint", ckpts["A"], *common]) == 0
    capsys.readouterr()
    assert eval_retrieval.main(["--checkpoint", ckpts["B"], *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(manifest.directory) in err[0] and ckpts["B"] in err[0]
    assert eval_retrieval.main(["--checkpoint", ckpts["B"], *common, "--allow-index-mismatch"]) == 0

    # An index written before fingerprints existed: accepted with a warning.
    path = manifest.directory / "manifest.json"
    old = json.loads(path.read_text())
    del old["extra"][FINGERPRINT_KEY]
    path.write_text(json.dumps(old))
    caplog.clear()
    _evaluate(ckpts["B"], index, evidence, "--qa-file", str(tmp / "qa" / "second.tsv"))
    assert any("no context-tower fingerprint" in r.getMessage() for r in caplog.records)


def _task(tmp, evidence, index_dir, *, retriever_load=None, freeze_context=False, allow=False,
          save=None, load=None, iters=2, reload=0):
    from megatron.emdr2.config import ModelSize, TrainingConfig
    from megatron.emdr2.data.qa import load_qa
    from megatron.emdr2.data.evidence import load_evidence
    from megatron.emdr2.openqa.emdr2_task import OpenQAConfig, OpenQATask
    from megatron.emdr2.openqa.index_refresh import RefreshConfig
    from tasks.openqa.common import tokenizers

    class Args:
        vocab_file = None

    rtok, tok = tokenizers(Args)
    size = ModelSize(**SIZE)
    qa = OpenQAConfig(retriever=size, reader=size, top_k=2, retriever_load=retriever_load,
                      reader_load=retriever_load, freeze_context_tower=freeze_context, allow_index_mismatch=allow,
                      query_max_len=24, context_max_len=48, reader_max_len=64, answer_max_len=8)
    cfg = TrainingConfig(seed=5)
    cfg.batch.global_batch_size = cfg.batch.micro_batch_size = 2
    cfg.schedule.train_iters = iters
    cfg.optimizer.lr = 1e-2  # the towers change visibly in a step
    cfg.checkpoint.save, cfg.checkpoint.load = save, load
    cfg.logging.progress_bar = False
    cfg.logging.metrics_file = str(tmp / "metrics.jsonl")
    train = load_qa(NQ_MINI / "train.tsv", for_training=True)[:16]
    return OpenQATask(qa, cfg, train, [], load_evidence(evidence), rtok, tok,
                      RefreshConfig(index_dir=str(index_dir), interval=reload, embed_batch_size=32)), cfg


def test_training_task_checks_at_start_and_accepts_its_own_lagging_index(setup, tmp_path, fresh_port, caplog):
    from megatron.emdr2.index import read_manifest
    from megatron.emdr2.index.fingerprint import FINGERPRINT_KEY, IndexMismatchError
    from megatron.emdr2.initialize import initialize, shutdown
    from megatron.emdr2.training.loop import Trainer

    tmp, evidence, ckpts, states = setup
    index_a = tmp_path / "index-A"
    initialize(1, 1, seed=0)
    try:
        task, _ = _task(tmp_path, evidence, index_a, retriever_load=ckpts["A"])
        task.build_models()  # no index yet: embedded with A's context tower at step 0
        assert read_manifest(index_a).extra[FINGERPRINT_KEY] == _context_fingerprint(states["A"])

        # A fresh run from B on A's index: refused when the task starts, naming both.
        task, _ = _task(tmp_path, evidence, index_a, retriever_load=ckpts["B"])
        with pytest.raises(IndexMismatchError) as e:
            task.build_models()
        assert str(read_manifest(index_a).directory) in str(e.value) and ckpts["B"] in str(e.value)
        _task(tmp_path, evidence, index_a, retriever_load=ckpts["B"], allow=True)[0].build_models()

        # MSS -> EMDR² with --freeze-context-tower: a checkpoint whose context tower is the one
        # that embedded the index (query tower and reader trained since) starts from it.
        task, _ = _task(tmp_path, evidence, index_a, retriever_load=ckpts["C"], freeze_context=True)
        task.build_models()
        assert task.index_manager.version_dir == read_manifest(index_a).directory

        # A run refreshing every 2 steps, saved at step 3 (index from step 2), then resumed:
        # its own older index is accepted (step lag), although the towers moved since.
        run_index, save = tmp_path / "run-index", str(tmp_path / "run")
        task, cfg = _task(tmp_path, evidence, run_index, retriever_load=ckpts["A"], save=save, iters=3, reload=2)
        Trainer(task, cfg).train()
        latest = read_manifest(run_index)
        assert latest.model_step == 2 and latest.extra["run_id"] == task.state_dict()["run_id"]
        moved = _context_fingerprint({"context_tower." + k: v
                                      for k, v in task._biencoder.context_encoder.state_dict().items()})
        assert moved != latest.extra[FINGERPRINT_KEY]
        task, cfg = _task(tmp_path, evidence, run_index, retriever_load=ckpts["A"], save=save, load=save,
                          iters=4, reload=2)
        caplog.set_level("INFO")
        trainer = Trainer(task, cfg)  # resumes at 3 and checks: same run
        assert trainer.state.iteration == 3 and task.index_manager.version == "step-00000002"
        assert any("built by this run at step 2 (1 steps behind iteration 3)" in r.getMessage()
                   for r in caplog.records)
        trainer.train()

        # Resuming that run on another run's index (A's, embedded before any step): refused.
        task, cfg = _task(tmp_path, evidence, index_a, retriever_load=ckpts["A"], save=save, load=save, iters=5)
        with pytest.raises(IndexMismatchError, match=re.escape(f"checkpoint {save}")):
            Trainer(task, cfg)
    finally:
        shutdown()


def test_test_data_scored_after_training(setup, tmp_path, fresh_port, capsys):
    """`tasks.openqa.emdr2 --test-data FILE GLOB`: every file scored on the final model, one JSON
    each (and "test" records in the metrics log); a bad file stops the run before training."""
    from megatron.emdr2.initialize import free_port

    tmp, evidence, ckpts, _ = setup
    flags = ["--retriever-num-layers", "1", "--retriever-hidden-size", "32", "--retriever-num-attention-heads", "2",
             "--reader-num-layers", "1", "--reader-hidden-size", "32", "--reader-num-attention-heads", "2",
             "--retriever-seq-length", "64", "--reader-seq-length", "64", *LENS,
             "--retriever-load", ckpts["A"], "--reader-load", ckpts["A"], "--evidence", str(evidence),
             "--train-data", str(tmp / "qa" / "first.tsv"), "--dev-data", str(tmp / "qa" / "second.tsv"),
             "--index-dir", str(tmp_path / "index"), "--top-k", "2", "--global-batch-size", "2",
             "--micro-batch-size", "2", "--train-iters", "2", "--index-reload-interval", "0",
             "--no-progress-bar", "--log-interval", "1000", "--save", str(tmp_path / "run"),
             "--eval-top-k-list", "1", "3"]
    e = dict(env(), MASTER_PORT=str(free_port()))
    res = subprocess.run([sys.executable, "-m", "tasks.openqa.emdr2", *flags, "--test-data",
                          str(tmp / "qa" / "first.tsv"), str(tmp / "qa" / "s*.tsv")],
                         cwd=ROOT, env=e, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name, n in (("first", 5), ("second", 3)):
        m = json.loads((tmp_path / "run" / "test" / f"{name}.json").read_text())
        assert m["questions"] == n and m["iteration"] == 2 and {"em", "top1", "top3", "reading_accuracy"} <= set(m)
        assert "top5" not in m
    tests = records(tmp_path / "run" / "metrics.jsonl", "test")
    assert sorted(r["name"] for r in tests) == ["first", "second"] and all(r["iteration"] == 2 for r in tests)
    assert "test second at iteration 2" in res.stdout

    # A malformed test file: one line naming the file and line, exit 2, before any training.
    from tasks.openqa import emdr2

    bad = tmp_path / "bad.tsv"
    bad.write_text("who wrote hamlet\t[\"shakespeare\"]\nno answers column here\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        emdr2.main([*flags, "--save", str(tmp_path / "run2"), "--test-data", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and str(bad) in err[0] and "line 2" in err[0], err
    assert not (tmp_path / "run2").exists()
    # A pattern that matches nothing, and --eval-top-k-list 0, are refused at parse time.
    for extra, msg in ((["--test-data", str(tmp_path / "none*.tsv")], "no file matches"),
                       (["--eval-top-k-list", "0"], "every k must be >= 1")):
        with pytest.raises(SystemExit) as exit_:
            emdr2.main([*flags, *extra])
        assert exit_.value.code == 2 and msg in capsys.readouterr().err


def test_evaluate_reads_and_decodes_as_the_run_did_unless_told(setup, fresh_port):
    """Without --top-k / --no-repeat-ngram-size / --num-beams / --stop-at-repeated-word, evaluate
    and answer use the checkpoint's recorded ones (top-k 2, bigram ban, the cut at a repeated word
    here); flags given win."""
    from megatron.emdr2.initialize import shutdown
    from tasks.openqa import common, evaluate

    tmp, evidence, ckpts, _ = setup
    base = ["--load", ckpts["A"], "--index-dir", str(tmp / "index-defaults"), "--evidence", str(evidence)]
    for extra, expected in (([], (2, 2, 1, True)),
                            (["--top-k", "1", "--no-repeat-ngram-size", "0", "--num-beams", "3",
                              "--no-stop-at-repeated-word"], (1, 0, 3, False))):
        args = evaluate.build_parser().parse_args(base + extra)
        try:
            task, _ = common.load_for_inference(args)
        finally:
            shutdown()
        assert (task.qa.top_k, task.qa.no_repeat_ngram_size, task.qa.num_beams,
                task.qa.stop_at_repeated_word) == expected
