"""The EMDR² training step as a whole: its loss equals the objective recomputed in float64 from the
models' own outputs (each passage read alone through the reader's plain forward), and a short
run on a toy corpus raises the retrieval of the passage that holds each answer."""

import dataclasses
import math

import pytest
import torch

from openqa_helpers import NQ_MINI, small_evidence
from test_mss_task import fresh_port  # noqa: F401  (fixture)


def _task(tmp_path, objective, evidence_path, train_examples, top_k=4, copy_head=False, marginalisation="sequence",
          seed=3, iters=2):
    from megatron.emdr2.config import BatchConfig, ModelSize, ScheduleConfig, TrainingConfig
    from megatron.emdr2.data.evidence import load_evidence
    from megatron.emdr2.objectives import ObjectiveConfig
    from megatron.emdr2.openqa.emdr2_task import OpenQAConfig, OpenQATask
    from megatron.emdr2.openqa.index_refresh import RefreshConfig
    from tasks.openqa.common import tokenizers

    class Args:
        vocab_file = None

    size = ModelSize(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=128, hidden_dropout=0.0,
                     attention_dropout=0.0, copy_head=copy_head)
    qa = OpenQAConfig(retriever=size, reader=size, top_k=top_k, query_max_len=32, context_max_len=64,
                      reader_max_len=96, answer_max_len=12, eval_batch_size=8,
                      objective=ObjectiveConfig(objective, marginalisation))
    cfg = TrainingConfig(seed=seed, batch=BatchConfig(4, 4), schedule=ScheduleConfig(train_iters=iters))
    cfg.optimizer.lr = 1e-3
    cfg.logging.progress_bar = False
    rtok, tok = tokenizers(Args)
    refresh = RefreshConfig(index_dir=str(tmp_path / "index"), interval=0, embed_batch_size=64)
    return OpenQATask(qa, cfg, train_examples, [], load_evidence(evidence_path), rtok, tok, refresh), cfg


def _float64_loss(objective, marginalisation, scores, token_lp, answer_mask, fid_nll):
    """The objectives written out per question with Python floats (objectives.py's formulas)."""
    total = 0.0
    B, K = scores.shape
    for b in range(B):
        s = [float(x) for x in scores[b]]
        m = max(s)
        log_z = m + math.log(sum(math.exp(x - m) for x in s))
        log_p = [x - log_z for x in s]
        T = [t for t in range(answer_mask.shape[1]) if answer_mask[b, t] > 0]
        ll = [sum(float(token_lp[b, k, t]) for t in T) for k in range(K)]
        if objective == "emdr2" and marginalisation == "sequence":
            terms = [ll[k] + log_p[k] for k in range(K)]
            mm = max(terms)
            retriever = -(mm + math.log(sum(math.exp(x - mm) for x in terms)))
        elif objective == "emdr2":
            retriever = 0.0
            for t in T:
                terms = [float(token_lp[b, k, t]) + log_p[k] for k in range(K)]
                mm = max(terms)
                retriever -= mm + math.log(sum(math.exp(x - mm) for x in terms))
        elif objective == "kl":
            mean = [x / len(T) for x in ll]
            mm = max(mean)
            z = sum(math.exp(x - mm) for x in mean)
            target = [math.exp(x - mm) / z for x in mean]
            retriever = sum(p * (math.log(p) - log_p[k]) for k, p in enumerate(target) if p > 0)
        elif objective == "hard-em":
            best = max(range(K), key=lambda k: (ll[k], -k))
            retriever = -log_p[best]
        else:
            raise ValueError(objective)
        total += float(fid_nll[b]) + retriever
    return total / B


@pytest.mark.parametrize("objective,marginalisation", [("emdr2", "sequence"), ("emdr2", "token"), ("kl", "sequence"),
                                                       ("hard-em", "sequence")])
def test_step_loss_equals_the_objective_recomputed_from_the_models(tmp_path, fresh_port, objective,  # noqa: F811
                                                                   marginalisation):
    from megatron.emdr2 import initialize
    from megatron.emdr2.data.inputs import decoder_inputs, encode_answers, encode_context
    from megatron.emdr2.data.qa import load_qa

    initialize.initialize(1, 1, seed=3)
    try:
        examples = load_qa(NQ_MINI / "dev.tsv")[:4]
        task, _ = _task(tmp_path, objective, small_evidence(tmp_path, 60), examples,
                        marginalisation=marginalisation)
        models = task.build_models()
        biencoder, reader = models["biencoder"], models["reader"]
        batch = task.make_batch(range(4))
        loss, _ = task.forward_step(models, batch)

        with torch.no_grad():
            # retrieval as the step did (the index and the query tower are deterministic)
            _, ids, _ = task.retrieve(biencoder, batch, task.qa.top_k)
            passages = task.passages(ids)
            q = biencoder.query_tower(batch.query_ids, batch.query_mask).double()
            c_ids, c_mask = encode_context(task.rtok, [p for ps in passages for p in ps], task.qa.context_max_len,
                                           pad_to="longest")
            c = biencoder.context_encoder(c_ids, c_mask).double().view(4, task.qa.top_k, -1)
            scores = torch.einsum("bh,bkh->bk", q, c) * biencoder.score_scale
            # the reader's plain forward: over all K passages, and over each passage alone
            r_ids, r_mask = task.reader_inputs(batch.questions, passages)
            labels, label_mask = encode_answers(task.tok, [e.answers[0] for e in examples], task.qa.answer_max_len,
                                                pad_to="longest")
            dec = decoder_inputs(labels, label_mask, task.tok.bos_id, task.tok.pad_id)

            def gold_logprobs(i, m):
                logp = torch.log_softmax(reader(i, m, dec).double(), -1)
                return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * label_mask

            fid_nll = -gold_logprobs(r_ids, r_mask).sum(-1)
            token_lp = torch.stack([gold_logprobs(r_ids[:, k:k + 1], r_mask[:, k:k + 1])
                                    for k in range(task.qa.top_k)], 1)
        expected = _float64_loss(objective, marginalisation, scores, token_lp, label_mask, fid_nll)
        assert float(loss) == pytest.approx(expected, rel=1e-4, abs=1e-4)
        task.close()
    finally:
        initialize.shutdown()


def _toy_corpus(tmp_path):
    """24 passages about made-up people; each of 8 questions asks for the town stated in exactly
    one passage (the 16 others are about the same people, in other words, with no town)."""
    names = ["alvar", "brisa", "corvin", "delmar", "eskil", "fenna", "garrick", "hollis"]
    towns = ["oslo", "lima", "quito", "hanoi", "dakar", "perth", "tunis", "riga"]
    rows, qa = ["id\ttext\ttitle"], []
    pid = 1
    for i, (name, town) in enumerate(zip(names, towns)):
        rows.append(f"{pid}\t{name} was born in the city of {town} and lived there all his life .\t{name}")
        qa.append((f"where was {name} born", town, pid))
        pid += 1
        for j in range(2):
            other = names[(i + j + 1) % len(names)]
            rows.append(f"{pid}\t{other} once went on a long journey along the coast .\t{other}")
            pid += 1
    (tmp_path / "toy.tsv").write_text("\n".join(rows) + "\n")
    return tmp_path / "toy.tsv", qa


def test_training_raises_retrieval_of_the_answer_passage(tmp_path, fresh_port):  # noqa: F811
    """EMDR² with a copy-head reader on a toy corpus, reading every passage (K = 24, so a random
    retriever's answer passage is always among them): the probability the retriever gives the
    passage holding each answer rises well above chance (1/24) in 12 steps."""
    from megatron.emdr2 import initialize
    from megatron.emdr2.data.inputs import encode_context, encode_query
    from megatron.emdr2.data.qa import QAExample
    from megatron.emdr2.training.loop import Trainer

    initialize.initialize(1, 1, seed=5)
    try:
        path, qa = _toy_corpus(tmp_path)
        examples = [QAExample(q, [a]) for q, a, _ in qa]
        task, cfg = _task(tmp_path, "emdr2", path, examples, top_k=24, copy_head=True, seed=5, iters=12)

        def answer_passage_prob(biencoder):
            """Mean over questions of p(answer passage | q) under a softmax over all passages."""
            biencoder.eval()
            with torch.no_grad():
                q_ids, q_mask = encode_query(task.rtok, [q for q, _, _ in qa], 32, pad_to="longest")
                rows = list(range(len(task.evidence)))
                c_ids, c_mask = encode_context(task.rtok, task.evidence.passages(rows), 64, pad_to="longest")
                s = biencoder.score(biencoder.embed_queries(q_ids, q_mask), biencoder.embed_contexts(c_ids, c_mask))
                p = torch.softmax(s.float(), -1)
                gold = torch.as_tensor(task.evidence.row_of([pid for _, _, pid in qa]))
                out = float(p[torch.arange(len(qa)), gold].mean())
            biencoder.train()
            return out

        trainer = Trainer(task, cfg)
        before = answer_passage_prob(trainer.models["biencoder"])
        trainer.train()
        after = answer_passage_prob(trainer.models["biencoder"])
        assert before < 1.5 / 24 and after > 2 * before and after > 2 / 24, (before, after)  # measured .040 -> .125
        task.close()
    finally:
        initialize.shutdown()
