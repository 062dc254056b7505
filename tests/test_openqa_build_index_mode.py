"""The index is embedded without dropout even when the towers are training (a refresh happens
mid-training), and the towers are left in the mode they were in."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def megatron_single_rank():
    from megatron.core import parallel_state

    from megatron.emdr2.initialize import initialize

    if not parallel_state.model_parallel_is_initialized():
        initialize(1, 1, seed=1234)
    yield


def test_refresh_during_training_embeds_without_dropout(nq_mini, tmp_path):
    from megatron.emdr2.config import ModelSize
    from megatron.emdr2.data.evidence import load_evidence
    from megatron.emdr2.data.tokenizer import BertWordPieceTokenizer
    from megatron.emdr2.index.sharded_index import ShardedIndex
    from megatron.emdr2.openqa import builders
    from megatron.emdr2.openqa.retrieval import build_index

    lines = (nq_mini / "evidence.tsv").read_text(encoding="utf-8").splitlines()[:41]
    (tmp_path / "ev.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    evidence = load_evidence(tmp_path / "ev.tsv")
    tok = BertWordPieceTokenizer()
    size = ModelSize(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=64,
                     hidden_dropout=0.5, attention_dropout=0.5)
    torch.manual_seed(0)
    biencoder = builders.build_biencoder(size, tok.vocab_size, shared=True).train()
    query = torch.randn(3, 32)
    results = []
    for name in ("a", "b"):
        build_index(biencoder, tok, evidence, str(tmp_path / name), batch_size=16, max_len=48, progress=False)
        results.append(ShardedIndex.load(tmp_path / name).search(query, 5))
        assert biencoder.training  # mode restored
    assert torch.equal(results[0][1], results[1][1])
    assert torch.allclose(results[0][0], results[1][0])
