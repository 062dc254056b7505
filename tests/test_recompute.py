"""Activation recompute (megatron-core's recompute_granularity / method / num_layers).

For the retriever towers and the FiD reader, with dropout on and off, the loss and every
parameter gradient with each recompute setting equal those without recompute (dropout masks
are reproduced by megatron's RNG tracker fork, also on CPU), and the recompute really happens
(layers run twice). Covers our own layers: post-LN residual order, T5 relative position bias,
the decoder's cross-attention with an additive (joint top-k) bias, the copy head, a frozen
encoder. Then the flags on every training entry point, their one-line refusals, and a tiny
EMDR² training run whose losses equal the run without recompute.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from openqa_helpers import NQ_MINI, ROOT, TINY_OPENQA, env, records, small_evidence

SETTINGS = {
    "full-uniform-1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full-uniform-2": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    "full-block-1": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective"),
    "selective-all": dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"]),
}
VOCAB = 128


@pytest.fixture(scope="module", autouse=True)
def megatron_single_rank():
    from megatron.core import parallel_state

    from megatron.emdr2.initialize import initialize

    if not parallel_state.model_parallel_is_initialized():
        initialize(1, 1, seed=1234)
    yield


def _device():
    from megatron.emdr2.initialize import device

    return device()


def _inputs(shape, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, shape, generator=g)
    mask = torch.ones_like(ids)
    mask[..., shape[-1] - 3:] = 0  # some padding
    return ids.to(_device()), mask.to(_device())


class _CallCounter:
    """How often each layer's (or attention core's, MLP's, norm's) forward runs in one step."""

    def __init__(self, model):
        from megatron.core.transformer.transformer_layer import TransformerLayer

        self.counts, self.handles = {}, []
        for name, module in model.named_modules():
            if isinstance(module, TransformerLayer) or name.endswith((".core_attention", ".mlp")):
                self.counts[name] = 0
                self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, args, output):
            self.counts[name] += 1
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _step(model, loss_fn, seed=11, extra_params=()):
    """One training forward/backward from a fixed RNG state: (loss, {name: grad}, call counts)."""
    from megatron.emdr2.initialize import set_seed

    model.train()
    model.zero_grad(set_to_none=True)
    for p in extra_params:
        p.grad = None
    counter = _CallCounter(model)
    set_seed(seed)
    loss = loss_fn(model)
    loss.backward()
    counter.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for i, p in enumerate(extra_params):
        grads[f"extra.{i}"] = p.grad.clone()
    return loss.detach(), grads, counter.counts


def _assert_same(reference, other, what):
    loss0, grads0, _ = reference
    loss1, grads1, _ = other
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=1e-6, msg=f"{what}: loss")
    assert grads1.keys() == grads0.keys(), f"{what}: parameters with a gradient differ"
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-6, msg=f"{what}: grad of {name}")


def _assert_recomputed(counts, setting):
    """Each recompute setting's tell-tale: the modules it recomputes ran twice in the step."""
    layers = {n: c for n, c in counts.items() if n.split(".")[-2] == "layers"}
    cfg = SETTINGS[setting]
    if cfg["recompute_granularity"] == "full":
        n = cfg["recompute_num_layers"]
        for name, c in layers.items():
            index = int(name.split(".")[-1])
            twice = cfg["recompute_method"] == "uniform" or index < n
            assert c == (2 if twice else 1), (setting, name, c)
        return
    modules = cfg.get("recompute_modules", ["core_attn"])
    assert set(layers.values()) == {1}, (setting, layers)
    for suffix, module in ((".core_attention", "core_attn"), (".mlp", "mlp")):
        runs = {n: c for n, c in counts.items() if n.endswith(suffix)}
        assert runs and set(runs.values()) == {2 if module in modules else 1}, (setting, suffix, runs)


# ---------------------------------------------------------------------- towers
def _tower(dropout, post_layernorm=False, **recompute):
    from megatron.emdr2.config import ModelSize
    from megatron.emdr2.openqa import builders

    torch.manual_seed(0)
    size = ModelSize(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, hidden_dropout=dropout,
                     attention_dropout=dropout, post_layernorm=post_layernorm, **recompute)
    return builders.build_tower(size, VOCAB).to(_device())


def _tower_loss(tower):
    ids, mask = _inputs((3, 12))
    weights = torch.linspace(-1, 1, 64, device=ids.device)
    hidden = tower.hidden_states(ids, mask)  # every position (not only [CLS]): every weight gets a gradient
    return (hidden * weights).square().mean() + hidden[:, 0].sum()


@pytest.mark.parametrize("post_layernorm", [False, True], ids=["pre-ln", "post-ln"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_tower_gradients_equal_with_every_recompute_setting(dropout, post_layernorm):
    base = _tower(dropout, post_layernorm)
    reference = _step(base, _tower_loss)
    if dropout:  # the masks matter: without dropout the loss is another number
        assert not torch.equal(_step(_tower(0.0, post_layernorm), _tower_loss)[0], reference[0])
    for setting, recompute in SETTINGS.items():
        model = _tower(dropout, post_layernorm, **recompute)
        model.load_state_dict(base.state_dict())
        result = _step(model, _tower_loss)
        _assert_same(reference, result, f"tower {setting} dropout {dropout}")
        _assert_recomputed(result[2], setting)


def test_dropout_masks_must_be_reproduced(monkeypatch):
    """The check above can fail: if the recompute did not restore the RNG states (megatron's
    tracker fork, the CPU generator here), its dropout masks would differ and so would the
    gradients."""
    from megatron.core.tensor_parallel import random as mrandom

    base = _tower(0.1)
    reference = _step(base, _tower_loss)
    model = _tower(0.1, **SETTINGS["full-uniform-1"])
    model.load_state_dict(base.state_dict())
    monkeypatch.setattr(mrandom, "_set_all_rng_states", lambda *states: None)
    loss, grads, _ = _step(model, _tower_loss)
    torch.testing.assert_close(loss, reference[0], rtol=0, atol=1e-6)  # forward untouched
    assert any(not torch.allclose(grads[n], reference[1][n], rtol=1e-5, atol=1e-6) for n in grads)


def test_recompute_only_in_training():
    """Evaluation (eval mode or no autograd) runs each layer once."""
    model = _tower(0.1, **SETTINGS["full-uniform-1"]).eval()
    counter = _CallCounter(model)
    ids, mask = _inputs((2, 12))
    with torch.no_grad():
        model(ids, mask)
    model.train()
    with torch.no_grad():
        model(ids, mask)
    counter.remove()
    layers = {n: c for n, c in counter.counts.items() if n.split(".")[-2] == "layers"}
    assert set(layers.values()) == {2}, layers  # two passes, once each


# ---------------------------------------------------------------------- reader
def _reader(dropout, relative=False, copy_head=False, **recompute):
    from megatron.emdr2.models.config import t5_config
    from megatron.emdr2.models.fid import FiDReader

    torch.manual_seed(0)
    cfg = t5_config(2, 64, 4, hidden_dropout=dropout, attention_dropout=dropout,
                    style="t5" if relative else "megatron", **recompute)
    reader = FiDReader(cfg, VOCAB, 64, position_embedding_type="relative" if relative else "learned_absolute",
                       relative_attention_num_buckets=8, relative_attention_max_distance=16,
                       copy_head=copy_head)
    return reader.to(_device())


def _reader_batch():
    ids, mask = _inputs((2, 3, 10))
    dec, _ = _inputs((2, 5), seed=4)
    labels, _ = _inputs((2, 5), seed=5)
    return ids, mask, dec, labels


def _reader_loss(reader):
    return reader.loss(*_reader_batch())


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative-bias"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_reader_gradients_equal_with_every_recompute_setting(dropout, relative):
    base = _reader(dropout, relative)
    reference = _step(base, _reader_loss)
    if dropout:
        assert not torch.equal(_step(_reader(0.0, relative), _reader_loss)[0], reference[0])
    for setting, recompute in SETTINGS.items():
        model = _reader(dropout, relative, **recompute)
        model.load_state_dict(base.state_dict())
        result = _step(model, _reader_loss)
        _assert_same(reference, result, f"reader {setting} dropout {dropout} relative {relative}")
        _assert_recomputed(result[2], setting)
    if relative:  # the bias table is shared by the layers of a stack and gets their summed gradient
        assert reference[1]["encoder_relative_pos_emb.relative_attention_bias.weight"].abs().sum() > 0


@pytest.mark.parametrize("setting", ["full-uniform-1", "full-block-1", "selective"])
def test_reader_copy_head_and_cross_attention_bias(setting):
    """The copy head, and a joint top-k bias log p(z|q) on the decoder's cross-attention whose
    gradient reaches the retriever scores (a float mask passed through the checkpoints)."""
    from megatron.emdr2.models.fid import FiDReader

    scores = torch.randn(2, 3, generator=torch.Generator().manual_seed(1)).to(_device()).requires_grad_()

    def loss_fn(reader):
        ids, mask, dec, labels = _reader_batch()
        states, memory_mask = reader.encode(ids, mask)
        bias = FiDReader.passage_memory_bias(torch.log_softmax(scores, -1), ids.size(-1))
        nll = reader.token_nll(states, memory_mask, dec, labels, memory_ids=ids.reshape(memory_mask.shape),
                               memory_bias=bias)
        return nll.sum() / labels.numel()

    base = _reader(0.1, copy_head=True)
    reference = _step(base, loss_fn, extra_params=[scores])
    model = _reader(0.1, copy_head=True, **SETTINGS[setting])
    model.load_state_dict(base.state_dict())
    result = _step(model, loss_fn, extra_params=[scores])
    _assert_same(reference, result, f"copy head + memory bias, {setting}")
    assert reference[1]["extra.0"].abs().sum() > 0
    assert any(n.startswith("copy_head.") for n in result[1])


@pytest.mark.parametrize("setting", ["full-uniform-1", "full-block-1"])
def test_frozen_encoder_decoder_still_gets_gradients(setting):
    """megatron's full recompute is reentrant: a decoder whose input embeddings are frozen (they
    are shared with the frozen encoder) would get no gradient without ``checkpointable_input``."""
    base = _reader(0.1)
    base.freeze_encoder()
    reference = _step(base, _reader_loss)
    model = _reader(0.1, **SETTINGS[setting])
    model.load_state_dict(base.state_dict())
    model.freeze_encoder()
    result = _step(model, _reader_loss)
    _assert_same(reference, result, f"frozen encoder, {setting}")
    assert any(n.startswith("decoder.layers.0.") for n in result[1])
    assert not any(n.startswith(("encoder.", "embedding.")) for n in result[1])


# ---------------------------------------------------------------------- flags
def _parse(module_name, argv):
    """(args, cfg) through the entry point's own parser and validation (one-line errors, exit 2)."""
    import importlib

    from megatron.emdr2.arguments import model_size_from_args
    from megatron.emdr2.training import launch
    from tasks.openqa import common

    module = importlib.import_module(module_name)
    sizes = (common.model_sizes if module_name.endswith(("emdr2", "mss"))
             else lambda a: [model_size_from_args(a, "retriever")])
    return launch.parse_and_validate(module.build_parser(), argv, model_sizes=sizes)


ENTRY_POINTS = {"tasks.openqa.ict": [], "tasks.openqa.dpr": [], "tasks.openqa.mss": ["--mss-data", "x", "--index-dir", "i"],
                "tasks.openqa.emdr2": ["--index-dir", "i"]}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_flags_reach_the_model_sizes_of_every_entry_point(entry):
    from megatron.emdr2.arguments import model_size_from_args

    base = ENTRY_POINTS[entry]
    roles = ["retriever", "reader"] if entry.endswith(("emdr2", "mss")) else ["retriever"]
    for flags, expected in (
            (["--recompute-activations"], ("selective", None, None, None)),
            (["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp"],
             ("selective", None, None, ["core_attn", "mlp"])),
            (["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "3"],
             ("full", "block", 3, None)),
            (["--checkpoint-activations"], ("full", "uniform", None, None))):
        args, _ = _parse(entry, [*base, *flags])
        for role in roles:
            s = model_size_from_args(args, role)
            assert (s.recompute_granularity, s.recompute_method, s.recompute_num_layers,
                    s.recompute_modules) == expected, (entry, flags, role)
    args, _ = _parse(entry, base)
    assert model_size_from_args(args, "retriever").recompute_granularity is None


def test_recompute_models_picks_the_reader_only():
    from tasks.openqa import common

    args, _ = _parse("tasks.openqa.emdr2", ["--index-dir", "i", "--recompute-activations", "--recompute-models", "reader"])
    sizes = common.role_sizes(args)
    assert sizes["retriever"].recompute_granularity is None
    assert sizes["reader"].recompute_granularity == "selective"


@pytest.mark.parametrize("entry,flags,message", [
    ("tasks.openqa.ict", ["--recompute-granularity", "full"], "needs --recompute-method uniform or block"),
    ("tasks.openqa.dpr", ["--recompute-method", "block"], "--recompute-method needs --recompute-granularity"),
    ("tasks.openqa.ict", ["--recompute-activations", "--recompute-granularity", "full"], "contradicts"),
    ("tasks.openqa.ict", ["--checkpoint-activations", "--recompute-activations"], "contradicts"),
    ("tasks.openqa.dpr", ["--recompute-granularity", "selective", "--recompute-num-layers", "2"],
     "apply to --recompute-granularity full only"),
    ("tasks.openqa.ict", ["--recompute-granularity", "full", "--recompute-method", "uniform",
                          "--recompute-modules", "mlp"], "applies to --recompute-granularity selective only"),
    ("tasks.openqa.ict", ["--recompute-granularity", "full", "--recompute-method", "block",
                          "--recompute-num-layers", "0"], "must be >= 1"),
    ("tasks.openqa.ict", ["--recompute-granularity", "full", "--recompute-method", "uniform",
                          "--recompute-num-layers", "5"], "does not divide a stack of 12 layers"),
    ("tasks.openqa.emdr2", ["--index-dir", "i", "--checkpoint-activations", "--recompute-num-layers", "4",
                            "--reader-decoder-num-layers", "6"], "does not divide a stack of 6 layers"),
    ("tasks.openqa.mss", ["--mss-data", "x", "--index-dir", "i", "--recompute-models", "reader"],
     "--recompute-models needs"),
    ("tasks.openqa.emdr2", ["--index-dir", "i", "--recompute-granularity", "partial"], "invalid choice"),
    ("tasks.openqa.ict", ["--recompute-activations", "--recompute-modules", "layernorm"], "invalid choice"),
])
def test_invalid_combinations_are_refused_in_one_line(entry, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(entry, flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_recompute_flags_directly():
    from megatron.emdr2.config import recompute_flags

    assert recompute_flags(12) == {}
    assert recompute_flags(12, "full", "uniform") == dict(recompute_granularity="full", recompute_method="uniform",
                                                          recompute_num_layers=1)
    # a chunk larger than a stack is the whole stack (e.g. a shallower decoder)
    assert recompute_flags(2, "full", "uniform", 4)["recompute_num_layers"] == 2
    assert recompute_flags(6, "selective") == dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    with pytest.raises(ValueError, match="one of"):
        recompute_flags(6, "selective", modules=["moe"])


# ---------------------------------------------------------------------- end to end
def test_emdr2_training_losses_equal_with_recompute(tmp_path):
    """A tiny EMDR² run (dropout 0.1, both towers and the reader trained) with full recompute
    of every layer has the losses of the same run without it."""
    evidence = small_evidence(tmp_path, rows=120)
    common = [*TINY_OPENQA, "--evidence", str(evidence), "--top-k", "4", "--train-data", str(NQ_MINI / "train.tsv"),
              "--global-batch-size", "4", "--micro-batch-size", "2", "--train-iters", "4", "--lr", "1e-3",
              "--lr-warmup-fraction", "0.25", "--index-reload-interval", "0", "--dev-data", str(NQ_MINI / "dev.tsv"),
              "--eval-max-questions", "2"]
    procs = {}
    for name, extra in (("plain", []), ("recompute", ["--recompute-granularity", "full",
                                                      "--recompute-method", "uniform", "--recompute-num-layers", "1"])):
        flags = [*common, *extra, "--index-dir", str(tmp_path / f"{name}-index"),
                 "--metrics-file", str(tmp_path / f"{name}.jsonl"), "--save", str(tmp_path / name)]
        procs[name] = subprocess.Popen([sys.executable, "-m", "tasks.openqa.emdr2", *flags], cwd=ROOT, env=env(1),
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    losses = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        losses[name] = [r["loss"] for r in records(tmp_path / f"{name}.jsonl")]
    assert len(losses["plain"]) == 4
    assert losses["recompute"] == pytest.approx(losses["plain"], rel=1e-6, abs=1e-7)
    from megatron.emdr2.openqa.builders import load_checkpoint_meta

    meta = load_checkpoint_meta(str(tmp_path / "recompute"))  # the models were built with it
    for role in ("retriever", "reader"):
        assert (meta[role]["recompute_granularity"], meta[role]["recompute_method"]) == ("full", "uniform")
    assert load_checkpoint_meta(str(tmp_path / "plain"))["reader"]["recompute_granularity"] is None


def test_builders_apply_the_settings_to_every_stack():
    from megatron.emdr2.config import ModelSize
    from megatron.emdr2.openqa import builders

    size = ModelSize(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, decoder_num_layers=1,
                     **SETTINGS["full-uniform-2"])
    reader = builders.build_reader(size, VOCAB, VOCAB)
    assert reader.encoder.config.recompute_num_layers == 2
    assert reader.decoder.config.recompute_num_layers == 1  # the chunk is cut to the shallower stack
    towers = builders.build_biencoder(dataclasses.replace(size, recompute_method=None, recompute_num_layers=None,
                                                         **SETTINGS["selective"]), VOCAB)
    assert towers.query_tower.encoder.config.recompute_granularity == "selective"
    assert towers.context_encoder.encoder.config.recompute_modules == ["core_attn"]
