"""Evidence passages: DPR `psgs_w100.tsv` (header `id\\ttext\\ttitle`) read as a stream, an
in-memory store for small corpora, and a memory-mapped store over the pre-tokenised files made by
`tools/preprocess_evidence.py` (or the original EMDR² release's `*_text_document`/`*_title_document`).

Lines are split on tabs. DPR writes psgs_w100.tsv with CSV quoting (a field containing `"` is
wrapped in quotes, inner quotes doubled) while other dumps (e.g. nq-mini) write raw text; with
quoting='auto' a field is unquoted only when it is a well-formed quoted CSV field, which raw text
essentially never is. A record never spans lines in either layout.
"""

from __future__ import annotations

import gzip
import zlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from . import indexed
from .errors import DataError, SkipLog, check_on_error

logger = logging.getLogger(__name__)

COLUMNS = ("id", "text", "title")
QUOTING = ("auto", "csv", "none")
# File names of the preprocessed store (prefix + suffix).
TEXT_SUFFIX, TITLE_SUFFIX, RAW_SUFFIX = "_text_document", "_title_document", "_raw"
IDS_SUFFIX, META_SUFFIX = "_ids.npy", "_meta.json"


class _CheckedGzipFile(gzip.GzipFile):
    """A gzip file whose truncation or corruption is a DataError naming it, not an EOFError
    deep in a reader."""

    def __init__(self, path: str):
        super().__init__(path, "rb")
        self._path = path

    def _checked(self, read, *args):
        try:
            return read(*args)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise DataError(self._path, None, f"truncated or corrupt gzip file ({e})") from None

    def read(self, size=-1):
        return self._checked(super().read, size)

    def read1(self, size=-1):
        return self._checked(super().read1, size)

    def readline(self, size=-1):
        return self._checked(super().readline, size)

    def __next__(self):
        line = self.readline()
        if not line:
            raise StopIteration
        return line


def open_binary(path):
    path = str(path)
    return _CheckedGzipFile(path) if path.endswith(".gz") else open(path, "rb")


def unquote_field(field: str, quoting: str = "auto") -> str:
    """Undo CSV quoting of one tab-separated field (see the module docstring for 'auto')."""
    if quoting == "none" or len(field) < 2 or field[0] != '"' or field[-1] != '"':
        return field
    inner = field[1:-1]
    if quoting == "auto" and '"' in inner.replace('""', ""):
        return field  # a lone quote inside: raw text that happens to start and end with quotes
    return inner.replace('""', '"')


class TsvLayout:
    """Column positions from the header line, plus the per-line parser (picklable for workers)."""

    def __init__(self, path, header: bytes, quoting: str = "auto"):
        if quoting not in QUOTING:
            raise ValueError(f"quoting must be one of {QUOTING}, got {quoting!r}")
        self.path, self.quoting = str(path), quoting
        names = [c.strip().lower() for c in _decode(header, path, 1).rstrip("\r\n").split("\t")]
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise DataError(path, 1, f"header must name the columns id, text, title; found {names} "
                                     f"(missing {missing})")
        self.ncols = len(names)
        self.id_col, self.text_col, self.title_col = (names.index(c) for c in COLUMNS)

    def parse(self, raw: bytes, line_no: int) -> tuple[int, str, str]:
        line = _decode(raw, self.path, line_no).rstrip("\r\n")
        if "\x00" in line:  # a binary or corrupted file, not text
            raise DataError(self.path, line_no, f"NUL byte at character {line.index(chr(0)) + 1} of the line")
        if not line.strip():
            raise DataError(self.path, line_no, "blank line (expected id, text, title)")
        fields = line.split("\t")
        if len(fields) != self.ncols:
            raise DataError(self.path, line_no, f"expected {self.ncols} tab-separated columns "
                                                f"(id, text, title), found {len(fields)}")
        pid = parse_id(fields[self.id_col], self.path, line_no)
        text = unquote_field(fields[self.text_col], self.quoting)
        title = unquote_field(fields[self.title_col], self.quoting)
        if not text.strip():
            raise DataError(self.path, line_no, f"passage {pid} has empty text")
        return pid, text, title


def _decode(raw: bytes, path, line_no: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, line_no, f"invalid UTF-8 at byte {e.start} of the line ({e.reason})") from None


def parse_id(field: str, path, line_no) -> int:
    s = field.strip()
    if not s.isdigit() or not s.isascii():
        raise DataError(path, line_no, f"passage id {field[:40]!r} is not a non-negative integer")
    value = int(s)
    if value >= 2 ** 63:
        raise DataError(path, line_no, f"passage id {s} does not fit in int64")
    return value


class IdSet:
    """Duplicate-id detection, vectorised per chunk: a growable byte map indexed by id (21 MB for
    DPR's 21M ids); a Python set instead once an id exceeds 2**31."""

    _MAP_LIMIT = 1 << 31

    def __init__(self, path):
        self.path = str(path)
        self._bits = np.zeros(1 << 16, dtype=bool)
        self._set: set[int] | None = None

    def add(self, ids: np.ndarray, line_numbers: np.ndarray | None = None) -> None:
        """Record ids; raise DataError at the first one seen before (here or in an earlier call)."""
        dups = self.find_duplicates(ids)
        if len(dups):
            k = int(dups[0])
            where = int(line_numbers[k]) if line_numbers is not None else f"record {k}"
            raise DataError(self.path, where, f"duplicate passage id {int(np.asarray(ids)[k])}")

    def find_duplicates(self, ids: np.ndarray) -> np.ndarray:
        """Positions of ids seen before; every other id is recorded as seen."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return np.zeros(0, np.int64)
        top = int(ids.max())
        if self._set is None and top >= self._MAP_LIMIT:
            self._set = set(np.flatnonzero(self._bits).tolist())
            self._bits = None
        if self._set is not None:
            dups = []
            for k, i in enumerate(ids.tolist()):
                if i in self._set:
                    dups.append(k)
                self._set.add(i)
            return np.array(dups, dtype=np.int64)
        if top >= len(self._bits):
            grown = np.zeros(max(top + 1, 2 * len(self._bits)), dtype=bool)
            grown[: len(self._bits)] = self._bits
            self._bits = grown
        dup = self._bits[ids]
        _, first = np.unique(ids, return_index=True)
        repeated = np.ones(len(ids), dtype=bool)
        repeated[first] = False
        dup |= repeated  # a repeat inside this chunk
        self._bits[ids] = True
        return np.flatnonzero(dup)


def read_evidence_tsv(path, quoting: str = "auto", on_error: str = "raise",
                      skipped: SkipLog | None = None) -> Iterator[tuple[int, str, str]]:
    """Yield (id, text, title) per passage, streaming; duplicate ids are errors.

    on_error='skip' skips malformed lines instead of raising; they are counted in `skipped`
    (pass a SkipLog to read the count) and summarised in a warning at the end.
    """
    check_on_error(on_error)
    log = skipped if skipped is not None else SkipLog()
    log.path = str(path)
    seen = IdSet(path)
    with open_binary(path) as f:
        header = f.readline()
        if not header:
            raise DataError(path, 1, "empty file (expected the header id, text, title)")
        layout = TsvLayout(path, header, quoting)
        for line_no, raw in enumerate(f, start=2):
            try:
                pid, text, title = layout.parse(raw, line_no)
                seen.add(np.array([pid]), np.array([line_no]))
            except DataError as err:
                if on_error == "raise":
                    raise
                log.add(err)
                continue
            yield pid, text, title
    log.report()


class Passage(tuple):
    """A (title, text) pair that also knows its evidence row (``.row``): what
    `Evidence.passages` returns, so that the reader can look up the passage's neighbours
    (``--reader-context neighbours``). Equal to, and unpacked like, the plain tuple."""

    def __new__(cls, title: str, text: str, row: int):
        self = super().__new__(cls, (title, text))
        self.row = int(row)
        return self

    def __getnewargs__(self):
        return (self[0], self[1], self.row)


class Evidence:
    """Passages addressed by row (0..N-1, file order) and by id (`ids[row]`)."""

    path: str
    ids: np.ndarray
    _neighbours = None

    def __len__(self) -> int:
        return len(self.ids)

    def text(self, row: int) -> str:
        raise NotImplementedError

    def title(self, row: int) -> str:
        raise NotImplementedError

    def passages(self, rows) -> list[Passage]:
        return [Passage(self.title(int(r)), self.text(int(r)), int(r)) for r in np.asarray(rows).reshape(-1)]

    def neighbour_map(self):
        """The same-article windows of the original's reader (`neighbours.NeighbourMap`), built
        on first use and kept (arrays only)."""
        if self._neighbours is None:
            from .neighbours import NeighbourMap

            self._neighbours = NeighbourMap.build(self)
        return self._neighbours

    def row_of(self, ids) -> np.ndarray:
        """Rows of the given passage ids (vectorised); unknown ids raise KeyError."""
        q = np.asarray(ids, dtype=np.int64)
        if self._first_id is not None:  # ids are first..first+N-1 in order: arithmetic
            rows = q - self._first_id
            bad = (rows < 0) | (rows >= len(self))
        else:
            if self._sorter is None:
                self._sorter = np.argsort(self.ids, kind="stable")
            sorted_ids = self.ids[self._sorter]
            pos = np.clip(np.searchsorted(sorted_ids, q), 0, max(len(self) - 1, 0))
            bad = sorted_ids[pos] != q if len(self) else np.ones(q.shape, bool)
            rows = self._sorter[pos]
        if bad.any():
            raise MissingPassageError(self.path, None, f"passage id(s) not in the evidence: {q[bad][:10].tolist()} "
                                                       "(an index or file made from another evidence file?)")
        return rows

    def _init_lookup(self) -> None:
        self._sorter = None
        self._first_id = None
        if len(self.ids) and int(self.ids[-1]) - int(self.ids[0]) == len(self.ids) - 1 \
                and bool(np.all(np.diff(self.ids) == 1)):
            self._first_id = int(self.ids[0])


class InMemoryEvidence(Evidence):
    """The whole tsv in Python lists: fine for small corpora (nq-mini), not for 21M passages."""

    def __init__(self, path, quoting: str = "auto", on_error: str = "raise"):
        self.path = str(path)
        self.skipped = SkipLog()
        ids, self._texts, self._titles = [], [], []
        for pid, text, title in read_evidence_tsv(path, quoting, on_error, self.skipped):
            ids.append(pid)
            self._texts.append(text)
            self._titles.append(title)
        self.ids = np.array(ids, dtype=np.int64)
        self._init_lookup()

    def text(self, row: int) -> str:
        return self._texts[row]

    def title(self, row: int) -> str:
        return self._titles[row]


class MmapEvidence(Evidence):
    """Pre-tokenised evidence on disk (megatron indexed datasets), opened lazily by mmap.

    Files for prefix P: P_text_document.{bin,idx} and P_title_document.{bin,idx} (token ids, one
    document per passage), and from our preprocessor also P_raw.{bin,idx} (UTF-8 bytes: title
    then text per passage, so text() is exact), P_ids.npy (id of each row) and P_meta.json
    (written last: its presence marks a complete store). The original release has neither ids
    nor raw text: its ids are DPR's 1..N in row order and text() decodes the tokens.
    """

    def __init__(self, prefix, tokenizer=None):
        self.path = self.prefix = str(prefix)
        meta_path = self.prefix + META_SUFFIX
        self.meta = None
        if os.path.exists(meta_path):
            with open(meta_path, encoding="utf-8") as f:
                try:
                    self.meta = json.load(f)
                except json.JSONDecodeError as e:
                    raise DataError(meta_path, e.lineno, f"invalid JSON ({e.msg})") from None
        elif os.path.exists(self.prefix + IDS_SUFFIX):
            raise DataError(meta_path, None, "missing: the preprocessed store is incomplete "
                                             "(interrupted run?); run tools/preprocess_evidence.py again")
        self._text = indexed.IndexedReader(self.prefix + TEXT_SUFFIX)
        self._title = indexed.IndexedReader(self.prefix + TITLE_SUFFIX)
        n = self._text.num_documents
        if self._title.num_documents != n:
            raise DataError(self.prefix + TITLE_SUFFIX + ".idx", None,
                            f"{self._title.num_documents} titles for {n} passages")
        self._raw = None
        if indexed.exists(self.prefix + RAW_SUFFIX):
            self._raw = indexed.IndexedReader(self.prefix + RAW_SUFFIX)
            if self._raw.num_documents != n or self._raw.num_sequences != 2 * n:
                raise DataError(self.prefix + RAW_SUFFIX + ".idx", None,
                                f"{self._raw.num_documents} raw passages for {n} token rows")
        ids_path = self.prefix + IDS_SUFFIX
        if os.path.exists(ids_path):
            try:
                self.ids = np.load(ids_path, mmap_mode="r")
            except ValueError as e:
                raise DataError(ids_path, None, f"unreadable id array ({e})") from None
            if self.ids.shape != (n,) or self.ids.dtype != np.int64:
                raise DataError(ids_path, None, f"expected {n} int64 ids, found shape {self.ids.shape} "
                                                f"dtype {self.ids.dtype}")
        else:
            logger.info("%s: no %s, assuming DPR ids 1..%d in row order", self.prefix, IDS_SUFFIX, n)
            self.ids = np.arange(1, n + 1, dtype=np.int64)
        self._tokenizer = tokenizer
        if self.meta is not None and self.meta.get("rows") != n:
            raise DataError(meta_path, None, f"records {self.meta.get('rows')} rows, the token files hold {n}")
        if self.meta is not None and self.meta.get("ids_contiguous") and n:
            self._sorter, self._first_id = None, int(self.meta["first_id"])  # skip the O(N) scan
        else:
            self._init_lookup()

    def __reduce__(self):  # reopen the maps in another process instead of copying their pages
        return (MmapEvidence, (self.prefix, self._tokenizer))

    @property
    def has_raw_text(self) -> bool:
        return self._raw is not None

    def text_tokens(self, row: int) -> np.ndarray:
        return self._text.document(row)

    def title_tokens(self, row: int) -> np.ndarray:
        return self._title.document(row)

    def _decode(self, ids: np.ndarray) -> str:
        if self._tokenizer is None:
            from .tokenizer import BertWordPieceTokenizer

            self._tokenizer = BertWordPieceTokenizer()
        return self._tokenizer.decode(ids.tolist())

    def text(self, row: int) -> str:
        if self._raw is not None:
            return self._raw.sequence(2 * row + 1).tobytes().decode("utf-8")
        return self._decode(self.text_tokens(row))

    def title(self, row: int) -> str:
        if self._raw is not None:
            return self._raw.sequence(2 * row).tobytes().decode("utf-8")
        return self._decode(self.title_tokens(row))


def is_mmap_prefix(path) -> bool:
    return indexed.exists(str(path) + TEXT_SUFFIX)


class MissingPassageError(DataError, KeyError):
    """Passage ids that the evidence does not have (a KeyError too, for lookups that expect one)."""

    def __str__(self):  # KeyError would quote the message
        return DataError.__str__(self)


def load_evidence(path, tokenizer=None, quoting: str = "auto", on_error: str = "raise") -> Evidence:
    """A tsv(.gz) file -> InMemoryEvidence; a preprocessed prefix -> MmapEvidence.

    `path` may also name one of the prefix's files (P_text_document.idx, P_meta.json, ...).
    """
    p = str(path)
    if os.path.isfile(p) and not p.endswith((".bin", ".idx", META_SUFFIX, IDS_SUFFIX)):
        return _nonempty(InMemoryEvidence(p, quoting, on_error), p)
    prefix = indexed.as_prefix(p)
    for suffix in (TEXT_SUFFIX, TITLE_SUFFIX, RAW_SUFFIX, META_SUFFIX, IDS_SUFFIX):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
    if is_mmap_prefix(prefix):
        return _nonempty(MmapEvidence(prefix, tokenizer), prefix + TEXT_SUFFIX + ".idx")
    if os.path.isdir(p):
        raise DataError(p, None, "is a directory, not an evidence file")
    raise DataError(p, None, "not an evidence file: neither a tsv nor the prefix of "
                             f"{Path(prefix).name}{TEXT_SUFFIX}.bin/.idx")


def _nonempty(evidence: Evidence, where: str) -> Evidence:
    """Every consumer (index, retrieval, training) needs at least one passage: an empty
    evidence file (e.g. only a header) is an error here, not a 0 x 0 index later."""
    if len(evidence) == 0:
        raise DataError(where, None, "no passages (the file holds only a header, or every line was skipped)")
    return evidence
