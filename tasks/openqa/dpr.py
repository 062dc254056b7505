"""DPR supervised training of the dual-encoder retriever (in-batch + hard negatives).

    python -m tasks.openqa.dpr --train-data data/nq-mini/train.dpr.json --retriever-load runs/ict \\
        --hard-negatives-source dense --save runs/dpr ...
    torchrun --nproc_per_node 8 -m tasks.openqa.dpr --train-data nq-train.json ...

Hard negatives (--hard-negatives N per question): 'file' (the DPR json's hard_negative_ctxs, or
--negatives-file from tools/mine_negatives.py), 'bm25' (mined here with bm25s, as DPR did),
'dense' (the top passages of the retriever's own index that hold no answer; with
--remine-every-epochs K re-mined by the current model every K epochs), or 'random' (random
evidence passages). --hard-negatives 0 trains with in-batch negatives only.
Defaults follow DPR (lr 2e-5, batch 128, one hard negative); see examples/dpr_{nq,trivia,webq}.sh.
"""

from __future__ import annotations

import os

from megatron.emdr2.arguments import ArgumentParser, add_training_args, fail, model_size_from_args
from megatron.emdr2.config import TrainingConfig
from megatron.emdr2.training import launch
from tasks.openqa import common
from tasks.openqa.ict import (add_retriever_training_args, check_retriever_args, load_common, retriever_config,
                              retriever_paths)

# DPR's biencoder training settings (Karpukhin et al. 2020, its train config).
DEFAULTS = TrainingConfig()
DEFAULTS.optimizer.lr = 2e-5
DEFAULTS.optimizer.weight_decay = 0.0
DEFAULTS.optimizer.clip_grad = 2.0
DEFAULTS.schedule.lr_warmup_fraction = 0.01
DEFAULTS.batch.global_batch_size = 128


def build_parser() -> ArgumentParser:
    from megatron.emdr2.openqa.dpr_task import NEGATIVE_SOURCES

    parser = ArgumentParser(prog="dpr", description="DPR supervised retriever training")
    add_training_args(parser, DEFAULTS)
    add_retriever_training_args(parser, query_max_len=256)
    g = parser.add_argument_group("DPR")
    g.add_argument("--train-data", default=os.path.join(common.NQ_MINI, "train.dpr.json"),
                   help="DPR biencoder json, or a QA file with gold passage ids (jsonl gold_passage_id)")
    g.add_argument("--hard-negatives", type=int, default=1, help="hard negatives per question (0: in-batch only)")
    g.add_argument("--hard-negatives-source", default="file", choices=NEGATIVE_SOURCES)
    g.add_argument("--negatives-file", default=None,
                   help="with source 'file': mined negatives from tools/mine_negatives.py")
    g.add_argument("--mine-depth", type=int, default=20,
                   help="mined negatives kept per question; N are sampled from them each epoch")
    g.add_argument("--mine-search-depth", type=int, default=100, help="passages searched per question")
    g.add_argument("--remine-every-epochs", type=int, default=0,
                   help="source 'dense': re-mine with the current model every K epochs (0: never)")
    g.add_argument("--top-negatives", dest="sample_negatives", action="store_false",
                   help="always use the N top-ranked mined negatives instead of sampling per epoch")
    return parser


def make_task(args, cfg):
    from megatron.emdr2.data.qa import load_qa
    from megatron.emdr2.openqa.dpr_task import DPRConfig, DPRTask

    tok, evidence, dev = load_common(args)
    dpr = DPRConfig(hard_negatives=args.hard_negatives, source=args.hard_negatives_source,
                    negatives_file=args.negatives_file, mine_depth=args.mine_depth,
                    search_depth=args.mine_search_depth, remine_every_epochs=args.remine_every_epochs,
                    sample_negatives=args.sample_negatives)
    return DPRTask(retriever_config(args), cfg, dpr, tok, evidence, load_qa(args.train_data, for_training=True), dev)


def main(argv=None):
    parser = build_parser()
    args, cfg = launch.parse_and_validate(
        parser, argv, model_sizes=lambda a: [model_size_from_args(a, "retriever")],
        paths=lambda a: retriever_paths(a) + [("--train-data", a.train_data), ("--negatives-file", a.negatives_file)])
    check_retriever_args(args, cfg, parser.prog)
    if args.hard_negatives < 0:
        fail("--hard-negatives must be >= 0", parser.prog)
    if args.negatives_file and args.hard_negatives_source != "file":
        fail("--negatives-file needs --hard-negatives-source file", parser.prog)
    if args.hard_negatives and args.mine_depth < args.hard_negatives:
        fail(f"--mine-depth {args.mine_depth} is below --hard-negatives {args.hard_negatives}", parser.prog)
    if args.remine_every_epochs and args.hard_negatives_source != "dense":
        fail("--remine-every-epochs needs --hard-negatives-source dense", parser.prog)
    common.setup_logging()
    launch.run(lambda: make_task(args, cfg), cfg)


if __name__ == "__main__":
    main()
