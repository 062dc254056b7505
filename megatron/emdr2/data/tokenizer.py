"""Tokenisers: BERT lower-case WordPiece (both retriever towers and, as in the paper, the T5
reader) and SentencePiece (Google-T5 checkpoints), behind one small interface.

Common interface: `vocab_size` (padded), `pad_id`, `unk_id`, `eos_id`, `bos_id`, `encode(text)`
(no special tokens), `decode(ids)` (skips special and padding ids), `sentinel(i)`,
`sentinel_ids`, `id_to_token(i)`, and `name` (recorded in preprocessed files' metadata).

The extra reader tokens ([BOS], [EOS], <extra_id_0..99>) are appended after the WordPiece
vocabulary in the order the original EMDR² release used (30522, 30523, 30524...), so its
checkpoints keep their embedding rows. They are *not* registered with the HF tokenizer as added
tokens: a passage containing the literal text "[SEP]" must tokenise as text, not as a control id.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

NUM_SENTINELS = 100
VOCAB_ENV = "EMDR2_VOCAB_FILE"


def default_vocab_file() -> str:
    """The vendored bert-base-uncased vocab (override with $EMDR2_VOCAB_FILE)."""
    override = os.environ.get(VOCAB_ENV)
    if override:
        return override
    return str(Path(__file__).resolve().parents[3] / "data" / "vocab" / "bert-base-uncased-vocab.txt")


def padded_size(size: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= size (tensor-parallel friendly embeddings)."""
    if multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {multiple}")
    return -(-size // multiple) * multiple


def _read_vocab(vocab_file: str) -> dict[str, int]:
    from .errors import DataError

    vocab: dict[str, int] = {}
    try:
        with open(vocab_file, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                token = line.rstrip("\n").rstrip("\r")
                if token in vocab:
                    raise DataError(vocab_file, line_no, f"duplicate vocabulary token {token!r}")
                vocab[token] = line_no - 1
    except UnicodeDecodeError as e:
        raise DataError(vocab_file, None, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    for required in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
        if required not in vocab:
            raise DataError(vocab_file, None, f"vocabulary lacks the BERT token {required}")
    return vocab


class BertWordPieceTokenizer:
    """BERT WordPiece via Hugging Face `tokenizers` (same splits as Google's BERT FullTokenizer)."""

    def __init__(self, vocab_file: str | None = None, lower_case: bool = True,
                 t5_extras: bool = False, pad_to_multiple: int = 1):
        self.vocab_file = str(vocab_file or default_vocab_file())
        self.lower_case = lower_case
        self.t5_extras = t5_extras
        self.pad_to_multiple = pad_to_multiple
        vocab = _read_vocab(self.vocab_file)
        self._tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        # strip_accents=None follows lowercase, exactly as BERT's uncased/cased models do.
        self._tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lower_case)
        self._tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self._decoder = decoders.WordPiece(prefix="##", cleanup=True)

        self._id_to_token = [None] * len(vocab)
        for token, i in vocab.items():
            self._id_to_token[i] = token
        self.cls_id, self.sep_id = vocab["[CLS]"], vocab["[SEP]"]
        self.pad_id, self.mask_id, self.unk_id = vocab["[PAD]"], vocab["[MASK]"], vocab["[UNK]"]
        self.bos_id = self.eos_id = None
        self.sentinel_ids: list[int] = []
        if t5_extras:
            extras = ["[BOS]", "[EOS]"] + [f"<extra_id_{i}>" for i in range(NUM_SENTINELS)]
            base = len(self._id_to_token)
            self._id_to_token.extend(extras)
            self.bos_id, self.eos_id = base, base + 1
            self.sentinel_ids = list(range(base + 2, base + 2 + NUM_SENTINELS))
        self.real_vocab_size = len(self._id_to_token)
        self.vocab_size = padded_size(self.real_vocab_size, pad_to_multiple)
        specials = {self.cls_id, self.sep_id, self.pad_id, self.mask_id}
        specials.update(i for i in (self.bos_id, self.eos_id) if i is not None)
        specials.update(self.sentinel_ids)
        self.special_ids = frozenset(specials)
        with open(self.vocab_file, "rb") as f:
            digest = hashlib.sha1(f.read()).hexdigest()[:12]
        self.name = f"bert-wordpiece(lower_case={lower_case}, vocab_sha1={digest})"

    def __reduce__(self):  # rebuild from the vocab in DataLoader workers / spawned processes
        return (BertWordPieceTokenizer, (self.vocab_file, self.lower_case, self.t5_extras, self.pad_to_multiple))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def tokens(self, text: str) -> list[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens

    def id_to_token(self, i: int) -> str:
        if 0 <= i < self.real_vocab_size:
            return self._id_to_token[i]
        if self.real_vocab_size <= i < self.vocab_size:
            return f"<vocab_pad_{i - self.real_vocab_size}>"
        raise IndexError(f"token id {i} outside the vocabulary (size {self.vocab_size})")

    def decode(self, ids) -> str:
        pieces = [self._id_to_token[i] for i in (int(x) for x in ids)
                  if i not in self.special_ids and 0 <= i < self.real_vocab_size]
        return self._decoder.decode(pieces)

    def continuation_ids(self) -> frozenset:
        """Ids of the pieces that continue a word (``##``-prefixed), cached."""
        if not hasattr(self, "_continuations"):
            self._continuations = frozenset(i for i, t in enumerate(self._id_to_token)
                                            if t is not None and t.startswith("##"))
        return self._continuations

    def sentinel(self, i: int) -> int:
        if not self.sentinel_ids:
            raise ValueError("sentinel tokens need BertWordPieceTokenizer(t5_extras=True)")
        return self.sentinel_ids[i]


class SentencePieceTokenizer:
    """SentencePiece (Google-T5 layout: pad 0, eos 1, unk 2, <extra_id_i> sentinels).

    Sentinels come from the model when it defines `<extra_id_i>` pieces; otherwise they are
    appended after it the way T5 does (<extra_id_0> is the highest id). T5 has no [BOS]: the
    decoder starts from the pad token, so `bos_id == pad_id`. No [CLS]/[SEP]/[MASK] either.
    """

    def __init__(self, model_file: str, pad_to_multiple: int = 1, num_sentinels: int = NUM_SENTINELS):
        import sentencepiece as spm

        from .errors import DataError

        self.model_file = str(model_file)
        self._init_args = (self.model_file, pad_to_multiple, num_sentinels)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.model_file)
        except (OSError, RuntimeError) as e:
            raise DataError(self.model_file, None, f"cannot load SentencePiece model ({e})") from None
        n = self._sp.GetPieceSize()
        self.unk_id = self._sp.unk_id()
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0
        self.bos_id = self.pad_id
        self.cls_id = self.sep_id = self.mask_id = None
        has_own = num_sentinels > 0 and self._sp.PieceToId("<extra_id_0>") != self.unk_id
        if has_own:
            self.sentinel_ids = [self._sp.PieceToId(f"<extra_id_{i}>") for i in range(num_sentinels)]
            self.real_vocab_size = n
        else:
            self.sentinel_ids = [n + num_sentinels - 1 - i for i in range(num_sentinels)]
            self.real_vocab_size = n + num_sentinels
        self._sp_size = n
        self.vocab_size = padded_size(self.real_vocab_size, pad_to_multiple)
        controls = {i for i in range(n) if self._sp.IsControl(i)}
        self.special_ids = frozenset(controls | {self.pad_id} | set(self.sentinel_ids)
                                     | ({self.eos_id} if self.eos_id is not None else set()))
        with open(self.model_file, "rb") as f:
            digest = hashlib.sha1(f.read()).hexdigest()[:12]
        self.name = f"sentencepiece(model_sha1={digest})"

    def __reduce__(self):
        return (SentencePieceTokenizer, self._init_args)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.EncodeAsIds(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(x) for x in self._sp.EncodeAsIds(list(texts))]

    def tokens(self, text: str) -> list[str]:
        return list(self._sp.EncodeAsPieces(text))

    def id_to_token(self, i: int) -> str:
        if 0 <= i < self._sp_size:
            return self._sp.IdToPiece(i)
        if i in self.sentinel_ids:
            return f"<extra_id_{self.sentinel_ids.index(i)}>"
        if 0 <= i < self.vocab_size:
            return f"<vocab_pad_{i - self.real_vocab_size}>"
        raise IndexError(f"token id {i} outside the vocabulary (size {self.vocab_size})")

    def decode(self, ids) -> str:
        keep = [i for i in (int(x) for x in ids) if i not in self.special_ids and 0 <= i < self._sp_size]
        return self._sp.DecodeIds(keep)

    def continuation_ids(self) -> frozenset:
        """Ids of the pieces that continue a word (no leading ``▁``), cached."""
        if not hasattr(self, "_continuations"):
            self._continuations = frozenset(
                i for i in range(self._sp_size)
                if i not in self.special_ids and not self._sp.IsUnknown(i)
                and not self._sp.IdToPiece(i).startswith("\u2581"))
        return self._continuations

    def sentinel(self, i: int) -> int:
        return self.sentinel_ids[i]


def build_tokenizer(kind: str = "bert", **kwargs):
    """Factory for configs: kind 'bert' (kwargs of BertWordPieceTokenizer) or 'sentencepiece'."""
    if kind == "bert":
        return BertWordPieceTokenizer(**kwargs)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(**kwargs)
    raise ValueError(f"unknown tokenizer kind {kind!r} (use 'bert' or 'sentencepiece')")
