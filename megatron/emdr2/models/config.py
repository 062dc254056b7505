"""Builders of megatron-core ``TransformerConfig`` objects for the retriever towers and the reader.

The training loop calls these from its flags; the converters call them from a Hugging Face
config. Everything that decides the *architecture* (norm type, activation, biases, attention
scaling, residual ordering) is set here, so a model and its checkpoint converter always agree.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron.emdr2.config import recompute_flags

PRECISIONS = ("fp32", "fp16", "bf16")

# T5 flavours: Megatron's own T5 (LayerNorm, GeLU, biases, learned absolute positions), the
# original Google T5 (RMSNorm, ReLU, no biases, relative position bias, unscaled attention)
# and T5 v1.1 / Flan-T5 (the same with a gated tanh-GeLU feed-forward).
T5_STYLES = ("megatron", "t5", "t5-gated-gelu")


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GeLU (Hugging Face's "gelu_new", used by T5 v1.1)."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": gelu_tanh, "relu": F.relu}


def _dtype_flags(precision: str) -> dict:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return dict(fp16=precision == "fp16", bf16=precision == "bf16", params_dtype=dtype,
                pipeline_dtype=dtype)


def transformer_config(
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    ffn_hidden_size: Optional[int] = None,
    kv_channels: Optional[int] = None,
    hidden_dropout: float = 0.1,
    attention_dropout: float = 0.1,
    precision: str = "fp32",
    tensor_parallel: int = 1,
    layernorm_epsilon: float = 1e-5,
    normalization: str = "LayerNorm",
    activation: str = "gelu",
    gated_linear_unit: bool = False,
    add_bias_linear: bool = True,
    softmax_scale: Optional[float] = None,
    residual_post_layernorm: bool = False,
    use_cpu_initialization: bool = True,
    init_method_std: float = 0.02,
    recompute_granularity: Optional[str] = None,
    recompute_method: Optional[str] = None,
    recompute_num_layers: Optional[int] = None,
    recompute_modules: Optional[Sequence[str]] = None,
) -> TransformerConfig:
    """A local-spec (no TransformerEngine, no apex) megatron-core config.

    Args:
        num_layers, hidden_size, num_attention_heads: transformer size.
        ffn_hidden_size: feed-forward width (default 4 * hidden_size).
        kv_channels: per-head width (default hidden_size // heads; T5 sets d_kv).
        hidden_dropout, attention_dropout: dropout probabilities.
        precision: "fp32" | "fp16" | "bf16" (parameter dtype and megatron's fp16/bf16 flags).
        tensor_parallel: tensor-parallel size; heads, ffn and vocabulary must divide by it.
        normalization: "LayerNorm" | "RMSNorm".
        activation: "gelu" | "gelu_tanh" | "relu"; gated_linear_unit makes it a GLU.
        add_bias_linear: biases on all linear layers (BERT, Megatron-T5) or none (Google T5).
        softmax_scale: attention logit scale; None = 1/sqrt(kv_channels), 1.0 for Google T5.
        residual_post_layernorm: original-BERT residual ordering (the residual is taken after
            the layer norm), which is how Hugging Face's post-LN BERT maps onto our layers.
        use_cpu_initialization: initialise the full weight then shard it, so a model's weights
            do not depend on the tensor-parallel size (and CPU runs work at all).
        recompute_granularity, recompute_method, recompute_num_layers, recompute_modules:
            activation checkpointing (``recompute_flags``); off by default.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if num_attention_heads % tensor_parallel:
        raise ValueError(f"{num_attention_heads} attention heads do not divide over "
                         f"tensor-parallel size {tensor_parallel}")
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        ffn_hidden_size=ffn_hidden_size or 4 * hidden_size,
        kv_channels=kv_channels,
        hidden_dropout=hidden_dropout,
        attention_dropout=attention_dropout,
        tensor_model_parallel_size=tensor_parallel,
        layernorm_epsilon=layernorm_epsilon,
        normalization=normalization,
        activation_func=ACTIVATIONS[activation],
        gated_linear_unit=gated_linear_unit,
        add_bias_linear=add_bias_linear,
        softmax_scale=softmax_scale,
        apply_residual_connection_post_layernorm=residual_post_layernorm,
        use_cpu_initialization=use_cpu_initialization,
        init_method_std=init_method_std,
        # Fused kernels need compiled CUDA extensions we do not ship; the torch paths are exact.
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        **_dtype_flags(precision),
        **recompute_flags(num_layers, recompute_granularity, recompute_method, recompute_num_layers,
                          recompute_modules),
    )


def bert_config(
    num_layers: int = 12,
    hidden_size: int = 768,
    num_attention_heads: int = 12,
    ffn_hidden_size: Optional[int] = None,
    hidden_dropout: float = 0.1,
    attention_dropout: float = 0.1,
    precision: str = "fp32",
    tensor_parallel: int = 1,
    layernorm_epsilon: float = 1e-12,
    post_layernorm: bool = False,
    **overrides,
) -> TransformerConfig:
    """Config of one BERT retriever tower.

    ``post_layernorm=False`` is Megatron's pre-LN BERT (what the EMDR² release trained);
    ``True`` is the original BERT / Hugging Face layout, needed to load their checkpoints.
    """
    return transformer_config(
        num_layers, hidden_size, num_attention_heads, ffn_hidden_size,
        hidden_dropout=hidden_dropout, attention_dropout=attention_dropout, precision=precision,
        tensor_parallel=tensor_parallel, layernorm_epsilon=layernorm_epsilon,
        activation="gelu", residual_post_layernorm=post_layernorm, **overrides)


def t5_config(
    num_layers: int = 12,
    hidden_size: int = 768,
    num_attention_heads: int = 12,
    ffn_hidden_size: Optional[int] = None,
    kv_channels: Optional[int] = None,
    hidden_dropout: float = 0.1,
    attention_dropout: float = 0.1,
    precision: str = "fp32",
    tensor_parallel: int = 1,
    style: str = "megatron",
    layernorm_epsilon: Optional[float] = None,
    **overrides,
) -> TransformerConfig:
    """Config of the reader's encoder or decoder stack (build one of each if they differ).

    ``style`` is one of ``T5_STYLES``: "megatron" (LayerNorm, GeLU, biases, scaled attention)
    or the Google-T5 layouts "t5" (RMSNorm, ReLU) and "t5-gated-gelu" (RMSNorm, gated tanh-GeLU),
    both without biases and without the 1/sqrt(d) attention scaling (T5 folds it into init).
    """
    if style not in T5_STYLES:
        raise ValueError(f"style must be one of {T5_STYLES}, got {style!r}")
    google = style != "megatron"
    return transformer_config(
        num_layers, hidden_size, num_attention_heads, ffn_hidden_size, kv_channels,
        hidden_dropout=hidden_dropout, attention_dropout=attention_dropout, precision=precision,
        tensor_parallel=tensor_parallel,
        layernorm_epsilon=layernorm_epsilon if layernorm_epsilon is not None
        else (1e-6 if google else 1e-5),
        normalization="RMSNorm" if google else "LayerNorm",
        activation={"megatron": "gelu", "t5": "relu", "t5-gated-gelu": "gelu_tanh"}[style],
        gated_linear_unit=style == "t5-gated-gelu",
        add_bias_linear=not google,
        softmax_scale=1.0 if google else None,
        **overrides,
    )
