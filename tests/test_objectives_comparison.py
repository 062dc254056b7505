"""The comparison objectives of the EMDR² entry point (docs/objectives.md): hard EM (with the
MML-then-hard-EM schedule), Individual Top-K and Joint Top-K (Sachan et al., ACL 2021).

Objective math against plain float64 loops; the joint top-k cross-attention bias against the
reader given the other passages only; the individual top-k prediction rule against a direct
computation; and a few real training steps of each mode through `python -m tasks.openqa.emdr2`."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron.emdr2.objectives import ObjectiveConfig, joint_loss

# ----------------------------------------------------------------------------- objective math


def _inputs(B=3, K=4, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, K, generator=g) * 3
    token_lp = -torch.rand(B, K, T, generator=g) * 4  # log-probs <= 0
    mask = torch.ones(B, T)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    reader_nll = torch.rand(B, generator=g) * 5
    return scores, token_lp, mask, reader_nll


def _plain(scores, token_lp, mask):
    """Python lists of float64: p(z_k|q) and log p(a|q,z_k) = Σ_t over real tokens, by loops."""
    s, lp, m = scores.double().tolist(), token_lp.double().tolist(), mask.double().tolist()
    p_z, seq_ll = [], []
    for b in range(len(s)):
        z = sum(math.exp(x) for x in s[b])
        p_z.append([math.exp(x) / z for x in s[b]])
        seq_ll.append([sum(lp[b][k][t] for t in range(len(m[b])) if m[b][t]) for k in range(len(s[b]))])
    return p_z, seq_ll


def test_hard_em_loss_and_score_gradient_match_float64():
    scores, token_lp, mask, reader_nll = _inputs(seed=4)
    scores.requires_grad_(True)
    token_lp.requires_grad_(True)
    out = joint_loss(ObjectiveConfig("hard-em"), scores, token_lp, mask, reader_nll)
    out.loss.backward()
    p_z, seq_ll = _plain(scores.detach(), token_lp.detach(), mask)
    B, K = len(p_z), len(p_z[0])
    loss_ret, grad = 0.0, [[0.0] * K for _ in range(B)]
    for b in range(B):
        best = max(range(K), key=lambda k: seq_ll[b][k])
        loss_ret += -math.log(p_z[b][best]) / B
        for j in range(K):
            grad[b][j] = (p_z[b][j] - (1.0 if j == best else 0.0)) / B
    expected = sum(reader_nll.double().tolist()) / B + loss_ret
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.retriever_loss.item() == pytest.approx(loss_ret, rel=1e-6)
    np.testing.assert_allclose(scores.grad.double().numpy(), np.array(grad), rtol=1e-5, atol=1e-7)
    assert token_lp.grad is None or torch.count_nonzero(token_lp.grad) == 0  # k* under a stop-gradient


def test_hard_em_schedule_switches_from_mml_at_step_n():
    scores, token_lp, mask, reader_nll = _inputs(seed=5)
    cfg = ObjectiveConfig("hard-em", hard_em_after_steps=3)
    assert [cfg.effective_objective(s) for s in range(5)] == ["emdr2"] * 3 + ["hard-em"] * 2

    def grad_at(c, step):
        s = scores.clone().requires_grad_(True)
        out = joint_loss(c, s, token_lp, mask, reader_nll, step=step)
        out.loss.backward()
        return out.loss.item(), s.grad

    mml = grad_at(ObjectiveConfig("emdr2"), 0)
    hard = grad_at(ObjectiveConfig("hard-em"), 0)
    assert abs(mml[0] - hard[0]) > 1e-3 and (mml[1] - hard[1]).abs().max() > 1e-3  # distinguishable
    for step in (0, 2):  # the first N=3 steps (0, 1, 2 steps done): MML
        loss, grad = grad_at(cfg, step)
        assert loss == pytest.approx(mml[0], rel=1e-7) and torch.allclose(grad, mml[1])
    for step in (3, 10):  # from step N+1 on: hard EM
        loss, grad = grad_at(cfg, step)
        assert loss == pytest.approx(hard[0], rel=1e-7) and torch.allclose(grad, hard[1])


def test_individual_topk_loss_and_gradients_match_float64():
    """-log Σ_k p(a|q,z_k) p(z_k|q), gradient into the scores AND the per-passage token
    log-likelihoods (no stop-gradient); the FiD reader term plays no part."""
    scores, token_lp, mask, reader_nll = _inputs(seed=6)
    scores.requires_grad_(True)
    token_lp.requires_grad_(True)
    out = joint_loss(ObjectiveConfig(reader_mode="individual-topk"), scores, token_lp, mask, reader_nll)
    out.loss.backward()
    p_z, seq_ll = _plain(scores.detach(), token_lp.detach(), mask)
    B, K, T = token_lp.shape
    m = mask.tolist()
    loss, g_s, g_lp = 0.0, np.zeros((B, K)), np.zeros((B, K, T))
    for b in range(B):
        joint = [math.exp(seq_ll[b][k]) * p_z[b][k] for k in range(K)]
        marginal = sum(joint)
        loss += -math.log(marginal) / B
        for k in range(K):
            post = joint[k] / marginal
            g_s[b, k] = (p_z[b][k] - post) / B  # d/ds_k of -log Σ_j e^{ll_j} softmax(s)_j
            for t in range(T):
                g_lp[b, k, t] = -post * m[b][t] / B
    assert out.loss.item() == pytest.approx(loss, rel=1e-6)
    np.testing.assert_allclose(scores.grad.double().numpy(), g_s, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(token_lp.grad.double().numpy(), g_lp, rtol=1e-5, atol=1e-7)
    # The FiD reader NLL is not part of it: any (or no) reader_nll gives the same loss.
    again = joint_loss(ObjectiveConfig(reader_mode="individual-topk"), scores.detach(), token_lp.detach(), mask, None)
    assert again.loss.item() == pytest.approx(out.loss.item(), rel=1e-7)


def test_joint_topk_loss_is_the_biased_readers_nll_alone():
    scores, token_lp, mask, reader_nll = _inputs(seed=7)
    reader_nll.requires_grad_(True)
    out = joint_loss(ObjectiveConfig(reader_mode="joint-topk"), scores, token_lp, mask, reader_nll)
    assert out.loss.item() == pytest.approx(reader_nll.double().mean().item(), rel=1e-7)
    assert out.retriever_loss.item() == 0
    out.loss.backward()
    assert torch.allclose(reader_nll.grad, torch.full_like(reader_nll, 1 / 3))


def test_unsupported_combinations_are_refused_in_one_line(tmp_path, capsys):
    for kwargs, words in ((dict(retriever_objective="kl", reader_mode="joint-topk"), "use --retriever-objective emdr2"),
                          (dict(retriever_objective="hard-em", reader_mode="individual-topk"), "not hard-em"),
                          (dict(reader_mode="joint-topk", marginalisation="token"), "applies to --reader-mode fid"),
                          (dict(hard_em_after_steps=5), "hard-em only"),
                          (dict(retriever_objective="hard-em", hard_em_after_steps=-1), ">= 0"),
                          (dict(reader_mode="rag"), "reader mode 'rag'")):
        with pytest.raises(ValueError, match=words.replace("(", r"\(")):
            ObjectiveConfig(**kwargs)
    for ok in (dict(reader_mode="joint-topk"), dict(reader_mode="individual-topk", retriever_objective="none"),
               dict(retriever_objective="hard-em", hard_em_after_steps=4)):
        ObjectiveConfig(**ok)
    # The entry point: one line on stderr, exit status 2, before anything is built.
    from tasks.openqa import emdr2

    with pytest.raises(SystemExit) as e:
        emdr2.main(["--index-dir", str(tmp_path / "i"), "--reader-mode", "joint-topk",
                    "--retriever-objective", "pdist"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--reader-mode joint-topk" in err and "not pdist" in err, err
    # The flags reach the task's configuration; none still freezes the retriever.
    from tasks.openqa import common

    args = emdr2.build_parser().parse_args(["--index-dir", str(tmp_path), "--retriever-objective", "hard-em",
                                            "--hard-em-after-steps", "7"])
    qa = common.qa_config(args)
    assert (qa.objective.retriever_objective, qa.objective.hard_em_after_steps) == ("hard-em", 7)
    args = emdr2.build_parser().parse_args(["--index-dir", str(tmp_path), "--reader-mode", "individual-topk",
                                            "--retriever-objective", "none"])
    qa = common.qa_config(args)
    assert qa.objective.reader_mode == "individual-topk" and qa.freeze_query_tower and qa.freeze_context_tower


# ----------------------------------------------------------------------------- models

V, REAL_V = 128, 120


@pytest.fixture(scope="module")
def single_rank():
    from megatron.core import parallel_state

    from megatron.emdr2.initialize import initialize

    if not parallel_state.model_parallel_is_initialized():
        initialize(1, 1, seed=1234)
    yield


def _reader(seed=0, listen=1.0):
    """A tiny random reader; ``listen`` scales its cross-attention values and output, so that its
    answers depend on the passages (at 1 a random decoder mostly repeats its start token)."""
    from megatron.emdr2.config import ModelSize
    from megatron.emdr2.openqa import builders

    torch.manual_seed(seed)
    size = ModelSize(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, seq_length=32,
                     hidden_dropout=0.0, attention_dropout=0.0)
    reader = builders.build_reader(size, V, REAL_V).eval()
    with torch.no_grad():
        for name, p in reader.named_parameters():
            if "cross_attention.linear_proj.weight" in name or "cross_attention.linear_kv.weight" in name:
                p.mul_(listen)
    return reader


def _memory(B=2, K=3, S=7, T=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, REAL_V, (B, K, S), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 2, 4:] = 0
    mask[1, 0, 3:] = 0
    labels = torch.randint(5, REAL_V, (B, T), generator=g)
    dec = torch.cat([torch.zeros(B, 1, dtype=torch.long), labels[:, :-1]], 1)
    return ids, mask, dec, labels


@pytest.mark.parametrize("path", ["fused", "explicit"])
def test_joint_topk_bias_on_a_passage_equals_reading_without_it(single_rank, path, monkeypatch):
    """log p(z|q) with passage 1 at -1e4 (the others equal) on the cross-attention logits: the
    decoder output is that of the reader given passages 0 and 2 only; teacher-forced, in
    decoding, and on both attention paths (torch SDPA and the explicit softmax used with dropout)."""
    from megatron.emdr2.models.fast_attention import SdpaAttention

    if path == "explicit":
        monkeypatch.setattr(SdpaAttention, "_fast_path_ok", lambda self, q, p: False)
    reader = _reader(seed=1, listen=3.0)
    ids, mask, dec, labels = _memory()
    B, K, S = ids.shape
    scores = torch.tensor([[0.3, -1e4, 0.3], [1.0, -1e4, 1.0]])
    log_p_z = torch.log_softmax(scores, -1)
    keep = [0, 2]
    with torch.no_grad():
        states, memory_mask = reader.encode(ids, mask)
        bias = reader.passage_memory_bias(log_p_z, S)
        biased = reader.forward_from_states(states, memory_mask, dec, memory_bias=bias)
        plain = reader.forward_from_states(states, memory_mask, dec)
        sub_states, sub_mask = reader.encode(ids[:, keep], mask[:, keep])
        without = reader.forward_from_states(sub_states, sub_mask, dec)
    # (the padded vocabulary's logits are -inf everywhere)
    biased, plain, without = (x[..., :REAL_V] for x in (biased, plain, without))
    assert (plain - without).abs().max() > 1e-3  # passage 1 matters to the unbiased reader
    torch.testing.assert_close(biased, without, rtol=1e-4, atol=1e-4)
    # A bias that is not uniform over the kept passages changes the output too.
    other = reader.passage_memory_bias(torch.log_softmax(torch.tensor([[2.0, -1e4, 0.0]] * 2), -1), S)
    with torch.no_grad():
        moved = reader.forward_from_states(states, memory_mask, dec, memory_bias=other)[..., :REAL_V]
    assert (moved - without).abs().max() > 1e-3
    # Decoding (key/value cache, greedy and beam search) uses the same bias.
    for beams in (1, 2):
        def decode(i, m, **kw):
            return reader.generate(i, m, max_length=5, num_beams=beams, bos_id=0, eos_id=1, pad_id=2, **kw)

        got, want = decode(ids, mask, memory_bias=bias), decode(ids[:, keep], mask[:, keep])
        assert torch.equal(got, want), (beams, got, want)
        assert not torch.equal(decode(ids, mask), want)  # what reading passage 1 too gives


def test_joint_topk_gradient_reaches_the_retrieval_scores_and_towers(single_rank):
    from megatron.emdr2.config import ModelSize
    from megatron.emdr2.openqa import builders, reader_modes

    reader = _reader().train()
    torch.manual_seed(3)
    size = ModelSize(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32)
    biencoder = builders.build_biencoder(size, V, "fp32", 1)
    ids, mask, dec, labels = _memory()
    B, K, S = ids.shape
    q = biencoder.embed_queries(ids[:, 0], torch.ones(B, S, dtype=torch.long))
    c = biencoder.embed_contexts(ids.reshape(B * K, S), mask.reshape(B * K, S)).view(B, K, -1)
    scores = biencoder.score(q, c)
    scores.retain_grad()

    class Batch:
        decoder_ids, label_mask = dec, torch.ones_like(labels, dtype=torch.bool)

    Batch.labels = labels
    states, memory_mask = reader.encode(ids, mask)
    cfg = ObjectiveConfig(reader_mode="joint-topk")
    reader_nll, token_lp = reader_modes.reader_terms(cfg, reader, states, memory_mask, ids.reshape(B, K * S),
                                                     Batch, scores, K)
    out = joint_loss(cfg, scores, token_lp, Batch.label_mask.float(), reader_nll)
    out.loss.backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all() and scores.grad.abs().max() > 1e-6
    for tower in (biencoder.query_tower, biencoder.context_encoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())


def test_individual_topk_reads_each_passage_alone_with_gradient(single_rank):
    """reader_terms' per-passage log-likelihoods = the same reader given that one passage (a
    single-passage FiD run), and they carry the reader's gradient."""
    from megatron.emdr2.openqa import reader_modes

    reader = _reader()  # eval mode: no dropout, so the two runs compare exactly
    ids, mask, dec, labels = _memory()
    B, K, S = ids.shape
    label_mask = torch.ones_like(labels, dtype=torch.bool)
    label_mask[1, 3] = False

    class Batch:
        pass

    Batch.decoder_ids, Batch.labels, Batch.label_mask = dec, labels, label_mask
    states, memory_mask = reader.encode(ids, mask)
    reader_nll, token_lp = reader_modes.reader_terms(ObjectiveConfig(reader_mode="individual-topk"), reader,
                                                     states, memory_mask, ids.reshape(B, K * S), Batch,
                                                     torch.zeros(B, K), K)
    assert reader_nll is None and token_lp.requires_grad
    for b in range(B):
        for k in range(K):
            with torch.no_grad():
                one = reader.loss(ids[b:b + 1, k:k + 1], mask[b:b + 1, k:k + 1], dec[b:b + 1], labels[b:b + 1],
                                  label_mask[b:b + 1]) * label_mask[b].sum()
            assert token_lp[b, k].sum().item() == pytest.approx(-one.item(), rel=1e-4, abs=1e-4)
    assert token_lp[1, :, 3].abs().max() == 0  # masked answer position
    token_lp.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in reader.decoder.parameters())


def test_individual_topk_prediction_rule_against_a_direct_computation(single_rank):
    """Candidates = each passage's own greedy answer; score(c) = log Σ_k p(z_k|q) p(c|q,z_k),
    each p(c|q,z_k) from the full-vocabulary log-softmax of the reader given passage k alone."""
    from megatron.emdr2.openqa.reader_modes import individual_topk_answers

    reader = _reader(seed=1, listen=3.0)  # different answers from different passages
    ids, mask, _, _ = _memory(B=2, K=4, seed=9)
    B, K, S = ids.shape
    log_p_z = torch.log_softmax(torch.tensor([[0.5, 2.0, -1.0, 0.0], [0.0, 0.1, 3.0, -2.0]]), -1)
    bos, eos, pad = 0, 1, 2
    out, scored = individual_topk_answers(reader, ids, mask, log_p_z, max_length=4, num_beams=1, bos_id=bos,
                                          eos_id=eos, pad_id=pad, return_scores=True)
    counts = []
    for b in range(B):
        cands = []
        for k in range(K):
            row = reader.generate(ids[b:b + 1, k:k + 1], mask[b:b + 1, k:k + 1], 4, bos_id=bos, eos_id=eos,
                                  pad_id=pad)[0].tolist()
            cand = tuple(row[:row.index(eos) + 1]) if eos in row else tuple(row)
            if cand not in cands:
                cands.append(cand)
        assert list(scored[b]) == cands
        counts.append(len(cands))
        direct = {}
        for cand in cands:
            dec = torch.tensor([[bos, *cand[:-1]]])
            terms = []
            for k in range(K):
                with torch.no_grad():
                    logits = reader(ids[b:b + 1, k:k + 1], mask[b:b + 1, k:k + 1], dec)[0, :, :REAL_V].double()
                lp = torch.log_softmax(logits, -1)
                ll = sum(lp[t, tok].item() for t, tok in enumerate(cand))
                terms.append(math.exp(log_p_z[b, k].item() + ll))
            direct[cand] = math.log(sum(terms))
            assert scored[b][cand] == pytest.approx(direct[cand], rel=1e-4, abs=1e-4)
        best = max(cands, key=lambda c: direct[c])
        assert out[b, :len(best)].tolist() == list(best) and (out[b, len(best):] == pad).all()
    assert counts == [3, 4]  # several candidates per question, one decoded from two passages


# ----------------------------------------------------------------------------- end to end


def _run(tmp_path, name, extra, iters=3):
    from openqa_helpers import NQ_MINI, ROOT, TINY_OPENQA, env, small_evidence

    from megatron.emdr2.initialize import free_port

    evidence = tmp_path / "evidence.tsv"
    if not evidence.exists():
        small_evidence(tmp_path, 120)
    out = tmp_path / name
    flags = [*TINY_OPENQA, "--evidence", str(evidence), "--train-data", str(NQ_MINI / "train.tsv"),
             "--dev-data", str(NQ_MINI / "dev.tsv"), "--index-dir", str(out / "index"), "--top-k", "3",
             "--global-batch-size", "2", "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", str(iters),
             "--index-reload-interval", "2", "--eval-interval", str(iters), "--eval-max-questions", "4",
             "--save", str(out / "ckpt"), "--save-interval", "1", "--metrics-file", str(out / "metrics.jsonl"),
             # no weight decay: a parameter changes only if a gradient reaches it
             "--weight-decay", "0", *extra]
    proc = subprocess.run([sys.executable, "-m", "tasks.openqa.emdr2", *flags], cwd=ROOT,
                          env=dict(env(1), MASTER_PORT=str(free_port())), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, [r for r in rec if r["kind"] == "train"], [r for r in rec if r["kind"] == "eval"]


def _retriever(out, iteration):
    from megatron.emdr2.openqa import builders
    from megatron.emdr2.training import checkpointing as ckpt

    return builders.load_model_state(str(ckpt.iteration_dir(str(out / "ckpt"), iteration)) + "/mp_rank_00.pt",
                                     "biencoder")


def _changed(a: dict, b: dict, prefix: str) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix) and torch.is_tensor(a[k])
               and a[k].is_floating_point())


@pytest.mark.parametrize("mode", [
    ["--reader-mode", "individual-topk"],
    ["--reader-mode", "joint-topk"],
    ["--retriever-objective", "hard-em", "--hard-em-after-steps", "2"],
    ["--reader-mode", "joint-topk", "--retriever-objective", "none"],
], ids=["individual-topk", "joint-topk", "mml-then-hard-em", "joint-topk-frozen"])
def test_entry_point_trains_and_evaluates_each_mode(tmp_path, mode):
    out, train, evals = _run(tmp_path, "run", mode)
    assert [r["iteration"] for r in train] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in train)
    assert evals and {"em", "top1", "questions"} <= set(evals[-1]) and evals[-1]["questions"] == 4
    from megatron.emdr2.openqa.builders import load_checkpoint_meta

    # `evaluate --load` reads the passages as the run did.
    assert load_checkpoint_meta(str(out / "ckpt"))["reader_mode"] == (mode[1] if mode[0] == "--reader-mode" else "fid")
    first, last = _retriever(out, 1), _retriever(out, 3)
    frozen = "none" in mode
    for tower in ("query_tower.", "context_tower."):
        assert _changed(first, last, tower) != frozen, (tower, mode)
    if "hard-em" in mode:
        assert [r["hard_em"] for r in train] == [0.0, 0.0, 1.0]  # MML for the first N=2 steps
    if "individual-topk" in mode:
        assert all(r["retriever_loss"] == 0 for r in train)
        # `evaluate --load` reads (and decodes) as the run did, without being told.
        from openqa_helpers import NQ_MINI, ROOT, env

        from megatron.emdr2.initialize import free_port

        flags = ["--load", str(out / "ckpt"), "--evidence", str(tmp_path / "evidence.tsv"),
                 "--index-dir", str(tmp_path / "eval-index"), "--qa-file", str(NQ_MINI / "dev.tsv"),
                 "--eval-max-questions", "2", "--metrics-out", str(tmp_path / "m.json")]
        res = subprocess.run([sys.executable, "-m", "tasks.openqa.evaluate", *flags], cwd=ROOT,
                             env=dict(env(1), MASTER_PORT=str(free_port())), capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "reader mode individual-topk" in res.stdout
        assert json.loads((tmp_path / "m.json").read_text())["questions"] == 2
