"""Warm starts from a Hugging Face BERT: the reader's encoder and truncated retriever towers
compute what the BERT computes (a random BERT saved to disk, so no download is involved)."""

from __future__ import annotations

import pytest
import torch

from megatron.emdr2.config import ModelSize
from megatron.emdr2.openqa import builders


@pytest.fixture(scope="module", autouse=True)
def megatron_single_rank():
    from megatron.core import parallel_state

    from megatron.emdr2.initialize import initialize

    if not parallel_state.model_parallel_is_initialized():
        initialize(1, 1, seed=1234)
    yield


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=80, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # a non-zero segment embedding, so that folding it is checked
        model.embeddings.token_type_embeddings.weight.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("bert")
    model.save_pretrained(path)
    return model, path


def _hf_states(model, ids, mask, layers):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states[layers]  # after the output LayerNorm of layer `layers`


def _size(layers, **kw):
    return ModelSize(num_layers=layers, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                     seq_length=48, hidden_dropout=0.0, attention_dropout=0.0, post_layernorm=True,
                     layernorm_epsilon=1e-12, **kw)


@pytest.mark.parametrize("layers", [3, 2])
def test_reader_encoder_from_bert_matches_bert(hf_bert, layers):
    model, path = hf_bert
    reader = builders.build_reader(_size(layers, decoder_num_layers=1), vocab_size=128, real_vocab_size=124)
    builders.bert_into_reader_encoder(reader, builders.load_bert_tower_state(str(path), layers), str(path))
    reader.eval()
    assert len(reader.decoder.layers) == 1
    torch.manual_seed(1)
    ids = torch.randint(0, 120, (2, 3, 20))
    mask = torch.ones_like(ids)
    mask[0, 1, 12:] = 0
    states, _ = reader.encode(ids, mask)
    want = _hf_states(model, ids.view(6, 20), mask.view(6, 20), layers).view(2, 60, 64)
    keep = mask.view(2, 60).bool()
    assert torch.allclose(states[keep], want[keep], atol=1e-4), (states[keep] - want[keep]).abs().max()
    # rows past BERT's vocabulary keep the reader's own initialisation (not zero, not copied)
    assert reader.embedding.word_embeddings.weight[120:].abs().sum() > 0


def test_truncated_retriever_tower_matches_bert(hf_bert):
    model, path = hf_bert
    tower = builders.build_tower(_size(2), vocab_size=120)
    builders.load_into(tower, builders.load_bert_tower_state(str(path), 2, seq_length=48), str(path))
    tower.eval()
    ids = torch.randint(0, 120, (3, 16))
    mask = torch.ones_like(ids)
    got = tower(ids, mask)
    want = _hf_states(model, ids, mask, 2)[:, 0]
    assert torch.allclose(got, want, atol=1e-4)


def test_bert_warm_start_errors_name_the_file(hf_bert, tmp_path):
    _, path = hf_bert
    with pytest.raises(builders.PretrainedError, match=r"has 3 layers, the model asks for 4"):
        builders.load_bert_tower_state(str(path), 4)
    wide = builders.build_reader(ModelSize(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=48),
                                 vocab_size=128, real_vocab_size=124)
    with pytest.raises(builders.PretrainedError, match=r"hidden size 64 differs"):
        builders.bert_into_reader_encoder(wide, builders.load_bert_tower_state(str(path), 2), str(path))
    with pytest.raises(builders.PretrainedError, match=str(tmp_path / "nope")):
        builders.load_bert_tower_state(str(tmp_path / "nope"), 2)
