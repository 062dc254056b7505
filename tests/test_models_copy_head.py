"""The reader's copy head (pointer-generator): a proper distribution, the same likelihoods on
every path (FiD memory, per-passage reuse, KV-cached decoding), and refusals where it cannot go."""

from __future__ import annotations

import pytest
import torch

from megatron.emdr2.config import ModelSize
from megatron.emdr2.openqa import builders

V, REAL_V = 128, 120


@pytest.fixture(scope="module", autouse=True)
def megatron_single_rank():
    from megatron.core import parallel_state

    from megatron.emdr2.initialize import initialize

    if not parallel_state.model_parallel_is_initialized():
        initialize(1, 1, seed=1234)
    yield


def _reader(seed=0, continuation=False):
    torch.manual_seed(seed)
    size = ModelSize(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, seq_length=32,
                     hidden_dropout=0.0, attention_dropout=0.0, copy_head=True, copy_continuation=continuation)
    reader = builders.build_reader(size, V, REAL_V)
    with torch.no_grad():  # a decisive copy attention and a gate away from 1/2
        reader.copy_head.query.weight.mul_(20)
        reader.copy_head.gate.bias.fill_(-0.5)
    return reader.eval()


def _batch(B=2, K=3, S=7, T=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, REAL_V, (B, K, S), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 1, 4:] = 0
    mask[1, 2, 2:] = 0
    # targets copied from the passages (and one absent from every memory)
    labels = torch.stack([ids[0, 0, :T], ids[1, 1, 1:T + 1]])
    labels[1, -1] = 3
    dec = torch.cat([torch.zeros(B, 1, dtype=torch.long), labels[:, :-1]], 1)
    return ids, mask, dec, labels


def _full_log_probs(reader, ids, mask, dec):
    """Teacher-forced log p(w) over the vocabulary [B, T, V], without any cache."""
    states, memory_mask = reader.encode(ids, mask)
    hidden = reader.decoder_hidden(states, memory_mask, dec)
    logits = reader.vocab_parallel_logits(hidden)
    out = reader.copy_head.mix_full(logits, hidden, reader.copy_head.keys(states), memory_mask,
                                    ids.reshape(memory_mask.shape), dec)
    return out.transpose(0, 1)


CONTINUATION = pytest.mark.parametrize("continuation", [False, True], ids=["plain", "continuation"])


@CONTINUATION
def test_copy_mixture_is_a_distribution_and_matches_token_nll(continuation):
    reader = _reader(continuation=continuation)
    ids, mask, dec, labels = _batch()
    with torch.no_grad():
        logp = _full_log_probs(reader, ids, mask, dec)
        states, memory_mask = reader.encode(ids, mask)
        nll = reader.token_nll(states, memory_mask, dec, labels, memory_ids=ids.reshape(memory_mask.shape))
    assert torch.allclose(logp.logsumexp(-1), torch.zeros(2, 4), atol=1e-5)
    assert torch.isinf(logp[..., REAL_V:]).all() or (logp[..., REAL_V:] < -60).all()  # padding ids
    gold = logp.gather(-1, labels[..., None])[..., 0]
    assert torch.allclose(-nll, gold, atol=1e-5)
    # copying helps exactly the tokens present in the memory
    vocab_only = torch.log_softmax(reader(ids, mask, dec).float(), -1).gather(-1, labels[..., None])[..., 0]
    assert (gold[0] > vocab_only[0]).all()
    assert gold[1, -1] < vocab_only[1, -1]  # token 3 is in no passage: only the (1 - g) share is lost


@CONTINUATION
def test_copy_head_per_passage_equals_single_passage_runs(continuation):
    reader = _reader(continuation=continuation)
    ids, mask, dec, labels = _batch()
    B, K = ids.shape[:2]
    with torch.no_grad():
        separate = torch.stack([
            _full_log_probs(reader, ids[:, k:k + 1], mask[:, k:k + 1], dec).gather(-1, labels[..., None])[..., 0]
            for k in range(K)], 1)
        states, memory_mask = reader.encode(ids, mask)
    seq, tok = reader.per_passage_log_likelihood(states, memory_mask, K, dec, labels, max_sequences=B,
                                                 memory_ids=ids.reshape(memory_mask.shape))
    assert torch.allclose(tok, separate, atol=1e-4)
    assert separate.std() > 0.5  # each passage copies from its own tokens only


@CONTINUATION
def test_copy_head_greedy_and_beam_follow_the_distribution(continuation):
    reader = _reader(continuation=continuation)
    ids, mask, _, _ = _batch()
    gen = reader.generate(ids, mask, max_length=5, num_beams=1, bos_id=0, eos_id=1)
    dec = torch.cat([torch.zeros(2, 1, dtype=torch.long), gen[:, :-1]], 1)
    with torch.no_grad():
        logp = _full_log_probs(reader, ids, mask, dec)
    steps = gen.size(1)
    assert torch.equal(logp.argmax(-1)[:, :steps], gen)
    memory = ids.reshape(2, -1)
    assert all(int(t) in set(memory[b].tolist()) for b in range(2) for t in gen[b])  # it copies


@CONTINUATION
def test_copy_head_beam_search_with_every_token_kept_is_exact(continuation):
    """With as many beams as real tokens, beam search over two steps keeps every prefix, so its
    answer must be the best of all answers of length <= 2 under its own score, sum(log p) /
    length (eos ends an answer): found here by scoring every one of them teacher-forced."""
    reader = _reader(continuation=continuation)
    ids, mask, _, _ = _batch()
    B, eos = ids.size(0), 1
    out = reader.generate(ids, mask, max_length=2, num_beams=REAL_V, bos_id=0, eos_id=eos)
    with torch.no_grad():
        first = _full_log_probs(reader, ids, mask, torch.zeros(B, 1, dtype=torch.long))[:, 0]  # [B, V]
        a = torch.arange(REAL_V)
        rep = lambda t: t.repeat_interleave(REAL_V, 0)
        dec = torch.stack([torch.zeros(B * REAL_V, dtype=torch.long), a.repeat(B)], 1)
        second = _full_log_probs(reader, rep(ids), rep(mask), dec)[:, 1].view(B, REAL_V, -1)  # [B, a, V]
    for b in range(B):
        two = (first[b, :REAL_V, None] + second[b, :, :REAL_V]) / 2  # answers a, c (c may be eos)
        two[eos] = float("-inf")  # after eos nothing follows
        best = max(float(first[b, eos]), float(two.max()))
        seq = [int(t) for t in out[b]]
        got = float(first[b, eos]) if seq[0] == eos else float(first[b, seq[0]] + second[b, seq[0], seq[1]]) / 2
        assert got == pytest.approx(best, abs=1e-5), (b, seq, got, best)


@CONTINUATION
def test_copy_head_trains_and_refuses_what_it_cannot_do(continuation):
    from megatron.emdr2.models.convert import ConversionError, megatron_to_hf_t5

    reader = _reader(continuation=continuation).train()
    ids, mask, dec, labels = _batch()
    loss = reader.loss(ids, mask, dec, labels)
    loss.backward()
    assert reader.copy_head.query.weight.grad.abs().sum() > 0
    assert reader.copy_head.gate.weight.grad.abs().sum() > 0
    if continuation:
        assert reader.copy_head.continuation.grad.abs().sum() > 0
    states, memory_mask = reader.encode(ids, mask)
    with pytest.raises(ValueError, match="needs the memory's token ids"):
        reader.token_nll(states, memory_mask, dec, labels)
    with pytest.raises(ConversionError, match="copy head"):
        megatron_to_hf_t5(reader.state_dict(), 4)


def test_repeated_ngram_mask_bans_exactly_the_completing_tokens():
    from megatron.emdr2.models.generation import repeated_ngram_mask

    seqs = torch.tensor([[5, 6, 5, 7, 5], [1, 2, 3, 4, 2]])
    one = repeated_ngram_mask(seqs, 1, 10)
    assert one[0].nonzero().flatten().tolist() == [5, 6, 7] and one[1].nonzero().flatten().tolist() == [1, 2, 3, 4]
    two = repeated_ngram_mask(seqs, 2, 10)  # after "5": 6 and 7 followed 5 before; after "2": 3
    assert two[0].nonzero().flatten().tolist() == [6, 7] and two[1].nonzero().flatten().tolist() == [3]
    three = repeated_ngram_mask(seqs, 3, 10)  # (7, 5) never seen before; (4, 2) neither
    assert three is not None and not three.any()
    assert repeated_ngram_mask(seqs[:, :1], 2, 10) is None  # too short to complete any bigram



def test_continuation_bias_marks_the_successors_of_the_previous_tokens():
    reader = _reader(continuation=True)
    head = reader.copy_head
    ids = torch.tensor([[7, 8, 9, 7, 8, 5]])
    inputs = torch.tensor([[0, 7, 8]])  # fed: start, then 7, then 8
    with torch.no_grad():
        head.continuation.copy_(torch.tensor([1.0, 10.0]))
    bias = head.continuation_bias(ids, inputs)[:, 0]  # [T, M]
    assert torch.equal(bias[0], torch.zeros(6))  # the start token precedes nothing
    assert torch.equal(bias[1], torch.tensor([0., 1., 0., 0., 1., 0.]))  # after a 7
    assert torch.equal(bias[2], torch.tensor([0., 0., 11., 0., 0., 11.]))  # after "7 8"


def test_continuation_copies_a_multi_token_span_sooner():
    """Same seed, same steps: with the continuation bias, a fresh reader learns to copy a
    4-token span from its passage to a lower loss."""
    torch.manual_seed(0)
    B, K, S, T = 8, 2, 12, 4
    ids = torch.randint(5, REAL_V, (B, K, S))
    mask = torch.ones_like(ids)
    start = torch.randint(0, S - T, (B,))
    labels = torch.stack([ids[b, 0, start[b]:start[b] + T] for b in range(B)])
    dec = torch.cat([torch.zeros(B, 1, dtype=torch.long), labels[:, :-1]], 1)
    losses = {}
    for continuation in (False, True):
        reader = _reader(continuation=continuation).train()
        opt = torch.optim.Adam(reader.parameters(), lr=1e-3)
        for _ in range(30):
            opt.zero_grad()
            loss = reader.loss(ids, mask, dec, labels)
            loss.backward()
            opt.step()
        losses[continuation] = float(loss)
    assert losses[True] < 0.8 * losses[False], losses


@CONTINUATION
def test_copy_head_decodes_under_bf16_autocast(continuation):
    # evaluate/answer decode under --autocast (auto picks bf16 on CPUs with native bf16): the copy
    # attention then comes out in bf16 and must still be scattered into the fp32 copy distribution
    from megatron.emdr2.autocast import autocast

    reader = _reader(continuation=continuation)
    ids, mask, dec, _ = _batch()
    with torch.no_grad(), autocast("cpu", torch.bfloat16):
        logp = _full_log_probs(reader, ids, mask, dec)
        for beams in (1, 2):
            gen = reader.generate(ids, mask, max_length=5, num_beams=beams, bos_id=0, eos_id=1)
            assert gen.shape[0] == 2 and gen.dtype == torch.long
    assert logp.dtype == torch.float32
    assert torch.allclose(logp.logsumexp(-1), torch.zeros(2, 4), atol=5e-3)  # bf16 attention weights
