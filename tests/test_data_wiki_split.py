"""Wikipedia -> 100-word passages (DPR conventions), read back by the evidence reader."""

import subprocess
import sys
from pathlib import Path

import pytest

from megatron.emdr2.data.errors import DataError
from megatron.emdr2.data.evidence import load_evidence
from megatron.emdr2.data.wiki_split import split_passages, split_wikipedia

FIX = Path(__file__).parent / "fixtures" / "data"
ROOT = Path(__file__).resolve().parents[1]


def test_split_passages_conventions():
    words = [f"w{i}" for i in range(250)]
    ps = split_passages("Title", "Title\n\n" + " ".join(words))  # title already leads the text
    assert [len(p.split()) for p in ps] == [100, 100, 51]
    assert ps[0].startswith("Title w0 w1") and ps[2].endswith("w249")
    assert split_passages("Albedo", "Albedo is the  whiteness\nof a surface.")[0] == "Albedo is the whiteness of a surface."
    assert split_passages("Aaron", "is a prophet", words=100)[0] == "Aaron is a prophet"  # title prepended
    assert split_passages("Aaron", "is a prophet", title_in_text="never") == ["is a prophet"]


def test_split_wikipedia_round_trip(tmp_path):
    out = tmp_path / "psgs.tsv"
    counts = split_wikipedia(FIX / "wiki_sample.jsonl", out, workers=0, progress=False, start_id=1)
    assert counts == {"articles": 2, "passages": 4, "disambiguation": 1, "empty": 1, "skipped": 0}
    ev = load_evidence(out)
    assert ev.ids.tolist() == [1, 2, 3, 4]
    assert [ev.title(i) for i in range(4)] == ["Anarchism"] * 3 + ["Albedo"]
    assert ev.text(0).startswith("Anarchism Anarchism is a political philosophy.")
    assert len(ev.text(0).split()) == 100 and len(ev.text(2).split()) == 236 - 200
    assert ev.text(3) == 'Albedo is the "whiteness" of a surface. It is measured from 0 to 1.'
    assert '\t"Albedo is the ""whiteness"" of' in out.read_text(encoding="utf-8")  # DPR's CSV quoting


def test_cli_parallel_matches_inline(tmp_path):
    inline = tmp_path / "a.tsv"
    split_wikipedia([FIX / "wiki_sample.jsonl", FIX / "wiki_sample.jsonl"], inline, workers=0,
                    chunk_lines=1, progress=False)
    cli = tmp_path / "b.tsv"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "split_wikipedia.py"), "--input",
                        str(FIX / "wiki_sample.jsonl"), str(FIX / "wiki_sample.jsonl"), "--output", str(cli),
                        "--workers", "2", "--chunk-lines", "1", "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert cli.read_bytes() == inline.read_bytes()
    assert load_evidence(cli).ids.tolist() == list(range(1, 9))


@pytest.mark.parametrize("name,line,problem", [
    ("wiki_bad_json.jsonl", 2, "invalid JSON"),
    ("wiki_missing_text.jsonl", 2, "article has no 'text' string"),
])
def test_malformed_articles(tmp_path, name, line, problem):
    with pytest.raises(DataError) as e:
        split_wikipedia(FIX / name, tmp_path / "out.tsv", workers=0, progress=False)
    assert str(e.value).startswith(str(FIX / name)) and f"line {line}:" in str(e.value) and problem in str(e.value)
    assert not list(tmp_path.iterdir())  # the temporary output was removed
    counts = split_wikipedia(FIX / name, tmp_path / "out.tsv", workers=0, progress=False, on_error="skip")
    assert counts["skipped"] == 1 and counts["articles"] == 1
