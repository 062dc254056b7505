"""--retriever-anchor-weight on real tiny megatron-core towers: the term is zero at the start and
grows as the query tower moves, it covers the starting ranks K+1..depth only, its gradient
reaches the query tower only, a shift common to a question's scores costs nothing, it holds the
scores nearer the start in training, and a resumed run keeps anchoring to where the run began
(not to the resumed weights)."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from openqa_helpers import NQ_MINI, ROOT, TINY_OPENQA, env, small_evidence
from test_mss_task import _task, fresh_port  # noqa: F401  (fixture)


def _anchored(tmp_path, weight=1.0, depth=10, **changes):
    task, cfg = _task(tmp_path)
    changes = {"freeze_context_tower": True, **changes}
    task.qa = dataclasses.replace(task.qa, shared_towers=False, anchor_weight=weight, anchor_depth=depth,
                                  **changes)
    return task, cfg


def _anchor_term(task, models, batch):
    biencoder = models["biencoder"]
    q_emb = biencoder.embed_queries(batch.query_ids, batch.query_mask)
    return task._anchor.loss(biencoder, batch.query_ids, batch.query_mask, q_emb, task.index_manager.index,
                             lambda top: task._context_embeddings_no_grad(biencoder, top), batch.exclude_ids)


@pytest.mark.parametrize("frozen_context", [True, False], ids=["frozen-context", "trained-context"])
def test_zero_at_the_start_then_grows_and_trains_the_query_tower_only(tmp_path, fresh_port,  # noqa: F811
                                                                     frozen_context):
    """With a frozen context tower the passages come from its cache; with one that trains, from
    that tower without gradient: either way only the query tower learns from the term."""
    from megatron.emdr2 import initialize

    initialize.initialize(1, 1, seed=3)
    try:
        task, _ = _anchored(tmp_path, freeze_context_tower=frozen_context)
        models = task.build_models()
        biencoder = models["biencoder"]
        biencoder.eval()  # no dropout: the live tower computes what its frozen copy does
        batch = task.make_batch(list(range(4)))
        if frozen_context:  # the index already holds a frozen tower's vectors: nothing is embedded
            def embedded(*a):
                raise AssertionError("the anchor re-embedded passages that the index holds")
            task._embed_contexts_eval = embedded
        assert float(_anchor_term(task, models, batch)) < 1e-10

        with torch.no_grad():  # move the query tower
            for p in biencoder.query_tower.parameters():
                p.add_(0.05 * torch.randn_like(p))
        term = _anchor_term(task, models, batch)
        assert float(term) > 1e-4
        term.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in biencoder.query_tower.parameters())
        assert all(p.grad is None for p in biencoder.context_tower.parameters())
        assert all(p.grad is None and not p.requires_grad for p in task._anchor.tower.parameters())
        task.close()
    finally:
        initialize.shutdown()


def test_it_holds_the_starting_ranks_below_the_top_k(tmp_path, fresh_port):  # noqa: F811
    """The passages scored are the starting tower's ranks K+1..depth: the reader's top K are left
    to the retriever term."""
    from megatron.emdr2 import initialize
    from megatron.emdr2.openqa.retrieval import search_excluding

    initialize.initialize(1, 1, seed=3)
    try:
        task, _ = _anchored(tmp_path, depth=12)
        models = task.build_models()
        biencoder = models["biencoder"]
        biencoder.eval()
        batch = task.make_batch(list(range(4)))
        seen = []
        q_emb = biencoder.embed_queries(batch.query_ids, batch.query_mask)

        def contexts(top):
            seen.append(top.clone())
            return task._context_embeddings_no_grad(biencoder, top)

        task._anchor.loss(biencoder, batch.query_ids, batch.query_mask, q_emb, task.index_manager.index,
                          contexts, batch.exclude_ids)
        _, start_ids = search_excluding(task.index_manager.index, q_emb.detach().float(), 12, batch.exclude_ids)
        assert len(seen) == 1 and torch.equal(seen[0], start_ids[:, task.qa.top_k:])
        assert seen[0].shape == (4, 12 - task.qa.top_k)
        task.close()
    finally:
        initialize.shutdown()


def test_a_shift_common_to_a_questions_scores_costs_nothing(tmp_path, fresh_port):  # noqa: F811
    """Adding the same constant to all of a question's current scores changes no ranking, and
    leaves the term as it was (the score function is wrapped to add it to the live tower's scores)."""
    from megatron.emdr2 import initialize

    initialize.initialize(1, 1, seed=3)
    try:
        task, _ = _anchored(tmp_path, weight=2.0)
        models = task.build_models()
        biencoder = models["biencoder"]
        biencoder.eval()
        batch = task.make_batch(list(range(4)))
        with torch.no_grad():
            for p in biencoder.query_tower.parameters():
                p.add_(0.05 * torch.randn_like(p))
        before = float(_anchor_term(task, models, batch))
        score = biencoder.score
        biencoder.score = lambda q, c: score(q, c) + (5.0 if q.requires_grad else 0.0)
        try:
            shifted = float(_anchor_term(task, models, batch))
        finally:
            biencoder.score = score
        assert before > 1e-4 and abs(shifted - before) < 1e-5 * max(1.0, before)
        task.close()
    finally:
        initialize.shutdown()


def _drift_after_training(tmp_path, weight):
    """Train 6 steps at a high query-tower rate; the anchor's drift (centred squared score change
    on a fixed batch) of the trained tower against its start."""
    from megatron.emdr2.training.loop import Trainer

    task, cfg = _anchored(tmp_path, weight=max(weight, 1e-9))
    cfg.schedule.train_iters = 6
    cfg.logging.eval_interval = 0
    cfg.optimizer.lr = 3e-3
    trainer = Trainer(task, cfg)
    if weight == 0:
        task._anchor.weight = 0.0  # the same run without the term (the copy still measures drift)
    state = trainer.train()
    models = trainer.models
    models["biencoder"].eval()
    task._anchor.weight = 1.0
    with torch.no_grad():
        drift = float(_anchor_term(task, models, task.make_batch(list(range(8)))))
    task.close()
    return drift, state


def test_a_heavy_anchor_holds_the_scores_nearer_the_start(tmp_path, fresh_port):  # noqa: F811
    from megatron.emdr2 import initialize

    drifts = {}
    for weight in (0.0, 1000.0):
        initialize.initialize(1, 1, seed=3)
        try:
            out = tmp_path / f"w{weight:g}"
            out.mkdir()
            drifts[weight], state = _drift_after_training(out, weight)
            assert all("anchor_drift" in h for h in state.history)
        finally:
            initialize.shutdown()
    assert drifts[0.0] > 0 and drifts[1000.0] < 0.5 * drifts[0.0], drifts


def test_a_resumed_run_anchors_to_where_the_run_began(tmp_path, fresh_port):  # noqa: F811
    """Trained 2 steps and saved, then resumed from that checkpoint: the resumed run's anchor holds
    the weights the run started from, not the resumed ones (the towers are built, and the anchor
    taken, before the training loop loads the checkpoint)."""
    from megatron.emdr2 import initialize
    from megatron.emdr2.training.loop import Trainer

    weights = lambda tower: {k: v.detach().clone() for k, v in tower.state_dict().items() if torch.is_tensor(v)}
    initialize.initialize(1, 1, seed=3)
    try:
        task, cfg = _anchored(tmp_path)
        cfg.logging.eval_interval = 0
        cfg.checkpoint.save, cfg.checkpoint.save_interval = str(tmp_path / "run"), 2
        trainer = Trainer(task, cfg)
        start = weights(task._anchor.tower)
        trainer.train()
        trained = weights(trainer.models["biencoder"].query_tower)
        task.close()
    finally:
        initialize.shutdown()
    assert any(not torch.equal(start[k], trained[k]) for k in start)

    initialize.initialize(1, 1, seed=3)
    try:
        (tmp_path / "b").mkdir()
        task, cfg = _anchored(tmp_path / "b")
        cfg.checkpoint.load = str(tmp_path / "run")
        trainer = Trainer(task, cfg)
        resumed = weights(trainer.models["biencoder"].query_tower)
        anchor = weights(task._anchor.tower)
        task.close()
    finally:
        initialize.shutdown()
    assert all(torch.equal(resumed[k], trained[k]) for k in trained)
    assert all(torch.equal(anchor[k], start[k]) for k in start)


def test_bad_anchor_flags_are_refused(tmp_path):
    evidence = small_evidence(tmp_path, 40)
    base = [*TINY_OPENQA, "--evidence", str(evidence), "--index-dir", str(tmp_path / "index"),
            "--train-data", str(NQ_MINI / "train.tsv"), "--train-iters", "1", "--top-k", "2"]
    cases = [
        (["--retriever-anchor-weight", "-1"], "--retriever-anchor-weight must be >= 0"),
        (["--retriever-anchor-weight", "1", "--retriever-objective", "none"], "needs a query tower that trains"),
        (["--retriever-anchor-weight", "1", "--freeze-query-tower"], "needs a query tower that trains"),
        (["--retriever-anchor-weight", "1", "--retriever-anchor-depth", "3"], "must be at least --top-k + 2 = 4"),
        (["--retriever-anchor-weight", "1", "--retriever-anchor-depth", "41"], "more than the 40 passages"),
    ]
    for extra, message in cases:
        r = subprocess.run([sys.executable, "-m", "tasks.openqa.emdr2", *base, *extra], cwd=ROOT, env=env(),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, (extra, r.stderr[-2000:])
        assert message in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr[-2000:])
