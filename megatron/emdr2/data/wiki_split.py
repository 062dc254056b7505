"""Wikipedia articles (WikiExtractor JSON lines: id, title, text) -> 100-word passages in DPR's
psgs_w100.tsv layout (the library behind tools/split_wikipedia.py).

DPR's conventions: an article's text (title line included, as WikiExtractor writes it and as
psgs_w100 shows: passage 1 reads "Aaron Aaron ( or ; ...") is split on whitespace into disjoint
blocks of `words` words (the last block may be shorter), joined by single spaces; the title goes
in its own column; disambiguation pages are left out; ids run from 1 in input order. The tsv is
written with CSV quoting (quotes doubled inside quoted fields), like DPR's file.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import itertools
import json
import multiprocessing as mp
import os
import re
from collections import deque
from pathlib import Path

from .errors import DataError, SkipLog, check_on_error

_DISAMBIGUATION = re.compile(r"\(disambiguation\)\s*$", re.IGNORECASE)


def split_passages(title: str, text: str, words: int = 100, title_in_text: str = "auto") -> list[str]:
    """The passages of one article. title_in_text: 'auto' prepends the title unless the text
    already starts with it (older WikiExtractor versions include it), 'prepend', or 'never'."""
    if title_in_text not in ("auto", "prepend", "never"):
        raise ValueError(f"title_in_text must be auto, prepend or never, got {title_in_text!r}")
    tokens = text.split()
    title_words = title.split()
    if title_in_text == "prepend" or (title_in_text == "auto" and title_words
                                       and tokens[: len(title_words)] != title_words):
        tokens = title_words + tokens
    return [" ".join(tokens[i: i + words]) for i in range(0, len(tokens), words)]


def _parse_article(raw: bytes, path: str, line_no: int) -> tuple[str, str]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, line_no, f"invalid UTF-8 at byte {e.start} of the line ({e.reason})") from None
    if not line.strip():
        raise DataError(path, line_no, "blank line (expected a JSON article)")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(path, line_no, f"invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(path, line_no, f"expected a JSON object, found {type(obj).__name__}")
    for key in ("title", "text"):
        if not isinstance(obj.get(key), str):
            raise DataError(path, line_no, f"article has no '{key}' string")
    return obj["title"].strip(), obj["text"]


def _split_chunk(task):
    path, first_line, lines, words, title_in_text, keep_disambiguation, on_error = task
    out, errors, counts = [], [], {"disambiguation": 0, "empty": 0}
    for k, raw in enumerate(lines):
        try:
            title, text = _parse_article(raw, path, first_line + k)
        except DataError as err:
            if on_error == "raise":
                raise
            errors.append(err)
            continue
        if not keep_disambiguation and _DISAMBIGUATION.search(title):
            counts["disambiguation"] += 1
            continue
        if not text.split():
            counts["empty"] += 1
            continue
        out.append((title, split_passages(title, text, words, title_in_text)))
    return out, errors, counts


def list_inputs(inputs) -> list[str]:
    """Files as given; directories walked recursively in sorted order (WikiExtractor's AA/wiki_00...)."""
    files = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files.extend(str(f) for f in sorted(p.rglob("*")) if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            files.append(str(p))
        else:
            raise DataError(p, None, "input not found")
    return files


def _open(path: str):
    if path.endswith(".bz2"):
        return bz2.open(path, "rb")
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _tasks(files, chunk_lines, words, title_in_text, keep_disambiguation, on_error, bar):
    for path in files:
        with _open(path) as f:
            line_no = 1
            while True:
                lines = list(itertools.islice(f, chunk_lines))
                if not lines:
                    break
                yield (path, line_no, lines, words, title_in_text, keep_disambiguation, on_error)
                line_no += len(lines)
                if bar is not None:
                    bar.update(sum(len(x) for x in lines))


def split_wikipedia(inputs, output_tsv, words: int = 100, start_id: int = 1, workers: int = 1,
                    chunk_lines: int = 500, title_in_text: str = "auto", keep_disambiguation: bool = False,
                    on_error: str = "raise", progress: bool = True) -> dict:
    """Write the passage tsv (to a temporary name, renamed when complete); returns counts."""
    check_on_error(on_error)
    if words < 1:
        raise ValueError(f"words must be >= 1, got {words}")
    files = list_inputs([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)
    skipped = SkipLog(path=", ".join(files[:3]) + (" ..." if len(files) > 3 else ""))
    counts = {"articles": 0, "passages": 0, "disambiguation": 0, "empty": 0}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(os.path.getsize(f) for f in files), unit="B", unit_scale=True, desc="splitting")
    tmp = f"{output_tsv}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(str(output_tsv))), exist_ok=True)
    next_id = start_id
    pool = None
    try:
        with io.open(tmp, "w", encoding="utf-8", newline="") as out:
            writer = csv.writer(out, delimiter="\t", lineterminator="\n")
            writer.writerow(["id", "text", "title"])

            def consume(result):
                nonlocal next_id
                articles, errors, c = result
                for err in errors:
                    skipped.add(err)
                counts["disambiguation"] += c["disambiguation"]
                counts["empty"] += c["empty"]
                for title, passages in articles:
                    counts["articles"] += 1
                    for passage in passages:
                        writer.writerow([next_id, passage, title])
                        next_id += 1
                        counts["passages"] += 1

            tasks = _tasks(files, chunk_lines, words, title_in_text, keep_disambiguation, on_error, bar)
            if workers <= 0:
                for task in tasks:
                    consume(_split_chunk(task))
            else:
                pool = mp.get_context("spawn").Pool(workers)
                pending: deque = deque()
                for task in tasks:
                    pending.append(pool.apply_async(_split_chunk, (task,)))
                    while len(pending) > 2 * workers:  # back-pressure: bounded memory
                        consume(pending.popleft().get())
                while pending:
                    consume(pending.popleft().get())
                pool.close()
                pool.join()
                pool = None
        os.replace(tmp, output_tsv)
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        if bar is not None:
            bar.close()
    skipped.report()
    counts["skipped"] = skipped.count
    return counts
