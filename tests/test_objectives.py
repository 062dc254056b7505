"""The joint objectives against direct float64 computations of their formulas."""

import numpy as np
import pytest
import torch

from megatron.emdr2.objectives import ObjectiveConfig, joint_loss


def _inputs(B=3, K=4, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, K, generator=g) * 3
    token_lp = -torch.rand(B, K, T, generator=g) * 4  # log-probs <= 0
    mask = torch.ones(B, T)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    reader_nll = torch.rand(B, generator=g) * 5
    return scores, token_lp, mask, reader_nll


def _direct(kind, scores, token_lp, mask, reader_nll):
    """Plain float64 numpy: probabilities, products and sums written out."""
    s, lp, m, r = (x.double().numpy() for x in (scores, token_lp, mask, reader_nll))
    p_z = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
    p_a_z = np.exp((lp * m[:, None, :]).sum(-1))  # p(a|q,z_k)
    if kind == "sequence":
        ret = -np.log((p_a_z * p_z).sum(-1))
        post = p_a_z * p_z / (p_a_z * p_z).sum(-1, keepdims=True)
        grad = -(post - p_z) / len(s)  # d mean(ret) / d s
    else:
        p_tok = np.exp(lp)  # [B,K,T]
        mix = (p_tok * p_z[:, :, None]).sum(1)  # [B,T]
        ret = -(np.log(mix) * m).sum(-1)
        # d/ds_j of -Σ_t log Σ_k p_tk p_k = -Σ_t (p_tj p_j / mix_t - p_j) over real tokens
        resp = p_tok * p_z[:, :, None] / mix[:, None, :]
        grad = -((resp - p_z[:, :, None]) * m[:, None, :]).sum(-1) / len(s)
    return (r + ret).mean(), grad


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_emdr2_loss_and_score_gradient_match_float64_formula(kind):
    scores, token_lp, mask, reader_nll = _inputs()
    scores.requires_grad_(True)
    token_lp.requires_grad_(True)
    out = joint_loss(ObjectiveConfig("emdr2", kind), scores, token_lp, mask, reader_nll)
    out.loss.backward()
    expected_loss, expected_grad = _direct(kind, scores.detach(), token_lp.detach(), mask, reader_nll)
    assert out.loss.item() == pytest.approx(expected_loss, rel=1e-5)
    np.testing.assert_allclose(scores.grad.double().numpy(), expected_grad, rtol=1e-4, atol=1e-6)
    # Stop-gradient: nothing flows into the per-passage reader likelihoods.
    assert token_lp.grad is None or torch.count_nonzero(token_lp.grad) == 0


def test_the_two_marginalisations_differ():
    scores, token_lp, mask, reader_nll = _inputs(seed=1)
    seq = joint_loss(ObjectiveConfig("emdr2", "sequence"), scores, token_lp, mask, reader_nll).loss
    tok = joint_loss(ObjectiveConfig("emdr2", "token"), scores, token_lp, mask, reader_nll).loss
    assert abs(seq.item() - tok.item()) > 1e-3


def _lalt2_direct(scores, token_lp, mask, reader_nll):
    """The paper's L_alt-2 / the original's --ret-kldiv in plain float64 numpy, written out from
    get_kl_div_retriever: teacher = softmax_k(Σ_t log p_t·mask / Σ_t mask); loss =
    F.kl_div(log p(z|q), teacher, 'batchmean') = Σ_{b,k} teacher (log teacher − log p) / B."""
    s, lp, m, r = (x.double().numpy() for x in (scores, token_lp, mask, reader_nll))
    B, K = s.shape
    p_z = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
    loss_ret, grad = 0.0, np.zeros_like(s)
    for b in range(B):
        mean_ll = [sum(lp[b, k, t] for t in range(lp.shape[2]) if m[b, t]) / m[b].sum() for k in range(K)]
        e = np.exp(np.array(mean_ll) - max(mean_ll))
        teacher = e / e.sum()
        loss_ret += sum(teacher[k] * (np.log(teacher[k]) - np.log(p_z[b, k])) for k in range(K))
        grad[b] = (p_z[b] - teacher) / B  # d/ds of −Σ_k teacher_k log softmax(s)_k
    return r.mean() + loss_ret / B, loss_ret / B, grad


def test_kl_is_the_papers_lalt2_against_float64():
    """kl = the paper's L_alt-2 = the original's --ret-kldiv: reader likelihood alone (per-token
    mean, no retriever prior, no temperature), KL(target ‖ p(z|q)); not the posterior."""
    scores, token_lp, mask, reader_nll = _inputs(seed=2)
    scores.requires_grad_(True)
    token_lp.requires_grad_(True)
    out = joint_loss(ObjectiveConfig("kl"), scores, token_lp, mask, reader_nll)
    out.loss.backward()
    loss, ret, grad = _lalt2_direct(scores.detach(), token_lp.detach(), mask, reader_nll)
    assert out.loss.item() == pytest.approx(loss, rel=1e-6)
    assert out.retriever_loss.item() == pytest.approx(ret, rel=1e-5)
    np.testing.assert_allclose(scores.grad.double().numpy(), grad, rtol=1e-5, atol=1e-7)
    assert token_lp.grad is None or torch.count_nonzero(token_lp.grad) == 0  # target is a constant
    # It is a different objective from EMDR²: the score gradients differ.
    scores2 = scores.detach().clone().requires_grad_(True)
    joint_loss(ObjectiveConfig("emdr2", "sequence"), scores2, token_lp.detach(), mask, reader_nll).loss.backward()
    assert np.abs(scores2.grad.numpy() - scores.grad.numpy()).max() > 1e-3


def test_kl_uses_the_mean_not_the_sum_over_tokens():
    # Two answers of different lengths: a mean over 1 token and over 5 tokens.
    scores = torch.zeros(1, 2)
    token_lp = torch.tensor([[[-1.0, -1.0, -1.0, -1.0, -1.0], [-2.0, -0.1, -0.1, -0.1, -0.1]]])
    mask = torch.ones(1, 5)
    out = joint_loss(ObjectiveConfig("kl"), scores, token_lp, mask, torch.zeros(1))
    teacher = torch.softmax(torch.tensor([-1.0, -2.4 / 5], dtype=torch.float64), -1)
    expected = (teacher * (teacher.log() - np.log(0.5))).sum()
    assert out.retriever_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_kl_posterior_trains_exactly_like_emdr2_sequence():
    """kl-posterior (the former 'kl'): KL(posterior ‖ p) with the posterior held fixed has the
    gradient p − posterior with respect to the scores, which is emdr2/sequence's gradient."""
    scores, token_lp, mask, reader_nll = _inputs(seed=2)
    scores.requires_grad_(True)
    out = joint_loss(ObjectiveConfig("kl-posterior"), scores, token_lp, mask, reader_nll)
    out.loss.backward()
    s = scores.detach().double()
    p_z = torch.softmax(s, -1)
    ll = (token_lp.double() * mask[:, None, :]).sum(-1)
    post = torch.softmax(ll + torch.log(p_z), -1)
    kl = (post * (post.log() - p_z.log())).sum(-1)
    assert out.loss.item() == pytest.approx((reader_nll.double() + kl).mean().item(), rel=1e-5)
    np.testing.assert_allclose(scores.grad.double(), (p_z - post) / len(s), rtol=1e-4, atol=1e-7)
    scores2 = scores.detach().clone().requires_grad_(True)
    joint_loss(ObjectiveConfig("emdr2", "sequence"), scores2, token_lp, mask, reader_nll).loss.backward()
    np.testing.assert_allclose(scores2.grad.numpy(), scores.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_pdist_and_frozen_retriever():
    scores, token_lp, mask, reader_nll = _inputs(seed=3)
    out = joint_loss(ObjectiveConfig("pdist", pdist_temperature=2.0), scores, token_lp, mask, reader_nll)
    ll = (token_lp.double() * mask[:, None, :]).sum(-1)
    target = torch.softmax(ll / 2.0, -1)
    log_p = torch.log_softmax(scores.double(), -1)
    kl = (target * (target.log() - log_p)).sum(-1)
    assert out.retriever_loss.item() == pytest.approx(kl.mean().item(), rel=1e-5)
    none = joint_loss(ObjectiveConfig("none"), scores, token_lp, mask, reader_nll)
    assert none.loss.item() == pytest.approx(reader_nll.mean().item())
    assert none.retriever_loss.item() == 0


def test_unknown_objective_is_rejected():
    with pytest.raises(ValueError, match="retriever objective 'bogus'"):
        ObjectiveConfig("bogus")
