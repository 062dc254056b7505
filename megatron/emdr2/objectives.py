"""Joint reader-retriever objectives, computed from the same few tensors.

Inputs (B questions, K retrieved passages, T answer tokens):
  retrieval_scores  [B, K]     f_q(q)·f_d(z_k)/τ from the *current* towers (carries gradient)
  token_logprobs    [B, K, T]  log p(a_t | q, z_k, a_<t) from the reader given one passage
                               (no gradient: the stop-gradient SG[·] of the paper)
  answer_mask       [B, T]     1 for real answer tokens
  reader_nll        [B]        -log p(a | q, Z) of the FiD reader over all K passages

Objectives (loss = reader_nll + retriever term, averaged over the batch):
  emdr2 / sequence   -log Σ_k SG[p(a|q,z_k)] p(z_k|q)            (the paper)
  emdr2 / token      -Σ_t log Σ_k SG[p(a_t|q,z_k,a_<t)] p(z_k|q)  (the original code)
  kl                 KL(target ‖ p(z|q)), target = softmax_k( (1/T) Σ_t log p(a_t|q,z_k,a_<t) ):
                     the per-token MEAN answer log-likelihood of each passage, no retriever prior,
                     no temperature. The paper's L_alt-2 (appendix D.1) and exactly the original's
                     `--ret-kldiv` (`get_kl_div_retriever` in tasks/openqa/e2eqa/train_e2eqa.py:
                     teacher = softmax over k of Σ_t gold_log_probs·mask / Σ_t mask, computed under
                     no_grad; F.kl_div(topk_log_probs, teacher, 'batchmean')). T counts the answer
                     tokens and [EOS], as the original's loss_mask does.
  kl-posterior       KL(posterior ‖ p(z|q)), posterior ∝ SG[p(a|q,z_k)] p(z_k|q) held fixed. Its
                     gradient with respect to the scores is p(z|q) − posterior, *exactly* the gradient
                     of emdr2/sequence: it trains identically to emdr2/sequence and differs only in
                     the loss value logged. Kept for comparison; not a different objective.
  pdist              KL(softmax_k(log p(a|q,z_k)/temperature) ‖ p(z|q))  (Atlas perplexity distillation;
                     whole-answer log-likelihood, so it differs from kl by sum vs mean over tokens)
  none               reader only: the frozen-retriever FiD baseline
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RETRIEVER_OBJECTIVES = ("emdr2", "kl", "kl-posterior", "pdist", "none")
MARGINALISATIONS = ("sequence", "token")


@dataclass
class ObjectiveConfig:
    retriever_objective: str = "emdr2"
    marginalisation: str = "sequence"  # for emdr2: the paper's "sequence" or the original's "token"
    pdist_temperature: float = 1.0
    retriever_weight: float = 1.0

    def __post_init__(self):
        if self.retriever_objective not in RETRIEVER_OBJECTIVES:
            raise ValueError(f"retriever objective {self.retriever_objective!r} is not one of {RETRIEVER_OBJECTIVES}")
        if self.marginalisation not in MARGINALISATIONS:
            raise ValueError(f"marginalisation {self.marginalisation!r} is not one of {MARGINALISATIONS}")


def sequence_loglik(token_logprobs: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """log p(a | q, z_k) = Σ_t log p(a_t | ...) over real answer tokens: [B, K]."""
    return (token_logprobs * answer_mask.unsqueeze(1).to(token_logprobs.dtype)).sum(-1)


def mean_token_loglik(token_logprobs: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """(1/T) Σ_t log p(a_t | q, z_k, a_<t) over the real answer tokens: [B, K] (the original's
    teacher logits for --ret-kldiv)."""
    mask = answer_mask.to(token_logprobs.dtype)
    return sequence_loglik(token_logprobs, answer_mask) / mask.sum(-1, keepdim=True).clamp_min(1)


def reader_likelihood_target(token_logprobs: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """L_alt-2's target: softmax_k of the per-token-mean answer log-likelihood, constant: [B, K]."""
    return torch.softmax(mean_token_loglik(token_logprobs.detach().float(), answer_mask.float()), dim=-1)


def retriever_log_probs(retrieval_scores: torch.Tensor) -> torch.Tensor:
    """log p(z_k | q): softmax over the K retrieved passages, in fp32."""
    return torch.log_softmax(retrieval_scores.float(), dim=-1)


def emdr2_sequence_loss(log_p_z: torch.Tensor, seq_ll: torch.Tensor) -> torch.Tensor:
    """-log Σ_k SG[p(a|q,z_k)] p(z_k|q), per question: [B]."""
    return -torch.logsumexp(seq_ll.detach().float() + log_p_z, dim=-1)


def emdr2_token_loss(log_p_z: torch.Tensor, token_logprobs: torch.Tensor,
                     answer_mask: torch.Tensor) -> torch.Tensor:
    """-Σ_t log Σ_k SG[p(a_t|q,z_k,a_<t)] p(z_k|q), per question: [B]."""
    per_token = torch.logsumexp(token_logprobs.detach().float() + log_p_z.unsqueeze(-1), dim=1)  # [B, T]
    return -(per_token * answer_mask.float()).sum(-1)


def posterior(log_p_z: torch.Tensor, seq_ll: torch.Tensor) -> torch.Tensor:
    """p(z_k | q, a) ∝ p(a|q,z_k) p(z_k|q), treated as a constant target: [B, K]."""
    return torch.softmax(seq_ll.detach().float() + log_p_z.detach(), dim=-1)


def kl_to_target(target: torch.Tensor, log_p_z: torch.Tensor) -> torch.Tensor:
    """KL(target ‖ p(z|q)) per question: [B] (target has no gradient)."""
    target = target.detach()
    return (target * (torch.log(target.clamp_min(1e-30)) - log_p_z)).sum(-1)


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor            # scalar: mean over the batch of reader + weight * retriever
    reader_loss: torch.Tensor     # scalar, detached
    retriever_loss: torch.Tensor  # scalar, detached
    log_p_z: torch.Tensor         # [B, K], detached: retrieval distribution (for logging/output)
    posterior: torch.Tensor       # [B, K], detached


def joint_loss(cfg: ObjectiveConfig, retrieval_scores: torch.Tensor, token_logprobs: torch.Tensor,
               answer_mask: torch.Tensor, reader_nll: torch.Tensor) -> ObjectiveOutput:
    log_p_z = retriever_log_probs(retrieval_scores)
    seq_ll = sequence_loglik(token_logprobs.float(), answer_mask)
    if cfg.retriever_objective == "emdr2":
        if cfg.marginalisation == "sequence":
            retriever = emdr2_sequence_loss(log_p_z, seq_ll)
        else:
            retriever = emdr2_token_loss(log_p_z, token_logprobs, answer_mask)
    elif cfg.retriever_objective == "kl":
        retriever = kl_to_target(reader_likelihood_target(token_logprobs, answer_mask), log_p_z)
    elif cfg.retriever_objective == "kl-posterior":
        retriever = kl_to_target(posterior(log_p_z, seq_ll), log_p_z)
    elif cfg.retriever_objective == "pdist":
        retriever = kl_to_target(torch.softmax(seq_ll.detach() / cfg.pdist_temperature, -1), log_p_z)
    else:
        retriever = torch.zeros_like(reader_nll, dtype=torch.float32)
    reader = reader_nll.float()
    loss = (reader + cfg.retriever_weight * retriever).mean()
    return ObjectiveOutput(loss, reader.mean().detach(), retriever.mean().detach(), log_p_z.detach(),
                           posterior(log_p_z, seq_ll))
