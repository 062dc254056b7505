"""Tensor-parallel size 2 in the reader-retriever tasks gives what size 1 gives.

* one spawn of two gloo ranks (TP=2) against references computed here (TP=1) on the same
  weights (``tp_split`` of this process's models): the context tower's embeddings, the index
  it builds (one shard, written by tensor-parallel rank 0 alone) and its fingerprint, the search
  of an index spread over both ranks, the whole tower handed to indexer ranks, and a reader
  with a copy head (span continuation on, padded vocabulary): loss, gradients of the copy
  head, per-passage likelihoods, greedy and beam decoding with and without the n-gram ban,
  and a BERT warm start of its encoder (--reader-bert-load);
* short EMDR² (copy head, decoding with the n-gram ban) and MSS commands with an index
  refresh every 2 steps: the TP=2 run's losses and dev predictions equal the TP=1 run's, and
  its checkpoint (one file per tensor-parallel rank) loads merged at TP=1;
* asynchronous refresh: TP=2 trainers hand the whole context tower to an unsharded indexer,
  whose index versions are exactly what a TP=1 tower with the checkpointed weights embeds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from openqa_helpers import NQ_MINI, TINY_OPENQA, launch_ranks, records, small_evidence
from spawn import run_ranks

B, K, S, T = 2, 3, 7, 5
VOCAB, REAL_VOCAB = 96, 90  # the top rows are padding: -inf logits, on the second rank's slice
EVIDENCE_ROWS, EMBED_BATCH = 40, 16  # three batches: the ranks stay in step across batches


@pytest.fixture(scope="module", autouse=True)
def megatron_single_rank():
    from megatron.core import parallel_state

    from megatron.emdr2.initialize import initialize

    if not parallel_state.model_parallel_is_initialized():
        initialize(1, 1, seed=1234)
    yield


def _size(**kw):
    from megatron.emdr2.config import ModelSize

    return ModelSize(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64,
                     hidden_dropout=0.0, attention_dropout=0.0, **kw)


def _models(tp: int, vocab: int):
    from megatron.emdr2.openqa import builders

    biencoder = builders.build_biencoder(_size(), vocab, tensor_parallel=tp, shared=True)
    reader = builders.build_reader(_size(copy_head=True, copy_continuation=True), VOCAB, REAL_VOCAB,
                                   tensor_parallel=tp)
    return biencoder, reader


def _inputs():
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(2, REAL_VOCAB, (B, K, S), generator=g)
    ids[:, :, 3] = ids[0, 0, 2]  # repeated tokens: copy mass from several positions
    mask = torch.ones_like(ids)
    mask[1, 2, 4:] = 0
    dec = torch.randint(2, REAL_VOCAB, (B, T), generator=g)
    labels = ids[:, 0, 1:T + 1].clone()  # answers copied from the first passage
    labels[1, 3:] = -100
    return dict(ids=ids, mask=mask, dec=dec, labels=labels)


def _read(reader, x) -> tuple[dict, dict]:
    """The reader's outputs (loss, per-passage likelihoods, decodings) and copy-head gradients."""
    out = {}
    reader.zero_grad(set_to_none=True)
    loss = reader.loss(x["ids"], x["mask"], x["dec"], x["labels"])
    loss.backward()
    out["loss"] = loss.detach()
    states, memory_mask = reader.encode(x["ids"], x["mask"])
    ids = x["ids"].reshape(memory_mask.shape)
    out["per_passage"] = reader.per_passage_log_likelihood(states, memory_mask, K, x["dec"], x["labels"],
                                                           memory_ids=ids)[1]
    for beams in (1, 3):
        for ngram in (0, 2):
            out[f"generate{beams}/ngram{ngram}"] = reader.generate(x["ids"], x["mask"], 6, beams, 0, 1,
                                                                   no_repeat_ngram_size=ngram)
    grads = {n: p.grad.clone() for n, p in reader.named_parameters() if n.startswith("copy_head.")}
    grads["word_embeddings"] = reader.embedding.word_embeddings.weight.grad.clone()
    return out, grads


def _bert_warm_start(reader, biencoder_state: dict) -> dict:
    """--reader-bert-load's path: the query tower (a BERT) into the reader's encoder; the
    reader's whole state after it."""
    from megatron.emdr2.models.tp_state import full_state_dict
    from megatron.emdr2.openqa.builders import bert_into_reader_encoder

    tower = {k[len("query_tower."):]: v for k, v in biencoder_state.items() if k.startswith("query_tower.")}
    bert_into_reader_encoder(reader, tower, "query tower")
    return full_state_dict(reader)


def _embed_and_search(biencoder, rtok, evidence, index_dir: Path, x_queries) -> dict:
    from megatron.emdr2.index.fingerprint import tower_fingerprint
    from megatron.emdr2.index.sharded_index import ShardedIndex
    from megatron.emdr2.models.tp_state import full_state_dict
    from megatron.emdr2.openqa.retrieval import build_index, context_tokenizer

    tower = biencoder.context_encoder.eval()
    ids, mask = context_tokenizer(rtok, evidence, 48)(range(len(evidence)))
    out = {"embeddings": tower(ids, mask).detach(), "fingerprint": tower_fingerprint(tower),
           "whole_tower": full_state_dict(tower)}
    build_index(biencoder, rtok, evidence, str(index_dir), batch_size=EMBED_BATCH, max_len=48, progress=False)
    index = ShardedIndex.load(index_dir)  # over every rank: each holds a slice of the rows
    out["local_rows"] = index.local_rows
    q = biencoder.embed_queries(*x_queries).detach()
    out["scores"], out["ids"] = index.search(q, 5)
    return out


def _tp2_rank(rank, world, states, evidence_path, index_dir, x, x_queries):
    from megatron.emdr2.data.evidence import load_evidence
    from megatron.emdr2.initialize import initialize, shutdown
    from megatron.emdr2.models.tp_state import shard_for
    from tasks.openqa.common import tokenizers

    class Args:
        vocab_file = None

    initialize(tensor_parallel=2, seed=1234)
    try:
        rtok, _ = tokenizers(Args)
        biencoder, reader = _models(2, rtok.vocab_size)
        biencoder.load_state_dict(shard_for(biencoder, states["biencoder"]), strict=True)
        reader.load_state_dict(shard_for(reader, states["reader"]), strict=True)
        out = _embed_and_search(biencoder, rtok, load_evidence(evidence_path), Path(index_dir), x_queries)
        read, grads = _read(reader, x)
        read["warm_started"] = _bert_warm_start(reader, states["biencoder"])
        return {**out, **read}, grads
    finally:
        shutdown()


def _assert_close(got, ref, what, rel=1e-5):
    assert got.shape == ref.shape, what
    tol = rel * max(1.0, ref.abs().max().item())
    diff = (got.float() - ref.float()).abs().max().item()
    assert diff <= tol, (what, diff, tol)
    return diff


def test_embedding_index_and_copy_head_reader_at_tp2_equal_tp1(tmp_path):
    from megatron.emdr2.data.evidence import load_evidence
    from megatron.emdr2.data.inputs import encode_query
    from megatron.emdr2.index import shard_store
    from megatron.emdr2.index.sharded_index import ShardedIndex
    from tasks.openqa.common import tokenizers

    class Args:
        vocab_file = None

    torch.manual_seed(0)
    rtok, _ = tokenizers(Args)
    biencoder, reader = _models(1, rtok.vocab_size)
    # Copies: state_dict() shares the parameters, which the warm start below overwrites.
    states = {name: {k: v.clone() if torch.is_tensor(v) else v for k, v in m.state_dict().items()}
              for name, m in (("biencoder", biencoder), ("reader", reader))}
    evidence_path = small_evidence(tmp_path, EVIDENCE_ROWS)
    evidence = load_evidence(evidence_path)
    x = _inputs()
    queries = encode_query(rtok, ["who wrote the song", "where is the capital of france"], 16, pad_to="longest")
    ref = _embed_and_search(biencoder, rtok, evidence, tmp_path / "tp1", queries)
    ref_read, ref_grads = _read(reader, x)
    ref_read["warm_started"] = _bert_warm_start(reader, states["biencoder"])

    t0 = time.perf_counter()
    results = run_ranks(_tp2_rank, 2, states, str(evidence_path), str(tmp_path / "tp2"), x, queries)
    print(f"TP=2 ranks: {time.perf_counter() - t0:.1f}s")
    diffs = {}
    for rank, (out, grads) in enumerate(results):
        diffs["embeddings"] = _assert_close(out["embeddings"], ref["embeddings"], "embeddings")
        assert out["fingerprint"] == ref["fingerprint"]  # the whole tower's, at any TP size
        assert set(out["whole_tower"]) == set(ref["whole_tower"])
        for name, value in ref["whole_tower"].items():
            assert torch.equal(out["whole_tower"][name], value), name
        assert out["local_rows"] == EVIDENCE_ROWS // 2  # the index is spread over both ranks
        assert torch.equal(out["ids"], ref["ids"])
        diffs["search scores"] = _assert_close(out["scores"], ref["scores"], "search scores")
        for key in ("loss", "per_passage"):
            diffs[key] = _assert_close(out[key], ref_read[key], key)
        for key, value in ref_read.items():
            if key.startswith("generate"):
                assert torch.equal(out[key], value), (rank, key, out[key], value)
        for name, value in ref_read["warm_started"].items():  # --reader-bert-load at TP=2
            assert torch.equal(out["warm_started"][name], value), name
        for name, value in ref_grads.items():
            if name == "word_embeddings":  # vocab-parallel: this rank's rows
                value = value.chunk(2)[rank]
            diffs[f"grad {name}"] = _assert_close(grads[name], value, name)
    print("max abs diff TP=2 vs TP=1:", {k: f"{v:.1e}" for k, v in diffs.items()})
    assert ref_read["per_passage"].abs().sum() > 0 and ref_grads["copy_head.gate.weight"].abs().sum() > 0
    assert any(len(set(v.flatten().tolist())) > 2 for k, v in ref_read.items() if k.startswith("generate"))

    # One shard, written by tensor-parallel rank 0 alone; the same vectors up to fp16 rounding.
    manifest = shard_store.read_manifest(tmp_path / "tp2")
    assert len(manifest.shards) == 1 and manifest.num_rows == EVIDENCE_ROWS
    assert manifest.extra["context_tower_sha256"] == ref["fingerprint"]
    one, two = ShardedIndex.load(tmp_path / "tp1"), ShardedIndex.load(tmp_path / "tp2")
    assert torch.equal(one.ids, two.ids)
    torch.testing.assert_close(two.vectors.float(), one.vectors.float(), rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------------- the commands

RUN_FLAGS = [*TINY_OPENQA, "--top-k", "4", "--global-batch-size", "4", "--micro-batch-size", "2",
             "--lr", "1e-3", "--train-iters", "4", "--index-reload-interval", "2", "--eval-interval", "4",
             "--eval-max-questions", "8", "--no-repeat-ngram-size", "2", "--keep-index-versions", "0",
             *(f for role in ("retriever", "reader") for kind in ("hidden", "attention")
               for f in (f"--{role}-{kind}-dropout", "0"))]
MSS_SENTENCES = Path(__file__).resolve().parent / "fixtures" / "mss" / "nq_mini_first80.jsonl"


def _task_flags(task: str, tmp: Path, evidence: Path) -> list[str]:
    common = [*RUN_FLAGS, "--evidence", str(evidence), "--index-dir", str(tmp / "index"),
              "--save", str(tmp / "ckpt"), "--metrics-file", str(tmp / "metrics.jsonl"),
              "--predictions-file", str(tmp / "predictions.jsonl")]
    if task == "emdr2":
        return [*common, "--train-data", str(NQ_MINI / "train.tsv"), "--dev-data", str(NQ_MINI / "dev.tsv"),
                "--reader-copy-head"]
    return [*common, "--mss-data", str(MSS_SENTENCES), "--mss-dev-sentences", "16", "--mss-max-spans", "2"]


def _run(module: str, flags: list[str], world: int, log_dir: Path, timeout: float = 600) -> float:
    from megatron.emdr2.initialize import free_port

    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    procs = launch_ranks(module, flags, world, free_port(), log_dir)
    try:
        codes = [p.wait(timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(log_dir.glob("rank*.log")))
    assert all(c == 0 for c in codes), (codes, logs)
    return time.perf_counter() - t0


@pytest.mark.parametrize("task", ["emdr2", pytest.param("mss", marks=pytest.mark.slow)])
def test_task_with_index_refresh_at_tp2_equals_tp1(tmp_path, task):
    from megatron.emdr2.openqa import builders
    from megatron.emdr2.training import checkpointing as ckpt

    evidence = small_evidence(tmp_path, 120)
    runs, seconds = {}, {}
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}"
        flags = [*_task_flags(task, out, evidence), "--tensor-model-parallel-size", str(tp)]
        seconds[tp] = _run(f"tasks.openqa.{task}", flags, tp, out)
        runs[tp] = out
    print(f"{task}: TP=1 {seconds[1]:.0f}s, TP=2 {seconds[2]:.0f}s")

    one, two = (records(runs[tp] / "metrics.jsonl") for tp in (1, 2))
    assert [r["iteration"] for r in two] == [1, 2, 3, 4]
    assert [r["index_step"] for r in two] == [0, 2, 2, 4]  # refreshed after steps 2 and 4
    # p(top-1 | q) is a softmax of the towers' scores: the weights' last-bit differences, which
    # Adam's normalised first steps amplify to ~1e-4 of lr, show in it more than in the losses.
    tolerance = {"loss": 1e-4, "reader_loss": 1e-4, "retriever_loss": 1e-4, "p_top1": 2e-3}
    worst = dict.fromkeys(tolerance, 0.0)
    for a, b in zip(one, two):
        for key, rel in tolerance.items():
            assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-6), (key, a, b)
            worst[key] = max(worst[key], abs(b[key] - a[key]))
    assert len({round(r["loss"], 4) for r in two}) > 1  # the model moved
    print(f"{task}: max abs diff TP=2 vs TP=1", {k: f"{v:.1e}" for k, v in worst.items()})
    evals = [records(runs[tp] / "metrics.jsonl", "eval")[-1] for tp in (1, 2)]
    for key in ("em", "top1", "top5"):
        assert evals[1][key] == pytest.approx(evals[0][key]), (key, evals)
    predictions = [[json.loads(l)["prediction"] for l in (runs[tp] / "predictions.jsonl").read_text().splitlines()]
                   for tp in (1, 2)]
    assert predictions[0] == predictions[1] and len(predictions[0]) > 0

    # The TP=2 checkpoint holds one model file per rank and loads merged at TP=1 (evaluate, answer).
    last = ckpt.iteration_dir(str(runs[2] / "ckpt"), 4)
    assert Path(last, ckpt.model_file(1)).exists()
    for name in ("biencoder", "reader"):
        merged = builders.load_model_state(last, name)
        reference = builders.load_model_state(ckpt.iteration_dir(str(runs[1] / "ckpt"), 4), name)
        for key, value in reference.items():
            if torch.is_tensor(value) and not key.endswith("_extra_state"):
                assert merged[key].shape == value.shape, key
                # Adam normalises its steps: a near-zero gradient that differs in its last bits
                # (reductions in another order) can move a weight by up to lr per step.
                torch.testing.assert_close(merged[key], value, rtol=1e-3, atol=1e-3, msg=key)
        # and re-split for another TP=2 run: rank 1's file as saved
        split = builders.load_model_state(ckpt.iteration_dir(str(runs[1] / "ckpt"), 4), name, 2, 1)
        saved = builders.load_model_state(last, name, 2, 1)
        assert {k: v.shape for k, v in split.items() if torch.is_tensor(v)} == \
               {k: v.shape for k, v in saved.items() if torch.is_tensor(v) and not k.endswith("_extra_state")}


@pytest.mark.slow
def test_async_indexer_embeds_the_whole_tower_of_tp2_trainers(tmp_path):
    from megatron.emdr2.config import ModelSize
    from megatron.emdr2.data.evidence import load_evidence
    from megatron.emdr2.index import shard_store
    from megatron.emdr2.index.fingerprint import tower_fingerprint
    from megatron.emdr2.index.sharded_index import ShardedIndex
    from megatron.emdr2.openqa import builders
    from megatron.emdr2.openqa.retrieval import build_index
    from megatron.emdr2.training import checkpointing as ckpt
    from tasks.openqa.common import tokenizers

    evidence = small_evidence(tmp_path, 120)
    flags = [*_task_flags("emdr2", tmp_path, evidence), "--train-iters", "10", "--save-interval", "1",
             "--tensor-model-parallel-size", "2", "--num-indexer-ranks", "1",
             "--autocast", "none"]  # compared bit for bit with an fp32 re-embedding below
    seconds = _run("tasks.openqa.emdr2", flags, 3, tmp_path / "logs")
    print(f"async TP=2 + 1 indexer: {seconds:.0f}s")
    versions = sorted(m.parent for m in (tmp_path / "index").glob("step-*/manifest.json"))
    by_indexer = [v for v in versions if shard_store.read_manifest(v).model_step > 0]
    assert by_indexer, [v.name for v in versions]
    searched = sorted({int(r["index_step"]) for r in records(tmp_path / "metrics.jsonl")})
    print(f"indexer versions {[v.name for v in by_indexer]}; trainers searched the steps' {searched}")

    class Args:
        vocab_file = None

    rtok, _ = tokenizers(Args)
    size = ModelSize(**builders.load_checkpoint_meta(str(tmp_path / "ckpt"))["retriever"])
    for version in by_indexer[-2:]:
        manifest = shard_store.read_manifest(version)
        whole = builders.load_model_state(ckpt.iteration_dir(str(tmp_path / "ckpt"), manifest.model_step),
                                          "biencoder")
        tower_state = {k[len("context_tower."):]: v for k, v in whole.items() if k.startswith("context_tower.")}
        assert manifest.extra["context_tower_sha256"] == tower_fingerprint(tower_state)
        biencoder = builders.build_biencoder(size, rtok.vocab_size, shared=True)
        builders.load_into(biencoder.query_tower, tower_state, str(version))
        build_index(biencoder, rtok, load_evidence(evidence), str(tmp_path / "check" / version.name),
                    batch_size=64, max_len=96, progress=False)
        ours, theirs = ShardedIndex.load(tmp_path / "check" / version.name), ShardedIndex.load(version)
        assert torch.equal(ours.ids, theirs.ids)
        assert torch.equal(ours.vectors, theirs.vectors), version.name
