"""Evaluate a trained reader-retriever on a QA file: exact match and top-k retrieval accuracy.

    python -m tasks.openqa.evaluate --load runs/emdr2 --qa-file data/nq-mini/dev.tsv \
        --index-dir runs/emdr2-index --metrics-out runs/dev_metrics.json

Builds the index with the checkpoint's context tower when --index-dir has none (or with
--rebuild-index). Runs on any number of ranks (torchrun): questions are split across them.
"""

from __future__ import annotations

import os

from megatron.emdr2.arguments import ArgumentParser, fail
from tasks.openqa import common


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="evaluate", description=__doc__.split("\n")[0])
    common.add_inference_args(parser)
    parser.add_argument("--qa-file", default=os.path.join(common.NQ_MINI, "dev.tsv"))
    parser.add_argument("--metrics-out", default=None, help="JSON file: em, top1, top5, top20, questions")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    for flag, path in [("--load", args.load), ("--qa-file", args.qa_file), ("--evidence", args.evidence)]:
        if not os.path.exists(path):
            fail(f"{flag} {path}: no such file or directory", "evaluate")
    common.check_decoding_args(args, "evaluate")
    common.setup_logging()
    from megatron.emdr2.data.qa import load_qa
    from megatron.emdr2.initialize import shutdown
    from megatron.emdr2.openqa.evaluation import evaluate_open_qa
    from megatron.emdr2.training.launch import _user_errors

    try:
        examples = load_qa(args.qa_file)
        if args.eval_max_questions:
            examples = examples[: args.eval_max_questions]
        with common.inference_autocast(args):
            task, models = common.load_for_inference(args)
            metrics = evaluate_open_qa(task, models, examples, predictions_file=args.predictions_file)
    except _user_errors() as e:
        fail(str(e), "evaluate")
    finally:
        shutdown()
    import torch.distributed as dist

    print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    if args.metrics_out:
        common.write_json_atomic(args.metrics_out, metrics)
        print(args.metrics_out)


if __name__ == "__main__":
    main()
