"""QA loaders: real files load with the right counts; every malformed input fails with file,
line/record and problem; skipping is opt-in and counted; TriviaQA's training rule."""

from pathlib import Path

import pytest

from megatron.emdr2.data.errors import DataError
from megatron.emdr2.data.qa import QAExample, detect_format, load_qa

FIX = Path(__file__).parent / "fixtures" / "data"


@pytest.mark.parametrize("name,fmt,count", [
    ("nq-mini/train.tsv", "tsv", 1826), ("nq-mini/dev.tsv", "tsv", 422),
    ("nq-mini/train.jsonl", "jsonl", 1826), ("nq-mini/dev.jsonl", "jsonl", 422),
    ("nq-mini/train.dpr.json", "dpr", 1826), ("nq-open/NQ-open.dev.jsonl", "jsonl", 3610),
    ("webquestions/test.json", "webq", 2032),
])
def test_shared_files_load_with_right_counts(shared_data, name, fmt, count):
    qa = load_qa(shared_data / name)
    assert qa.fmt == fmt and len(qa) == count
    assert all(isinstance(ex, QAExample) and ex.question and ex.answers for ex in qa)
    assert qa.skipped.count == 0 and qa.dropped_examples == 0


def test_webquestions_train_is_3778(shared_data):
    parts = ("trainmodel.json", "val.json", "devtest.json")
    assert sum(len(load_qa(shared_data / "webquestions" / p)) for p in parts) == 3778


def test_vendored_nq_mini_formats_agree(nq_mini):
    tsv, jsonl, dpr = (load_qa(nq_mini / f) for f in ("train.tsv", "train.jsonl", "train.dpr.json"))
    assert [e.question for e in tsv] == [e.question for e in jsonl] == [e.question for e in dpr]
    assert [e.answers for e in tsv] == [e.answers for e in jsonl] == [e.answers for e in dpr]
    assert [e.gold_passage_ids for e in jsonl] == [e.gold_passage_ids for e in dpr]
    assert tsv[0] == QAExample("who got the first nobel prize in physics", ["Wilhelm Conrad Röntgen"], qid="0")
    assert dpr[0].positive_ctxs[0]["title"] == "List of Nobel laureates in Physics"
    assert dpr[0].negative_ctxs == [] and dpr[0].hard_negative_ctxs == []
    assert load_qa(nq_mini / "train.jsonl", fmt="jsonl")[5] == jsonl[5]


def test_python_literal_answers_and_no_eval(tmp_path, monkeypatch):
    qa = load_qa(FIX / "qa_python_literal.tsv")
    assert qa[0].answers == ["William Shakespeare", "Shakespeare"] and qa[1].answers == ["Paris"]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"qa_code_injection.tsv: line 1: answers column .* is not a JSON or Python list"):
        load_qa(FIX / "qa_code_injection.tsv")
    assert not (tmp_path / "INJECTED_BY_QA_FILE").exists()


def test_other_formats():
    fid = load_qa(FIX / "fid_sample.json")
    assert fid.fmt == "fid" and fid[0].qid == "q1" and len(fid[0].ctxs) == 2 and fid[1].ctxs == []
    webq = load_qa(FIX / "webq_original.json")
    assert webq.fmt == "webq" and webq[0].answers == ["Jazmyn Bieber", "Jaxon Bieber"]
    assert webq[1].answers == ["Lawyer"]
    assert detect_format(FIX / "triviaqa_sample.json") == "triviaqa"


def test_triviaqa_training_rule():
    ev = load_qa(FIX / "triviaqa_sample.json")
    assert ev[0].answers[0] == "Sunset Boulevard" and "Sunset Blvd." in ev[0].answers  # aliases for eval
    assert len(ev) == 3
    train = load_qa(FIX / "triviaqa_sample.json", for_training=True)
    # human-annotated answer only; the 10-word answer is dropped (> 5 words), and with it its question
    assert [e.answers for e in train] == [["Sunset Boulevard"], ["David Seville"]]
    assert train.dropped_examples == 1 and train.dropped_answers == 1
    assert len(load_qa(FIX / "triviaqa_sample.json", for_training=True, max_answer_words=20)) == 3


MALFORMED = [
    ("qa_bad_json.jsonl", "line 2:", "invalid JSON"),
    ("qa_answers_not_list.tsv", "line 2:", "answers must be a list of strings, found str"),
    ("qa_answers_not_list.jsonl", "line 2:", "answers must be a list of strings, found str"),
    ("qa_empty_question.tsv", "line 3:", "empty question"),
    ("qa_invalid_utf8.tsv", "line 2:", "invalid UTF-8"),
    ("qa_missing_column.tsv", "line 2:", "expected 2 tab-separated columns"),
    ("qa_truncated.json", "line 3:", "invalid JSON"),
    ("qa_dpr_bad_record.json", "record 2:", "answers must be a list of strings, found str"),
    ("qa_dpr_bad_passage_id.json", "record 1:", "passage_id 'wiki:7' is not a non-negative integer"),
    ("qa_empty_answer.jsonl", "line 1:", "answer 1 is empty"),
]


@pytest.mark.parametrize("name,where,problem", MALFORMED)
def test_malformed_qa_names_file_where_problem(name, where, problem):
    with pytest.raises(DataError) as e:
        load_qa(FIX / name)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(FIX / name)) and where in msg and problem in msg


def test_skip_is_counted():
    qa = load_qa(FIX / "qa_empty_question.tsv", on_error="skip")
    assert len(qa) == 2 and qa.skipped.count == 1 and "empty question" in qa.skipped.examples[0]
    with pytest.raises(ValueError, match="on_error"):
        load_qa(FIX / "qa_empty_question.tsv", on_error="ignore")


def test_flag_overrides_detection_and_bad_flag(nq_mini):
    with pytest.raises(DataError, match="expected 2 tab-separated columns"):
        load_qa(nq_mini / "dev.jsonl", fmt="tsv")
    with pytest.raises(ValueError, match="fmt must be one of"):
        load_qa(nq_mini / "dev.jsonl", fmt="csv")
    with pytest.raises(DataError, match="file not found"):
        load_qa(nq_mini / "absent.tsv")


def test_tsv_edge_cases(tmp_path):
    p = tmp_path / "edge.tsv"
    # a question starting with a bracket, and a csv-quoted question and answers column (DPR's writer)
    p.write_text('[citation] who wrote hamlet\t["Shakespeare"]\n'
                 '"who sang ""hey jude"""\t"[""The Beatles""]"\n', encoding="utf-8")
    qa = load_qa(p)
    assert qa.fmt == "tsv" and qa[0].question == "[citation] who wrote hamlet"
    assert qa[1].question == 'who sang "hey jude"' and qa[1].answers == ["The Beatles"]
