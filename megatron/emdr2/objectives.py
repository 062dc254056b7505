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
  hard-em            -log p(z_k*|q), k* = argmax_k SG[log p(a|q,z_k)] (Min et al. 2019; the EMDR²
                     paper's appendix D.1): the retriever is pushed towards the single passage with
                     the highest answer likelihood. With ``hard_em_after_steps`` N > 0, the first N
                     optimizer steps use emdr2 (the MML objective, with ``marginalisation``) and hard
                     EM only from step N+1 on (``effective_objective``).
  none               reader only: the frozen-retriever FiD baseline

Reader modes (``reader_mode``; the comparison baselines of Sachan et al., ACL 2021, "End-to-End
Training of Neural Retrievers for Open-Domain Question Answering"):
  fid                the above: FiD reader term + one of the retriever terms.
  individual-topk    the reader reads each passage alone (single-passage FiD), and the loss is the
                     marginal likelihood  -log Σ_k p(a|q,z_k) p(z_k|q)  with gradient into BOTH the
                     reader (token_logprobs carries gradient here) and the retriever; no separate
                     FiD term (``individual_topk_loss``).
  joint-topk         the FiD reader with log p(z_k|q) added to every decoder cross-attention logit
                     over passage k's tokens (``FiDReader.token_nll(memory_bias=...)``): the loss is
                     that reader's NLL alone, and the retriever learns only through the attention.
  With either, ``retriever_objective`` is "emdr2" (its default: the mode's own training of the
  retriever) or "none" (frozen towers; p(z|q) still weights the passages); ``retriever_weight``
  and ``marginalisation`` do not apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

RETRIEVER_OBJECTIVES = ("emdr2", "kl", "kl-posterior", "pdist", "hard-em", "none")
MARGINALISATIONS = ("sequence", "token")
READER_MODES = ("fid", "individual-topk", "joint-topk")


@dataclass
class ObjectiveConfig:
    retriever_objective: str = "emdr2"
    marginalisation: str = "sequence"  # for emdr2: the paper's "sequence" or the original's "token"
    pdist_temperature: float = 1.0
    retriever_weight: float = 1.0
    reader_mode: str = "fid"
    hard_em_after_steps: int = 0  # hard-em: emdr2 (MML) for this many optimizer steps first

    def __post_init__(self):
        if self.retriever_objective not in RETRIEVER_OBJECTIVES:
            raise ValueError(f"retriever objective {self.retriever_objective!r} is not one of {RETRIEVER_OBJECTIVES}")
        if self.marginalisation not in MARGINALISATIONS:
            raise ValueError(f"marginalisation {self.marginalisation!r} is not one of {MARGINALISATIONS}")
        problem = self.problem()
        if problem:
            raise ValueError(problem)

    def problem(self) -> str | None:
        """Why this combination of options is not supported (one line), or None."""
        if self.reader_mode not in READER_MODES:
            return f"reader mode {self.reader_mode!r} is not one of {READER_MODES}"
        if self.hard_em_after_steps < 0:
            return f"hard_em_after_steps must be >= 0, got {self.hard_em_after_steps}"
        if self.hard_em_after_steps and self.retriever_objective != "hard-em":
            return "--hard-em-after-steps applies to --retriever-objective hard-em only"
        if self.reader_mode != "fid":
            if self.retriever_objective not in ("emdr2", "none"):
                return (f"--reader-mode {self.reader_mode} trains the retriever through its own loss: use "
                        f"--retriever-objective emdr2 (the default) or none (frozen retriever), "
                        f"not {self.retriever_objective}")
            if self.marginalisation != "sequence":
                return f"--marginalisation {self.marginalisation} applies to --reader-mode fid only"
        return None

    def effective_objective(self, step: int) -> str:
        """The retriever objective used at a step (``step`` optimizer steps done): hard-em with
        ``hard_em_after_steps`` N is emdr2 (MML) while step < N."""
        if self.retriever_objective == "hard-em" and step < self.hard_em_after_steps:
            return "emdr2"
        return self.retriever_objective


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


def hard_em_loss(log_p_z: torch.Tensor, seq_ll: torch.Tensor) -> torch.Tensor:
    """-log p(z_k*|q), k* = argmax_k SG[log p(a|q,z_k)] (the first on ties), per question: [B]."""
    best = seq_ll.detach().argmax(dim=-1, keepdim=True)
    return -log_p_z.gather(-1, best).squeeze(-1)


def individual_topk_loss(log_p_z: torch.Tensor, seq_ll: torch.Tensor) -> torch.Tensor:
    """-log Σ_k p(a|q,z_k) p(z_k|q) with NO stop-gradient: the marginal likelihood of the
    individual top-k reader, trained into both the reader and the retriever: [B]."""
    return -torch.logsumexp(seq_ll.float() + log_p_z, dim=-1)


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
               answer_mask: torch.Tensor, reader_nll: Optional[torch.Tensor], step: int = 0) -> ObjectiveOutput:
    """The loss of ``cfg`` at ``step`` (optimizer steps done; keys the hard-EM schedule).

    reader_mode "fid" / "joint-topk": ``reader_nll`` is the FiD (for joint-topk: retrieval-biased)
    reader's NLL and ``token_logprobs`` the per-passage likelihoods under a stop-gradient (unused,
    may be zeros, for joint-topk and "none"). "individual-topk": ``token_logprobs`` carries the
    reader's gradient and ``reader_nll`` is ignored; the marginal NLL is reported as reader_loss.
    """
    log_p_z = retriever_log_probs(retrieval_scores)
    seq_ll = sequence_loglik(token_logprobs.float(), answer_mask)
    if cfg.reader_mode == "individual-topk":
        marginal = individual_topk_loss(log_p_z, seq_ll)
        loss = marginal.mean()
        return ObjectiveOutput(loss, loss.detach(), torch.zeros((), device=loss.device), log_p_z.detach(),
                               posterior(log_p_z, seq_ll))
    objective = cfg.effective_objective(step)
    if cfg.reader_mode == "joint-topk":
        objective = "none"  # the retriever learns through the reader's attention only
    if objective == "emdr2":
        if cfg.marginalisation == "sequence":
            retriever = emdr2_sequence_loss(log_p_z, seq_ll)
        else:
            retriever = emdr2_token_loss(log_p_z, token_logprobs, answer_mask)
    elif objective == "kl":
        retriever = kl_to_target(reader_likelihood_target(token_logprobs, answer_mask), log_p_z)
    elif objective == "hard-em":
        retriever = hard_em_loss(log_p_z, seq_ll)
    elif objective == "kl-posterior":
        retriever = kl_to_target(posterior(log_p_z, seq_ll), log_p_z)
    elif objective == "pdist":
        retriever = kl_to_target(torch.softmax(seq_ll.detach() / cfg.pdist_temperature, -1), log_p_z)
    else:
        retriever = torch.zeros_like(reader_nll, dtype=torch.float32)
    reader = reader_nll.float()
    loss = (reader + cfg.retriever_weight * retriever).mean()
    return ObjectiveOutput(loss, reader.mean().detach(), retriever.mean().detach(), log_p_z.detach(),
                           posterior(log_p_z, seq_ll))
