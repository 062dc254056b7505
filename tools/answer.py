"""Answer questions with a trained reader-retriever, showing the passages it read.

    python tools/answer.py --load runs/emdr2 --index-dir runs/emdr2-index \
        --question "who got the first nobel prize in physics"
    python tools/answer.py ... --questions-file questions.txt --json answers.jsonl
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.emdr2.arguments import ArgumentParser, fail  # noqa: E402
from tasks.openqa import common  # noqa: E402


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="answer", description=__doc__.split("\n")[0])
    common.add_inference_args(parser)
    parser.add_argument("--question", action="append", default=[], help="a question (repeatable)")
    parser.add_argument("--questions-file", default=None,
                        help="one question per line, or any QA file the loaders read")
    parser.add_argument("--show-passages", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the answers as JSON lines here")
    return parser


def read_questions(args):
    from megatron.emdr2.data.qa import QAExample, load_qa

    examples = [QAExample(q, []) for q in args.question]
    if args.questions_file:
        if args.questions_file.endswith(".txt"):
            with open(args.questions_file, encoding="utf-8") as f:
                examples += [QAExample(line.strip(), []) for line in f if line.strip()]
        else:
            examples += list(load_qa(args.questions_file))
    return examples


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.question and not args.questions_file:
        fail("give --question or --questions-file", "answer")
    for flag, path in [("--load", args.load), ("--questions-file", args.questions_file)]:
        if path and not os.path.exists(path):
            fail(f"{flag} {path}: no such file or directory", "answer")
    common.check_decoding_args(args, "answer")
    from megatron.emdr2.initialize import shutdown
    from megatron.emdr2.openqa.evaluation import predict_batch
    from megatron.emdr2.training.launch import _user_errors

    try:
        examples = read_questions(args)
        with common.inference_autocast(args):
            task, models = common.load_for_inference(args)
            records = []
            for s in range(0, len(examples), args.eval_batch_size):
                records += predict_batch(task, models, examples[s:s + args.eval_batch_size], task.qa.top_k,
                                         args.show_passages)
    except _user_errors() as e:
        fail(str(e), "answer")
    finally:
        shutdown()
    for r in records:
        print(f"Q: {r['question']}\nA: {r['prediction']}")
        for p in r["passages"]:
            print(f"   p={p['probability']:.3f}  [{p['id']}] {p['title']}: {p['text'][:100]}...")
    if args.json:
        from megatron.emdr2.openqa.evaluation import write_predictions

        write_predictions(args.json, records)


if __name__ == "__main__":
    main()
