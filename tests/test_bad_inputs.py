"""The bad-input corpus (tests/fixtures/bad_inputs/): every malformed evidence and QA file is
walked through the tool that reads it, as a user would run it, and must give exit status 1/2
with one line naming the file, the line where there is one, and the problem; no traceback, and
no output written. The table of inputs and messages is in docs/bad_inputs.md."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from openqa_helpers import ROOT, env

CORPUS = ROOT / "tests" / "fixtures" / "bad_inputs"

EVIDENCE = {  # fixture -> what the one-line error must say (tools/preprocess_evidence.py, exit 1)
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
QA = {  # fixture -> message (tools/split_dev.py, which reads QA files as every task does; exit 2)
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
}


def _run(case):
    name, tmp = case
    path = CORPUS / name
    out = tmp / name.replace(".", "_")
    if name.startswith("evidence"):
        argv = ["tools/preprocess_evidence.py", "--input", str(path), "--output-prefix", str(out / "p"), "--quiet"]
    else:
        argv = ["tools/split_dev.py", str(path), "--out-dir", str(out)]
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env(1), capture_output=True, text=True,
                          timeout=120)
    return name, proc, out


def test_every_bad_input_gives_one_located_line_and_writes_nothing(tmp_path):
    assert sorted(p.name for p in CORPUS.iterdir()) == sorted([*EVIDENCE, *QA, "evidence_crlf.tsv"])
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(_run, [(name, tmp_path) for name in [*EVIDENCE, *QA]]))
    for name, proc, out in results:
        expected_rc, message = (1, EVIDENCE[name]) if name in EVIDENCE else (2, QA[name])
        err = proc.stderr.strip()
        assert proc.returncode == expected_rc, (name, proc.returncode, err[-1500:])
        assert err.count("\n") == 0 and "Traceback" not in err, (name, err[-1500:])
        assert f"{CORPUS / name}:" in err and message in err, (name, err)
        assert not out.exists() or not any(out.rglob("*")), (name, sorted(out.rglob("*")))


def test_crlf_evidence_is_read_like_lf(tmp_path):
    from megatron.emdr2.data.evidence import load_evidence

    ev = load_evidence(CORPUS / "evidence_crlf.tsv")
    assert len(ev) == 2 and ev.text(0) == "The first passage text." and ev.title(1) == "Title Two"
