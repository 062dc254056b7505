"""EMDR² end-to-end training of the FiD reader and the dual-encoder retriever.

    python -m tasks.openqa.emdr2 --train-data data/nq-mini/train.tsv --index-dir runs/index ...
    torchrun --nproc_per_node 8 -m tasks.openqa.emdr2 --num-indexer-ranks 4 ...   (async refresh, a GPU per rank)

See examples/emdr2_*.sh for the paper's settings.
"""

from __future__ import annotations

import os

from megatron.emdr2.arguments import ArgumentParser, add_training_args
from megatron.emdr2.config import TrainingConfig
from megatron.emdr2.training import launch
from tasks.openqa import common

# Table 7 of the paper (NQ / TriviaQA): Adam, lr 2e-5, 1% warm-up, linear decay, weight decay
# 0.1, clip 1.0, batch 64. Iterations depend on the dataset size (10 epochs).
DEFAULTS = TrainingConfig()
DEFAULTS.optimizer.lr = 2e-5
DEFAULTS.optimizer.weight_decay = 0.1
DEFAULTS.optimizer.clip_grad = 1.0
DEFAULTS.schedule.lr_warmup_fraction = 0.01
DEFAULTS.batch.global_batch_size = 64


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="emdr2", description="EMDR² end-to-end reader-retriever training")
    add_training_args(parser, DEFAULTS)
    common.add_openqa_args(parser)
    common.add_reader_input_args(parser)
    parser.add_argument("--train-data", default=os.path.join(common.NQ_MINI, "train.tsv"),
                        help="QA training file (tsv, jsonl, DPR/FiD json, WebQuestions, TriviaQA)")
    parser.add_argument("--train-answer", default="first", choices=("first", "random"),  # emdr2_task.TRAIN_ANSWERS
                        help="gold answer a training question is taught: 'first' (default: answers[0], "
                             "one fixed target per question) or 'random' (the original's: one of the "
                             "gold answers drawn afresh each time the question is drawn; seeded by "
                             "--seed, the step and the question, so resumes are exact)")
    parser.add_argument("--max-train-answer-words", type=int, default=None, metavar="N",
                        help="drop training answers longer than N words (questions left with none are "
                             "dropped), in every file format: the paper's TriviaQA rule is N=5 "
                             "(examples/emdr2_trivia.sh sets it). Default: 5 for the official TriviaQA "
                             "json, no limit otherwise")
    parser.add_argument("--test-data", nargs="+", action="extend", default=None, metavar="FILE",
                        help="QA files or glob patterns scored on the final model after the last step "
                             "(never used to pick checkpoints): EM, reading accuracy and the "
                             "--eval-top-k-list accuracies per file, written to --test-metrics-dir")
    parser.add_argument("--test-metrics-dir", default=None,
                        help="where each --test-data file's <name>.json and <name>.predictions.jsonl "
                             "go (default: SAVE/test)")
    return parser


def test_files(args, prog: str = "emdr2") -> list[str]:
    """--test-data expanded (globs), checked to exist; [] without it. One-line errors, exit 2."""
    from megatron.emdr2.config import ConfigError
    from megatron.emdr2.openqa.evaluation import expand_qa_files

    if not args.test_data:
        return []
    try:
        files = expand_qa_files(args.test_data, "--test-data")
    except ConfigError as e:
        common.fail(str(e), prog)
    if not (args.test_metrics_dir or args.save):
        common.fail("--test-data needs --test-metrics-dir or --save (where the results go)", prog)
    return files


def train_examples(args):
    """The training questions: --max-train-answer-words applies to every format (the TriviaQA
    rule must also run on the tsv that examples/emdr2_trivia.sh passes)."""
    from megatron.emdr2.data.qa import load_qa

    return load_qa(args.train_data, for_training=True,
                   max_answer_words=getattr(args, "max_train_answer_words", None))


def make_task(args, cfg):
    from megatron.emdr2.data.evidence import load_evidence
    from megatron.emdr2.data.qa import load_qa
    from megatron.emdr2.openqa.emdr2_task import OpenQATask

    from megatron.emdr2.openqa.evaluation import load_qa_sets

    rtok, tok = common.tokenizers(args)
    tests = load_qa_sets(getattr(args, "test_files", []))  # read before training: a bad file fails now, not at the end
    out = args.test_metrics_dir or (os.path.join(args.save, "test") if args.save else None)
    return OpenQATask(common.qa_config(args), cfg, train_examples(args),
                      load_qa(args.dev_data), load_evidence(args.evidence), rtok, tok,
                      common.refresh_config(args), test_sets=tests, test_out_dir=out)


def main(argv=None):
    parser = build_parser()
    args, cfg = launch.parse_and_validate(
        parser, argv, model_sizes=common.model_sizes,
        paths=lambda a: common.openqa_paths(a) + [("--train-data", a.train_data)],
        training_world=common.training_world)
    common.check_openqa_args(args, cfg, parser.prog)
    if args.max_train_answer_words is not None and args.max_train_answer_words < 1:
        common.fail("--max-train-answer-words must be >= 1", parser.prog)
    args.test_files = test_files(args, parser.prog)
    common.run_roles(args, cfg, lambda: make_task(args, cfg), lambda: common.indexer_main(args, cfg))


if __name__ == "__main__":
    main()
