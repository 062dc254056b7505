"""--complete-words: a decoded answer that stops inside a word of a passage is completed to the
word's end (megatron/emdr2/openqa/word_completion.py), with the real tokenizers."""

import io

import pytest
import torch

from megatron.emdr2.data.tokenizer import BertWordPieceTokenizer, SentencePieceTokenizer
from megatron.emdr2.openqa.word_completion import complete_words

PASSAGES = ["the lead role went to natasha bharadwaj after the auditions",
            "pradyumna is the son of krishna and rukmini in the bhagavata purana"]


@pytest.fixture(scope="module")
def tok():
    return BertWordPieceTokenizer(t5_extras=True)


def _rows(tok, passages, width=40):
    rows = [tok.encode(p) for p in passages]
    return torch.tensor([[r + [tok.pad_id] * (width - len(r)) for r in rows]])  # [1, K, S]


def _answer(tok, ids, width=12):
    row = list(ids) + [tok.eos_id]
    return torch.tensor([row + [tok.pad_id] * (width - len(row))])


def _text(tok, answers):
    return [tok.decode(row) for row in answers.tolist()]


def test_a_word_cut_short_is_completed_from_the_passage(tok):
    full = tok.encode("natasha bharadwaj")
    assert len(full) >= 3 and tok.id_to_token(full[-1]).startswith("##")  # a multi-piece word
    cut = full[:-1]
    out = complete_words(_answer(tok, cut), _rows(tok, PASSAGES), tok.continuation_ids(), tok.eos_id, tok.pad_id)
    assert _text(tok, out) == ["natasha bharadwaj"]
    assert out[0].tolist().count(tok.eos_id) == 1


def test_whole_words_absent_answers_and_empty_answers_are_left_alone(tok):
    rows = _rows(tok, PASSAGES)
    cont = tok.continuation_ids()
    for text in ["natasha bharadwaj", "the lead role", "a word nowhere to be seen"]:
        ans = _answer(tok, tok.encode(text))
        assert torch.equal(complete_words(ans, rows, cont, tok.eos_id, tok.pad_id), ans)
    empty = _answer(tok, [])
    assert torch.equal(complete_words(empty, rows, cont, tok.eos_id, tok.pad_id), empty)


def test_the_first_passage_in_retrieval_order_decides_and_each_question_reads_its_own(tok):
    cont = tok.continuation_ids()
    prefix = tok.encode("pradyumna")[:-1]
    assert prefix  # "pradyumna" is several pieces
    # Passage 1 continues "pradyum..." differently; passage 0 (ranked first) wins.
    rows = _rows(tok, ["the prince pradyumna", "prince pradyumnas kingdom"])
    out = complete_words(_answer(tok, prefix), rows, cont, tok.eos_id, tok.pad_id)
    assert _text(tok, out) == ["pradyumna"]
    # Two questions: the second's passages do not hold the first's words.
    rows2 = torch.cat([_rows(tok, PASSAGES), _rows(tok, ["nothing relevant here", "nor here"])])
    answers = torch.cat([_answer(tok, prefix), _answer(tok, prefix)])
    out = complete_words(answers, rows2, cont, tok.eos_id, tok.pad_id)
    assert _text(tok, out) == ["pradyumna", tok.decode(prefix)]


def test_an_answer_that_ran_to_the_length_limit_gets_its_word_and_an_eos(tok):
    cut = tok.encode("natasha bharadwaj")[:-1]
    ans = torch.tensor([cut])  # no eos: decoding stopped at the length limit
    out = complete_words(ans, _rows(tok, PASSAGES), tok.continuation_ids(), tok.eos_id, tok.pad_id)
    assert out[0].tolist()[-1] == tok.eos_id
    assert tok.decode(out[0].tolist()) == "natasha bharadwaj"


def test_sentencepiece_pieces_without_a_word_start_continue_the_word(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(PASSAGES * 20), model_writer=buf, vocab_size=40, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
    (tmp_path / "m.model").write_bytes(buf.getvalue())
    tok = SentencePieceTokenizer(str(tmp_path / "m.model"))
    full = tok.encode("bharadwaj")
    assert len(full) >= 2
    cont = tok.continuation_ids()
    assert full[0] not in cont and all(i in cont for i in full[1:])
    rows = torch.tensor([[tok.encode(PASSAGES[0])]])
    ans = torch.tensor([full[:1] + [tok.eos_id]])
    out = complete_words(ans, rows, cont, tok.eos_id, tok.pad_id)
    assert tok.decode(out[0].tolist()) == "bharadwaj"
