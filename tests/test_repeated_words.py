"""--stop-at-repeated-word: a decoded answer is cut before its first repeated word, with hanging
punctuation dropped (megatron/emdr2/openqa/repeated_words.py), on the real tokenizers; and the
choice is recorded in a run's checkpoint so a plain `evaluate --load` decodes the same way."""

import io

import pytest
import torch

from megatron.emdr2.data.tokenizer import BertWordPieceTokenizer, SentencePieceTokenizer
from megatron.emdr2.openqa.repeated_words import punctuation_ids, stop_at_repeated_word


@pytest.fixture(scope="module")
def tok():
    return BertWordPieceTokenizer(t5_extras=True)


def _answers(tok, texts, width=24, eos=True):
    rows = [tok.encode(t) + ([tok.eos_id] if eos else []) for t in texts]
    return torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows])


def _cut(tok, texts, **kw):
    answers = _answers(tok, texts, **kw)
    out = stop_at_repeated_word(answers, tok.continuation_ids(), punctuation_ids(tok), tok.eos_id, tok.pad_id)
    assert out.shape == answers.shape
    return [tok.decode(r) for r in out.tolist()], out


@pytest.mark.parametrize("decoded, expected", [
    ("kelly reno ( reno", "kelly reno"),                     # the copy ran on into the passage
    ("merry clayton, clayton", "merry clayton"),
    ("toby keith. keith keith ' s keith", "toby keith"),
    ("lauren tom ( tom tom", "lauren tom"),
    ("natasha bharadwaj and bharadwaj", "natasha bharadwaj and"),  # only punctuation is dropped
    ("the the 7th", "the"),
])
def test_an_answer_is_cut_before_its_first_repeated_word(tok, decoded, expected):
    texts, _ = _cut(tok, [decoded])
    assert texts == [expected]


def test_answers_without_a_repeated_word_are_left_alone(tok):
    kept = ["joseph rowntree", "9 february 2018", "bharad bharadwaj",  # one word a prefix of the other
            "r. e. m.", "1, 2, 3"]  # punctuation repeats, words do not
    answers = _answers(tok, kept)
    texts, out = _cut(tok, kept)
    assert torch.equal(out, answers)


def test_an_answer_that_never_ended_is_ended_at_the_cut(tok):
    texts, out = _cut(tok, ["john young, young"], width=8, eos=False)
    assert texts == ["john young"]
    row = out[0].tolist()
    assert row[row.index(tok.eos_id) + 1:] == [tok.pad_id] * (len(row) - row.index(tok.eos_id) - 1)


def test_punctuation_pieces(tok):
    punct = punctuation_ids(tok)
    for piece in ("(", ",", ".", "'", "&"):
        assert tok.encode(piece)[0] in punct
    for word in ("reno", "the", "7th", "2018"):
        assert all(i not in punct for i in tok.encode(word))


def test_sentencepiece_words_are_runs_of_pieces(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text = ["toby keith was born in clinton , oklahoma and keith sang", "merry clayton sang with the stones"]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text * 20), model_writer=buf, vocab_size=30, model_type="unigram", hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
    (tmp_path / "m.model").write_bytes(buf.getvalue())
    sp = SentencePieceTokenizer(str(tmp_path / "m.model"))
    texts, _ = _cut(sp, ["toby keith , keith", "clayton sang with clay"])
    assert texts == ["toby keith", "clayton sang with clay"]  # "clay" is not "clayton"
