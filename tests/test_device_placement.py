"""Every model every role builds is on ``compute_device()`` (issue 33: the indexer ranks once
embedded 21M passages on the host while their GPUs sat idle).

On a CPU-only machine ``compute_device()`` is patched to the ``meta`` device: a model (or one of
its tensors) that no code moved stays on the CPU and is caught. Each role runs its real entry
point up to the moment its models are placed and used (the first index embedded, the models
handed to the optimizer or returned for inference), where a spy records every parameter's and
buffer's device and stops the run (meta tensors hold no data to compute with).
"""

from __future__ import annotations

from spawn import run_ranks
from openqa_helpers import NQ_MINI, ROOT, TINY_OPENQA

SENTENCES = ROOT / "tests" / "fixtures" / "mss" / "nq_mini_first80.jsonl"
RETRIEVER = ["--retriever-num-layers", "2", "--retriever-hidden-size", "64", "--retriever-num-attention-heads", "4",
             "--retriever-seq-length", "128", "--query-max-len", "32", "--context-max-len", "96"]
BATCH = ["--global-batch-size", "4", "--micro-batch-size", "2", "--train-iters", "2", "--autocast", "none",
         "--no-progress-bar"]


class Placed(Exception):
    """Raised by a spy once it has seen where the models are."""


def _devices(*modules) -> list[str]:
    return sorted({str(t.device) for m in modules for t in (*m.parameters(), *m.buffers())})


def _roles(rank, world, tmp):
    import torch

    from megatron.emdr2.arguments import training_config_from_args
    from megatron.emdr2.initialize import initialize, shutdown
    from megatron.emdr2.openqa import emdr2_task, index_refresh, retrieval
    from megatron.emdr2.training import loop, setup

    seen: dict[str, list[str]] = {}
    real_prepare = setup.prepare_models

    def prepare_spy(role):
        def spy(models, cfg):  # the real casts and moves; DDP cannot wrap data-less tensors
            cast, _ = real_prepare(models, cfg)
            seen[f"{role} models"] = _devices(*cast.values())
            raise Placed
        return spy

    def index_spy(role, stop=False):
        def spy(biencoder, tok, evidence, out_dir, *a, **k):
            seen[f"{role} embedding"] = _devices(biencoder)
            if stop:
                raise Placed
            return out_dir
        return spy

    def run(role, fn):
        try:
            fn()
        except Placed:
            pass
        finally:
            shutdown()

    mp = {}

    def patch(obj, name, value):
        mp.setdefault((obj, name), getattr(obj, name))
        setattr(obj, name, value)

    patch(loop, "compute_device", lambda: torch.device("meta"))
    patch(setup, "wrap_ddp", lambda m, cfg: m)
    patch(index_refresh.IndexManager, "load", lambda self, d: None)
    try:
        from tasks.openqa import common, dpr, emdr2, ict, mss

        evidence = str(NQ_MINI / "evidence.tsv")
        for role, module, flags in (
                ("ict", ict, [*RETRIEVER, "--evidence", evidence, "--dev-data", ""]),
                ("dpr", dpr, [*RETRIEVER, "--evidence", evidence, "--dev-data", "", "--hard-negatives", "0",
                              "--train-data", str(NQ_MINI / "train.jsonl")]),
                ("emdr2", emdr2, [*TINY_OPENQA, "--evidence", evidence, "--index-dir", f"{tmp}/emdr2-index",
                                  "--top-k", "2"]),
                ("mss", mss, [*TINY_OPENQA, "--evidence", evidence, "--index-dir", f"{tmp}/mss-index",
                              "--top-k", "2", "--mss-data", str(SENTENCES), "--mss-dev-sentences", "8"])):
            patch(loop, "prepare_models", prepare_spy(role))
            patch(emdr2_task, "build_index", index_spy(role))  # the trainers' first index
            run(role, lambda: module.main([*flags, *BATCH]))

        # An indexer rank: its tower embeds each tower the trainers hand over.
        args = emdr2.build_parser().parse_args([*TINY_OPENQA, "--evidence", evidence, "--index-dir",
                                                f"{tmp}/idx-index", "--num-indexer-ranks", "1", *BATCH])
        cfg = training_config_from_args(args)

        def fake_run_indexer(refresh, embed_version):
            state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in tower_state().items() if torch.is_tensor(v)}
            embed_version(4, state, f"{tmp}/idx-index/step-00000004", {})

        def tower_state():  # the shape of what the trainers publish: one context tower
            from megatron.emdr2.openqa import builders

            rtok, _ = common.tokenizers(args)
            return builders.build_tower(common.role_sizes(args)["retriever"], rtok.vocab_size).state_dict()

        patch(index_refresh, "run_indexer", fake_run_indexer)
        patch(retrieval, "build_index", index_spy("indexer", stop=True))
        initialize(seed=1)
        run("indexer", lambda: common.indexer_main(args, cfg))

        # Inference (evaluate / answer): a tiny checkpoint loaded, its first index embedded.
        ckpt = _tiny_checkpoint(tmp)
        from tasks.openqa import evaluate

        args = evaluate.build_parser().parse_args(["--load", ckpt, "--index-dir", f"{tmp}/eval-index",
                                                   "--evidence", evidence, "--autocast", "none"])
        patch(emdr2_task, "build_index", index_spy("inference"))

        def inference():
            _, models = common.load_for_inference(args)
            seen["inference models"] = _devices(*models.values())

        run("inference", inference)
    finally:
        for (obj, name), value in mp.items():
            setattr(obj, name, value)
    return seen


def _tiny_checkpoint(tmp) -> str:
    """An EMDR² checkpoint (tiny towers and reader, sizes in its meta), saved on the host."""
    from dataclasses import asdict

    from megatron.emdr2.config import ModelSize
    from megatron.emdr2.initialize import initialize, shutdown
    from megatron.emdr2.openqa import builders
    from megatron.emdr2.training import checkpointing as ckpt
    from tasks.openqa.common import tokenizers

    class Args:
        vocab_file = None

    rtok, tok = tokenizers(Args)
    size = ModelSize(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=128)
    initialize(seed=0)
    try:
        bi = builders.build_biencoder(size, rtok.vocab_size)
        reader = builders.build_reader(size, tok.vocab_size, tok.real_vocab_size)
        meta = {"retriever": asdict(size), "reader": asdict(size), "shared_towers": False,
                "context_max_len": 96, "query_max_len": 32, "reader_max_len": 128, "answer_max_len": 16}
        root = f"{tmp}/ckpt"
        ckpt.save_checkpoint(root, 1, {"iteration": 1, "models": {"biencoder": bi.state_dict(),
                                                                    "reader": reader.state_dict()},
                                       "meta": meta}, {}, meta={"world_size": 1})
    finally:
        shutdown()
    return root


def test_every_role_places_every_model_on_the_compute_device(tmp_path):
    (seen,), = [run_ranks(_roles, 1, str(tmp_path), timeout=600)]
    expected = ["ict models", "dpr models", "emdr2 embedding", "emdr2 models", "mss embedding", "mss models",
                "indexer embedding", "inference embedding", "inference models"]
    assert sorted(seen) == sorted(expected), seen
    left_behind = {role: devices for role, devices in seen.items() if devices != ["meta"]}
    assert not left_behind, f"models not on compute_device(): {left_behind}"
