"""Evidence: streaming tsv reader, in-memory and memory-mapped stores, the preprocessor, and the
megatron-core indexed_dataset format in both directions."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron.emdr2.data import indexed
from megatron.emdr2.data.errors import DataError, SkipLog
from megatron.emdr2.data.evidence import MmapEvidence, load_evidence, read_evidence_tsv
from megatron.emdr2.data.preprocess import preprocess_evidence
from megatron.emdr2.data.tokenizer import BertWordPieceTokenizer

FIX = Path(__file__).parent / "fixtures" / "data"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return BertWordPieceTokenizer()


@pytest.fixture(scope="module")
def nq_store(nq_mini, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("store") / "nq"
    stats = preprocess_evidence(nq_mini / "evidence.tsv", prefix, workers=0, progress=False)
    return prefix, stats


def test_nq_mini_counts(nq_mini, shared_data):
    for d in (nq_mini, shared_data / "nq-mini"):
        ev = load_evidence(d / "evidence.tsv")
        assert len(ev) == 3588
        assert ev.ids[0] == 1 and ev.ids[-1] == 3588
        title, text = ev.passages([0])[0]
        assert title == "Pico Rivera, California" or title  # a real title
        assert text.startswith("Pío Pico, the last Mexican governor")


def test_round_trip_is_exact(nq_mini, nq_store, tok):
    prefix, stats = nq_store
    assert stats["rows"] == 3588 and stats["skipped"] == 0
    tsv, mm = load_evidence(nq_mini / "evidence.tsv"), load_evidence(prefix, tok)
    assert isinstance(mm, MmapEvidence) and mm.has_raw_text
    assert np.array_equal(tsv.ids, mm.ids) and len(mm) == 3588
    for row in range(len(tsv)):
        assert mm.text(row) == tsv.text(row) and mm.title(row) == tsv.title(row)
    for row in (0, 13, 1000, 3587):  # tokens are the tokenizer's encoding of the original text
        assert mm.text_tokens(row).tolist() == tok.encode(tsv.text(row))
        assert mm.title_tokens(row).tolist() == tok.encode(tsv.title(row))
    meta = json.loads(Path(f"{prefix}_meta.json").read_text())
    assert meta["rows"] == 3588 and meta["token_dtype"] == "uint16" and meta["ids_contiguous"]
    assert mm.passages([2, 0]) == [(tsv.title(2), tsv.text(2)), (tsv.title(0), tsv.text(0))]


def test_megatron_core_reads_our_files(nq_store, tok):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix, _ = nq_store
    mm = load_evidence(prefix, tok)
    core = IndexedDataset(f"{prefix}_text_document")
    assert len(core) == 3588 and core.document_indices.tolist() == list(range(3589))
    for row in (0, 7, 3587):
        assert core[row].tolist() == mm.text_tokens(row).tolist()
    raw = IndexedDataset(f"{prefix}_raw")
    assert raw[1].tobytes().decode() == mm.text(0)


def test_original_release_layout_loads(tmp_path, tok, nq_mini):
    """Files as the original EMDR² release wrote them (megatron's builder, one sequence per
    passage, no ids/raw/meta): ids are DPR's 1..N and text() decodes tokens."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rows = []
    for pid, text, title in read_evidence_tsv(nq_mini / "evidence.tsv"):
        rows.append((text, title))
        if len(rows) == 50:
            break
    prefix = str(tmp_path / "wikipedia-evidence")
    for key, col in (("text", 0), ("title", 1)):
        b = IndexedDatasetBuilder(f"{prefix}_{key}_document.bin", dtype=np.uint16)
        for r in rows:
            b.add_item(torch.IntTensor(tok.encode(r[col])))
            b.end_document()
        b.finalize(f"{prefix}_{key}_document.idx")
    ev = load_evidence(prefix + "_text_document.idx", tok)
    assert len(ev) == 50 and ev.ids[0] == 1 and ev.row_of([50]).tolist() == [49]
    assert not ev.has_raw_text
    assert ev.text(3) == tok.decode(tok.encode(rows[3][0]))
    assert ev.text_tokens(3).tolist() == tok.encode(rows[3][0])


def test_row_of(nq_mini, tmp_path):
    ev = load_evidence(FIX / "evidence_ok.tsv")
    assert ev.row_of(np.array([4, 1, 2])).tolist() == [3, 0, 1]
    with pytest.raises(KeyError, match=r"not in the evidence: \[9\]"):
        ev.row_of([1, 9])
    shuffled = tmp_path / "shuffled.tsv"  # non-contiguous ids take the searchsorted path
    shuffled.write_text("id\ttext\ttitle\n30\tc\tC\n10\ta\tA\n20\tb\tB\n", encoding="utf-8")
    ev = load_evidence(shuffled)
    assert ev.row_of([10, 30, 20]).tolist() == [1, 0, 2]
    with pytest.raises(KeyError):
        ev.row_of([15])


def test_dpr_quoting():
    rows = list(read_evidence_tsv(FIX / "evidence_ok.tsv"))
    assert rows[1] == (2, 'Aaron Aaron ( or ; "Ahärôn") is a prophet, high priest.', "Aaron")
    # a raw field that only starts with a quote is left alone (nq-mini's layout)
    assert rows[2] == (3, '"December, 1963 (Oh, What a Night)" is a song by the Four Seasons.',
                       '"December, 1963" (song)')
    raw = list(read_evidence_tsv(FIX / "evidence_ok.tsv", quoting="none"))
    assert raw[1][1].startswith('"Aaron')


MALFORMED = [
    ("evidence_missing_column.tsv", 3, "expected 3 tab-separated columns"),
    ("evidence_non_integer_id.tsv", 3, "passage id '2b' is not a non-negative integer"),
    ("evidence_duplicate_id.tsv", 5, "duplicate passage id 2"),
    ("evidence_invalid_utf8.tsv", 3, "invalid UTF-8"),
    ("evidence_bad_header.tsv", 1, "header must name the columns"),
    ("evidence_empty_text.tsv", 3, "passage 2 has empty text"),
    ("evidence_blank_line.tsv", 3, "blank line"),
]


@pytest.mark.parametrize("name,line,problem", MALFORMED)
def test_malformed_evidence_names_file_line_problem(name, line, problem, tmp_path):
    path = FIX / name
    for load in (lambda: load_evidence(path),
                 lambda: preprocess_evidence(path, tmp_path / "out", workers=0, progress=False)):
        with pytest.raises(DataError) as e:
            load()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(str(path)) and f"line {line}:" in msg and problem in msg
        assert e.value.where == line
    assert not list(tmp_path.iterdir())  # nothing half-written is left behind


def test_skipping_is_opt_in_and_counted(tmp_path):
    log = SkipLog()
    rows = list(read_evidence_tsv(FIX / "evidence_duplicate_id.tsv", on_error="skip", skipped=log))
    assert [r[0] for r in rows] == [1, 2, 3] and log.count == 1 and "duplicate" in log.examples[0]
    stats = preprocess_evidence(FIX / "evidence_missing_column.tsv", tmp_path / "s", workers=0,
                                on_error="skip", progress=False)
    assert stats["rows"] == 2 and stats["skipped"] == 1
    assert load_evidence(tmp_path / "s").ids.tolist() == [1, 3]
    stats = preprocess_evidence(FIX / "evidence_duplicate_id.tsv", tmp_path / "d", workers=0,
                                on_error="skip", progress=False)
    ev = load_evidence(tmp_path / "d")
    assert stats["skipped"] == 1 and ev.ids.tolist() == [1, 2, 3]
    assert [ev.text(i) for i in range(3)] == ["first passage", "second passage", "third passage"]
    assert ev.text_tokens(2).tolist() == BertWordPieceTokenizer().encode("third passage")


def test_truncated_bin_and_idx(nq_store, tmp_path):
    with pytest.raises(DataError, match=r"truncated_text_document.bin: truncated data file: the index "
                                        r"needs 60 bytes, the file has 50"):
        indexed.IndexedReader(FIX / "truncated_text_document")
    prefix, _ = nq_store
    copy = tmp_path / "nq"
    for f in Path(prefix).parent.iterdir():
        shutil.copy(f, tmp_path / f.name)
    text_bin = Path(f"{copy}_text_document.bin")
    with open(text_bin, "r+b") as f:
        f.truncate(text_bin.stat().st_size - 7)
    with pytest.raises(DataError, match=r"_text_document.bin: truncated data file"):
        load_evidence(copy)
    raw_idx = Path(f"{copy}_raw.idx")
    with open(raw_idx, "r+b") as f:
        f.truncate(100)
    shutil.copy(f"{prefix}_text_document.bin", text_bin)
    with pytest.raises(DataError, match=r"_raw.idx: truncated or corrupt index"):
        load_evidence(copy)
    Path(f"{copy}_meta.json").unlink()  # an interrupted re-run leaves no metadata
    with pytest.raises(DataError, match=r"_meta.json: missing: the preprocessed store is incomplete"):
        load_evidence(copy)


def test_writer_reader_documents(tmp_path):
    w = indexed.IndexedWriter(tmp_path / "d", np.int32)
    w.add_document([[1, 2, 3], [4]])
    w.add_document([])
    w.add_documents(np.array([5, 6, 7], np.int32), [1, 2], seqs_per_doc=1)
    w.finalize()
    r = indexed.IndexedReader(tmp_path / "d")
    assert r.num_documents == 4 and len(r) == 4
    assert [r.document(j).tolist() for j in range(4)] == [[1, 2, 3, 4], [], [5], [6, 7]]
    assert r.document_lengths().tolist() == [4, 0, 1, 2]
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]  # temporaries renamed or removed


def test_parallel_cli_matches_inline_and_memory_is_bounded(tmp_path, nq_store):
    """The CLI with 2 spawned workers writes byte-identical files; RSS stays small."""
    prefix, _ = nq_store
    src = Path(prefix).parent
    out = tmp_path / "cli"
    stats_file = tmp_path / "stats.json"
    tsv = ROOT / "data" / "nq-mini" / "evidence.tsv"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_evidence.py"), "--input", str(tsv),
                        "--output-prefix", str(out), "--workers", "2", "--chunk-rows", "300", "--quiet",
                        "--stats-json", str(stats_file)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for suffix in ("_text_document.bin", "_text_document.idx", "_title_document.bin", "_raw.bin", "_raw.idx"):
        assert Path(f"{out}{suffix}").read_bytes() == (src / f"nq{suffix}").read_bytes(), suffix
    assert np.array_equal(np.load(f"{out}_ids.npy"), np.arange(1, 3589))
    stats = json.loads(stats_file.read_text())
    assert 0 < stats["peak_rss"]["main_mb"] < 300 and 0 < stats["peak_rss"]["largest_worker_mb"] < 300


def test_cli_reports_errors_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_evidence.py"), "--input",
                        str(FIX / "evidence_non_integer_id.tsv"), "--output-prefix", str(tmp_path / "x"),
                        "--workers", "0", "--quiet"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].endswith("line 3: passage id '2b' is not a non-negative integer")


def test_index_pointers_across_stream_blocks(tmp_path, monkeypatch):
    """The .idx is written in blocks of rows; pointers must carry across block boundaries."""
    monkeypatch.setattr(indexed, "_CHUNK", 3)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 30000, size=int(n)).astype(np.uint16) for n in rng.integers(0, 9, size=11)]
    w = indexed.IndexedWriter(tmp_path / "b", np.uint16)
    w.add_documents(np.concatenate(seqs), [len(s) for s in seqs])
    w.finalize()
    r = indexed.IndexedReader(tmp_path / "b")
    assert [r.sequence(i).tolist() for i in range(11)] == [s.tolist() for s in seqs]
    assert r.pointers.tolist() == (np.cumsum([0] + [len(s) for s in seqs[:-1]]) * 2).tolist()
