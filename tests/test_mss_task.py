"""The MSS task on real tiny megatron-core models: retrieval never returns a sentence's own source
passage (directly and during training), and the command line pre-trains, evaluates and hands its
checkpoint to EMDR² fine-tuning."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from openqa_helpers import NQ_MINI, ROOT, TINY_OPENQA, env, records, small_evidence

SENTENCES = ROOT / "tests" / "fixtures" / "mss" / "nq_mini_first80.jsonl"  # tools/annotate_entities.py output


@pytest.fixture
def fresh_port(monkeypatch):
    from megatron.emdr2.initialize import free_port

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


def _task(tmp_path, evidence_rows=80, top_k=4, source="skip"):
    from megatron.emdr2.config import BatchConfig, ModelSize, ScheduleConfig, TrainingConfig
    from megatron.emdr2.data.evidence import load_evidence
    from megatron.emdr2.data.mss import MSSDataset, SentenceFile, split_tail
    from megatron.emdr2.openqa.emdr2_task import OpenQAConfig
    from megatron.emdr2.openqa.index_refresh import RefreshConfig
    from megatron.emdr2.openqa.mss_task import MSSTask, masked_dev_examples
    from tasks.openqa.common import tokenizers

    class Args:
        vocab_file = None

    size = ModelSize(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=128)
    qa = OpenQAConfig(retriever=size, reader=size, top_k=top_k, query_max_len=32, context_max_len=64,
                      reader_max_len=96, answer_max_len=12, eval_batch_size=8)
    cfg = TrainingConfig(seed=3, batch=BatchConfig(2, 2), schedule=ScheduleConfig(train_iters=2))
    cfg.optimizer.lr = 1e-3
    cfg.logging.progress_bar = False
    cfg.logging.eval_interval = 2
    sentences = SentenceFile(SENTENCES)
    train_rows, dev_rows = split_tail(sentences, 20)
    rtok, tok = tokenizers(Args)
    evidence = load_evidence(small_evidence(tmp_path, evidence_rows))
    refresh = RefreshConfig(index_dir=str(tmp_path / "index"), interval=1, embed_batch_size=64)
    dev = masked_dev_examples(MSSDataset(sentences, dev_rows, seed=3), limit=8)
    return MSSTask(qa, cfg, MSSDataset(sentences, train_rows, seed=3, max_spans=2), dev, evidence, rtok, tok,
                   refresh, source=source), cfg


def test_retrieval_never_returns_the_source_passage(tmp_path, fresh_port):
    from megatron.emdr2 import initialize
    from megatron.emdr2.training.loop import Trainer

    initialize.initialize(1, 1, seed=3)
    try:
        task, cfg = _task(tmp_path)
        models = task.build_models()
        all_ids = set(task.evidence.ids.tolist())
        n = len(all_ids)
        # Asking for every passage but one returns exactly the others: the source alone is skipped.
        batch = task.make_batch(list(range(0, len(task.train_examples), 7)))
        assert batch.exclude_ids.shape == (len(batch.questions), 1)
        with torch.no_grad():
            _, ids, scores = task.retrieve(models["biencoder"], batch, n - 1)
        for row, src in zip(ids.tolist(), batch.exclude_ids[:, 0].tolist()):
            assert src in all_ids  # the sentences come from this evidence
            assert set(row) == all_ids - {src} and len(row) == n - 1
        assert torch.all(scores[:, :-1] >= scores[:, 1:])  # still in score order
        # Without the exclusion the source would be there: the skip is the task's doing.
        batch.exclude_ids = None
        with torch.no_grad():
            _, ids, _ = task.retrieve(models["biencoder"], batch, n)
        assert all(set(r) == all_ids for r in ids.tolist())

        # During training (steps, index refreshes) and evaluation: record every retrieval.
        seen = []
        retrieve = task.retrieve

        def recording_retrieve(biencoder, b, k, grad=True):
            out = retrieve(biencoder, b, k, grad)
            seen.append((out[1].clone(), b.exclude_ids.clone(), k))
            return out

        task.retrieve = recording_retrieve
        state = Trainer(task, cfg).train()
        task.close()
        assert state.iteration == 2 and all(np.isfinite(h["loss"]) for h in state.history)
        assert [h["index_step"] for h in state.history] == [1, 2]  # a fresh index after every step
        assert len(seen) == 2 + 1  # 2 steps, then the held-out evaluation (8 sentences, one batch)
        for ids, exclude, k in seen:
            assert (ids.unsqueeze(-1) == exclude.unsqueeze(1)).sum() == 0
            assert ids.size(1) == k and (ids >= 0).all()
        assert task.state_dict()["iteration"] == 2
    finally:
        initialize.shutdown()


def test_retrieve_source_lets_training_sentences_find_their_passage_but_not_held_out_ones(tmp_path, fresh_port):
    from megatron.emdr2 import initialize
    from megatron.emdr2.training.loop import Trainer

    initialize.initialize(1, 1, seed=3)
    try:
        task, cfg = _task(tmp_path, source="retrieve")
        models = task.build_models()
        n = len(task.evidence.ids)
        batch = task.make_batch(list(range(0, len(task.train_examples), 7)))
        assert batch.exclude_ids is None
        sources = [e.doc_id for e in (task.train_examples.example(i, 0)
                                      for i in range(0, len(task.train_examples), 7))]
        with torch.no_grad():
            _, ids, _ = task.retrieve(models["biencoder"], batch, n)
        assert all(src in row for src, row in zip(sources, ids.tolist()))  # nothing is skipped

        seen = []
        retrieve = task.retrieve

        def recording_retrieve(biencoder, b, k, grad=True):
            out = retrieve(biencoder, b, k, grad)
            seen.append((out[1].clone(), None if b.exclude_ids is None else b.exclude_ids.clone()))
            return out

        task.retrieve = recording_retrieve
        Trainer(task, cfg).train()
        task.close()
        assert len(seen) == 3 and seen[0][1] is None and seen[1][1] is None
        ids, exclude = seen[2]  # the held-out evaluation keeps skipping the source
        assert exclude is not None and (ids.unsqueeze(-1) == exclude.unsqueeze(1)).sum() == 0
    finally:
        initialize.shutdown()


def test_read_source_puts_each_training_sentences_passage_among_the_k_read(tmp_path, fresh_port):
    from megatron.emdr2 import initialize
    from megatron.emdr2.openqa.emdr2_task import with_required_passages
    from megatron.emdr2.training.loop import Trainer

    # The required id replaces the lowest-ranked one, and only where retrieval missed it.
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    assert with_required_passages(ids, torch.tensor([6, 11])).tolist() == [[5, 6, 7], [8, 9, 11]]
    assert ids.tolist() == [[5, 6, 7], [8, 9, 10]]  # the input is left alone

    initialize.initialize(1, 1, seed=3)
    try:
        task, cfg = _task(tmp_path, top_k=2, source="read")
        models = task.build_models()
        picks = list(range(0, len(task.train_examples), 7))
        sources = [task.train_examples.example(i, 0).doc_id for i in picks]
        batch = task.make_batch(picks)
        assert batch.exclude_ids is None and batch.include_ids.tolist() == sources
        models["biencoder"].eval()  # no dropout: both searches see the same query embeddings
        with torch.no_grad():
            _, plain, _ = task.retrieve(models["biencoder"], dataclasses.replace(batch, include_ids=None), 2)
            _, ids, _ = task.retrieve(models["biencoder"], batch, 2)
        assert any(src not in row for src, row in zip(sources, plain.tolist()))  # a tiny random tower misses some
        for src, row, before in zip(sources, ids.tolist(), plain.tolist()):
            assert src in row and row[0] == before[0]  # the source is read; the best hit stays
        models["biencoder"].train()

        seen = []
        retrieve = task.retrieve

        def recording_retrieve(biencoder, b, k, grad=True):
            out = retrieve(biencoder, b, k, grad)
            seen.append((out[1].clone(), b.include_ids, b.exclude_ids))
            return out

        task.retrieve = recording_retrieve
        Trainer(task, cfg).train()
        task.close()
        assert len(seen) == 3
        for ids, include, _ in seen[:2]:  # training steps read their sources
            assert (ids == include.view(-1, 1)).any(dim=1).all()
        ids, include, exclude = seen[2]  # the held-out evaluation still skips them
        assert include is None and (ids.unsqueeze(-1) == exclude.unsqueeze(1)).sum() == 0
    finally:
        initialize.shutdown()


def _mss_flags(tmp_path, evidence, iters):
    return [*TINY_OPENQA, "--mss-data", str(SENTENCES), "--mss-dev-sentences", "24", "--mss-max-spans", "2",
            "--evidence", str(evidence), "--index-dir", str(tmp_path / "mss-index"), "--top-k", "4",
            "--global-batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", str(iters),
            "--eval-interval", str(iters), "--index-reload-interval", "2", "--save", str(tmp_path / "mss"),
            "--metrics-file", str(tmp_path / "mss.jsonl"), "--predictions-file", str(tmp_path / "pred.jsonl")]


def test_mss_command_then_emdr2_from_its_checkpoint(tmp_path):
    evidence = small_evidence(tmp_path, 120)
    from megatron.emdr2.initialize import free_port

    def run(module, flags):
        e = dict(env(), MASTER_PORT=str(free_port()))  # other jobs may hold the default port
        return subprocess.run([sys.executable, "-m", module, *flags], cwd=ROOT, env=e, capture_output=True,
                              text=True, timeout=300)
    res = run("tasks.openqa.mss", [*_mss_flags(tmp_path, evidence, 4), "--mss-min-entity-passages", "2"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    train = records(tmp_path / "mss.jsonl")
    assert [r["iteration"] for r in train] == [1, 2, 3, 4] and max(r["index_step"] for r in train) >= 2
    ev = records(tmp_path / "mss.jsonl", "eval")[-1]
    assert {"em", "top1", "top5", "top20"} <= set(ev) and ev["questions"] > 0
    preds = [json.loads(l) for l in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert all(p["question"].count("<extra_id_0>") == 1 and "<extra_id_1>" not in p["question"] for p in preds)
    from megatron.emdr2.data.answers import normalize_answer
    from megatron.emdr2.data.mss import SentenceFile, entity_passage_counts

    counts = entity_passage_counts(SentenceFile(SENTENCES))  # only entities named in 2+ passages
    assert all(counts[normalize_answer(p["answers"][0])] >= 2 for p in preds)
    from megatron.emdr2.openqa.builders import load_checkpoint_meta

    meta = load_checkpoint_meta(str(tmp_path / "mss"))
    assert meta["task"] == "mss"

    # EMDR² fine-tuning starts from the MSS reader and retriever.
    res = run("tasks.openqa.emdr2", [
        *TINY_OPENQA, "--train-data", str(NQ_MINI / "train.tsv"), "--dev-data", str(NQ_MINI / "dev.tsv"),
        "--evidence", str(evidence), "--index-dir", str(tmp_path / "ft-index"), "--top-k", "4",
        "--global-batch-size", "4", "--micro-batch-size", "2", "--train-iters", "1",
        "--retriever-load", str(tmp_path / "mss"), "--reader-load", str(tmp_path / "mss"),
        "--metrics-file", str(tmp_path / "ft.jsonl"), "--stop-at-repeated-word", "--save", str(tmp_path / "ft")])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert len(records(tmp_path / "ft.jsonl")) == 1
    # How the run decoded is recorded, so a plain `evaluate --load` decodes the same way.
    assert load_checkpoint_meta(str(tmp_path / "ft"))["stop_at_repeated_word"] is True
    assert meta["stop_at_repeated_word"] is False

    # A bad sentence file is reported in one line before training.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(SENTENCES.read_text().splitlines()[0] + "\n" + '{"doc_id": 1}\n' * 40)
    flags = _mss_flags(tmp_path, evidence, 1)
    flags[flags.index("--mss-data") + 1] = str(bad)
    flags[flags.index("--mss-dev-sentences") + 1] = "5"
    res = run("tasks.openqa.mss", flags)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert f"{bad}: line" in last and "missing key(s)" in last, res.stderr[-2000:]
