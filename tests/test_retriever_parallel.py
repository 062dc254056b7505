"""Data-parallel 2 on gloo: the gathered in-batch loss and the DDP gradients of one training step
equal the single-process loss and gradients over the same global batch (ICT and DPR)."""

import numpy as np
import pytest

from openqa_helpers import NQ_MINI
from spawn import run_ranks

GLOBAL_BATCH = 8


def _one_step(rank, world, kind):
    """One real Trainer step (megatron DDP + optimizer) on this rank's share of the first global
    batch; then, on rank 0, the same global batch through a copy of the initial weights in one
    process with the plain float64 formula. Returns both losses and both gradients."""
    import copy

    import torch

    from megatron.emdr2.config import BatchConfig, ModelSize, TrainingConfig
    from megatron.emdr2.data.evidence import load_evidence
    from megatron.emdr2.data.qa import load_qa
    from megatron.emdr2.data.tokenizer import BertWordPieceTokenizer
    from megatron.emdr2.openqa import builders
    from megatron.emdr2.openqa.dpr_task import DPRConfig, DPRTask
    from megatron.emdr2.openqa.ict_task import ICTTask, RetrieverTaskConfig
    from megatron.emdr2.openqa.inbatch import reference_loss
    from megatron.emdr2.training.loop import Trainer

    from megatron.emdr2.initialize import set_seed

    # The process group is set up once by _both (re-initialising gloo in a process can hang).
    # Reseed: rank 0's reference model of the previous kind drew from its RNG alone, and the
    # ranks must build identical initial weights.
    set_seed(11)
    size = ModelSize(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=128,
                     hidden_dropout=0.0, attention_dropout=0.0)
    cfg = TrainingConfig(seed=11, batch=BatchConfig(GLOBAL_BATCH // world, GLOBAL_BATCH))
    cfg.optimizer.clip_grad = 0.0
    cfg.schedule.train_iters = 1
    cfg.logging.progress_bar = False
    rcfg = RetrieverTaskConfig(size, query_max_len=32, context_max_len=96)
    tok, evidence = BertWordPieceTokenizer(), load_evidence(NQ_MINI / "evidence.tsv")
    if kind == "ict":
        task = ICTTask(rcfg, cfg, tok, evidence, [])
    else:
        train = load_qa(NQ_MINI / "train.jsonl")[:64]
        task = DPRTask(rcfg, cfg, DPRConfig(hard_negatives=2, source="random"), tok, evidence, train, [])
    trainer = Trainer(task, cfg)
    biencoder = trainer.models["biencoder"]
    initial = copy.deepcopy(biencoder.state_dict())
    global_indices = trainer.sampler.epoch_order(0)[:GLOBAL_BATCH].tolist()
    metrics = trainer.train_step(next(iter(trainer.sampler)))
    grads = {n: p.main_grad.detach().clone().numpy() for n, p in biencoder.named_parameters()}
    out = {"loss": metrics["loss"], "grads": grads, "candidates": metrics["inbatch_candidates"]}
    if rank == 0:
        ref_model = builders.build_biencoder(size, tok.vocab_size)
        ref_model.load_state_dict(initial)
        ref_model.train()
        batch = task.build_batch(global_indices, epoch=0)
        q = ref_model.embed_queries(batch.query_ids, batch.query_mask)
        c = ref_model.embed_contexts(batch.context_ids, batch.context_mask)
        loss = reference_loss(q, c, batch.positives, ref_model.score_scale)
        loss.backward()
        out["ref_loss"] = float(loss.detach())
        out["ref_grads"] = {n: p.grad.detach().clone().numpy() for n, p in ref_model.named_parameters()}
    return out


def _both(rank, world):
    from megatron.emdr2.initialize import initialize, shutdown

    initialize(1, 1, seed=11)
    try:
        return {kind: _one_step(rank, world, kind) for kind in ("ict", "dpr")}
    finally:
        shutdown()


@pytest.fixture(scope="module")
def results():
    return run_ranks(_both, 2, timeout=200)


@pytest.mark.parametrize("kind,contexts", [("ict", GLOBAL_BATCH), ("dpr", GLOBAL_BATCH * 3)])
def test_dp2_loss_and_gradients_equal_one_process(results, kind, contexts):
    r0, r1 = results[0][kind], results[1][kind]
    # Every question was scored against the contexts of both ranks.
    assert r0["candidates"] == contexts
    assert r0["loss"] == pytest.approx(r0["ref_loss"], rel=1e-5)
    assert r1["loss"] == pytest.approx(r0["ref_loss"], rel=1e-5)
    ref = r0["ref_grads"]
    assert set(ref) == set(r0["grads"])
    checked = 0
    # Some gradients are ~0 exactly (e.g. the context tower's final LayerNorm bias: the softmax
    # gradients of all contexts sum to zero) and hold only rounding noise: a small absolute term.
    top = max(np.abs(g).max() for g in ref.values())
    for name, g in ref.items():
        for r in (r0, r1):  # both ranks hold the same averaged gradient
            # fp32 sums in another order and padding: ~1e-4 relative; a mis-scaled gather: >= 0.5
            diff = np.abs(r["grads"][name] - g).max()
            assert diff <= 1e-3 * np.abs(g).max() + 1e-5 * top, (kind, name, diff, np.abs(g).max(), top)
        checked += int(np.abs(g).max() > 1e-3 * top)
    # Both towers got gradient (the context tower only through the gather's backward).
    assert any(n.startswith("context_tower.") and np.abs(g).max() > 0 for n, g in ref.items())
    assert checked > 10
