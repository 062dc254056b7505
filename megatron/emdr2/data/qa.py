"""Question-answer files: one loader for every layout the project reads, chosen by content or flag.

Formats (`fmt`):
  tsv       DPR / EMDR² `question<TAB>answers`, answers a JSON list or a Python list literal
            (DPR's csv files use `['a', 'b']`); parsed with json / ast.literal_eval, never eval.
  jsonl     one object per line: NQ-open (`question`, `answer`), nq-mini (`answers`, `gold_passage_id`).
  dpr       DPR biencoder json: a list of {question, answers, positive_ctxs, negative_ctxs, hard_negative_ctxs}.
  fid       Fusion-in-Decoder json: a list of {id?, question, answers, ctxs}.
  webq      WebQuestions json: {qId, qText, answers} (brmson layout) or {utterance, targetValue} (original).
  triviaqa  the official TriviaQA json ({"Data": [...]}).

Every record is validated; a bad one raises `DataError` naming file, line or record (0-based index
in a JSON list) and the problem. With on_error='skip' bad records are skipped and counted in
`result.skipped`. TriviaQA for training keeps only the human-annotated answers and drops answers
longer than 5 words (the EMDR² paper's rule); those drops are counted in `result.dropped_answers` /
`result.dropped_examples`.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
from dataclasses import dataclass
from functools import partial

from .errors import DataError, SkipLog, check_on_error
from .evidence import unquote_field

logger = logging.getLogger(__name__)

FORMATS = ("tsv", "jsonl", "dpr", "fid", "webq", "triviaqa")
TRIVIAQA_MAX_ANSWER_WORDS = 5


@dataclass
class QAExample:
    question: str
    answers: list[str]
    qid: str | None = None
    gold_passage_ids: list[int] | None = None
    positive_ctxs: list[dict] | None = None
    negative_ctxs: list[dict] | None = None
    hard_negative_ctxs: list[dict] | None = None
    ctxs: list[dict] | None = None  # FiD: passages retrieved beforehand


class QAList(list):
    """A list of QAExample that also says what was skipped or dropped while loading."""

    def __init__(self, path: str, fmt: str):
        super().__init__()
        self.path, self.fmt = path, fmt
        self.skipped = SkipLog(path=path)
        self.dropped_answers = 0
        self.dropped_examples = 0


# ----------------------------------------------------------------------------- reading


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(path, line, f"invalid UTF-8 ({e.reason})") from None
    return text[1:] if text.startswith("\ufeff") else text


def _load_json(path: str, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, f"invalid JSON: {e.msg} (column {e.colno})") from None


def detect_format(path, text: str | None = None) -> str:
    """Guess the format from the content: JSON lines, a JSON list/object (by its keys), or tsv."""
    path = str(path)
    return _detect(path, _read_text(path) if text is None else text)[0]


def _detect(path: str, text: str):
    """(format, parsed JSON or None): the JSON is parsed once, here, and reused by the loader."""
    head = text.lstrip()
    if not head:
        raise DataError(path, None, "empty file")
    first_line = head.split("\n", 1)[0]
    if text.lstrip(" \r\n").startswith("\t"):  # a tsv row with an empty question
        return "tsv", None
    if head[0] not in "[{":
        try:
            scalar = json.loads(text)
        except json.JSONDecodeError:
            return "tsv", None
        raise DataError(path, None, f"holds a single JSON {type(scalar).__name__}, not questions "
                                    f"(a JSON list, JSON lines or tsv)")
    if head[0] == "{":
        try:
            obj = json.loads(first_line)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and ("question" in obj or "Question" in obj):
            return "jsonl", None
    try:
        data = _load_json(path, text)
    except DataError:
        if "\t" in first_line:  # a tsv whose first question starts with a bracket
            return "tsv", None
        raise
    if isinstance(data, dict):
        if "Data" in data:
            return "triviaqa", data
        raise DataError(path, 1, "a JSON object that is neither JSON lines with 'question' nor TriviaQA ('Data')")
    return _json_list_kind(path, data), data


def _json_list_kind(path: str, data) -> str:
    if not isinstance(data, list):
        raise DataError(path, None, f"expected a JSON list of questions, found {type(data).__name__}")
    if not data:
        raise DataError(path, None, "the JSON list is empty")
    first = data[0]
    if not isinstance(first, dict):
        raise DataError(path, "record 0", f"expected an object, found {type(first).__name__}")
    if "positive_ctxs" in first:
        return "dpr"
    if "qText" in first or "utterance" in first:
        return "webq"
    if "question" in first:
        return "fid"
    raise DataError(path, "record 0", f"unrecognised question record with keys {sorted(first)[:8]}")


# ----------------------------------------------------------------------------- validation


def _question(path, where, value) -> str:
    if not isinstance(value, str):
        raise DataError(path, where, f"question must be a string, found {type(value).__name__}")
    q = value.strip()
    if not q:
        raise DataError(path, where, "empty question")
    return q


def _answers(path, where, value, allow_empty: bool = False) -> list[str]:
    if not isinstance(value, list):
        raise DataError(path, where, f"answers must be a list of strings, found {type(value).__name__}")
    out = []
    for k, a in enumerate(value):
        if not isinstance(a, str):
            raise DataError(path, where, f"answer {k} must be a string, found {type(a).__name__}")
        if not a.strip():
            raise DataError(path, where, f"answer {k} is empty")
        out.append(a.strip())
    if not out and not allow_empty:
        raise DataError(path, where, "no answers")
    return out


def _ctxs(path, where, value, key: str) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(c, dict) for c in value):
        raise DataError(path, where, f"{key} must be a list of objects")
    for k, c in enumerate(value):
        if not isinstance(c.get("text"), str):
            raise DataError(path, where, f"{key}[{k}] has no 'text' string")
    return value


def _passage_id(path, where, value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise DataError(path, where, f"{what} {value!r} is not a non-negative integer")
    return int(value)


def _ctx_ids(path, where, ctxs: list[dict]) -> list[int] | None:
    ids = []
    for c in ctxs:
        pid = c.get("passage_id", c.get("psg_id", c.get("id")))
        if pid is not None:
            ids.append(_passage_id(path, where, pid, "passage_id"))
    return ids or None


# ----------------------------------------------------------------------------- per-format parsers


def _parse_answer_column(path, line_no, field: str):
    field = field.strip()
    # As written, then without CSV quoting (a csv writer quotes a field that contains quotes);
    # the first reading that gives a list wins, else the first that parses (reported as not a list).
    parsed = []
    for candidate in dict.fromkeys((field, unquote_field(field, "auto"))):
        for parse in (json.loads, ast.literal_eval):  # literal_eval: DPR's Python list literals; never eval
            try:
                value = parse(candidate)
            except (ValueError, SyntaxError, MemoryError, RecursionError):  # JSONDecodeError is a ValueError
                continue
            if isinstance(value, list):
                return value
            parsed.append(value)
    if parsed:
        return parsed[0]
    raise DataError(path, line_no, f"answers column {field[:60]!r} is not a JSON or Python list")


def _parse_tsv_line(path, line_no: int, line: str) -> QAExample:
    if not line.strip():
        raise DataError(path, line_no, "blank line (expected question<TAB>answers)")
    fields = line.split("\t")
    if len(fields) != 2:
        raise DataError(path, line_no, f"expected 2 tab-separated columns (question, answers), found {len(fields)}")
    q = _question(path, line_no, unquote_field(fields[0], "auto"))
    answers = _answers(path, line_no, _parse_answer_column(path, line_no, fields[1]))
    return QAExample(q, answers, qid=str(line_no - 1))


def _parse_jsonl_line(path, line_no: int, line: str) -> QAExample:
    if not line.strip():
        raise DataError(path, line_no, "blank line (expected a JSON object)")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(path, line_no, f"invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(path, line_no, f"expected a JSON object, found {type(obj).__name__}")
    if "answers" not in obj and "answer" not in obj:
        raise DataError(path, line_no, "missing 'answers' (or NQ-open 'answer')")
    q = _question(path, line_no, obj.get("question"))
    answers = _answers(path, line_no, obj["answers"] if "answers" in obj else obj["answer"])
    gold = None
    if obj.get("gold_passage_id") is not None:
        gold = [_passage_id(path, line_no, obj["gold_passage_id"], "gold_passage_id")]
    elif obj.get("gold_passage_ids") is not None:
        if not isinstance(obj["gold_passage_ids"], list):
            raise DataError(path, line_no, "gold_passage_ids must be a list")
        gold = [_passage_id(path, line_no, g, "gold passage id") for g in obj["gold_passage_ids"]]
    qid = obj.get("id", obj.get("qid", obj.get("question_id", line_no - 1)))
    return QAExample(q, answers, qid=str(qid), gold_passage_ids=gold)


def _iter_lines(path, text, parse_line):
    """One deferred parse per line, so load_qa can skip a bad line and go on."""
    lines = text.split("\n")
    for line_no, line in enumerate(lines, start=1):
        if not line.strip() and line_no == len(lines):
            return  # the empty remainder after the final newline
        yield partial(parse_line, path, line_no, line.rstrip("\r"))


def _iter_records(path, data, build):
    if not isinstance(data, list):
        raise DataError(path, None, f"expected a JSON list of questions, found {type(data).__name__}")
    for i, rec in enumerate(data):
        yield partial(_parse_record, path, rec, i, build)


def _parse_record(path, rec, i: int, build) -> QAExample:
    where = f"record {i + 1}"  # counted from 1, like line numbers
    if not isinstance(rec, dict):
        raise DataError(path, where, f"expected an object, found {type(rec).__name__}")
    return build(rec, where, i)


def _dpr(path):
    def build(rec, where, i):
        q = _question(path, where, rec.get("question"))
        answers = _answers(path, where, rec.get("answers"))
        pos = _ctxs(path, where, rec.get("positive_ctxs"), "positive_ctxs")
        neg = _ctxs(path, where, rec.get("negative_ctxs"), "negative_ctxs")
        hard = _ctxs(path, where, rec.get("hard_negative_ctxs"), "hard_negative_ctxs")
        return QAExample(q, answers, qid=str(rec.get("id", i)), gold_passage_ids=_ctx_ids(path, where, pos),
                         positive_ctxs=pos, negative_ctxs=neg, hard_negative_ctxs=hard)
    return build


def _fid(path):
    def build(rec, where, i):
        q = _question(path, where, rec.get("question"))
        raw = rec.get("answers")
        if raw is None and isinstance(rec.get("target"), str):
            raw = [rec["target"]]
        answers = _answers(path, where, raw)
        ctxs = _ctxs(path, where, rec.get("ctxs"), "ctxs") if "ctxs" in rec else None
        return QAExample(q, answers, qid=str(rec.get("id", i)), ctxs=ctxs)
    return build


_TARGET_VALUE = re.compile(r'\(description\s+(?:"((?:[^"\\]|\\.)*)"|([^()"]*?))\)')


def _webq(path):
    def build(rec, where, i):
        if "qText" in rec:
            q = _question(path, where, rec.get("qText"))
            answers = _answers(path, where, rec.get("answers"))
            qid = rec.get("qId", i)
        else:
            q = _question(path, where, rec.get("utterance"))
            target = rec.get("targetValue")
            if not isinstance(target, str):
                raise DataError(path, where, "missing 'targetValue' string")
            found = [(a.replace('\\"', '"') if a else b.strip()) for a, b in _TARGET_VALUE.findall(target)]
            if not found:
                raise DataError(path, where, f"no (description ...) answer in targetValue {target[:60]!r}")
            answers = _answers(path, where, found)
            qid = rec.get("url", i)
        return QAExample(q, answers, qid=str(qid))
    return build


def _triviaqa(path, for_training: bool):
    def build(rec, where, i):
        q = _question(path, where, rec.get("Question"))
        ans = rec.get("Answer")
        if not isinstance(ans, dict) or not isinstance(ans.get("Value"), str):
            raise DataError(path, where, "missing Answer.Value")
        human = ans.get("HumanAnswers")
        human = _answers(path, where, human) if human else [ans["Value"]]
        if for_training:
            answers = human
        else:  # evaluation: the usual TriviaQA answer set (value, human answers, aliases)
            aliases = ans.get("Aliases") or []
            answers = list(dict.fromkeys(human + _answers(path, where, aliases, allow_empty=True)))
        return QAExample(q, _answers(path, where, answers), qid=str(rec.get("QuestionId", i)))
    return build


# ----------------------------------------------------------------------------- entry point


def load_qa(path, fmt: str | None = None, for_training: bool = False,
            max_answer_words: int | None = None, on_error: str = "raise") -> QAList:
    """Load a QA file as a list of QAExample (see the module docstring for formats and rules).

    max_answer_words: drop answers with more words than this (examples left with none are
    dropped; both counted). Defaults to 5 for TriviaQA training, otherwise no limit.
    """
    check_on_error(on_error)
    path = str(path)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS} or None, got {fmt!r}")
    if os.path.isdir(path):
        raise DataError(path, None, "is a directory, not a QA file")
    if not os.path.isfile(path):
        raise DataError(path, None, "file not found")
    text = _read_text(path)
    data = None
    if fmt is None:
        fmt, data = _detect(path, text)
    if fmt == "triviaqa" and for_training and max_answer_words is None:
        max_answer_words = TRIVIAQA_MAX_ANSWER_WORDS

    if fmt == "tsv":
        parsers = _iter_lines(path, text, _parse_tsv_line)
    elif fmt == "jsonl":
        parsers = _iter_lines(path, text, _parse_jsonl_line)
    else:
        if data is None:
            data = _load_json(path, text)
        if fmt == "triviaqa":
            if not isinstance(data, dict) or not isinstance(data.get("Data"), list):
                raise DataError(path, None, "TriviaQA json needs a top-level object with a 'Data' list")
            data = data["Data"]
        build = {"dpr": _dpr, "fid": _fid, "webq": _webq}.get(fmt)
        build = build(path) if build else _triviaqa(path, for_training)
        parsers = _iter_records(path, data, build)

    result = QAList(path, fmt)
    for parse in parsers:
        try:
            ex = parse()
        except DataError as err:
            if on_error == "raise":
                raise
            result.skipped.add(err)
            continue
        if max_answer_words is not None:
            kept = [a for a in ex.answers if len(a.split()) <= max_answer_words]
            result.dropped_answers += len(ex.answers) - len(kept)
            if not kept:
                result.dropped_examples += 1
                continue
            ex.answers = kept
        result.append(ex)
    if not result and not result.skipped.count and not result.dropped_examples:
        raise DataError(path, None, "no questions in the file")
    result.skipped.report()
    if result.dropped_examples or result.dropped_answers:
        logger.info("%s: dropped %d answer(s) longer than %s words; %d question(s) left without answers "
                    "were dropped", path, result.dropped_answers, max_answer_words, result.dropped_examples)
    return result
