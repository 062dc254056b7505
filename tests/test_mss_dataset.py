"""The MSS masking dataset: deterministic masks per (seed, epoch, index), query/target layout, the
lazily indexed sentence file and its held-out split."""

import re
from pathlib import Path

import pytest

from megatron.emdr2.data.errors import DataError
from megatron.emdr2.data.mss import (MSSDataset, SentenceFile, mss_query_inputs,
                                     mss_reader_inputs, mss_targets, split_tail, usable_spans)
from megatron.emdr2.data.ner import Entity, make_record
from megatron.emdr2.data.tokenizer import BertWordPieceTokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mss"

SENTENCES = [  # (doc_id, sentence, entities as (text, type))
    (10, "Aaron Burr was born in Newark, New Jersey in 1756.",
     [("Aaron Burr", "PERSON"), ("Newark", "GPE"), ("New Jersey", "GPE"), ("1756", "DATE")]),
    (10, "He served as the third Vice President of the United States.",
     [("third", "ORDINAL"), ("the United States", "GPE")]),
    (11, "The song was written by Paul Simon.", [("Paul Simon", "PERSON")]),
    (12, "It rained.", []),
    (12, "Canberra is the capital of Australia.", [("Canberra", "GPE"), ("Australia", "GPE")]),
    (13, "Mount Everest is 8,849 metres high.", [("Mount Everest", "LOC"), ("8,849 metres", "QUANTITY")]),
    (13, "It lies in the Himalayas.", [("the Himalayas", "LOC")]),
]


@pytest.fixture(scope="module")
def toks():
    return BertWordPieceTokenizer(), BertWordPieceTokenizer(t5_extras=True, pad_to_multiple=128)


@pytest.fixture
def sentence_file(tmp_path, toks):
    path = tmp_path / "sentences.jsonl"
    lines = []
    for doc_id, text, ents in SENTENCES:
        found = [Entity(t, ty, text.index(t), text.index(t) + len(t)) for t, ty in ents]
        lines.append(make_record(doc_id, text, found, toks[0]).to_json())
    lines.insert(3, "")  # a blank line: skipped, line numbers kept
    path.write_text("\n".join(lines))  # no final newline
    return SentenceFile(path)


def _unmask(ex) -> str:
    return re.sub(r"<extra_id_(\d+)>", lambda m: ex.spans[int(m.group(1))], ex.question)


def test_sentence_file_random_access_and_line_numbers(sentence_file):
    assert len(sentence_file) == len(SENTENCES)
    assert sentence_file.record(6).sent_text == SENTENCES[6][1]  # last line, no trailing newline
    assert sentence_file.record(3).doc_id == 12 and sentence_file.line_number(3) == 5  # after the blank line
    assert [sentence_file.record(i).doc_id for i in range(7)] == [s[0] for s in SENTENCES]


def test_bad_line_is_reported_with_its_line_number(tmp_path):
    path = tmp_path / "s.jsonl"
    good = (FIXTURES / "bad_offsets.jsonl").read_text().splitlines()
    path.write_text("\n".join([good[0], "", good[1]]) + "\n")
    f = SentenceFile(path)
    assert f.record(0).doc_id == 1
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: line 3: linguistic_ent\[0\] has offsets"):
        f.record(1)


def test_masks_are_deterministic_per_seed_epoch_index(sentence_file):
    ds = MSSDataset(sentence_file, seed=7, max_spans=3)
    again = MSSDataset(sentence_file, seed=7, max_spans=3)
    for i in range(len(ds)):
        for epoch in range(3):
            assert ds.example(i, epoch) == again.example(i, epoch)
    # Over epochs and seeds, a sentence with four entities gets different masks, 1..3 of them.
    masks = {tuple(MSSDataset(sentence_file, seed=s, max_spans=3).example(0, e).spans)
             for s in range(4) for e in range(5)}
    assert len(masks) > 3 and {len(m) for m in masks} <= {1, 2, 3} and len({len(m) for m in masks}) > 1


def test_masked_example_layout(sentence_file):
    ds = MSSDataset(sentence_file, seed=1, max_spans=2)
    for i in range(len(ds)):
        for epoch in range(2):
            ex = ds.example(i, epoch)
            assert ex.sent_text in [s[1] for s in SENTENCES]
            assert ex.doc_id == next(d for d, t, _ in SENTENCES if t == ex.sent_text)
            assert re.findall(r"<extra_id_(\d+)>", ex.question) == [str(k) for k in range(len(ex.spans))]
            assert _unmask(ex) == ex.sent_text  # the placeholders stand exactly for the spans
            assert ex.answers == [" ".join(ex.spans)]
    # Index 3 ("It rained.", no entity) falls through to the next sentence with one.
    assert ds.example(3).sent_text == SENTENCES[4][1]


def test_entity_type_filter_and_span_location(sentence_file):
    ds = MSSDataset(sentence_file, seed=3, entity_types=["PERSON"])
    for i in range(len(ds)):
        ex = ds.example(i)
        assert ex.spans[0] in {"Aaron Burr", "Paul Simon"}
    rec = sentence_file.record(0)
    # Offsets from elsewhere (e.g. document-relative) fall back to the entity's first occurrence.
    shifted = type(rec)(rec.doc_id, rec.sent_text, [Entity("Newark", "GPE", 100, 106)], [])
    assert usable_spans(shifted) == [(23, 29, "Newark")]
    literal = type(rec)(1, "Use <extra_id_0> here, Paris.", [Entity("Paris", "GPE", 23, 28)], [])
    assert usable_spans(literal) == []


def test_query_reader_and_target_tokens(sentence_file, toks):
    rtok, tok = toks
    ds = MSSDataset(sentence_file, seed=5, max_spans=2)
    examples = [ds.example(i) for i in range(len(ds))]
    q_ids, q_mask = mss_query_inputs(rtok, [e.question for e in examples], max_len=64)
    labels, l_mask = mss_targets(tok, [e.spans for e in examples], max_len=16)
    for j, ex in enumerate(examples):
        q = q_ids[j][q_mask[j].bool()].tolist()
        assert q[0] == rtok.cls_id and q[-1] == rtok.sep_id
        assert q.count(rtok.mask_id) == len(ex.spans)  # one [MASK] per span, never a sentinel
        assert max(q) < rtok.vocab_size
        # the unmasked words are exactly the sentence's, in order
        rest = [t for t in q[1:-1] if t != rtok.mask_id]
        assert rest == rtok.encode(re.sub(r"<extra_id_\d+>", " ", ex.question))
        lab = labels[j][l_mask[j].bool()].tolist()
        expect = []
        for k, s in enumerate(ex.spans):
            expect += [tok.sentinel(k), *tok.encode(s)]
        assert lab == expect + [tok.eos_id]
        assert tok.decode(lab) == tok.decode(tok.encode(" ".join(ex.spans)))
        r_ids, r_mask = mss_reader_inputs(tok, ex.question, [("T1", "text one"), ("T2", "text two")], 64)
        row = r_ids[0][r_mask[0].bool()].tolist()
        assert [t for t in row if t in tok.sentinel_ids] == [tok.sentinel(k) for k in range(len(ex.spans))]
        assert row[0] == tok.cls_id and row[-1] == tok.sep_id
        assert tok.decode(row).startswith("question :")


def test_long_query_keeps_the_mask(toks):
    rtok, _ = toks
    words = " ".join(f"word{i}" for i in range(80))
    ids, mask = mss_query_inputs(rtok, [f"{words} <extra_id_0> end."], max_len=24)
    assert ids.size(1) == 24 and rtok.mask_id in ids[0].tolist()


def test_held_out_split_is_at_a_passage_boundary(sentence_file):
    train, dev = split_tail(sentence_file, 2)  # the last two lines are both doc 13
    assert list(dev) == [5, 6] and list(train) == [0, 1, 2, 3, 4]
    train, dev = split_tail(sentence_file, 3)  # a cut inside doc 12 moves forward to its end
    assert list(dev) == [5, 6]
    with pytest.raises(ValueError, match="belong to one passage"):
        split_tail(sentence_file, 1)  # a cut inside the last passage leaves nothing held out


def test_min_entity_passages_masks_only_entities_found_elsewhere(tmp_path, toks):
    from megatron.emdr2.data.mss import entity_passage_counts

    rows = [(1, "Zorg met Lafayette in Paris.", ["Zorg", "Lafayette", "Paris"]),
            (1, "Zorg stayed.", ["Zorg"]),  # named in one passage only: never masked
            (2, "The Paris treaty was signed.", ["Paris"]),
            (3, "Lafayette sailed home.", ["Lafayette"]),
            (3, "Quux was there.", ["Quux"])]
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(
        make_record(d, t, [Entity(e, "PERSON", t.index(e), t.index(e) + len(e)) for e in ents], toks[0]).to_json()
        for d, t, ents in rows) + "\n")
    sentences = SentenceFile(path)
    counts = entity_passage_counts(sentences)
    assert counts == {"zorg": 1, "lafayette": 2, "paris": 2, "quux": 1}
    ds = MSSDataset(sentences, seed=1, min_entity_passages=2)
    assert list(ds.rows) == [0, 2, 3]  # sentences left without a maskable entity are dropped
    seen = {ds.example(i, epoch).spans[0] for i in range(len(ds)) for epoch in range(8)}
    assert seen == {"Lafayette", "Paris"}
    assert {ex.doc_id for ex in ds.examples()} == {1, 2, 3}
    with pytest.raises(DataError, match="no sentence has an entity named in at least 4 passages"):
        MSSDataset(sentences, min_entity_passages=4)
