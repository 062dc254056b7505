"""megatron-core `indexed_dataset` files (.bin + .idx, "MMIDIDX"), written in bounded memory and
read with validation.

The byte layout is megatron-core's (and the original EMDR² release's): files written here load
with `megatron.core.datasets.indexed_dataset.IndexedDataset`, and files written by it (or by the
release) load here. We keep our own writer and reader because megatron-core's builder keeps every
sequence length in Python lists (about 60 bytes per row: 1.3 GB for 21M passages), and its
reader checks files with bare asserts; here a short or corrupt file raises a `DataError` that
names the file and the problem, and writing streams the lengths to a side file.

.idx layout: b"MMIDIDX\\x00\\x00", u64 version (1), u8 dtype code, u64 sequence count N,
u64 document count D (= number of documents + 1), int32[N] lengths, int64[N] byte pointers into
.bin, int64[D] document boundaries (sequence indices, starting at 0 and ending at N).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from .errors import DataError

HEADER = b"MMIDIDX\x00\x00"
_PREAMBLE = len(HEADER) + 8 + 1 + 8 + 8  # 34 bytes
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
          6: np.float64, 7: np.float32, 8: np.uint16}
_CODES = {np.dtype(v): k for k, v in DTYPES.items()}
_CHUNK = 1 << 18  # rows per block when streaming the index side files


def token_dtype(vocab_size: int):
    """uint16 while ids fit (as megatron-core and the original release chose), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def bin_path(prefix) -> str:
    return f"{prefix}.bin"


def idx_path(prefix) -> str:
    return f"{prefix}.idx"


def exists(prefix) -> bool:
    return os.path.exists(bin_path(prefix)) and os.path.exists(idx_path(prefix))


class IndexedWriter:
    """Streams documents into `<prefix>.bin/.idx` under temporary names; `finalize()` writes the
    index and renames both into place, so a crash never leaves a half-written dataset behind."""

    def __init__(self, prefix, dtype):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODES:
            raise ValueError(f"dtype {self.dtype} cannot be stored in an indexed dataset")
        tag = f".tmp-{os.getpid()}"
        self._bin_tmp = bin_path(self.prefix) + tag
        self._idx_tmp = idx_path(self.prefix) + tag
        self._len_tmp = self.prefix + ".lengths" + tag
        self._doc_tmp = self.prefix + ".docs" + tag
        self._bin = open(self._bin_tmp, "wb")
        self._lengths = open(self._len_tmp, "wb")
        self._docs = open(self._doc_tmp, "wb")
        self._docs.write(np.zeros(1, np.int64).tobytes())
        self.num_sequences = 0
        self.num_documents = 0

    def add_documents(self, flat: np.ndarray, seq_lengths: np.ndarray, seqs_per_doc: int | np.ndarray = 1):
        """Append documents given as one flat token array, the length of every sequence, and
        the number of sequences in each document (an int if all documents have the same)."""
        seq_lengths = np.asarray(seq_lengths, dtype=np.int64)
        if int(seq_lengths.sum()) != len(flat):
            raise ValueError("sequence lengths do not add up to the number of tokens")
        if np.isscalar(seqs_per_doc):
            if len(seq_lengths) % int(seqs_per_doc):
                raise ValueError("sequence count is not a multiple of seqs_per_doc")
            per_doc = np.full(len(seq_lengths) // int(seqs_per_doc), int(seqs_per_doc), np.int64)
        else:
            per_doc = np.asarray(seqs_per_doc, dtype=np.int64)
        self._bin.write(np.ascontiguousarray(flat, dtype=self.dtype).tobytes())
        self._lengths.write(seq_lengths.astype(np.int32).tobytes())
        ends = self.num_sequences + np.cumsum(per_doc)
        self._docs.write(ends.astype(np.int64).tobytes())
        self.num_sequences += len(seq_lengths)
        self.num_documents += len(per_doc)

    def add_document(self, sequences: list):
        arrays = [np.asarray(s, dtype=self.dtype) for s in sequences]
        flat = np.concatenate(arrays) if arrays else np.zeros(0, self.dtype)
        self.add_documents(flat, [len(a) for a in arrays], np.array([len(arrays)]))

    def finalize(self) -> None:
        for f in (self._bin, self._lengths, self._docs):
            f.close()
        n, d = self.num_sequences, self.num_documents + 1
        itemsize = self.dtype.itemsize
        with open(self._idx_tmp, "wb") as out:
            out.write(HEADER)
            out.write(struct.pack("<Q", 1))
            out.write(struct.pack("<B", _CODES[self.dtype]))
            out.write(struct.pack("<Q", n))
            out.write(struct.pack("<Q", d))
            _copy_file(self._len_tmp, out)
            carry = 0  # byte pointer of the next sequence, carried across chunks
            for start in range(0, n, _CHUNK):
                lengths = np.fromfile(self._len_tmp, dtype=np.int32, count=min(_CHUNK, n - start),
                                      offset=4 * start).astype(np.int64)
                ends = np.cumsum(lengths) * itemsize + carry
                pointers = np.empty_like(ends)
                pointers[0] = carry
                pointers[1:] = ends[:-1]
                carry = int(ends[-1])
                out.write(pointers.tobytes())
            _copy_file(self._doc_tmp, out)
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(self._idx_tmp, idx_path(self.prefix))
        os.remove(self._len_tmp)
        os.remove(self._doc_tmp)

    def abort(self) -> None:
        for f in (self._bin, self._lengths, self._docs):
            f.close()
        for p in (self._bin_tmp, self._idx_tmp, self._len_tmp, self._doc_tmp):
            if os.path.exists(p):
                os.remove(p)


def _copy_file(src: str, out) -> None:
    with open(src, "rb") as f:
        while block := f.read(1 << 24):
            out.write(block)


class IndexedReader:
    """Memory-mapped, validated view of `<prefix>.bin/.idx`."""

    def __init__(self, prefix):
        self.prefix = str(prefix)
        ipath, bpath = idx_path(self.prefix), bin_path(self.prefix)
        for p in (ipath, bpath):
            if not os.path.exists(p):
                raise DataError(p, None, "file not found (an indexed dataset needs both .bin and .idx)")
        size = os.path.getsize(ipath)
        with open(ipath, "rb") as f:
            pre = f.read(_PREAMBLE)
        if len(pre) < _PREAMBLE or pre[:len(HEADER)] != HEADER:
            raise DataError(ipath, "header", "not a megatron indexed dataset index (bad magic or truncated)")
        version, code, n, d = struct.unpack("<QBQQ", pre[len(HEADER):])
        if version != 1:
            raise DataError(ipath, "header", f"unsupported index version {version} (expected 1)")
        if code not in DTYPES:
            raise DataError(ipath, "header", f"unknown dtype code {code}")
        self.dtype = np.dtype(DTYPES[code])
        expected = _PREAMBLE + 4 * n + 8 * n + 8 * d
        if size not in (expected, expected + n):  # + n: megatron's optional per-sequence modes
            raise DataError(ipath, None, f"truncated or corrupt index: {n} sequences and {d - 1} documents "
                                         f"need {expected} bytes, the file has {size}")
        self.num_sequences = n
        self._idx = np.memmap(ipath, dtype=np.uint8, mode="r") if size else None
        self.lengths = np.frombuffer(self._idx, np.int32, count=n, offset=_PREAMBLE)
        self.pointers = np.frombuffer(self._idx, np.int64, count=n, offset=_PREAMBLE + 4 * n)
        self.doc_index = np.frombuffer(self._idx, np.int64, count=d, offset=_PREAMBLE + 12 * n)
        if d < 1 or self.doc_index[0] != 0 or self.doc_index[-1] != n:
            raise DataError(ipath, None, f"corrupt document boundaries (first {self.doc_index[:1].tolist()}, "
                                         f"last {self.doc_index[-1:].tolist()}, expected 0 and {n})")
        need = int(self.pointers[-1]) + int(self.lengths[-1]) * self.dtype.itemsize if n else 0
        have = os.path.getsize(bpath)
        if have < need:
            raise DataError(bpath, None, f"truncated data file: the index needs {need} bytes, the file has {have}")
        if have > need:
            raise DataError(bpath, None, f"data file has {have - need} bytes more than its index describes "
                                         "(mismatched .bin/.idx pair?)")
        self._bin = np.memmap(bpath, dtype=np.uint8, mode="r") if have else np.zeros(0, np.uint8)

    @property
    def num_documents(self) -> int:
        return len(self.doc_index) - 1

    def __len__(self) -> int:
        return self.num_sequences

    def sequence(self, i: int) -> np.ndarray:
        return np.frombuffer(self._bin, self.dtype, count=int(self.lengths[i]), offset=int(self.pointers[i]))

    def document(self, j: int) -> np.ndarray:
        """All sequences of document j, concatenated (they are contiguous in the .bin)."""
        first, last = int(self.doc_index[j]), int(self.doc_index[j + 1])
        if first == last:
            return np.zeros(0, self.dtype)
        count = int(self.pointers[last - 1] - self.pointers[first]) // self.dtype.itemsize + int(self.lengths[last - 1])
        return np.frombuffer(self._bin, self.dtype, count=count, offset=int(self.pointers[first]))

    def document_lengths(self) -> np.ndarray:
        """Tokens per document (vectorised)."""
        csum = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])
        return csum[self.doc_index[1:]] - csum[self.doc_index[:-1]]


def remove(prefix) -> None:
    for p in (bin_path(prefix), idx_path(prefix)):
        if os.path.exists(p):
            os.remove(p)


def as_prefix(path) -> str:
    """Accept 'x', 'x.bin' or 'x.idx' for the prefix 'x'."""
    p = str(path)
    for suffix in (".bin", ".idx"):
        if p.endswith(suffix):
            return p[: -len(suffix)]
    return str(Path(p))
