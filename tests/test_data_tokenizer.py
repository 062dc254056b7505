"""Tokenisers: BERT WordPiece (checked against transformers' independent BertTokenizer) and a
SentencePiece model trained here from nq-mini text."""

import io

import pytest

from megatron.emdr2.data.evidence import read_evidence_tsv
from megatron.emdr2.data.tokenizer import (BertWordPieceTokenizer, SentencePieceTokenizer,
                                           default_vocab_file)


@pytest.fixture(scope="module")
def bert():
    return BertWordPieceTokenizer()


@pytest.fixture(scope="module")
def passages(nq_mini):
    rows = []
    for _, text, title in read_evidence_tsv(nq_mini / "evidence.tsv"):
        rows.append((title, text))
        if len(rows) == 300:
            break
    return rows


def test_default_vocab_and_special_ids(bert, monkeypatch, tmp_path):
    assert default_vocab_file().endswith("data/vocab/bert-base-uncased-vocab.txt")
    assert bert.vocab_size == 30522
    assert (bert.pad_id, bert.unk_id, bert.cls_id, bert.sep_id, bert.mask_id) == (0, 100, 101, 102, 103)
    assert bert.bos_id is None and bert.sentinel_ids == []
    with pytest.raises(ValueError, match="t5_extras"):
        bert.sentinel(0)
    monkeypatch.setenv("EMDR2_VOCAB_FILE", str(tmp_path / "v.txt"))
    assert default_vocab_file() == str(tmp_path / "v.txt")


def test_t5_extras_follow_the_original_release_and_pad(bert):
    t5 = BertWordPieceTokenizer(t5_extras=True, pad_to_multiple=128)
    assert (t5.bos_id, t5.eos_id) == (30522, 30523)          # [BOS], [EOS] appended in that order
    assert t5.sentinel_ids == list(range(30524, 30624)) and t5.sentinel(99) == 30623
    assert t5.real_vocab_size == 30624 and t5.vocab_size == 30720  # padded to a multiple of 128
    assert t5.id_to_token(30522) == "[BOS]" and t5.id_to_token(30700).startswith("<vocab_pad")
    ids = [t5.bos_id] + t5.encode("The Eiffel Tower") + [t5.sentinel(0), t5.eos_id, t5.pad_id, 30700]
    assert t5.decode(ids) == "the eiffel tower"
    assert t5.encode("x [SEP] [BOS] y") == bert.encode("x [SEP] [BOS] y")  # literal text, not control ids
    assert bert.sep_id not in bert.encode("x [SEP] y")


def test_matches_transformers_bert_tokenizer(bert, passages):
    transformers = pytest.importorskip("transformers")
    ref = transformers.BertTokenizer(default_vocab_file(), do_lower_case=True)
    for title, text in passages[:150]:
        for s in (title, text):
            assert bert.encode(s) == ref.convert_tokens_to_ids(ref.tokenize(s)), s
    assert bert.encode_batch([t for _, t in passages[:20]]) == [bert.encode(t) for _, t in passages[:20]]


def test_decode_round_trip(bert):
    text = "Wilhelm Conrad Röntgen won the first Nobel Prize in Physics in 1901."
    assert bert.decode(bert.encode(text)) == "wilhelm conrad rontgen won the first nobel prize in physics in 1901."
    assert bert.decode([bert.cls_id] + bert.encode("hello world") + [bert.sep_id, 0, 0]) == "hello world"
    assert bert.tokens("Unaffable") == ["una", "##ffa", "##ble"]  # greedy longest match, lower-cased


def test_cased_and_bad_vocab(tmp_path):
    cased = BertWordPieceTokenizer(lower_case=False)
    assert cased.encode("Paris") != BertWordPieceTokenizer().encode("Paris")
    assert "lower_case=False" in cased.name
    bad = tmp_path / "vocab.txt"
    bad.write_text("[PAD]\nhello\n", encoding="utf-8")
    from megatron.emdr2.data.errors import DataError

    with pytest.raises(DataError, match=r"vocab.txt: vocabulary lacks the BERT token \[UNK\]"):
        BertWordPieceTokenizer(str(bad))


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory, passages):
    spm = pytest.importorskip("sentencepiece")
    path = tmp_path_factory.mktemp("spm") / "tiny.model"
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([t for _, t in passages]), model_writer=buf, vocab_size=400,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        minloglevel=2)
    path.write_bytes(buf.getvalue())
    return str(path)


def test_sentencepiece_same_interface(spm_model, passages):
    tok = SentencePieceTokenizer(spm_model, pad_to_multiple=64)
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert tok.bos_id == tok.pad_id  # T5 starts decoding from the pad token
    assert tok.real_vocab_size == 500 and tok.vocab_size == 512
    assert tok.sentinel(0) == 499 and tok.sentinel(99) == 400  # T5: <extra_id_0> is the highest id
    text = passages[0][1]
    ids = tok.encode(text)
    assert ids and max(ids) < 400
    assert tok.decode(ids + [tok.eos_id, tok.pad_id, tok.sentinel(3)]) == " ".join(text.split())
    assert tok.encode_batch([text, "hello"]) == [ids, tok.encode("hello")]
    assert tok.id_to_token(tok.sentinel(5)) == "<extra_id_5>"
    assert "sentencepiece" in tok.name


def test_sentencepiece_missing_model(tmp_path):
    from megatron.emdr2.data.errors import DataError

    with pytest.raises(DataError, match="cannot load SentencePiece model"):
        SentencePieceTokenizer(str(tmp_path / "absent.model"))
