"""Model inputs: layouts, truncation, padding and masks."""

import pytest
import torch

from megatron.emdr2.data.inputs import (decoder_inputs, encode_answers, encode_context, encode_context_tokens,
                                        encode_query, encode_reader_inputs)
from megatron.emdr2.data.tokenizer import BertWordPieceTokenizer


@pytest.fixture(scope="module")
def tok():
    return BertWordPieceTokenizer(t5_extras=True, pad_to_multiple=128)


def test_context_layout_and_padding(tok):
    ids, mask = encode_context(tok, [("Paris", "Paris is the capital of France."), ("A", "b " * 400)])
    assert ids.shape == mask.shape == (2, 256) and ids.dtype == torch.long
    title, text = tok.encode("Paris"), tok.encode("Paris is the capital of France.")
    n = 3 + len(title) + len(text)
    assert ids[0, :n].tolist() == [tok.cls_id, *title, tok.sep_id, *text, tok.sep_id]
    assert mask[0].sum() == n and ids[0, n:].eq(tok.pad_id).all()
    assert mask[1].all() and ids[1, -1] == tok.sep_id  # truncated, final [SEP] kept
    ids2, _ = encode_context_tokens(tok, [title], [text], max_len=32)
    assert ids2[0].tolist() == ids[0, :32].tolist()
    short, m = encode_context(tok, [("Paris", "Paris is the capital of France.")], pad_to="longest")
    assert short.shape == (1, n) and m.all()


def test_query_layout(tok):
    ids, mask = encode_query(tok, ["who wrote hamlet?", "x " * 500], max_len=64)
    q = tok.encode("who wrote hamlet?")
    assert ids.shape == (2, 64)
    assert ids[0, : len(q) + 2].tolist() == [tok.cls_id, *q, tok.sep_id]
    assert mask[1].all() and ids[1, 0] == tok.cls_id and ids[1, -1] == tok.sep_id


def test_reader_inputs_fid(tok):
    passages = [("Hamlet", "Hamlet is a tragedy by William Shakespeare."), ("Long", "word " * 1000)]
    ids, mask = encode_reader_inputs(tok, "who wrote hamlet?", passages)
    assert ids.shape == mask.shape == (2, 512)
    expected = tok.encode("question: who wrote hamlet? title: Hamlet context: Hamlet is a tragedy by William Shakespeare.")
    assert ids[0, : len(expected) + 2].tolist() == [tok.cls_id, *expected, tok.sep_id]
    q = tok.encode("question: who wrote hamlet?")
    assert ids[1, 1: 1 + len(q)].tolist() == q  # the question survives truncation
    assert mask[1].all() and ids[1, -1] == tok.sep_id


def test_reader_inputs_sentencepiece(tmp_path):
    """The T5 path: no [CLS], inputs end with </s>."""
    import io

    import sentencepiece as spm

    from megatron.emdr2.data.tokenizer import SentencePieceTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["question title context who wrote hamlet"] * 50),
                                   model_writer=buf, vocab_size=30, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   minloglevel=2, hard_vocab_limit=False)
    (tmp_path / "m.model").write_bytes(buf.getvalue())
    sp = SentencePieceTokenizer(str(tmp_path / "m.model"))
    ids, mask = encode_reader_inputs(sp, "who wrote hamlet", [("Hamlet", "a play")], max_len=64)
    n = int(mask[0].sum())
    assert ids[0, n - 1] == sp.eos_id and ids[0, n:].eq(sp.pad_id).all()
    labels, lmask = encode_answers(sp, ["hamlet"], max_len=8)
    assert labels[0, int(lmask[0].sum()) - 1] == sp.eos_id


def test_answers_and_decoder_inputs(tok):
    labels, mask = encode_answers(tok, ["William Shakespeare", "w " * 100])
    a = tok.encode("William Shakespeare")
    assert labels.shape == (2, 32)
    assert labels[0, : len(a) + 1].tolist() == [*a, tok.eos_id] and mask[0].sum() == len(a) + 1
    assert mask[1].all() and labels[1, -1] == tok.eos_id
    dec = decoder_inputs(labels, mask, tok.bos_id, tok.pad_id)
    assert dec[0, : len(a) + 1].tolist() == [tok.bos_id, *a] and dec[0, len(a) + 1:].eq(tok.pad_id).all()
    assert dec[1, 0] == tok.bos_id and dec[1, 1:].tolist() == labels[1, :-1].tolist()


def test_errors_for_missing_specials():
    plain = BertWordPieceTokenizer()
    with pytest.raises(ValueError, match="eos_id"):
        encode_answers(plain, ["x"])
    with pytest.raises(ValueError, match="pad_to"):
        encode_query(plain, ["x"], pad_to="none")
