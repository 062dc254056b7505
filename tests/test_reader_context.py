"""--reader-context neighbours: the original EMDR²'s reader context, token for token.

The original (DevSinghSachan/emdr2) is re-implemented plainly below from its source:
  * tools/inverted_title_index.py:40-64 (`process_wikipedia`: title -> [doc ids] in file order)
    and :22-37 (`get_neighbour_paragraphs`: bisect, then doc_row[i:i+3] / [i-2:i+1] / [i-1:i+2]
    with main index 0 / -1 / 1);
  * megatron/model/emdr2_model.py:306-359 (`query_extended_context_t5_format`) and :362-376
    (`query_single_context_t5_format`), called by `postprocess` (:259-295) with the question ids
    `query_t5[:query_t5_len]`, the passage's title ids and its window's passage ids;
  * tasks/openqa/e2eqa/train_data_utils.py:27-52: those question ids are [CLS] q [SEP], cut to
    --seq-length-ret (the retriever query's ids, reused for the reader).
Our rows (`encode_reader_inputs(layout="original", windows=neighbour_windows(...))`) must equal
them for every passage of a hand-written evidence and many reader lengths.
"""

from __future__ import annotations

import bisect
import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest
import torch

from openqa_helpers import NQ_MINI, ROOT, env

# Article "apple" has passages 1-4 and, out of order in the file, 9 (the original joins every row
# with the same title); "banana" two passages; "cherry" and "date" one each.
EVIDENCE = [
    (1, "red green blue", "Apple"),
    (2, "cat dog", "Apple"),
    (3, "sun moon star sky", "Apple"),
    (4, "north south", "Apple"),
    (5, "one two three", "Banana"),
    (6, "four five", "Banana"),
    (7, "king queen prince", "Cherry"),
    (8, "river lake", "Date"),
    (9, "east west", "Apple"),
]
QUESTION = "who is it"


def write_tsv(path, rows=EVIDENCE):
    path.write_text("id\ttext\ttitle\n" + "".join(f"{i}\t{x}\t{t}\n" for i, x, t in rows))
    return path


# ------------------------------------------------------------------ the original, plainly
class OriginalTitleMap:
    """tools/inverted_title_index.py: WikiTitleDocMap."""

    def __init__(self, rows):
        self.title2docs, self.docid2title = defaultdict(list), {}
        for doc_id, _text, title in rows:  # file order
            self.title2docs[title].append(doc_id)
            self.docid2title[doc_id] = title

    def get_neighbour_paragraphs(self, doc_id):
        doc_row = self.title2docs[self.docid2title[doc_id]]
        i = bisect.bisect_left(doc_row, doc_id)
        assert i != len(doc_row) and doc_row[i] == doc_id
        if i == 0:
            return doc_row[i: i + 3], 0
        elif i == len(doc_row) - 1:
            return doc_row[i - 2: i + 1], -1
        return doc_row[i - 1: i + 2], 1


def original_extended(query_ids, title_ids, context_doc_list, main_doc_idx, max_seq_length, sep_id, pad_id):
    """megatron/model/emdr2_model.py: query_extended_context_t5_format."""
    enc_ids = query_ids + title_ids + [sep_id]

    def prepare_context_ids(maxlen):
        context_ids = context_doc_list[main_doc_idx]
        if len(context_ids) > maxlen or len(context_doc_list) == 1:
            return context_ids[0: maxlen]
        extra_len = maxlen - len(context_ids)
        if main_doc_idx == 0:
            extra = []
            for item in context_doc_list[1:]:
                extra.extend(item)
            if len(extra) > extra_len:
                extra = extra[0: extra_len]
            return context_ids + extra
        elif main_doc_idx == -1:
            extra = []
            for item in context_doc_list[:-1]:
                extra.extend(item)
            if len(extra) > extra_len:
                offset = len(extra) - extra_len + 1
                extra = extra[offset:]
            return extra + context_ids
        left = context_doc_list[0]
        if len(left) > extra_len:
            offset = len(left) - extra_len + 1
            return left[offset:] + context_ids
        context_ids = left + context_ids
        if len(context_doc_list) == 3:
            right = context_doc_list[2]
            len_remaining = extra_len - len(left)
            if len(right) > len_remaining:
                right = right[:len_remaining]
            context_ids = context_ids + right
        return context_ids

    remaining_len = max(0, max_seq_length - len(enc_ids) - 1)
    enc_ids.extend(prepare_context_ids(remaining_len))
    enc_ids.append(sep_id)
    padding_length = max_seq_length - len(enc_ids)
    if padding_length > 0:
        enc_ids.extend([pad_id] * padding_length)
    return enc_ids


def original_single(query_ids, title_ids, context_ids, max_seq_length, sep_id, pad_id):
    """megatron/model/emdr2_model.py: query_single_context_t5_format."""
    enc_ids = query_ids + title_ids + [sep_id] + context_ids
    if len(enc_ids) > max_seq_length - 1:
        enc_ids = enc_ids[0: max_seq_length - 1]
    enc_ids.append(sep_id)
    return enc_ids + [pad_id] * (max_seq_length - len(enc_ids))


def original_rows(tok, rows, ids, max_len, query_max_len=256):
    """What the original's postprocess feeds the reader for the passages `ids`."""
    tmap = OriginalTitleMap(rows)
    text = {i: x for i, x, _ in rows}
    title = {i: t for i, _, t in rows}
    q = [tok.cls_id, *tok.encode(QUESTION)][: query_max_len - 1] + [tok.sep_id]  # train_data_utils.py:34-50
    out = []
    for eid in ids:
        doc_idxs, main = tmap.get_neighbour_paragraphs(eid)
        docs = [tok.encode(text[d]) for d in doc_idxs]
        out.append(original_extended(list(q), tok.encode(title[eid]), docs, main, max_len, tok.sep_id, tok.pad_id))
    return out


# ------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def tok():
    from megatron.emdr2.data.tokenizer import BertWordPieceTokenizer

    return BertWordPieceTokenizer(t5_extras=True, pad_to_multiple=128)


def ours(tok, evidence, ids, max_len, layout="original", context="neighbours", query_max_len=256):
    from megatron.emdr2.data.inputs import encode_reader_inputs
    from megatron.emdr2.data.neighbours import neighbour_windows

    passages = [evidence.passages(evidence.row_of(ids))]
    windows = neighbour_windows(evidence, tok, passages)[0] if context == "neighbours" else None
    got, mask = encode_reader_inputs(tok, QUESTION, passages[0], max_len, pad_to="max", layout=layout,
                                     windows=windows, question_max_len=query_max_len)
    assert torch.equal(mask, (torch.arange(max_len) < mask.sum(1, keepdim=True)).long())  # no holes
    return got.tolist()


def words(tok, row):
    return " ".join(tok.id_to_token(i) for i in row if i != tok.pad_id)


# ------------------------------------------------------------------ tests
def test_windows_are_the_originals(tmp_path):
    """Which neighbours, in which order, for every passage; the same from the tsv, from our mmap
    store (raw titles hashed) and from an original-release-style store (title tokens only)."""
    from megatron.emdr2.data.evidence import load_evidence
    from megatron.emdr2.data.neighbours import NeighbourMap
    from tools.preprocess_evidence import main as preprocess

    tsv = write_tsv(tmp_path / "ev.tsv")
    stores = {"tsv": load_evidence(tsv)}
    assert preprocess(["--input", str(tsv), "--output-prefix", str(tmp_path / "raw"), "--workers", "0", "--quiet"]) == 0
    assert preprocess(["--input", str(tsv), "--output-prefix", str(tmp_path / "noraw"), "--workers", "0",
                       "--quiet", "--no-raw"]) == 0
    stores["mmap"] = load_evidence(tmp_path / "raw")
    stores["mmap-no-raw"] = load_evidence(tmp_path / "noraw")
    want = OriginalTitleMap(EVIDENCE)
    for name, ev in stores.items():
        nmap = ev.neighbour_map()
        assert nmap.num_articles == 4, name
        for doc_id, _, _ in EVIDENCE:
            rows, main = nmap.window(int(ev.row_of([doc_id])[0]))
            assert ([int(ev.ids[r]) for r in rows], main) == want.get_neighbour_paragraphs(doc_id), (name, doc_id)
        assert nmap.order is not None  # id 9 joins "apple": rows are not in article order
    # Spelled out: first / middle / last of an article; the last of a two-passage article has no
    # neighbour (doc_row[-1:2] in the original); single-passage articles; the straggler id 9.
    w = lambda i: want.get_neighbour_paragraphs(i)
    assert [w(i) for i in (1, 2, 4, 9, 5, 6, 7)] == [
        ([1, 2, 3], 0), ([1, 2, 3], 1), ([3, 4, 9], 1), ([3, 4, 9], -1), ([5, 6], 0), ([6], -1), ([7], 0)]

    # DPR's layout (articles = runs of consecutive rows, ids ascending): no row permutation kept.
    dpr = NeighbourMap.build(load_evidence(write_tsv(tmp_path / "dpr.tsv", EVIDENCE[:8])))
    assert dpr.order is None and dpr.rank is None and dpr.starts.tolist() == [0, 4, 6, 7, 8]
    # Rows in any file order: the same windows by id as the sorted file (articles ordered by id).
    shuffled = load_evidence(write_tsv(tmp_path / "shuffled.tsv", [EVIDENCE[i] for i in (8, 3, 6, 0, 5, 2, 7, 4, 1)]))
    for doc_id, _, _ in EVIDENCE:
        rows, main = shuffled.neighbour_map().window(int(shuffled.row_of([doc_id])[0]))
        assert ([int(shuffled.ids[r]) for r in rows], main) == w(doc_id)


@pytest.mark.parametrize("max_len", [6, 9, 10, 11, 12, 13, 15, 18, 21, 40])
def test_reader_rows_are_the_originals(tmp_path, tok, max_len):
    """Every passage's row equals query_extended_context_t5_format's at many reader lengths
    (truncation of each neighbour, the original's off-by-one on the left included)."""
    from megatron.emdr2.data.evidence import load_evidence

    ev = load_evidence(write_tsv(tmp_path / "ev.tsv"))
    ids = [r[0] for r in EVIDENCE]
    want = original_rows(tok, EVIDENCE, ids, max_len)
    got = ours(tok, ev, ids, max_len)
    for i, a, b in zip(ids, got, want):
        if len(b) > max_len:  # the original would crash on this row (question + title too long)
            assert a == b[: max_len - 1] + [tok.sep_id], i
        else:
            assert a == b, (i, max_len, words(tok, a), words(tok, b))
    # passage alone in the original layout = the original's single-context rows
    q = [tok.cls_id, *tok.encode(QUESTION), tok.sep_id]
    single = [original_single(q, tok.encode(t), tok.encode(x), max_len, tok.sep_id, tok.pad_id) for _, x, t in EVIDENCE]
    assert ours(tok, ev, ids, max_len, context="passage") == single


def test_reader_rows_spelled_out(tmp_path, tok):
    """Exact layouts, by hand: [CLS] question [SEP] title [SEP] context [SEP] [PAD]..."""
    from megatron.emdr2.data.evidence import load_evidence

    ev = load_evidence(write_tsv(tmp_path / "ev.tsv"))
    head = "[CLS] who is it [SEP]"
    # passage 2 (middle of "apple"): the one before, itself, then the next cut to the room left
    assert words(tok, ours(tok, ev, [2], 14)[0]) == f"{head} apple [SEP] red green blue cat dog sun [SEP]"
    # shorter: the left neighbour cut from the left keeps one token less than the room (2 -> 1)
    assert words(tok, ours(tok, ev, [2], 12)[0]) == f"{head} apple [SEP] blue cat dog [SEP]"
    # first passage: itself, then the next two
    assert words(tok, ours(tok, ev, [1], 40)[0]) == \
        f"{head} apple [SEP] red green blue cat dog sun moon star sky [SEP]"
    # the last one ("apple" id 9): the two before it, then itself; never another article's text
    assert words(tok, ours(tok, ev, [9], 40)[0]) == f"{head} apple [SEP] sun moon star sky north south east west [SEP]"
    # article boundaries: "banana" 5 reads 6, 6 reads itself only; "cherry" alone
    assert words(tok, ours(tok, ev, [5], 40)[0]) == f"{head} banana [SEP] one two three four five [SEP]"
    assert words(tok, ours(tok, ev, [6], 40)[0]) == f"{head} banana [SEP] four five [SEP]"
    assert words(tok, ours(tok, ev, [7], 40)[0]) == f"{head} cherry [SEP] king queen prince [SEP]"
    # the question is cut to the query length (the original's --seq-length-ret) with its [SEP]
    assert words(tok, ours(tok, ev, [7], 40, query_max_len=4)[0]) == \
        "[CLS] who is [SEP] cherry [SEP] king queen prince [SEP]"
    # our prompt layout with neighbours: the same context after "title: t context:"
    assert words(tok, ours(tok, ev, [5], 40, layout="prompt")[0]) == \
        "[CLS] question : who is it title : banana context : one two three four five [SEP]"
    assert words(tok, ours(tok, ev, [5], 40, layout="prompt", context="passage")[0]) == \
        "[CLS] question : who is it title : banana context : one two three [SEP]"


def test_task_reader_inputs_follow_the_config(tmp_path, tok):
    """OpenQATask.reader_inputs (training and evaluation) with both contexts, from the passages
    the task looks up (they carry their evidence rows)."""
    from megatron.emdr2.config import ModelSize, TrainingConfig
    from megatron.emdr2.data.evidence import load_evidence
    from megatron.emdr2.openqa.emdr2_task import OpenQAConfig, OpenQATask

    ev = load_evidence(write_tsv(tmp_path / "ev.tsv"))
    size = ModelSize(num_layers=1, hidden_size=32, num_attention_heads=2, seq_length=64)
    ids = torch.tensor([[2, 7], [5, 9]])
    rows = {}
    for context in ("passage", "neighbours"):
        qa = OpenQAConfig(retriever=size, reader=size, top_k=2, reader_max_len=40, reader_context=context,
                          reader_format="original")
        task = OpenQATask(qa, TrainingConfig(), [], [], ev, tok, tok, None)
        r_ids, r_mask = task.reader_inputs([QUESTION, QUESTION], task.passages(ids))
        assert r_ids.shape[:2] == (2, 2)
        rows[context] = [[words(tok, r) for r in q] for q in r_ids.tolist()]
    assert rows["neighbours"][0][0].endswith("apple [SEP] red green blue cat dog sun moon star sky [SEP]")
    assert rows["passage"][0][0].endswith("apple [SEP] cat dog [SEP]")
    assert rows["neighbours"][1][1].endswith("apple [SEP] sun moon star sky north south east west [SEP]")
    assert rows["passage"][1][1].endswith("apple [SEP] east west [SEP]")
    with pytest.raises(ValueError, match="reader_context 'article'"):
        OpenQAConfig(retriever=size, reader=size, reader_context="article")
    with pytest.raises(ValueError, match="know their evidence row"):
        task.reader_inputs([QUESTION], [[("Apple", "cat dog")]])


def test_neighbour_map_is_arrays_and_scales(tmp_path):
    """A DPR-shaped store of ~390k passages (articles of 1-12 consecutive rows, ids 1..N, title
    tokens only as in the original release's mmap): the map is the article boundaries alone,
    built vectorised."""
    import time

    import numpy as np

    from megatron.emdr2.data import indexed
    from megatron.emdr2.data.evidence import load_evidence

    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 13, 60000)
    n = int(sizes.sum())
    article = np.repeat(np.arange(len(sizes)), sizes)
    prefix = str(tmp_path / "wiki")
    titles = np.stack([article // 1000 + 1000, article % 1000 + 2000, np.full(n, 3000)], 1).astype(np.uint16)
    for suffix, flat, lengths in (("_title_document", titles.reshape(-1), np.full(n, 3)),
                                  ("_text_document", np.full(n, 7, np.uint16), np.ones(n))):
        w = indexed.IndexedWriter(prefix + suffix, np.uint16)
        w.add_documents(flat, lengths.astype(np.int64))
        w.finalize()
    ev = load_evidence(prefix)
    t0 = time.perf_counter()
    m = ev.neighbour_map()
    elapsed = time.perf_counter() - t0
    assert m.order is None and m.rank is None and m.num_articles == len(sizes)
    assert m.starts.tolist() == [0, *np.cumsum(sizes).tolist()]
    assert elapsed < 20, elapsed  # about 0.2 s here
    last = int(np.cumsum(sizes)[-1]) - 1
    assert m.window(0) == (list(range(min(3, int(sizes[0])))), 0)
    assert m.window(last)[1] == (-1 if sizes[-1] > 1 else 0)


def test_emdr2_run_and_evaluate_with_neighbours(tmp_path):
    """A tiny EMDR² run with --reader-context neighbours records it in its checkpoint; evaluate
    --load reads the same way without being told."""
    from megatron.emdr2.initialize import free_port
    from megatron.emdr2.openqa.builders import load_checkpoint_meta

    # nq-mini passages grouped into articles of 1-3 consecutive rows (their titles rewritten)
    lines = (NQ_MINI / "evidence.tsv").read_text(encoding="utf-8").splitlines()[1:121]
    ev = tmp_path / "evidence.tsv"
    ev.write_text("id\ttext\ttitle\n" + "".join(
        f"{l.split(chr(9))[0]}\t{l.split(chr(9))[1]}\tArticle {k // 3 if k < 60 else k}\n" for k, l in enumerate(lines)),
        encoding="utf-8")
    qa = (NQ_MINI / "dev.tsv").read_text(encoding="utf-8").splitlines()
    (tmp_path / "qa.tsv").write_text("\n".join(qa[:4]) + "\n", encoding="utf-8")
    common = ["--evidence", str(ev), "--index-dir", str(tmp_path / "index"), "--top-k", "2",
              "--context-max-len", "48", "--reader-max-len", "64", "--query-max-len", "24",
              "--answer-max-len", "6", "--eval-max-questions", "2"]
    flags = ["--retriever-num-layers", "1", "--retriever-hidden-size", "32", "--retriever-num-attention-heads", "2",
             "--reader-num-layers", "1", "--reader-hidden-size", "32", "--reader-num-attention-heads", "2",
             "--retriever-seq-length", "64", "--reader-seq-length", "64", *common,
             "--train-data", str(tmp_path / "qa.tsv"), "--dev-data", str(tmp_path / "qa.tsv"),
             "--global-batch-size", "2", "--micro-batch-size", "2", "--train-iters", "2",
             "--index-reload-interval", "0", "--no-progress-bar", "--log-interval", "1000",
             "--embed-batch-size", "64", "--save", str(tmp_path / "run"), "--reader-context", "neighbours"]
    e = env(threads=2)
    e["MASTER_PORT"] = str(free_port())
    res = subprocess.run([sys.executable, "-m", "tasks.openqa.emdr2", *flags], cwd=ROOT, env=e,
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "neighbour map of" in res.stdout and "in 80 articles" in res.stdout
    meta = load_checkpoint_meta(str(tmp_path / "run"))
    assert (meta["reader_context"], meta["reader_format"]) == ("neighbours", "prompt")

    e["MASTER_PORT"] = str(free_port())
    res = subprocess.run([sys.executable, "-m", "tasks.openqa.evaluate", "--load", str(tmp_path / "run"),
                          *common, "--qa-file", str(tmp_path / "qa.tsv"), "--metrics-out", str(tmp_path / "m.json"),
                          "--index-dir", str(tmp_path / "eval-index")],  # the trained tower's index
                         cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "neighbour map of" in res.stdout
    assert json.loads((tmp_path / "m.json").read_text())["questions"] == 2


def test_flags_and_defaults(tmp_path):
    from tasks.openqa import common
    from tasks.openqa.emdr2 import build_parser

    args = build_parser().parse_args(["--index-dir", str(tmp_path)])
    cfg = common.qa_config(args)
    assert (cfg.reader_context, cfg.reader_format) == ("passage", "prompt")
    args = build_parser().parse_args(["--index-dir", str(tmp_path), "--reader-context", "neighbours",
                                      "--reader-format", "original"])
    cfg = common.qa_config(args)
    assert (cfg.reader_context, cfg.reader_format) == ("neighbours", "original")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--index-dir", str(tmp_path), "--reader-context", "article"])
