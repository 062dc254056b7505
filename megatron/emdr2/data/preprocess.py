"""Evidence tsv -> pre-tokenised memory-mapped store (the library behind tools/preprocess_evidence.py).

The main process reads raw lines and hands chunks to worker processes, which parse, validate and
tokenise them; results come back in order and are streamed to disk. Memory stays bounded: at most
`2 * workers` chunks are in flight, and per-row index data goes to side files, not lists. Output
files are written under temporary names and renamed at the end, metadata last.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

from . import indexed
from .errors import DataError, SkipLog, check_on_error
from .evidence import (IDS_SUFFIX, META_SUFFIX, RAW_SUFFIX, TEXT_SUFFIX, TITLE_SUFFIX, IdSet,
                       TsvLayout, open_binary)

FORMAT = "emdr2-evidence-mmap"


@dataclass(frozen=True)
class TokenizerSpec:
    """What a worker needs to rebuild the tokenizer (tokenizers are not shipped between processes)."""

    kind: str = "bert"
    vocab_file: str | None = None
    lower_case: bool = True
    model_file: str | None = None

    def build(self):
        from .tokenizer import BertWordPieceTokenizer, SentencePieceTokenizer

        if self.kind == "bert":
            return BertWordPieceTokenizer(self.vocab_file, lower_case=self.lower_case)
        if self.kind == "sentencepiece":
            return SentencePieceTokenizer(self.model_file)
        raise ValueError(f"unknown tokenizer kind {self.kind!r}")


_TOKENIZER = None


def _init_worker(spec: TokenizerSpec) -> None:
    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    _TOKENIZER = spec.build()


def _flatten(seqs: list[list[int]], dtype) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


LONG_TEXT_CHARS = 100_000  # tokenised in whitespace-aligned pieces above this


def _pieces(text: str, size: int) -> list[str]:
    """``text`` cut before a whitespace character every ~``size`` characters (no cut inside a
    word, so WordPiece and SentencePiece give the same ids piece by piece as for the whole)."""
    out, start = [], 0
    while len(text) - start > size:
        cut = text.rfind(" ", start + 1, start + size)
        if cut <= start:  # one word longer than size: cut at the next space (or keep it whole)
            cut = text.find(" ", start + size)
            if cut < 0:
                break
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def encode_bounded(tokenizer, texts: list[str], long_chars: int = LONG_TEXT_CHARS) -> list[list[int]]:
    """``tokenizer.encode_batch(texts)``, with any text longer than ``long_chars`` encoded in
    pieces: a fast tokenizer's encoding of one 10 MB passage holds ~1.4 GB of offsets and
    alignments; in pieces the peak stays bounded, with the same ids."""
    if all(len(t) <= long_chars for t in texts):
        return tokenizer.encode_batch(texts)
    out = []
    for t in texts:
        if len(t) <= long_chars:
            out.extend(tokenizer.encode_batch([t]))
        else:
            out.append([i for piece in _pieces(t, long_chars) for ids in tokenizer.encode_batch([piece])
                        for i in ids])
    return out


def _encode_chunk(task):
    """Parse and tokenise one chunk of raw lines (runs in a worker)."""
    layout, first_line, lines, on_error, write_raw, dtype = task
    ids, line_numbers, titles, texts, errors = [], [], [], [], []
    for k, raw in enumerate(lines):
        try:
            pid, text, title = layout.parse(raw, first_line + k)
        except DataError as err:
            if on_error == "raise":
                raise
            errors.append(err)
            continue
        ids.append(pid)
        line_numbers.append(first_line + k)
        titles.append(title)
        texts.append(text)
    out = {"ids": np.array(ids, np.int64), "lines": np.array(line_numbers, np.int64), "errors": errors}
    out["text"] = _flatten(encode_bounded(_TOKENIZER, texts), dtype)
    out["title"] = _flatten(encode_bounded(_TOKENIZER, titles), dtype)
    if write_raw:
        pieces = [s.encode("utf-8") for pair in zip(titles, texts) for s in pair]
        lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
        out["raw"] = (np.frombuffer(b"".join(pieces), dtype=np.uint8), lengths)
    out["peak_rss_mb"] = own_peak_rss_mb()
    return out


def _drop_rows(result: dict, rows: np.ndarray, write_raw: bool) -> dict:
    """Remove rows (positions) from a chunk's result: ids, line numbers and their token runs."""
    keep = np.ones(len(result["ids"]), dtype=bool)
    keep[rows] = False
    out = dict(result, ids=result["ids"][keep], lines=result["lines"][keep])
    for key, per_row in (("text", 1), ("title", 1), ("raw", 2)):
        if key == "raw" and not write_raw:
            continue
        flat, lengths = result[key]
        seq_keep = np.repeat(keep, per_row)
        out[key] = (flat[np.repeat(seq_keep, lengths)], lengths[seq_keep])
    return out


def _read_chunks(f, first_line: int, chunk_rows: int):
    line_no = first_line
    while True:
        lines = list(itertools.islice(f, chunk_rows))
        if not lines:
            return
        yield line_no, lines, sum(len(x) for x in lines)
        line_no += len(lines)


def own_peak_rss_mb() -> float:
    """Peak resident memory of this process image in MiB.

    Linux's VmHWM, not ru_maxrss: ru_maxrss survives exec, so a tool started from a big parent
    (a test runner) would report the parent's size at fork time."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2 ** 20  # ru_maxrss: KiB (bytes on macOS)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class _StoreWriter:
    """Receives tokenised chunks in row order and streams them into the store's files."""

    def __init__(self, prefix: str, input_path, dtype, write_raw: bool, on_error: str, progress: bool):
        self.prefix, self.input_path = prefix, input_path
        self.write_raw, self.on_error = write_raw, on_error
        self.writers = {TEXT_SUFFIX: indexed.IndexedWriter(prefix + TEXT_SUFFIX, dtype),
                        TITLE_SUFFIX: indexed.IndexedWriter(prefix + TITLE_SUFFIX, dtype)}
        if write_raw:
            self.writers[RAW_SUFFIX] = indexed.IndexedWriter(prefix + RAW_SUFFIX, np.uint8)
        self.ids_tmp = prefix + IDS_SUFFIX + f".raw.tmp-{os.getpid()}"
        self.ids_out = open(self.ids_tmp, "wb")
        self.skipped = SkipLog(path=str(input_path))
        self.seen = IdSet(input_path)
        self.rows = self.tokens = 0
        self.worker_rss = 0.0
        self.first_id = self.last_id = None
        self.contiguous = True
        self.bar = _progress_bar(input_path, progress)

    def consume(self, result: dict, nbytes: int) -> None:
        for err in result["errors"]:
            self.skipped.add(err)
        if self.on_error == "raise":
            self.seen.add(result["ids"], result["lines"])
        else:
            dups = self.seen.find_duplicates(result["ids"])
            for k in dups:
                self.skipped.add(DataError(self.input_path, int(result["lines"][k]),
                                           f"duplicate passage id {int(result['ids'][k])}"))
            if len(dups):
                result = _drop_rows(result, dups, self.write_raw)
        ids = result["ids"]
        if len(ids):
            if self.first_id is None:
                self.first_id, self.last_id = int(ids[0]), int(ids[0]) - 1
            # contiguous ids (DPR's 1..N) let readers map id -> row by arithmetic
            self.contiguous &= bool(np.array_equal(ids, np.arange(self.last_id + 1, self.last_id + 1 + len(ids))))
            self.last_id = int(ids[-1])
        self.ids_out.write(ids.tobytes())
        self.writers[TEXT_SUFFIX].add_documents(*result["text"])
        self.writers[TITLE_SUFFIX].add_documents(*result["title"])
        if self.write_raw:
            self.writers[RAW_SUFFIX].add_documents(*result["raw"], seqs_per_doc=2)
        self.worker_rss = max(self.worker_rss, result["peak_rss_mb"])
        self.rows += len(ids)
        self.tokens += len(result["text"][0])
        if self.bar is not None:
            self.bar.update(nbytes)

    def finalize(self) -> None:
        self.ids_out.close()
        # Invalidate an older store first: a crash during the renames then leaves no metadata,
        # and a store with our side files but no metadata is refused as incomplete.
        if os.path.exists(self.prefix + META_SUFFIX):
            os.remove(self.prefix + META_SUFFIX)
        if not self.write_raw:
            indexed.remove(self.prefix + RAW_SUFFIX)
        for w in self.writers.values():
            w.finalize()
        _write_ids(self.ids_tmp, self.prefix + IDS_SUFFIX, self.rows)

    def abort(self) -> None:
        self.ids_out.close()
        for w in self.writers.values():
            w.abort()
        if os.path.exists(self.ids_tmp):
            os.remove(self.ids_tmp)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_chunks(chunks, store: _StoreWriter, spec: TokenizerSpec, workers: int, make_task) -> None:
    if workers <= 0:
        _init_worker(spec)
        for first, lines, nbytes in chunks:
            store.consume(_encode_chunk(make_task(first, lines)), nbytes)
        return
    pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(spec,))
    try:
        pending: deque = deque()
        for first, lines, nbytes in chunks:
            pending.append((pool.apply_async(_encode_chunk, (make_task(first, lines),)), nbytes))
            while len(pending) > 2 * workers:  # back-pressure keeps memory bounded
                res, nb = pending.popleft()
                store.consume(res.get(), nb)
        while pending:
            res, nb = pending.popleft()
            store.consume(res.get(), nb)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def preprocess_evidence(input_path, output_prefix, tokenizer: TokenizerSpec | None = None,
                        workers: int = 1, chunk_rows: int = 2000, quoting: str = "auto",
                        on_error: str = "raise", write_raw: bool = True, progress: bool = True) -> dict:
    """Write `<output_prefix>_{text,title}_document.{bin,idx}`, `_raw.{bin,idx}` (unless
    write_raw=False), `_ids.npy` and `_meta.json`. workers=0 tokenises in this process.
    Returns statistics (rows, skipped, seconds, rows_per_s, peak RSS)."""
    check_on_error(on_error)
    if os.path.isdir(input_path):
        raise DataError(input_path, None, "is a directory, not an evidence file")
    if not os.path.exists(input_path):
        raise DataError(input_path, None, "no such file")
    spec = tokenizer or TokenizerSpec()
    tok = spec.build()
    dtype = indexed.token_dtype(tok.vocab_size)
    prefix = str(output_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    start = time.perf_counter()

    with open_binary(input_path) as f:
        header = f.readline()
        if not header:
            raise DataError(input_path, 1, "empty file (expected the header id, text, title)")
        layout = TsvLayout(input_path, header, quoting)
        store = _StoreWriter(prefix, input_path, dtype, write_raw, on_error, progress)
        try:
            _run_chunks(_read_chunks(f, 2, chunk_rows), store, spec, workers,
                        lambda first, lines: (layout, first, lines, on_error, write_raw, dtype))
            if store.rows == 0:  # nothing to index: an error now, not a 0 x 0 index later
                raise DataError(input_path, None, "no passages (the file holds only a header, or every "
                                                  "line was skipped)")
            store.finalize()
        except BaseException:
            store.abort()
            raise
        finally:
            store.close_bar()
    seconds = time.perf_counter() - start
    store.skipped.report()
    meta = {
        "format": FORMAT, "version": 1, "rows": store.rows, "first_id": store.first_id,
        "ids_contiguous": store.contiguous, "has_raw": write_raw,
        "tokenizer": tok.name, "tokenizer_spec": asdict(spec), "vocab_size": tok.vocab_size,
        "token_dtype": np.dtype(dtype).name, "source": os.path.abspath(str(input_path)),
        "source_bytes": os.path.getsize(input_path), "skipped": store.skipped.count,
    }
    _atomic_write_text(prefix + META_SUFFIX, json.dumps(meta, indent=1))
    return {
        "rows": store.rows, "skipped": store.skipped.count, "text_tokens": store.tokens,
        "seconds": round(seconds, 3), "rows_per_s": round(store.rows / max(seconds, 1e-9), 1),
        "workers": workers,
        # with workers=0 the "worker" is this process
        "peak_rss": {"main_mb": round(own_peak_rss_mb(), 1), "largest_worker_mb": round(store.worker_rss, 1)},
    }


def _write_ids(raw_path: str, npy_path: str, rows: int) -> None:
    """Wrap the streamed int64 ids in a .npy header (copied in blocks, never held in memory)."""
    tmp = npy_path + f".tmp-{os.getpid()}"
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int64)), "fortran_order": False, "shape": (rows,)}
    with open(tmp, "wb") as out:
        np.lib.format.write_array_header_1_0(out, header)
        with open(raw_path, "rb") as f:
            while block := f.read(1 << 24):
                out.write(block)
    os.replace(tmp, npy_path)
    os.remove(raw_path)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _progress_bar(path, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    total = os.path.getsize(path) if not str(path).endswith(".gz") else None
    return tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenising {os.path.basename(str(path))}")
