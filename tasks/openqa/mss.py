"""Masked-salient-span (MSS) pre-training of the reader and retriever with the EMDR² objective.

    python tools/annotate_entities.py --evidence EVIDENCE --output SENTENCES.jsonl
    python -m tasks.openqa.mss --mss-data SENTENCES.jsonl --evidence EVIDENCE --index-dir runs/index \\
        --retriever-load ICT_CHECKPOINT --reader-load T5_CHECKPOINT ...
    torchrun --nproc_per_node 8 -m tasks.openqa.mss --num-indexer-ranks 4 ...   (async refresh, a GPU per rank)

The sentence file may be the original release's (doc_id = DPR passage id). Held-out sentences
(--mss-dev-data, or the last --mss-dev-sentences of --mss-data) give the evaluation: masked-span
exact match (em) and source-related recall (top1/5/20, see megatron/emdr2/openqa/mss_task.py).
See examples/mss_pretrain.sh for the paper's settings.
"""

from __future__ import annotations

import logging

from megatron.emdr2.arguments import ArgumentParser, add_training_args, fail
from megatron.emdr2.config import TrainingConfig
from megatron.emdr2.training import launch
from tasks.openqa import common

logger = logging.getLogger(__name__)

# Appendix C.1 of the paper: retriever from ICT, reader from T5, 82k steps, batch 64, Adam lr 2e-5,
# 5% warm-up, linear decay, weight decay 0.1, clip 1.0.
DEFAULTS = TrainingConfig()
DEFAULTS.optimizer.lr = 2e-5
DEFAULTS.optimizer.weight_decay = 0.1
DEFAULTS.optimizer.clip_grad = 1.0
DEFAULTS.schedule.train_iters = 82_000
DEFAULTS.schedule.lr_warmup_fraction = 0.05
DEFAULTS.batch.global_batch_size = 64


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="mss", description="masked-salient-span pre-training (EMDR² objective)")
    add_training_args(parser, DEFAULTS)
    common.add_openqa_args(parser)
    g = parser.add_argument_group("masked salient spans")
    g.add_argument("--mss-data", required=True,
                   help="annotated sentences (JSON lines: doc_id, sent_text, linguistic_ent, bert_ent_pos), "
                        "from tools/annotate_entities.py or the original release")
    g.add_argument("--mss-dev-data", default=None,
                   help="held-out annotated sentences (default: the last --mss-dev-sentences of --mss-data)")
    g.add_argument("--mss-dev-sentences", type=int, default=200,
                   help="held-out sentences cut from the end of --mss-data (at a passage boundary)")
    g.add_argument("--mss-max-spans", type=int, default=1,
                   help="mask 1..N entities per training sentence (held-out sentences: always 1)")
    g.add_argument("--mss-entity-types", default=None,
                   help="comma-separated OntoNotes types to mask (default: all), e.g. PERSON,ORG,GPE,DATE")
    g.add_argument("--mss-min-entity-passages", type=int, default=1,
                   help="mask only entities the annotations name in at least this many passages "
                        "(2: somewhere besides the source, which retrieval skips; training and "
                        "held-out sentences alike)")
    g.add_argument("--mss-source", default="skip", choices=("skip", "retrieve", "read"),
                   help="the passage a training sentence was taken from: skip (never retrieved, the default), "
                        "retrieve (retrieval may find it), read (always among the K passages the reader reads, "
                        "in place of the lowest-ranked one: a reader beside a weak retriever sees the masked "
                        "span and learns to copy it); held-out sentences always skip it")
    return parser


def check_mss_args(args, parser) -> None:
    if args.mss_max_spans < 1:
        fail("--mss-max-spans must be >= 1", parser.prog)
    if args.mss_min_entity_passages < 1:
        fail("--mss-min-entity-passages must be >= 1", parser.prog)
    if args.mss_dev_data is None and args.mss_dev_sentences < 1:
        fail("--mss-dev-sentences must be >= 1 (or give --mss-dev-data)", parser.prog)


def mss_datasets(args, seed: int, evidence=None):
    """(training dataset, held-out examples) from the flags; every sentence record (and, given
    the evidence, its doc_id) is checked first."""
    from megatron.emdr2.data.mss import (MSSDataset, SentenceFile, check_sentences, entity_passage_counts,
                                         split_tail)
    from megatron.emdr2.openqa.mss_task import masked_dev_examples

    types = [t.strip() for t in args.mss_entity_types.split(",") if t.strip()] if args.mss_entity_types else None
    sentences = SentenceFile(args.mss_data)
    files = [sentences] + ([SentenceFile(args.mss_dev_data)] if args.mss_dev_data else [])
    for f in files:
        if not check_sentences(f, evidence):
            logger.info("%s: %d sentences, more than are checked at start-up: records are checked as drawn",
                        f.path, len(f))
    if args.mss_dev_data:
        train_rows, dev_file, dev_rows = None, files[1], None
    else:
        try:
            train_rows, dev_rows = split_tail(sentences, args.mss_dev_sentences)
        except ValueError as e:
            fail(f"--mss-dev-sentences: {e}")
        dev_file = sentences
    n = args.mss_min_entity_passages
    counts = None
    if n > 1:
        counts = entity_passage_counts(*{id(f): f for f in (sentences, dev_file)}.values())
    train = MSSDataset(sentences, train_rows, seed=seed, max_spans=args.mss_max_spans, entity_types=types,
                       min_entity_passages=n, passage_counts=counts)
    dev = MSSDataset(dev_file, dev_rows, seed=seed, max_spans=1, entity_types=types,
                     min_entity_passages=n, passage_counts=counts)
    return train, masked_dev_examples(dev, args.eval_max_questions)


def make_task(args, cfg):
    from megatron.emdr2.data.evidence import load_evidence
    from megatron.emdr2.openqa.mss_task import MSSTask

    rtok, tok = common.tokenizers(args)
    evidence = load_evidence(args.evidence)
    train, dev = mss_datasets(args, cfg.seed, evidence)
    return MSSTask(common.qa_config(args), cfg, train, dev, evidence, rtok, tok, common.refresh_config(args),
                   source=args.mss_source)


def main(argv=None):
    parser = build_parser()
    args, cfg = launch.parse_and_validate(
        parser, argv, model_sizes=common.model_sizes,
        paths=lambda a: common.openqa_paths(a) + [("--mss-data", a.mss_data), ("--mss-dev-data", a.mss_dev_data)],
        training_world=common.training_world)
    common.check_openqa_args(args, cfg, parser.prog)
    check_mss_args(args, parser)
    common.run_roles(args, cfg, lambda: make_task(args, cfg), lambda: common.indexer_main(args, cfg))


if __name__ == "__main__":
    main()
