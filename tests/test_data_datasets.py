"""Task datasets: evidence contexts from pre-tokenised files equal those from raw text; QA items;
everything pickles for DataLoader workers."""

import pickle

import pytest
import torch

from megatron.emdr2.data.datasets import EvidenceContextDataset, QADataset, collate
from megatron.emdr2.data.evidence import load_evidence
from megatron.emdr2.data.inputs import encode_context
from megatron.emdr2.data.preprocess import preprocess_evidence
from megatron.emdr2.data.qa import load_qa
from megatron.emdr2.data.samplers import ResumableDistributedSampler
from megatron.emdr2.data.tokenizer import BertWordPieceTokenizer


@pytest.fixture(scope="module")
def tok():
    return BertWordPieceTokenizer(t5_extras=True)


def test_evidence_contexts_pretokenised_equal_raw(nq_mini, tmp_path, tok):
    prefix = tmp_path / "nq"
    preprocess_evidence(nq_mini / "evidence.tsv", prefix, workers=0, progress=False)
    raw = EvidenceContextDataset(load_evidence(nq_mini / "evidence.tsv"), tok)
    mm_evidence = pickle.loads(pickle.dumps(load_evidence(prefix)))  # reopened, not copied
    pre = EvidenceContextDataset(mm_evidence, pickle.loads(pickle.dumps(tok)))
    assert len(raw) == len(pre) == 3588
    for row in (0, 1, 77, 3587):
        a, b = raw[row], pre[row]
        assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["mask"], b["mask"]) and a["id"] == row + 1
    ids, mask = encode_context(tok, mm_evidence.passages([77]))
    assert torch.equal(ids[0], pre[77]["ids"])
    batch = collate([pre[i] for i in range(4)])
    assert batch["ids"].shape == (4, 256) and batch["row"].tolist() == [0, 1, 2, 3]


def test_qa_dataset_with_sampler_and_loader(nq_mini, tok):
    ds = QADataset(load_qa(nq_mini / "dev.tsv"), tok, query_max_len=64)
    sampler = ResumableDistributedSampler(len(ds), 8, dp_rank=0, dp_size=2, seed=5)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["query_ids"].shape == (4, 64) and batch["answer_labels"].shape == (4, 32)
    assert len(batch["answers"]) == 4 and isinstance(batch["question"][0], str)
    multi = next(i for i, ex in enumerate(ds.examples) if len(ex.answers) > 2)
    picks = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        picks.add(tuple(ds[multi]["answer_labels"].tolist()))
    assert len(picks) > 1  # another gold answer in another epoch
    # deterministic in (seed, epoch, index): a fresh dataset, and this one after other epochs,
    # draw the same answer for epoch 3
    ds.set_epoch(3)
    first = ds[multi]["answer_labels"]
    again = QADataset(load_qa(nq_mini / "dev.tsv"), tok, query_max_len=64)
    again.set_epoch(3)
    assert torch.equal(again[multi]["answer_labels"], first)
    ds.set_epoch(4), ds.set_epoch(3)
    assert torch.equal(ds[multi]["answer_labels"], first)
