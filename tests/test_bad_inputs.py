"""The bad-input corpus (tests/fixtures/bad_inputs/), walked through every tool and entry point that
reads that kind of file, as a user would run them: each must exit with the documented status and
one line naming the file, the line or record where there is one, and the problem; no traceback;
and no output file created, nor any input changed. Checkpoints and index versions are corrupted
copies of real ones made here (their formats belong to the code of the day, so they are not
committed as binary fixtures); config and flag mistakes are argument lists. The table of inputs,
tools and messages is docs/bad_inputs.md.

Each tool runs the whole list in one process (tests/bad_input_walk.py): importing torch and
megatron-core once per tool is what makes ~150 runs affordable.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from openqa_helpers import NQ_MINI, ROOT, TINY_OPENQA, env

CORPUS = ROOT / "tests" / "fixtures" / "bad_inputs"

EVIDENCE = {  # fixture -> what the one-line error must say, whichever tool reads it
    "evidence_missing_column.tsv": "line 2: expected 3 tab-separated columns (id, text, title), found 2",
    "evidence_extra_column.tsv": "line 2: expected 3 tab-separated columns (id, text, title), found 4",
    "evidence_non_integer_id.tsv": "line 3: passage id 'abc' is not a non-negative integer",
    "evidence_negative_id.tsv": "line 2: passage id '-5' is not a non-negative integer",
    "evidence_duplicate_id.tsv": "line 3: duplicate passage id 1",
    "evidence_invalid_utf8.tsv": "line 2: invalid UTF-8 at byte 7 of the line",
    "evidence_nul_byte.tsv": "line 2: NUL byte at character 7 of the line",
    "evidence_empty.tsv": "line 1: empty file (expected the header id, text, title)",
    "evidence_header_only.tsv": "no passages (the file holds only a header",
    "evidence_no_header.tsv": "line 1: header must name the columns id, text, title",
    "evidence_truncated.tsv.gz": "truncated or corrupt gzip file",
}
QA = {
    "qa_answers_not_list.tsv": "line 1: answers must be a list of strings, found str",
    "qa_answers_bad_json.tsv": "line 1: answers column '[\"shakespeare\"' is not a JSON or Python list",
    "qa_answer_not_string.tsv": "line 1: answer 0 must be a string, found int",
    "qa_empty_answers.tsv": "line 1: no answers",
    "qa_empty_question.tsv": "line 1: empty question",
    "qa_missing_tab.tsv": "line 1: expected 2 tab-separated columns (question, answers), found 1",
    "qa_evidence_as_qa.tsv": "line 1: expected 2 tab-separated columns (question, answers), found 3",
    "qa_truncated_json.json": "line 1: invalid JSON: Unterminated string",
    "qa_top_level_number.json": "holds a single JSON int, not questions",
    "qa_jsonl_missing_key.jsonl": "line 2: missing 'answers'",
    "qa_empty.tsv": "empty file",
    "qa_json_answers_not_list.json": "record 2: answers must be a list of strings, found str",
    "qa_jsonl_line_is_list.jsonl": "line 2: expected a JSON object, found list",
}
MSS = {  # tasks.openqa.mss --mss-data
    "mss_span_out_of_range.jsonl": "line 4: linguistic_ent[0] has offsets 15..400 beyond the sentence's 21 characters",
    "mss_offsets_wrong_type.jsonl": "line 4: linguistic_ent[0] must be [text, type, start, end]",
    "mss_doc_id_not_integer.jsonl": "line 4: doc_id must be a non-negative integer, found 'two'",
    "mss_missing_key.jsonl": "line 4: missing key(s) ['sent_text']",
    "mss_truncated_line.jsonl": "line 4: neither JSON",
    "mss_entities_not_list.jsonl": "line 4: linguistic_ent must be a list, found str",
    "mss_doc_id_not_in_evidence.jsonl": "line 4: doc_id 999999 is not a passage id of the evidence",
    "mss_empty.jsonl": "no sentences (empty file)",
}
CONFIG = {  # tools/build_index.py --config, for a retriever state dict saved without its config
    "config_wrong_type.json": "{f}: num_layers must be an integer, found 'two'",
    "config_size_mismatch.json": "has shape (30522, 32), the model expects (30522, 48) (--config {f} does not "
                                 "match the weights)",
}
CHECKPOINTS = {  # corrupted copy of a tiny EMDR² checkpoint -> message (evaluate, emdr2 --load, build_index, answer)
    "truncated": "/mp_rank_00.pt: truncated or altered",
    "wrong_sha": "/mp_rank_00.pt: checksum differs from manifest.json: the file is corrupt",
    "no_manifest": ": no manifest.json; the checkpoint is incomplete",
    "empty_files": "/manifest.json: an empty or malformed 'files' entry",
    "no_files_key": "/manifest.json: no 'files' entry",
}
INDEXES = {  # corrupted copy of a tiny index -> message (eval_retrieval, evaluate)
    "truncated_shard": "step-00000000/shard-00000-of-00001.emb: 3776 bytes, manifest expects 3840 (truncated or wrong file)",
    "manifest_rows": "step-00000000/manifest.json: shard rows do not add up to num_rows=65",
    "latest_outside": "LATEST: names '../../etc', which is not a version directory inside",
}
FLAGS_EMDR2 = {
    "top-k-0": ["--top-k", "0"],
    "top-k-negative": ["--top-k", "-1"],
    "top-k-above-evidence": ["--top-k", "100"],
    "batch-not-divisible": ["--global-batch-size", "3", "--micro-batch-size", "2"],
    "micro-batch-above-data": ["--global-batch-size", "16", "--micro-batch-size", "16"],
    "eval-batch-size-0": ["--eval-batch-size", "0"],
    "reader-size-mismatch": [],  # filled in _cases: resume a checkpoint with other model sizes
}
FLAG_MESSAGES = {
    "top-k-0": "--top-k must be >= 1", "top-k-negative": "--top-k must be >= 1",
    "top-k-above-evidence": "--top-k 100 is more than the 60 passages of the evidence",
    "batch-not-divisible": "--global-batch-size 3 is not a multiple of --micro-batch-size 2",
    "micro-batch-above-data": "--global-batch-size 16 is more than the 8 training examples", "eval-batch-size-0": "--eval-batch-size must be >= 1",
    "reader-size-mismatch": "its reader does not fit the model built from the flags (size mismatch for",
    "metrics-out-is-a-directory": "is a directory (it names the JSON file to write)",
}
# the committed files (the CRLF one must be read like LF, tested below)
FIXTURES = sorted([*EVIDENCE, *QA, *MSS, *CONFIG, "evidence_crlf.tsv"])


def _digest(path: Path) -> str:
    """Content hash of a file or of a whole directory tree (names and bytes)."""
    h = hashlib.sha256()
    paths = sorted(path.rglob("*")) if path.is_dir() else [path]
    for p in paths:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _run(cmd, **kw):
    proc = subprocess.run(cmd, cwd=ROOT, env=kw.pop("env", env(1)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Good inputs (a slice of nq-mini, a tiny retriever and its index, a tiny EMDR² checkpoint)
    and corrupted copies of the checkpoint and the index."""
    return make_world(tmp_path_factory.mktemp("bad-inputs"))


def make_world(d: Path) -> Path:
    lines = (NQ_MINI / "evidence.tsv").read_text(encoding="utf-8").splitlines()
    (d / "evidence.tsv").write_text("\n".join(lines[:61]) + "\n", encoding="utf-8")
    for split in ("dev", "train"):
        (d / f"{split}.tsv").write_text("\n".join((NQ_MINI / f"{split}.tsv").read_text().splitlines()[:8]) + "\n")
    _run([sys.executable, "-c", f"""
import torch
from megatron.emdr2 import initialize
from tools.build_index import RetrieverConfig, _tower
from megatron.emdr2.models.biencoder import BiEncoder
initialize.initialize(1, 1, seed=0)
for name, width in (("retriever", 32), ("retriever48", 48)):
    cfg = RetrieverConfig(num_layers=1, hidden_size=width, num_attention_heads=2, ffn_hidden_size=64,
                          max_sequence_length=64)
    model = BiEncoder(_tower(cfg), _tower(cfg))
    torch.save({{"model": model.state_dict(), "config": vars(cfg)}}, "{d}/" + name + ".pt")
    torch.save(model.state_dict(), "{d}/" + name + "_noconfig.pt")
initialize.shutdown()
"""])
    for name in ("retriever", "retriever48"):
        _run([sys.executable, "tools/build_index.py", "--checkpoint", str(d / f"{name}.pt"), "--evidence",
              str(d / "evidence.tsv"), "--output", str(d / f"index-{name}"), "--no-progress-bar"])
    from megatron.emdr2.initialize import free_port

    _run([sys.executable, "-m", "tasks.openqa.emdr2", *TINY_OPENQA, "--evidence", str(d / "evidence.tsv"),
          "--train-data", str(d / "train.tsv"), "--dev-data", str(d / "dev.tsv"), "--index-dir", str(d / "ckpt-index"),
          "--top-k", "2", "--global-batch-size", "2", "--micro-batch-size", "2", "--train-iters", "1",
          "--lr", "1e-4", "--save", str(d / "ckpt"), "--eval-max-questions", "2"],
         env=dict(env(1), MASTER_PORT=str(free_port())))
    _corrupt_checkpoints(d)
    _corrupt_indexes(d)
    rows = lines[:6]
    rows.insert(3, "99999\t" + " ".join(["word"] * 2_000_000) + "\tBig")  # a 10 MB line
    (d / "evidence_10mb_line.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return d


def _corrupt_checkpoints(d: Path) -> None:
    it = next(p.name for p in (d / "ckpt").iterdir() if p.name.startswith("iter_"))
    for name, corrupt in {
        "truncated": lambda c: os.truncate(c / "mp_rank_00.pt", (c / "mp_rank_00.pt").stat().st_size // 2),
        "wrong_sha": lambda c: _flip_byte(c / "mp_rank_00.pt"),
        "no_manifest": lambda c: (c / "manifest.json").unlink(),
        "empty_files": lambda c: _edit_json(c / "manifest.json", lambda m: m.update(files={})),
        "no_files_key": lambda c: _edit_json(c / "manifest.json", lambda m: m.pop("files")),
    }.items():
        shutil.copytree(d / "ckpt", d / f"ckpt-{name}")
        corrupt(d / f"ckpt-{name}" / it)


def _corrupt_indexes(d: Path) -> None:
    version = (d / "index-retriever" / "LATEST").read_text().strip()
    for name, corrupt in {
        "truncated_shard": lambda v: os.truncate(next(v.glob("*.emb")), next(v.glob("*.emb")).stat().st_size - 64),
        "manifest_rows": lambda v: _edit_json(v / "manifest.json", lambda m: m.update(num_rows=m["num_rows"] + 5)),
        "latest_outside": lambda v: (v.parent / "LATEST").write_text("../../etc\n"),
    }.items():
        shutil.copytree(d / "index-retriever", d / f"index-{name}")
        corrupt(d / f"index-{name}" / version)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_json(path: Path, edit) -> None:
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


# ---------------------------------------------------------------------------- the cases
def _cases(d: Path):
    """(entry point, case id, argv, expected exit status, message, paths that must stay absent,
    paths that must not change)."""
    out = d / "out"
    ev, dev, train = str(d / "evidence.tsv"), str(d / "dev.tsv"), str(d / "train.tsv")
    retr = ["--checkpoint", str(d / "retriever.pt"), "--max-seq-length", "64"]
    index = str(d / "index-retriever")
    train_flags = [*TINY_OPENQA, "--top-k", "2", "--global-batch-size", "2", "--micro-batch-size", "2",
                   "--train-iters", "1"]
    cases = []

    def add(entry, cid, argv, rc, message, absent=(), unchanged=()):
        cases.append((entry, cid, [str(a) for a in argv], rc, message, [Path(p) for p in absent],
                      [Path(p) for p in unchanged]))

    for name, msg in EVIDENCE.items():
        f, o = CORPUS / name, out / name
        add("tools.preprocess_evidence", f"preprocess:{name}",
            ["--input", f, "--output-prefix", o / "p", "--quiet"], 1, f"{f}: {msg}", [o])
        add("tools.build_index", f"build_index:{name}",
            [*retr, "--evidence", f, "--output", o / "index", "--no-progress-bar"], 2, f"{f}: {msg}", [o])
        add("tools.eval_retrieval", f"eval_retrieval:{name}",
            [*retr, "--index", index, "--evidence", f, "--qa-file", dev, "--metrics-out", o / "m.json"],
            2, f"{f}: {msg}", [o], [index])
        add("tasks.openqa.emdr2", f"emdr2:{name}",
            [*train_flags, "--evidence", f, "--train-data", train, "--dev-data", dev, "--index-dir", o / "index",
             "--save", o / "ckpt"], 2, f"{f}: {msg}", [o])
        add("tasks.openqa.evaluate", f"evaluate:{name}",
            ["--load", d / "ckpt", "--evidence", f, "--qa-file", dev, "--index-dir", o / "index",
             "--metrics-out", o / "m.json"], 2, f"{f}: {msg}", [o], [d / "ckpt"])
        add("tools.annotate_entities", f"annotate:{name}",
            ["--evidence", f, "--output", o / "s.jsonl", "--workers", "0", "--no-progress-bar"], 1, f"{f}: {msg}",
            [o])
    # a 10 MB passage (made here, not committed): refused before the NER model tries it
    big, o = d / "evidence_10mb_line.tsv", out / "big"
    add("tools.annotate_entities", "annotate:evidence_10mb_line.tsv",
        ["--evidence", big, "--output", o / "s.jsonl", "--workers", "0", "--no-progress-bar"], 1,
        f"{big}: passage id 99999: 9,999,999 characters, more than --max-passage-chars 100,000", [o])
    for name, msg in QA.items():
        f, o = CORPUS / name, out / name
        add("tools.split_dev", f"split_dev:{name}", [f, "--out-dir", o], 2, f"{f}: {msg}", [o])
        add("tools.eval_retrieval", f"eval_retrieval:{name}",
            [*retr, "--index", index, "--evidence", ev, "--qa-file", f, "--metrics-out", o / "m.json"],
            2, f"{f}: {msg}", [o], [index])
        add("tasks.openqa.evaluate", f"evaluate:{name}",
            ["--load", d / "ckpt", "--evidence", ev, "--qa-file", f, "--index-dir", o / "index",
             "--metrics-out", o / "m.json"], 2, f"{f}: {msg}", [o], [d / "ckpt"])
        add("tasks.openqa.emdr2", f"emdr2:{name}",
            [*train_flags, "--evidence", ev, "--train-data", f, "--dev-data", dev, "--index-dir", o / "index",
             "--save", o / "ckpt"], 2, f"{f}: {msg}", [o])
    for name, msg in MSS.items():
        f, o = CORPUS / name, out / name
        add("tasks.openqa.mss", f"mss:{name}",
            [*train_flags, "--evidence", ev, "--mss-data", f, "--mss-dev-sentences", "2", "--index-dir", o / "index",
             "--save", o / "ckpt"], 2, f"{f}: {msg}", [o])
    for name, msg in CONFIG.items():
        f, o = CORPUS / name, out / name
        add("tools.build_index", f"build_index:{name}",
            ["--checkpoint", d / "retriever_noconfig.pt", "--config", f, "--evidence", ev, "--output", o],
            2, msg.format(f=f), [o])
    for name, msg in CHECKPOINTS.items():
        c, o = d / f"ckpt-{name}", out / f"ckpt-{name}"
        msg = f"{c}/iter_0000001{msg}"
        add("tasks.openqa.evaluate", f"evaluate:ckpt-{name}",
            ["--load", c, "--evidence", ev, "--qa-file", dev, "--index-dir", o / "index", "--metrics-out", o / "m.json"],
            2, msg, [o], [c])
        add("tasks.openqa.emdr2", f"emdr2:ckpt-{name}",
            [*train_flags, "--train-iters", "2", "--evidence", ev, "--train-data", train, "--dev-data", dev,
             "--index-dir", o / "index", "--load", c, "--save", c], 2, msg, [o], [c])
        add("tools.build_index", f"build_index:ckpt-{name}",
            ["--checkpoint", c, "--evidence", ev, "--output", o], 2, msg, [o], [c])
        add("tools.answer", f"answer:ckpt-{name}",
            ["--load", c, "--evidence", ev, "--index-dir", o / "index", "--question", "who wrote hamlet"],
            2, msg, [o], [c])
    for name, msg in INDEXES.items():
        x, o = d / f"index-{name}", out / f"index-{name}"
        msg = f"{x}/{msg}"
        add("tools.eval_retrieval", f"eval_retrieval:index-{name}",
            [*retr, "--index", x, "--evidence", ev, "--qa-file", dev, "--metrics-out", o / "m.json"],
            2, msg, [o], [x])
        add("tasks.openqa.evaluate", f"evaluate:index-{name}",
            ["--load", d / "ckpt", "--evidence", ev, "--qa-file", dev, "--index-dir", x, "--allow-index-mismatch",
             "--metrics-out", o / "m.json"], 2, msg, [o], [x, d / "ckpt"])
    x48 = d / "index-retriever48"
    add("tools.eval_retrieval", "eval_retrieval:index-other-tower",
        [*retr, "--index", x48, "--evidence", ev, "--qa-file", dev], 2,
        f"{x48}/step-00000000: index was embedded by another context tower", [], [x48])
    add("tools.eval_retrieval", "eval_retrieval:index-dim-mismatch",
        [*retr, "--index", x48, "--evidence", ev, "--qa-file", dev, "--allow-index-mismatch"], 2,
        f"{x48}: index dim 48 != query tower width 32", [], [x48])
    # paths that are not files, and an evidence file that lacks passages the index has
    missing, a_dir, fewer = d / "no-such-file.tsv", d / "out", d / "evidence-first30.tsv"
    fewer.write_text("\n".join((d / "evidence.tsv").read_text().splitlines()[:31]) + "\n")
    add("tools.preprocess_evidence", "preprocess:missing-path", ["--input", missing, "--output-prefix", a_dir / "m"],
        1, f"{missing}: no such file", [a_dir / "m"])
    add("tools.preprocess_evidence", "preprocess:directory", ["--input", d / "ckpt", "--output-prefix", a_dir / "m"],
        1, f"{d / 'ckpt'}: is a directory, not an evidence file", [a_dir / "m"])
    add("tools.split_dev", "split_dev:directory-as-qa", [d / "ckpt", "--out-dir", a_dir / "s"], 2,
        f"{d / 'ckpt'}: is a directory, not a QA file", [a_dir / "s"])
    add("tools.eval_retrieval", "eval_retrieval:evidence-lacks-index-ids",
        [*retr, "--index", index, "--evidence", fewer, "--qa-file", dev], 2,
        f"{fewer}: passage id(s) not in the evidence: [", [], [index])
    add("tasks.openqa.evaluate", "evaluate:index-dim-mismatch",
        ["--load", d / "ckpt", "--evidence", ev, "--qa-file", dev, "--index-dir", d / "index-retriever48",
         "--allow-index-mismatch"], 2, "step-00000000: index dim 48 != the query tower's width 64", [],
        [d / "index-retriever48"])
    o = out / "flags"
    train_run = [*train_flags, "--evidence", ev, "--train-data", train, "--dev-data", dev, "--index-dir", o / "index"]
    for cid, extra in FLAGS_EMDR2.items():
        if cid == "reader-size-mismatch":
            extra = ["--load", d / "ckpt", "--reader-hidden-size", "32"]
        add("tasks.openqa.emdr2", f"emdr2:{cid}", [*train_run, *extra], 2, FLAG_MESSAGES[cid], [o])
    add("tasks.openqa.emdr2", "emdr2:save-is-a-file", [*train_run, "--save", ev], 2, f"--save {ev}", [o], [d / "evidence.tsv"])
    add("tasks.openqa.evaluate", "evaluate:metrics-out-is-a-directory",
        ["--load", d / "ckpt", "--evidence", ev, "--qa-file", dev, "--index-dir", o / "index", "--metrics-out", d],
        2, FLAG_MESSAGES["metrics-out-is-a-directory"], [o])
    add("tools.eval_retrieval", "eval_retrieval:topk-0",
        [*retr, "--index", index, "--evidence", ev, "--qa-file", dev, "--topk", "0"], 2, "--topk must be >= 1")
    add("tools.build_index", "build_index:batch-size-0",
        [*retr, "--evidence", ev, "--output", o / "i", "--batch-size", "0"], 2, "--batch-size must be >= 1", [o])
    add("tools.build_index", "build_index:model-step-negative",
        [*retr, "--evidence", ev, "--output", o / "i", "--model-step", "-1"], 2, "--model-step must be >= 0", [o])
    return cases


def _walk(entry, cases, tmp: Path):
    spec = [{"id": cid, "entry": entry, "argv": argv} for e, cid, argv, *_ in cases if e == entry]
    cases_file, results_file = tmp / f"{entry}.cases.json", tmp / f"{entry}.results.json"
    cases_file.write_text(json.dumps(spec))
    from megatron.emdr2.initialize import free_port

    proc = subprocess.run([sys.executable, "tests/bad_input_walk.py", str(cases_file), str(results_file)],
                          cwd=ROOT, env=dict(env(1), MASTER_PORT=str(free_port())), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, (entry, proc.stderr[-3000:])
    return json.loads(results_file.read_text())


def test_every_bad_input_through_every_reader(world, tmp_path):
    assert sorted(p.name for p in CORPUS.iterdir()) == FIXTURES
    cases = _cases(world)
    before = {p: _digest(p) for *_, unchanged in cases for p in unchanged}
    entries = sorted({c[0] for c in cases})
    with ThreadPoolExecutor(2) as pool:
        results = {}
        for r in pool.map(lambda e: _walk(e, cases, tmp_path), entries):
            results.update(r)
    failures = []
    for entry, cid, argv, rc, message, absent, unchanged in cases:
        r = results[cid]
        err = r["stderr"].strip()
        lines = err.splitlines()
        problems = []
        if r["rc"] != rc:
            problems.append(f"exit {r['rc']} (expected {rc})")
        if "Traceback" in err:
            problems.append("traceback")
        if not lines or message not in lines[-1]:
            problems.append(f"last line lacks {message!r}")
        if sum(": error: " in l or l.startswith("error:") for l in lines) > 1 or len(lines) > 1 and (
                message in "\n".join(lines[:-1])):
            problems.append("more than one error line")
        problems += [f"{p} was created" for p in absent if p.exists() and any(p.rglob("*"))]
        problems += [f"{p} changed" for p in unchanged if _digest(p) != before[p]]
        if problems:
            failures.append(f"{cid}: {'; '.join(problems)}\n    stderr: {err[-600:]}")
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures)
    if os.environ.get("BAD_INPUTS_TABLE"):  # docs/bad_inputs.md's table, from this very run
        _write_table(Path(os.environ["BAD_INPUTS_TABLE"]), cases, results, world)


def _write_table(path: Path, cases, results, world: Path) -> None:
    rows = ["| input | tool | exit | message |", "| --- | --- | --- | --- |"]
    for entry, cid, argv, rc, *_ in cases:
        tool, what = cid.split(":", 1)
        line = results[cid]["stderr"].strip().splitlines()[-1]
        line = line.replace(str(CORPUS) + "/", "").replace(str(world) + "/", "").replace("|", "\\|")
        rows.append(f"| `{what}` | {tool} | {results[cid]['rc']} | {line} |")
    path.write_text("\n".join(rows) + "\n")


def test_crlf_evidence_is_read_like_lf(tmp_path):
    from megatron.emdr2.data.evidence import load_evidence

    ev = load_evidence(CORPUS / "evidence_crlf.tsv")
    assert len(ev) == 2 and ev.text(0) == "The first passage text." and ev.title(1) == "Title Two"


def test_a_10mb_passage_is_tokenised_in_bounded_memory(tmp_path):
    """preprocess_evidence on a 10 MB passage: the same ids as tokenising it whole, in a fraction
    of the memory (measured: peak worker RSS 1466 MB before, 186 MB after)."""
    from megatron.emdr2.data.preprocess import _pieces, encode_bounded
    from megatron.emdr2.data.tokenizer import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(None)
    text = " ".join(f"word{i % 97} Zürich, (x{i})" for i in range(3000))
    assert "".join(_pieces(text, 500)) == text and max(map(len, _pieces(text, 500))) <= 500
    assert encode_bounded(tok, [text, "short"], long_chars=500) == tok.encode_batch([text, "short"])
    rows = ["id\ttext\ttitle", "1\tfirst\tA", "2\t" + " ".join(["word"] * 2_000_000) + "\tBig"]
    (tmp_path / "big.tsv").write_text("\n".join(rows) + "\n")
    proc = subprocess.run([sys.executable, "tools/preprocess_evidence.py", "--input", str(tmp_path / "big.tsv"),
                           "--output-prefix", str(tmp_path / "p"), "--quiet"], cwd=ROOT, env=env(1),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["text_tokens"] == 1 + 2_000_000
    assert max(stats["peak_rss"].values()) < 600, stats["peak_rss"]  # whole: ~1.5 GB

