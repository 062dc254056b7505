"""ICT/DPR pieces without processes: in-batch loss, sentence splitting, ICT pairs, batches, mining."""

import json

import numpy as np
import pytest
import torch

from megatron.emdr2.config import ModelSize, TrainingConfig
from megatron.emdr2.data.answers import has_answer
from megatron.emdr2.data.errors import DataError
from megatron.emdr2.data.evidence import load_evidence
from megatron.emdr2.data.qa import load_qa
from megatron.emdr2.data.tokenizer import BertWordPieceTokenizer
from megatron.emdr2.openqa import negatives as neg
from megatron.emdr2.openqa.dpr_task import DPRConfig, DPRTask
from megatron.emdr2.openqa.ict_task import ICTTask, RetrieverTaskConfig, ict_pair, split_sentences
from megatron.emdr2.openqa.inbatch import inbatch_loss, reference_loss

from openqa_helpers import NQ_MINI

TINY = ModelSize(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=256)


@pytest.fixture(scope="module")
def evidence():
    return load_evidence(NQ_MINI / "evidence.tsv")


@pytest.fixture(scope="module")
def tok():
    return BertWordPieceTokenizer()


def test_inbatch_loss_matches_float64_formula_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, 16, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(12, 16, generator=g, dtype=torch.float64, requires_grad=True)
    pos = torch.arange(6) * 2  # DPR layout: each question's positive, then its hard negative
    loss, metrics = inbatch_loss(q, c, pos, scale=0.25)
    ref = -torch.stack([torch.log_softmax(0.25 * q[i] @ c.t(), 0)[pos[i]] for i in range(6)]).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert reference_loss(q, c, pos, 0.25).item() == pytest.approx(ref.item(), rel=1e-12)
    gq, gc = torch.autograd.grad(loss, (q, c))
    rq, rc = torch.autograd.grad(ref, (q, c))
    assert torch.allclose(gq, rq, rtol=1e-5, atol=1e-7) and torch.allclose(gc, rc, rtol=1e-5, atol=1e-7)
    assert 1.0 <= float(metrics["inbatch_mean_rank"]) <= 12.0
    with pytest.raises(ValueError, match="positives must be"):
        inbatch_loss(q, c, pos[:3], scale=1.0)


def test_split_sentences_keeps_abbreviations_and_initials():
    text = ('Dr. Smith met J. R. R. Tolkien in Oxford. They talked for hours! Was it 1950? '
            'Nobody knows "exactly." In the U.S. it is remembered.')
    assert split_sentences(text) == [
        "Dr. Smith met J. R. R. Tolkien in Oxford.", "They talked for hours!", "Was it 1950?",
        'Nobody knows "exactly."', "In the U.S. it is remembered."]
    assert split_sentences("no boundary here") == ["no boundary here"]
    assert split_sentences("") == []


def test_ict_pair_removes_the_query_sentence_90_percent_of_the_time():
    text = "Alpha one is here. Beta two is there. Gamma three went home. Delta four stayed."
    sentences = split_sentences(text)
    kept = 0
    for i in range(2000):
        query, block, keep = ict_pair(text, np.random.default_rng([1, i]), keep_prob=0.1)
        assert query in sentences
        kept += keep
        if keep:
            assert block == text
        else:
            assert query not in block and block == " ".join(s for s in sentences if s != query)
    assert 0.07 < kept / 2000 < 0.13
    # One sentence only: word windows stand in for sentences.
    q, block, keep = ict_pair(" ".join(f"w{i}" for i in range(50)), np.random.default_rng(0), 0.0)
    assert not keep and q not in block and len(q.split()) <= 20


def test_ict_batch_layout_and_determinism(evidence, tok):
    task = ICTTask(RetrieverTaskConfig(TINY), TrainingConfig(seed=3), tok, evidence, [])
    rows = [0, 5, 17, 2000]
    a, b = task.build_batch(rows, epoch=0), task.build_batch(rows, epoch=0)
    assert torch.equal(a.query_ids, b.query_ids) and torch.equal(a.context_ids, b.context_ids)
    c = task.build_batch(rows, epoch=1)
    assert not torch.equal(a.query_ids, c.query_ids)  # a new epoch draws other sentences
    assert a.context_ids.shape[1] <= 256 and torch.equal(a.positives, torch.arange(4))
    for i, row in enumerate(rows):
        ids = a.context_ids[i][a.context_mask[i].bool()].tolist()
        title = tok.encode(evidence.title(row))
        assert ids[:len(title) + 2] == [tok.cls_id, *title, tok.sep_id] and ids[-1] == tok.sep_id
        q = a.query_ids[i][a.query_mask[i].bool()].tolist()
        assert q[0] == tok.cls_id and q[-1] == tok.sep_id and len(q) <= 64


@pytest.fixture(scope="module")
def bm25_negatives(evidence):
    examples = load_qa(NQ_MINI / "train.jsonl")[:40]
    return examples, neg.mine_bm25(examples, evidence, depth=5, search_depth=50)


def test_bm25_negatives_hold_no_answer_and_no_gold(evidence, bm25_negatives):
    examples, lists = bm25_negatives
    assert sum(len(x) for x in lists) > 0.9 * 5 * len(examples)
    for ex, ids in zip(examples, lists):
        assert not set(ids) & set(ex.gold_passage_ids)
        for pid in ids:
            assert not has_answer(ex.answers, evidence.text(int(evidence.row_of([pid])[0])))
    # BM25 itself works: the gold passage is usually among the top 20.
    scores, ids = neg.BM25Retriever(evidence).search([e.question for e in examples], 20)
    found = np.mean([ex.gold_passage_ids[0] in line for ex, line in zip(examples, ids)])
    assert found > 0.6 and np.all(np.diff(scores, axis=1) <= 1e-6)


def test_negatives_file_round_trip_and_mismatch(tmp_path, bm25_negatives):
    examples, lists = bm25_negatives
    path = tmp_path / "neg.json"
    neg.save_negatives(str(path), examples, lists, "bm25", 5)
    assert neg.load_negatives(str(path), examples) == lists
    with pytest.raises(DataError, match=r"neg\.json: has 40 questions, the training data has 39"):
        neg.load_negatives(str(path), examples[:39])
    with pytest.raises(DataError, match=r"neg\.json: question 0: is"):
        neg.load_negatives(str(path), examples[1:] + examples[:1])
    path.write_text("{not json")
    with pytest.raises(DataError, match="not a mined-negatives file"):
        neg.load_negatives(str(path), examples)


def test_dpr_batch_positive_then_negatives(evidence, tok, tmp_path, bm25_negatives):
    examples, lists = bm25_negatives
    path = tmp_path / "neg.json"
    neg.save_negatives(str(path), examples, lists, "bm25", 5)
    train = load_qa(NQ_MINI / "train.jsonl")[:40]
    task = DPRTask(RetrieverTaskConfig(TINY, context_max_len=256), TrainingConfig(seed=5),
                   DPRConfig(hard_negatives=2, source="file", negatives_file=str(path)), tok, evidence, train, [])
    batch = task.build_batch([3, 7], epoch=0)
    assert batch.context_ids.shape[0] == 6 and batch.positives.tolist() == [0, 3]
    gold = evidence.row_of([train[3].gold_passage_ids[0]])[0]
    first = batch.context_ids[0][batch.context_mask[0].bool()].tolist()
    expect = tok.encode(evidence.title(gold))
    assert first[1:1 + len(expect)] == expect
    chosen = task._negatives_for(3, epoch=0)
    assert len(chosen) == 2 and set(chosen) <= set(lists[3])
    # A QA file without positives cannot train DPR: one line naming the file.
    with pytest.raises(DataError, match=r"dev\.tsv: no question has a positive passage"):
        DPRTask(RetrieverTaskConfig(TINY), TrainingConfig(), DPRConfig(hard_negatives=0), tok, evidence,
                load_qa(NQ_MINI / "dev.tsv"), [])
