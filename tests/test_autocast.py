"""--autocast bf16: fp32 weights, bf16 matrix multiplies on CPU, through megatron-core's own
tensor-parallel linear layers (whose backward needs megatron/emdr2/autocast.py on a CPU)."""

from __future__ import annotations

import pytest
import torch

from megatron.emdr2.config import ModelSize
from megatron.emdr2.openqa import builders
from spawn import run_ranks


@pytest.fixture(scope="module", autouse=True)
def megatron_single_rank():
    from megatron.core import parallel_state

    from megatron.emdr2.initialize import initialize

    if not parallel_state.model_parallel_is_initialized():
        initialize(1, 1, seed=1234)
    yield


def _loss_and_grads(reader, batch, dtype):
    from megatron.emdr2.autocast import autocast

    reader.zero_grad()
    with autocast("cpu", dtype):
        loss = reader.loss(*batch)
    loss.backward()
    return float(loss), torch.cat([p.grad.flatten() for p in reader.parameters() if p.grad is not None])


def test_bf16_autocast_reader_step_matches_fp32_and_keeps_fp32_weights():
    torch.manual_seed(0)
    size = ModelSize(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, seq_length=32,
                     hidden_dropout=0.0, attention_dropout=0.0, copy_head=True, copy_continuation=True)
    reader = builders.build_reader(size, 128, 120)
    ids = torch.randint(5, 120, (2, 3, 10))
    labels = ids[:, 0, 2:6]
    dec = torch.cat([torch.zeros(2, 1, dtype=torch.long), labels[:, :-1]], 1)
    batch = (ids, torch.ones_like(ids), dec, labels)
    loss32, grad32 = _loss_and_grads(reader, batch, None)
    from megatron.core.tensor_parallel import layers

    from megatron.emdr2.autocast import install

    install()
    with pytest.raises(RuntimeError, match="dtype"):  # megatron's linear backward, unpatched
        patched = layers.linear_with_grad_accumulation_and_async_allreduce
        layers.linear_with_grad_accumulation_and_async_allreduce = patched.__wrapped__
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = reader.loss(*batch)
            loss.backward()
        finally:
            layers.linear_with_grad_accumulation_and_async_allreduce = patched
    loss16, grad16 = _loss_and_grads(reader, batch, torch.bfloat16)
    assert abs(loss16 - loss32) < 0.02 * abs(loss32)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.99
    assert {p.dtype for p in reader.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in reader.parameters() if p.grad is not None} == {torch.float32}


def test_autocast_sees_weight_updates_within_one_region():
    """The training loop steps the optimizer inside one autocast region: the forward pass must
    read the updated weights, not autocast's cached low-precision copy of the first step's."""
    from megatron.emdr2.autocast import autocast

    layer = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    with autocast("cpu", torch.bfloat16):
        before = layer(x)
        with torch.no_grad():
            layer.weight.mul_(2.0)
        after = layer(x)
    assert not torch.allclose(before.float(), after.float(), atol=1e-2)


def _train(rank, world, autocast, iters):
    from megatron.emdr2.config import (BatchConfig, LoggingConfig, OptimizerSettings, PrecisionConfig,
                                       ScheduleConfig, TrainingConfig)
    from megatron.emdr2.initialize import initialize, shutdown
    from megatron.emdr2.training.loop import Trainer
    from tasks.bert_mlm import TINY, SyntheticMLMTask

    cfg = TrainingConfig(
        precision=PrecisionConfig("fp32", autocast=autocast),
        optimizer=OptimizerSettings(lr=3e-3, weight_decay=0.0),
        schedule=ScheduleConfig(train_iters=iters, lr_warmup_fraction=None, lr_decay_style="constant"),
        batch=BatchConfig(micro_batch_size=8, global_batch_size=8),
        logging=LoggingConfig(log_interval=1000, progress_bar=False),
    )
    initialize(seed=cfg.seed)
    try:
        trainer = Trainer(SyntheticMLMTask(TINY, cfg, num_samples=8), cfg)
        state = trainer.train()
        return {p.dtype for p in trainer.models["bert"].parameters()}, [h["loss"] for h in state.history]
    finally:
        shutdown()


def test_trainer_with_autocast_trains_fp32_weights_like_fp32():
    (dtypes, losses), = run_ranks(_train, 1, "bf16", 12)
    (_, reference), = run_ranks(_train, 1, "none", 12)
    assert dtypes == {torch.float32}
    assert losses[-1] < 0.8 * losses[0], losses
    assert abs(losses[0] - reference[0]) < 0.02 * reference[0]


def test_autocast_refuses_half_precision_weights():
    from megatron.emdr2.arguments import validate
    from megatron.emdr2.config import ConfigError, PrecisionConfig, TrainingConfig

    with pytest.raises(ConfigError, match="--autocast bf16 .* --bf16"):
        validate(TrainingConfig(precision=PrecisionConfig("bf16", autocast="bf16")), 1)


def test_differentiated_cpu_attention_runs_in_fp32_under_bf16_autocast():
    """torch's bf16 flash-attention backward is several times slower than fp32's on a CPU
    (bench/bench_cpu_attention.py): attention that will be differentiated runs in fp32 and
    returns the autocast dtype; attention without autograd keeps bf16."""
    import torch.nn.functional as F

    from megatron.emdr2.autocast import autocast
    from megatron.emdr2.models import fast_attention

    size = ModelSize(num_layers=1, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, seq_length=32,
                     hidden_dropout=0.0, attention_dropout=0.0)
    reader = builders.build_reader(size, 128, 120)
    attention = next(m for m in reader.modules() if isinstance(m, fast_attention.SdpaAttention))
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return real_sdpa(q, k, v, **kw)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 2, 4, 16, generator=g).bfloat16().requires_grad_() for _ in range(3))
    mask = torch.zeros(2, 1, 1, 6, dtype=torch.bool)
    mask[..., 4:] = True
    fast_attention.F.scaled_dot_product_attention = spy
    try:
        with autocast("cpu", torch.bfloat16):
            out = attention(q, k, v, mask)
            with torch.no_grad():
                out_nograd = attention(q, k, v, mask)
    finally:
        fast_attention.F.scaled_dot_product_attention = real_sdpa
    assert seen == [(torch.float32, False), (torch.bfloat16, True)]
    assert out.dtype == out_nograd.dtype == torch.bfloat16
    # fp32 attention of the bf16 inputs, computed independently
    qf, kf, vf = (t.detach().float().permute(1, 2, 0, 3) for t in (q, k, v))
    bias = torch.zeros(mask.shape).masked_fill(mask, -10000.0)
    ref = real_sdpa(qf, kf, vf, attn_mask=bias).permute(2, 0, 1, 3).reshape(6, 2, 64)
    assert torch.allclose(out.float(), ref, atol=1e-2)
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()


# --autocast auto: bf16 only where this CPU runs it natively and faster.

AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}  # a laptop-class CPU on any x86


def _resolve_in_subprocess(requested: str, env_extra: dict) -> tuple[str, str]:
    """(choice, stderr) of resolve_autocast in a fresh process (the CPU ISA is fixed at start-up)."""
    import os
    import subprocess
    import sys

    code = ("import sys; from megatron.emdr2.autocast import resolve_autocast; "
            f"print(resolve_autocast({requested!r}, 'cpu'))")
    env = {**os.environ, **env_extra, "RANK": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1], done.stdout


def test_auto_runs_fp32_where_bf16_is_emulated_and_says_why():
    choice, said = _resolve_in_subprocess("auto", AVX2_ONLY)
    assert choice == "none"
    assert "autocast auto: fp32" in said
    assert "slower" in said or "no AVX512-BF16 or AMX" in said


def test_explicit_bf16_is_kept_with_one_warning_where_emulated():
    import os
    import subprocess
    import sys

    code = ("from megatron.emdr2.autocast import resolve_autocast; "
            "print(resolve_autocast('bf16', 'cpu'), resolve_autocast('bf16', 'cpu'))")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **AVX2_ONLY, "RANK": "0"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["bf16", "bf16"]
    assert done.stderr.count("warning: --autocast bf16") == 1
    assert "slower" in done.stderr and "ms in fp32" in done.stderr


def test_auto_follows_the_probe_on_this_cpu():
    from megatron.emdr2.autocast import cpu_bf16_instructions, probe_cpu_bf16, resolve_autocast

    probe = probe_cpu_bf16()
    expected = "bf16" if cpu_bf16_instructions() and probe.native else "none"
    assert resolve_autocast("auto", "cpu", quiet=True) == expected


def test_auto_is_fp32_on_gpus_and_under_half_precision_and_none_is_none():
    from megatron.emdr2.autocast import resolve_autocast

    assert resolve_autocast("auto", "cuda", quiet=True) == "none"  # the GPU recipe is --bf16 / --fp16
    assert resolve_autocast("auto", "cpu", precision="bf16", quiet=True) == "none"
    assert resolve_autocast("none", "cpu", quiet=True) == "none"
    with pytest.raises(ValueError, match="--autocast 'fp8'"):
        resolve_autocast("fp8", "cpu")


def test_probe_decision_rule():
    from megatron.emdr2.autocast import Bf16Probe

    assert Bf16Probe(True, fp32_ms=10.0, bf16_ms=2.0).native  # AMX / AVX512-BF16
    assert not Bf16Probe(True, fp32_ms=10.0, bf16_ms=400.0).native  # instructions hidden (VM, ISA cap)
    assert not Bf16Probe(True, fp32_ms=10.0, bf16_ms=9.5).native  # no real gain: stay exact
    assert not Bf16Probe(False, fp32_ms=10.0, bf16_ms=2.0).native
    assert "40x slower" in Bf16Probe(True, 10.0, 400.0).describe()


def test_every_autocast_flag_defaults_to_auto(monkeypatch):
    import argparse

    monkeypatch.delenv("EMDR2_AUTOCAST", raising=False)  # conftest pins the suite's commands to none

    from megatron.emdr2.arguments import add_training_args
    from tasks.openqa import common

    training = argparse.ArgumentParser()
    add_training_args(training)
    inference = argparse.ArgumentParser()
    common.add_inference_args(inference)
    assert training.parse_args([]).autocast == "auto"
    assert inference.parse_args(["--load", "x", "--index-dir", "i"]).autocast == "auto"
    monkeypatch.setenv("EMDR2_AUTOCAST", "none")
    pinned = argparse.ArgumentParser()
    add_training_args(pinned)
    assert pinned.parse_args([]).autocast == "none"
    monkeypatch.setenv("EMDR2_AUTOCAST", "fp8")
    from megatron.emdr2.config import ConfigError

    with pytest.raises(ConfigError, match="EMDR2_AUTOCAST='fp8'"):
        add_training_args(argparse.ArgumentParser())


def test_training_config_holds_the_resolved_choice():
    import argparse

    from megatron.emdr2.arguments import add_training_args, training_config_from_args
    from megatron.emdr2.config import ConfigError

    parser = argparse.ArgumentParser()
    add_training_args(parser)
    assert training_config_from_args(parser.parse_args(["--autocast", "none"])).precision.autocast == "none"
    assert training_config_from_args(parser.parse_args(["--bf16"])).precision.autocast == "none"  # auto
    cfg = training_config_from_args(parser.parse_args(["--bf16", "--autocast", "bf16"]))
    from megatron.emdr2.arguments import validate

    with pytest.raises(ConfigError, match="cannot be combined"):
        validate(cfg, 1)


def test_a_refused_command_prints_only_its_error_and_a_running_one_says_its_choice(tmp_path):
    """auto's decision is printed once the flags are known to be good, never before an error."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "EMDR2_AUTOCAST"}
    env.update(AVX2_ONLY, RANK="0")
    bad = subprocess.run([sys.executable, "-m", "tasks.openqa.ict", "--precision", "fp8"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stdout == "", bad.stdout
    assert [l for l in bad.stderr.splitlines() if l.strip()] == [l for l in bad.stderr.splitlines()
                                                                 if "fp8" in l], bad.stderr
    from megatron.emdr2.autocast import announce, resolve_autocast

    announce()  # nothing pending from earlier tests
    assert resolve_autocast("auto", "cuda", quiet=True) == "none"
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        announce()
        announce()
    assert out.getvalue().count("autocast auto: fp32 (on GPUs") == 1
