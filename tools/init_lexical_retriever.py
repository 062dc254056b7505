"""A retriever tower initialised from a lexical model of the evidence: no labels, no training.

The tower (``--retriever-pooling weighted-mean``) starts out computing what a latent semantic
analysis (LSA) of the evidence computes:

  * word embeddings: each vocabulary entry's row of a truncated SVD of the evidence's TF-IDF
    matrix (``--lsa-dim`` dimensions, by default the tower's width), centred and scaled to length
    sqrt(lsa-dim); with fewer LSA dimensions than the width, the other coordinates start at zero
    (a LayerNorm rescales the vector but keeps its direction) and are free for training to use;
  * every layer's attention and MLP output projections set to zero, so at the start each layer
    passes its input through and the final LayerNorm sees the word embedding alone (position
    and segment embeddings start at zero too); the layers' other weights are random as usual,
    and training moves the projections off zero;
  * per-token pooling weights: the evidence's idf (0 for [CLS], [SEP], [PAD], [MASK]).

A text's vector is then the idf-weighted mean of its tokens' normalised LSA vectors, and a score
is sqrt(hidden) x their cosine. On nq-mini (256 dimensions) that ranks dev passages with top-1/5/20
about 0.74 / 0.89 / 0.95 before any training (``bench/bench_lexical_retrieval.py`` measures it
outside the tower). It is an unsupervised starting point for ICT, as a BERT checkpoint is in the
paper, built from the evidence alone: nothing trained on questions is involved. ``--lsa-dim``
sets how strong that start is: on nq-mini train questions 16 / 32 / 64 / 256 dimensions give
top-5 about 0.38 / 0.64 / 0.80 / 0.90 (``bench/bench_lexical_retrieval.py --dims``).

    python tools/init_lexical_retriever.py --evidence data/nq-mini/evidence.tsv --hidden-size 256 \\
        --num-layers 2 --num-attention-heads 4 --seq-length 256 --shared-towers --output runs/lexical.pt
    python -m tasks.openqa.ict ... --shared-towers --retriever-load runs/lexical.pt

The output .pt holds {"model": biencoder state dict, "config": its architecture}, so
``--retriever-load`` and ``tools/build_index.py --checkpoint`` take it without more flags. The SVD is
``torch.svd_lowrank`` on a sparse matrix (randomised, seeded): torch is installed already, where
scipy's ``svds`` would be one more dependency for the same result.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SPECIAL_WEIGHT = 0.0


def tfidf_matrix(rows: list[list[int]], vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row-L2-normalised sparse TF-IDF matrix [N, V], idf [V]) of token-id lists."""
    n = len(rows)
    doc = torch.cat([torch.full((len(r),), i, dtype=torch.long) for i, r in enumerate(rows)])
    tok = torch.cat([torch.tensor(r, dtype=torch.long) for r in rows])
    counts = torch.sparse_coo_tensor(torch.stack([doc, tok]), torch.ones(len(tok), dtype=torch.float64),
                                     (n, vocab_size)).coalesce()
    df = torch.zeros(vocab_size, dtype=torch.float64).index_add_(
        0, counts.indices()[1], torch.ones(counts.indices().size(1), dtype=torch.float64))
    idf = torch.log((1 + n) / (1 + df)) + 1
    values = counts.values() * idf[counts.indices()[1]]
    norms = torch.zeros(n, dtype=torch.float64).index_add_(0, counts.indices()[0], values ** 2).sqrt()
    values = values / norms[counts.indices()[0]].clamp(min=1e-12)
    return torch.sparse_coo_tensor(counts.indices(), values, (n, vocab_size)).coalesce(), idf


def lsa_token_vectors(tfidf: torch.Tensor, dim: int, seed: int, niter: int = 8) -> torch.Tensor:
    """[V, dim] token vectors: the right singular vectors of the TF-IDF matrix, each row centred
    (a LayerNorm removes the mean anyway) and scaled to length sqrt(dim); rows of tokens absent
    from the evidence stay zero."""
    if dim > min(tfidf.shape):
        raise ValueError(f"--lsa-dim {dim} exceeds the TF-IDF matrix's rank bound {min(tfidf.shape)} "
                         f"(fewer passages or distinct tokens than dimensions)")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        _, _, v = torch.svd_lowrank(tfidf, q=dim, niter=niter)
    finally:
        torch.random.set_rng_state(generator_state)
    v = v - v.mean(dim=1, keepdim=True)
    norms = v.norm(dim=1, keepdim=True)
    return torch.where(norms > 1e-9, v / norms.clamp(min=1e-12) * math.sqrt(dim), torch.zeros_like(v))


def lexical_tower_state(tower, token_vectors: torch.Tensor, idf: torch.Tensor, special_ids) -> dict:
    """The state dict of ``tower`` (a weighted-mean BertTower) set to the lexical model; token
    vectors narrower than the tower fill its first coordinates, the rest start at zero."""
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in tower.state_dict().items()}
    dtype = state["embedding.word_embeddings.weight"].dtype
    rows = state["embedding.word_embeddings.weight"].size(0)
    n, dim = token_vectors.shape
    state["embedding.word_embeddings.weight"].zero_()[:n, :dim] = token_vectors.to(dtype)
    for key, value in state.items():
        if not torch.is_tensor(value) or key.endswith("_extra_state"):
            continue
        if key.startswith(("embedding.position_embeddings", "embedding.tokentype_embeddings")):
            value.zero_()
        elif ".linear_proj." in key or ".linear_fc2." in key:  # each layer starts as the identity
            value.zero_()
    weights = torch.zeros(rows, dtype=torch.float64)
    weights[: idf.size(0)] = idf
    weights[list(special_ids)] = SPECIAL_WEIGHT
    state["token_weight"] = weights.to(state["token_weight"].dtype)
    return state


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--evidence", required=True, help="DPR evidence .tsv (id, text, title)")
    p.add_argument("--output", required=True, help="the .pt file to write")
    p.add_argument("--vocab-file", default=None, help="WordPiece vocab (default: the bundled bert-base-uncased)")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--lsa-dim", type=int, default=None,
                   help="LSA dimensions (default: --hidden-size); fewer make a weaker start")
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--ffn-hidden-size", type=int, default=None)
    p.add_argument("--seq-length", type=int, default=256, help="position embeddings of the tower")
    p.add_argument("--context-max-len", type=int, default=256,
                   help="passage tokens counted, as the tower will read them ([CLS] title [SEP] text [SEP])")
    p.add_argument("--shared-towers", action="store_true", help="one tower for questions and passages")
    p.add_argument("--seed", type=int, default=1234)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron.emdr2.arguments import fail

    prog = "init_lexical_retriever"
    for flag, value in (("--num-layers", args.num_layers), ("--hidden-size", args.hidden_size),
                        ("--num-attention-heads", args.num_attention_heads), ("--seq-length", args.seq_length),
                        ("--context-max-len", args.context_max_len), ("--lsa-dim", args.lsa_dim)):
        if value is not None and value < 1:
            fail(f"{flag} must be >= 1, got {value}", prog)
    lsa_dim = args.lsa_dim or args.hidden_size
    if lsa_dim > args.hidden_size:
        fail(f"--lsa-dim {lsa_dim} exceeds --hidden-size {args.hidden_size}", prog)
    if args.hidden_size % args.num_attention_heads:
        fail(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
             f"{args.num_attention_heads}", prog)
    if args.context_max_len > args.seq_length:
        fail(f"--context-max-len {args.context_max_len} exceeds --seq-length {args.seq_length}", prog)
    if not os.path.isfile(args.evidence):
        fail(f"--evidence {args.evidence}: no such file", prog)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        fail(f"--output {args.output}: directory {out_dir} does not exist", prog)

    from megatron.emdr2 import initialize
    from megatron.emdr2.config import ModelSize
    from megatron.emdr2.data.errors import DataError
    from megatron.emdr2.data.evidence import load_evidence
    from megatron.emdr2.data.inputs import encode_context
    from megatron.emdr2.data.tokenizer import BertWordPieceTokenizer
    from megatron.emdr2.openqa.builders import build_tower

    tok = BertWordPieceTokenizer(args.vocab_file)
    try:
        evidence = load_evidence(args.evidence)
    except DataError as e:
        fail(str(e), prog)
    rows = []
    for start in range(0, len(evidence), 512):
        ids, mask = encode_context(tok, evidence.passages(list(range(start, min(start + 512, len(evidence))))),
                                   args.context_max_len, pad_to="longest")
        for row, m in zip(ids.tolist(), mask.tolist()):
            rows.append([t for t, keep in zip(row, m) if keep and t not in tok.special_ids])
    tfidf, idf = tfidf_matrix(rows, tok.vocab_size)
    try:
        vectors = lsa_token_vectors(tfidf, lsa_dim, args.seed)
    except ValueError as e:
        fail(f"--evidence {args.evidence}: {e}", prog)

    size = ModelSize(num_layers=args.num_layers, hidden_size=args.hidden_size,
                     num_attention_heads=args.num_attention_heads, ffn_hidden_size=args.ffn_hidden_size,
                     seq_length=args.seq_length, hidden_dropout=0.0, attention_dropout=0.0, pooling="weighted-mean")
    launch = initialize.initialize(tensor_parallel=1, seed=args.seed)
    try:
        tower = build_tower(size, tok.vocab_size)
        tower_state = lexical_tower_state(tower, vectors, idf, tok.special_ids)
    finally:
        initialize.shutdown()
    state = {f"query_tower.{k}": v for k, v in tower_state.items()}
    if not args.shared_towers:
        state.update({f"context_tower.{k}": v.clone() for k, v in tower_state.items()})
    config = {"num_layers": args.num_layers, "hidden_size": args.hidden_size,
              "num_attention_heads": args.num_attention_heads, "ffn_hidden_size": args.ffn_hidden_size,
              "vocab_size": tok.vocab_size, "max_sequence_length": args.seq_length, "num_tokentypes": 2,
              "post_layernorm": False, "layernorm_epsilon": tower.config.layernorm_epsilon,
              "shared": args.shared_towers, "pooling": "weighted-mean", "vocab_file": tok.vocab_file,
              "lower_case": tok.lower_case}
    tmp = f"{args.output}.tmp-{os.getpid()}"
    torch.save({"model": state, "config": config}, tmp)
    os.replace(tmp, args.output)
    del launch
    print(f"lexical retriever ({len(evidence)} passages, {lsa_dim} LSA dimensions in a "
          f"{args.hidden_size}-wide tower): {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
