"""NER annotation for MSS: the record format (ours and the original release's), bert_ent_pos, the
spaCy backend through the real tool (parallel, resumable), and the Stanza backend's refusal to
run without local models."""

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from megatron.emdr2.data.errors import DataError
from megatron.emdr2.data.ner import (BackendUnavailable, Entity, StanzaBackend, make_record, parse_record,
                                     read_records)
from megatron.emdr2.data.tokenizer import BertWordPieceTokenizer

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "mss"
TOOL = [sys.executable, str(ROOT / "tools" / "annotate_entities.py")]


@pytest.fixture(scope="module")
def tok():
    return BertWordPieceTokenizer()


def _norm(text: str) -> str:
    """What the uncased WordPiece decoder can give back: lower case, no accents, single spaces."""
    text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    return "".join(text.lower().split())


def _run_tool(*flags, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([*TOOL, "--no-progress-bar", *map(str, flags)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _passages(nq_mini, n):
    from megatron.emdr2.data.evidence import read_evidence_tsv

    out = []
    for pid, text, _ in read_evidence_tsv(nq_mini / "evidence.tsv"):
        out.append((pid, text))
        if len(out) == n:
            return out


# ---------------------------------------------------------------------------- format
def test_release_format_parses_and_matches_our_bert_ent_pos(tok):
    records = list(read_records(FIXTURES / "release_sample.jsonl"))  # JSON and Python-literal lines
    assert [r.doc_id for r in records] == [1, 2, 3]
    first = records[0]
    assert first.entities[0] == Entity("Aaron", "PERSON", 0, 5)
    assert first.bert_ent_pos[0] == (1, 2)  # the README's example span for a sentence-initial "Aaron"
    for r in records:  # our convention reproduces the file's spans exactly
        assert make_record(r.doc_id, r.sent_text, r.entities, tok).bert_ent_pos == r.bert_ent_pos
        for e in r.entities:
            assert r.sent_text[e.start:e.end] == e.text
    assert records[2].entities == [] and records[2].bert_ent_pos == []


def test_bert_ent_pos_covers_exactly_the_entity_wordpieces(tok):
    sent = "In 1756, Aaron Burr Jr. moved from Newark to Princeton University's campus."
    ents = [Entity(t, ty, sent.index(t), sent.index(t) + len(t)) for t, ty in
            [("1756", "DATE"), ("Aaron Burr Jr.", "PERSON"), ("Newark", "GPE"), ("Princeton University", "ORG")]]
    rec = make_record(7, sent, ents, tok)
    pieces = ["[CLS]", *tok.tokens(sent), "[SEP]"]
    spans = {e.text: pieces[s:t] for e, (s, t) in zip(rec.entities, rec.bert_ent_pos)}
    assert spans == {"1756": ["1756"], "Aaron Burr Jr.": ["aaron", "burr", "jr", "."], "Newark": ["newark"],
                     "Princeton University": ["princeton", "university"]}
    # A round trip through the file format keeps everything.
    again = parse_record(rec.to_json())
    assert again == rec


@pytest.mark.parametrize("name, problem", [
    ("bad_missing_key", "missing key(s) ['bert_ent_pos']"),
    ("bad_entity_arity", "linguistic_ent[0] must be [text, type, start, end]"),
    ("bad_offsets", "offsets 5..0"),
    ("bad_doc_id", "doc_id must be a non-negative integer"),
    ("bad_syntax", "neither JSON"),
    ("bad_bert_pos", "bert_ent_pos[0] = [2, 2]"),
])
def test_bad_lines_name_file_line_and_problem(name, problem):
    path = FIXTURES / f"{name}.jsonl"
    with pytest.raises(DataError) as err:
        list(read_records(path))
    msg = str(err.value)
    assert msg.startswith(f"{path}: line 2:") and problem in msg and "\n" not in msg, msg


# ---------------------------------------------------------------------------- spaCy through the tool
def test_spacy_tool_annotates_every_passage_and_spans_map_to_wordpieces(tmp_path, nq_mini, tok):
    out = tmp_path / "sentences.jsonl"
    res = _run_tool("--evidence", nq_mini / "evidence.tsv", "--output", out, "--max-passages", 12,
                    "--chunk-size", 5, "--workers", 2, "--keep-all-sentences")
    assert res.returncode == 0, res.stderr[-2000:]
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    assert stats["passages"] == 12 and stats["chunks"] == 3 and not (tmp_path / "sentences.jsonl.parts").exists()
    records = list(read_records(out))
    assert len(records) == stats["sentences"] > 12
    passages = dict(_passages(nq_mini, 12))
    assert [r.doc_id for r in records] == sorted(r.doc_id for r in records)  # passage order kept
    assert {r.doc_id for r in records} == set(passages)  # every passage was split and annotated
    n_ents = 0
    for r in records:
        assert r.sent_text in passages[r.doc_id]
        pieces = [tok.cls_id, *tok.encode(r.sent_text), tok.sep_id]
        assert len(r.entities) == len(r.bert_ent_pos)
        for e, (s, t) in zip(r.entities, r.bert_ent_pos):
            assert r.sent_text[e.start:e.end] == e.text
            assert e.type in {"PERSON", "NORP", "FAC", "ORG", "GPE", "LOC", "PRODUCT", "EVENT", "WORK_OF_ART",
                              "LAW", "LANGUAGE", "DATE", "TIME", "PERCENT", "MONEY", "QUANTITY", "ORDINAL",
                              "CARDINAL"}
            assert 1 <= s < t <= len(pieces) - 1  # never [CLS] or [SEP]
            assert _norm(tok.decode(pieces[s:t])) == _norm(e.text), (e, tok.decode(pieces[s:t]))
            n_ents += 1
    assert n_ents == stats["entities"] > 20


def test_tool_resumes_from_finished_chunks_only(tmp_path, nq_mini):
    from tools import annotate_entities as tool

    out = tmp_path / "sentences.jsonl"
    flags = ["--evidence", str(nq_mini / "evidence.tsv"), "--output", str(out), "--max-passages", "6",
             "--chunk-size", "3", "--workers", "0"]
    # An interrupted run: chunk 0 finished (a marker record shows it is reused, not redone),
    # chunk 1 was being written (a temporary file that must be ignored).
    parts = Path(str(out) + ".parts")
    tool._open_parts(tool.parse_args(flags), str(parts))
    marker = '{"doc_id": 999999, "sent_text": "Kept from the first run.", "linguistic_ent": [], "bert_ent_pos": []}\n'
    (parts / "chunk-00000000.jsonl").write_text(marker)
    (parts / "chunk-00000001.jsonl.tmp-1").write_text('{"doc_id": 5, "sent_te')
    res = _run_tool(*flags)
    assert res.returncode == 0, res.stderr[-2000:]
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    assert stats["resumed_chunks"] == 1 and stats["passages"] == 3 and stats["chunks"] == 2
    records = list(read_records(out))
    assert records[0].doc_id == 999999 and {r.doc_id for r in records[1:]} <= {4, 5, 6}
    assert records[1].doc_id == 4 and not parts.exists()

    # Parts left by a run with other settings are not mixed in.
    out2 = tmp_path / "other.jsonl"
    tool._open_parts(tool.parse_args([*flags[:3], str(out2), *flags[4:]]), str(out2) + ".parts")
    res = _run_tool(*flags[:3], out2, "--max-passages", 6, "--chunk-size", 4, "--workers", 0)
    assert res.returncode == 1
    err = res.stderr.strip()
    assert "\n" not in err and "manifest.json" in err and "chunk_size" in err, err

    # Parts left by a run over an evidence file since changed in place (same path) are refused.
    evidence = tmp_path / "evidence.tsv"
    evidence.write_text("\n".join((nq_mini / "evidence.tsv").read_text().splitlines()[:8]) + "\n")
    out3 = tmp_path / "changed.jsonl"
    changed = ["--evidence", str(evidence), "--output", str(out3), "--chunk-size", "3", "--workers", "0"]
    tool._open_parts(tool.parse_args(changed), str(out3) + ".parts")
    lines = evidence.read_text().splitlines()
    lines[1] = lines[1].replace("\t", "\tEdited: ", 1)
    evidence.write_text("\n".join(lines) + "\n")
    res = _run_tool(*changed)
    assert res.returncode == 1 and "evidence_sha256" in res.stderr and "\n" not in res.stderr.strip(), res.stderr


# ---------------------------------------------------------------------------- Stanza
def test_stanza_without_package_or_models_says_so_in_one_line(tmp_path, nq_mini):
    with pytest.raises(BackendUnavailable) as err:
        StanzaBackend(str(tmp_path / "no-models"))
    msg = str(err.value)
    assert "\n" not in msg and "stanza" in msg.lower() and "download" in msg
    try:
        import stanza  # noqa: F401
    except ImportError:
        assert "not installed" in msg
    else:
        assert "no Stanza models" in msg
    res = _run_tool("--evidence", nq_mini / "evidence.tsv", "--output", tmp_path / "s.jsonl", "--backend", "stanza",
                    "--stanza-dir", tmp_path / "no-models", "--workers", 0, "--max-passages", 2)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "stanza" in res.stderr.lower()
    assert not (tmp_path / "s.jsonl").exists()
