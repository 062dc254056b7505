"""Evaluate a trained reader-retriever on QA files: exact match and top-k retrieval accuracy.

    python -m tasks.openqa.evaluate --load runs/emdr2 --qa-file data/nq-mini/dev.tsv \
        --index-dir runs/emdr2-index --metrics-out runs/dev_metrics.json
    python -m tasks.openqa.evaluate --load runs/emdr2 --qa-file 'data/qas/*-test.csv' nq-dev.tsv \
        --index-dir runs/emdr2-index --metrics-dir runs/emdr2/test --eval-top-k-list 1 5 20 50 100

Builds the index with the checkpoint's context tower when --index-dir has none (or with
--rebuild-index); an existing index embedded by another context tower is refused (its manifest
records the tower's fingerprint) unless --allow-index-mismatch. The model and index are loaded
once and every --qa-file (paths or glob patterns) is scored in turn: --metrics-dir gets one
<name>.json per file (and <name>.predictions.jsonl), --metrics-out the metrics of a single file.
Runs on any number of ranks (torchrun): questions are split across them.

A retriever-only checkpoint (an ICT or DPR run's --save directory) has no reader to answer with:
it is scored on retrieval alone (top{k} for each --eval-top-k-list k, and questions), with the
same --index-dir, --rebuild-index and output flags, so every stage of a pipeline can be measured
with one command (tools/build_index.py and tools/eval_retrieval.py do the work).
"""

from __future__ import annotations

import os

from megatron.emdr2.arguments import ArgumentParser, fail
from tasks.openqa import common


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="evaluate", description=__doc__.split("\n")[0])
    common.add_inference_args(parser)
    parser.add_argument("--qa-file", nargs="+", action="extend", default=None, metavar="FILE",
                        help="QA files or glob patterns, scored one by one (default: nq-mini dev)")
    parser.add_argument("--metrics-out", default=None,
                        help="JSON file: em, top{k} for each --eval-top-k-list k, questions, "
                             "reading_accuracy, read_questions (one --qa-file only)")
    parser.add_argument("--metrics-dir", default=None,
                        help="directory: <name>.json and <name>.predictions.jsonl per --qa-file "
                             "(<name>: the file name without its extension)")
    return parser


def is_retriever_only(path: str) -> bool:
    """An ICT or DPR save directory: a retriever config beside it and no reader in its metadata."""
    from megatron.emdr2.openqa import builders

    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, "retriever_config.json"))
            and not builders.load_checkpoint_meta(path).get("reader"))


def evaluate_retriever_only(args, files) -> dict:
    """{name: metrics} of a retriever-only checkpoint: the evidence embedded with its context tower
    into --index-dir (unless an index is there and --rebuild-index is not given), then top-k
    retrieval accuracy on each QA file. Exits 2 with the tool's message on bad input."""
    import json
    import shutil
    import tempfile

    from megatron.emdr2.index import shard_store
    from megatron.emdr2.openqa.evaluation import result_names
    from tools import build_index, eval_retrieval

    if args.rebuild_index and os.path.isdir(args.index_dir):
        shutil.rmtree(args.index_dir)
    try:
        has_index = os.path.isdir(args.index_dir) and shard_store.resolve(args.index_dir) is not None
    except shard_store.IndexStoreError:
        has_index = False
    common_flags = ["--checkpoint", args.load, "--seed", str(args.seed), "--batch-size", str(args.embed_batch_size)]
    if not has_index:
        rc = build_index.main(common_flags + ["--evidence", args.evidence, "--output", args.index_dir,
                                              "--no-progress-bar"])
        if rc:
            raise SystemExit(rc)
    depth = max(args.eval_top_k_list)
    results = {}
    for name, path in zip(result_names(files), files):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "metrics.json")
            flags = common_flags + ["--index", args.index_dir, "--evidence", args.evidence, "--qa-file", path,
                                    "--topk", str(depth), "--metrics-out", out]
            if args.allow_index_mismatch:
                flags.append("--allow-index-mismatch")
            if args.predictions_file:
                flags += ["--output", args.predictions_file.replace("{name}", name)]
            elif args.metrics_dir:
                os.makedirs(args.metrics_dir, exist_ok=True)
                flags += ["--output", os.path.join(args.metrics_dir, f"{name}.retrieved.json")]
            rc = eval_retrieval.main(flags)
            if rc:
                raise SystemExit(rc)
            found = json.load(open(out))
        metrics = {f"top{k}": found[f"top{k}"] for k in args.eval_top_k_list if f"top{k}" in found}
        metrics["questions"] = found["questions"]
        results[name] = metrics
        if args.metrics_dir:
            common.write_json_atomic(os.path.join(args.metrics_dir, f"{name}.json"),
                                     {**metrics, "qa_file": os.path.abspath(path), "checkpoint": os.path.abspath(args.load),
                                      "retriever_only": True})
    return results


def main(argv=None):
    from megatron.emdr2.arguments import path_exists
    from megatron.emdr2.config import ConfigError
    from megatron.emdr2.openqa.evaluation import expand_qa_files

    args = build_parser().parse_args(argv)
    for flag, path in [("--load", args.load), ("--evidence", args.evidence)]:
        if not path_exists(path):
            fail(f"{flag} {path}: no such file or directory", "evaluate")
    try:
        files = expand_qa_files(args.qa_file or [os.path.join(common.NQ_MINI, "dev.tsv")], "--qa-file")
    except ConfigError as e:
        fail(str(e), "evaluate")
    if args.metrics_out and len(files) > 1:
        fail(f"--metrics-out holds one file's metrics but --qa-file names {len(files)} files; "
             f"use --metrics-dir", "evaluate")
    if args.predictions_file and len(files) > 1 and "{name}" not in args.predictions_file:
        fail("--predictions-file with several --qa-file files must contain {name}", "evaluate")
    common.check_decoding_args(args, "evaluate")
    common.setup_logging()
    if is_retriever_only(args.load):
        print(f"evaluate: {args.load} holds a retriever and no reader (an ICT or DPR run): retrieval "
              f"accuracy only, no answers", flush=True)
        results = evaluate_retriever_only(args, files)
        _report(args, results)
        return
    from megatron.emdr2.initialize import shutdown
    from megatron.emdr2.openqa.evaluation import load_qa_sets, score_files
    from megatron.emdr2.training.launch import _user_errors

    try:
        sets = load_qa_sets(files, args.eval_max_questions)  # every file read before any work
        with common.inference_autocast(args):
            task, models = common.load_for_inference(args)
            results = score_files(task, models, sets, args.metrics_dir, predictions=True,
                                  predictions_file=args.predictions_file,
                                  about={"checkpoint": os.path.abspath(args.load),
                                         "index": str(task.index_manager.version_dir)})
    except _user_errors() as e:
        fail(str(e), "evaluate")
    finally:
        shutdown()

    _report(args, results)


def _report(args, results: dict) -> None:
    for name, metrics in results.items():
        line = " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        print(line if len(results) == 1 else f"{name}: {line}")
    if args.metrics_out:
        common.write_json_atomic(args.metrics_out, next(iter(results.values())))
        print(args.metrics_out)
    if args.metrics_dir:
        print(args.metrics_dir)


if __name__ == "__main__":
    main()
