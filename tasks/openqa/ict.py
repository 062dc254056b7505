"""ICT (inverse cloze task) pre-training of the dual-encoder retriever.

    python -m tasks.openqa.ict --save runs/ict --train-iters 300 --global-batch-size 64 ...
    torchrun --nproc_per_node 8 -m tasks.openqa.ict --bert-load ckpt/bert-base ...

The defaults are the paper's Table 6 (BERT init, batch 4096, lr 1e-4, 100k steps, 1% warm-up,
weight decay 0.01); see examples/ict_pretrain.sh. The retriever is saved as model "biencoder"
(usable by --retriever-load of the DPR / EMDR² tasks); <save>/retriever_config.json is the
--config of tools/build_index.py and tools/eval_retrieval.py.
"""

from __future__ import annotations

import os

from megatron.emdr2.arguments import ArgumentParser, add_model_size_args, add_training_args, fail, model_size_from_args
from megatron.emdr2.config import TrainingConfig
from megatron.emdr2.training import launch
from tasks.openqa import common

# Table 6 of the paper (ICT).
DEFAULTS = TrainingConfig()
DEFAULTS.optimizer.lr = 1e-4
DEFAULTS.optimizer.weight_decay = 0.01
DEFAULTS.optimizer.clip_grad = 1.0
DEFAULTS.schedule.train_iters = 100_000
DEFAULTS.schedule.lr_warmup_fraction = 0.01
DEFAULTS.batch.global_batch_size = 4096


def add_retriever_training_args(parser, query_max_len: int) -> None:
    """Flags that ICT and DPR training share (the towers, their inputs, dev evaluation)."""
    add_model_size_args(parser, "retriever", common.RETRIEVER_BASE, "retriever towers (BERT)")
    g = parser.add_argument_group("retriever training")
    g.add_argument("--evidence", default=os.path.join(common.NQ_MINI, "evidence.tsv"),
                   help="DPR-style passages tsv (id, text, title) or a preprocessed mmap prefix")
    g.add_argument("--dev-data", default=os.path.join(common.NQ_MINI, "dev.tsv"),
                   help="QA file for dev top-k retrieval accuracy ('' to skip evaluation)")
    g.add_argument("--vocab-file", default=None, help="BERT WordPiece vocab (default: the bundled uncased one)")
    g.add_argument("--retriever-load", default=None,
                   help="initial biencoder: a checkpoint dir (its best/latest) or .pt with model 'biencoder'")
    g.add_argument("--bert-load", default=None,
                   help="one BERT tower copied into both towers (e.g. tools/convert_hf_bert.py import output)")
    g.add_argument("--retriever-post-layernorm", action="store_true",
                   help="post-LN towers (Hugging Face BERT weights); default pre-LN (Megatron), or "
                        "whatever layout a --retriever-load checkpoint was trained with")
    g.add_argument("--shared-towers", action="store_true", help="one BERT for questions and passages")
    g.add_argument("--query-max-len", type=int, default=query_max_len)
    g.add_argument("--context-max-len", type=int, default=256)
    g.add_argument("--index-dir", default=None, help="evaluation indexes (default <save>/eval-index)")
    g.add_argument("--eval-score-k", type=int, default=20,
                   help="best checkpoint = highest dev top-k accuracy for this k")
    g.add_argument("--eval-max-questions", type=int, default=None)
    g.add_argument("--embed-batch-size", type=int, default=128)


def retriever_paths(args) -> list[tuple[str, str]]:
    return [("--evidence", args.evidence), ("--dev-data", args.dev_data or None), ("--vocab-file", args.vocab_file),
            ("--retriever-load", args.retriever_load), ("--bert-load", args.bert_load)]


def check_retriever_args(args, cfg: TrainingConfig, prog: str) -> None:
    if args.retriever_load and args.bert_load:
        fail("give --retriever-load or --bert-load, not both", prog)
    if cfg.parallel.tensor_parallel > 1:
        fail("retriever training (ICT, DPR) runs with tensor-parallel size 1 only; "
             "use data parallelism (a BERT-base tower fits one GPU)", prog)
    if args.eval_score_k < 1:
        fail("--eval-score-k must be >= 1", prog)
    size = model_size_from_args(args, "retriever")
    if max(args.query_max_len, args.context_max_len) > size.seq_length:
        fail(f"--query-max-len/--context-max-len exceed --retriever-seq-length {size.seq_length}", prog)
    # Continuing from a retriever checkpoint keeps the layout it was trained with: a post-LN tower
    # (warm-started from BERT) rebuilt pre-LN loads without complaint but computes nonsense.
    from megatron.emdr2.openqa.builders import PretrainedError

    try:
        layout = common.recorded_retriever_layout(args.retriever_load)
    except PretrainedError as e:
        fail(f"--retriever-load: {e}", prog)
    pooling = layout.get("pooling")
    if pooling is not None:
        if args.retriever_pooling not in (None, pooling):
            fail(f"--retriever-pooling {args.retriever_pooling} contradicts --retriever-load "
                 f"{args.retriever_load}, whose towers pool with {pooling}; drop the flag", prog)
        args.retriever_pooling = pooling
    recorded = layout.get("post_layernorm")
    if recorded is not None:
        if args.retriever_post_layernorm and not recorded:
            fail(f"--retriever-post-layernorm contradicts --retriever-load {args.retriever_load}, "
                 "which holds a pre-LN retriever; drop the flag", prog)
        args.retriever_post_layernorm = bool(recorded)


def retriever_config(args):
    from megatron.emdr2.openqa.ict_task import EVAL_KS, RetrieverTaskConfig

    return RetrieverTaskConfig(
        size=model_size_from_args(args, "retriever"), query_max_len=args.query_max_len,
        context_max_len=args.context_max_len, shared_towers=args.shared_towers,
        post_layernorm=args.retriever_post_layernorm, retriever_load=args.retriever_load,
        bert_load=args.bert_load, index_dir=args.index_dir,
        eval_ks=tuple(sorted(set(EVAL_KS) | {args.eval_score_k})), score_k=args.eval_score_k,
        eval_max_questions=args.eval_max_questions, embed_batch_size=args.embed_batch_size,
        vocab_file=args.vocab_file)


def load_common(args):
    """(retriever tokenizer, evidence, dev examples or [])."""
    from megatron.emdr2.data.evidence import load_evidence
    from megatron.emdr2.data.qa import load_qa
    from megatron.emdr2.data.tokenizer import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(args.vocab_file)
    dev = load_qa(args.dev_data) if args.dev_data else []
    return tok, load_evidence(args.evidence), dev


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="ict", description="ICT pre-training of the dual-encoder retriever")
    add_training_args(parser, DEFAULTS)
    add_retriever_training_args(parser, query_max_len=64)
    parser.add_argument("--query-in-block-prob", type=float, default=0.1,
                        help="probability that the pseudo-query sentence stays in its block")
    return parser


def make_task(args, cfg):
    from megatron.emdr2.openqa.ict_task import ICTTask

    tok, evidence, dev = load_common(args)
    return ICTTask(retriever_config(args), cfg, tok, evidence, dev, keep_prob=args.query_in_block_prob)


def main(argv=None):
    parser = build_parser()
    args, cfg = launch.parse_and_validate(parser, argv, model_sizes=lambda a: [model_size_from_args(a, "retriever")],
                                          paths=retriever_paths)
    check_retriever_args(args, cfg, parser.prog)
    if not 0.0 <= args.query_in_block_prob <= 1.0:
        fail("--query-in-block-prob must be in [0, 1]", parser.prog)
    common.setup_logging()
    launch.run(lambda: make_task(args, cfg), cfg)


if __name__ == "__main__":
    main()
