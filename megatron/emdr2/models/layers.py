"""Layer specs for the towers and the reader, built from megatron-core's local modules.

Two small additions to megatron-core's layers, each needed to load public checkpoints exactly:

- ``TransformerLayer`` in megatron-core 0.16 always takes the residual *before* the layer
  norm (pre-LN) and ignores ``config.apply_residual_connection_post_layernorm``. Original
  BERT takes it after: with that ordering a stack of our layers computes exactly Hugging
  Face's post-LN BERT (see ``convert.py`` for how the norms line up). ``ResidualOrderLayer``
  honours the flag; with the flag off it is megatron-core's layer unchanged.
- T5's relative position bias (``relative_attention.RelativeBiasAttention``).
"""

from __future__ import annotations

import copy

from megatron.core import tensor_parallel
from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
from megatron.core.models.T5.t5_spec import decoder_model_with_local_spec, encoder_model_with_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor

from megatron.emdr2.models.fast_attention import SdpaAttention
from megatron.emdr2.models.fast_linear import FusedColumnParallelLinear, FusedRowParallelLinear


class ResidualOrderLayer(TransformerLayer):
    """megatron-core's TransformerLayer that also supports original-BERT residual ordering.

    With ``config.apply_residual_connection_post_layernorm``:
        y = LN_in(x);  r = y + Attn(y);  z = LN_mlp(r);  out = z + MLP(z)
    (self-attention only: this ordering exists for BERT encoders).
    """

    def _forward_attention(self, hidden_states, attention_mask=None, context=None,
                           context_mask=None, **kwargs):
        if not self.config.apply_residual_connection_post_layernorm:
            return super()._forward_attention(hidden_states, attention_mask, context,
                                              context_mask, **kwargs)
        if context is not None:
            raise ValueError("post-layernorm residual ordering supports encoder layers only")
        normed = self.input_layernorm(hidden_states)
        out_with_bias = self.self_attention(
            normed, attention_mask=attention_mask,
            inference_context=kwargs.get("inference_context"),
            attention_bias=kwargs.get("attention_bias"))
        with self.bias_dropout_add_exec_handler():
            hidden_states = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                out_with_bias, normed, self.hidden_dropout)
        return hidden_states, context

    def _forward_mlp(self, hidden_states, inference_context=None, padding_mask=None):
        if not self.config.apply_residual_connection_post_layernorm:
            return super()._forward_mlp(hidden_states, inference_context, padding_mask)
        normed = self.pre_mlp_layernorm(hidden_states)
        if self.recompute_mlp:  # selective recompute of "mlp", as the parent does
            out_with_bias = tensor_parallel.checkpoint(self.mlp, False, normed)
        else:
            out_with_bias = self.mlp(normed)
        with self.bias_dropout_add_exec_handler():
            out = self.mlp_bda(self.training, self.config.bias_dropout_fusion)(
                out_with_bias, normed, self.hidden_dropout)
        return make_viewless_tensor(inp=out, requires_grad=out.requires_grad, keep_graph=True)


def _with_fused_linears(spec: ModuleSpec) -> ModuleSpec:
    """Bias fused into the matmul when no autograd and one tensor-parallel rank (``fast_linear``)."""
    sub = spec.submodules
    for attn in (sub.self_attention, getattr(sub, "cross_attention", None)):
        if attn is None or not hasattr(attn, "submodules"):
            continue
        for name in ("linear_qkv", "linear_q", "linear_kv"):
            if getattr(attn.submodules, name, None) is not None:
                setattr(attn.submodules, name, FusedColumnParallelLinear)
        attn.submodules.linear_proj = FusedRowParallelLinear
    sub.mlp.submodules.linear_fc1 = FusedColumnParallelLinear
    sub.mlp.submodules.linear_fc2 = FusedRowParallelLinear
    return spec


def bert_layer_spec() -> ModuleSpec:
    """megatron-core's local BERT layer, with the residual-ordering option and fused attention."""
    spec = copy.deepcopy(bert_layer_local_spec)
    spec.module = ResidualOrderLayer
    spec.submodules.self_attention.submodules.core_attention = SdpaAttention
    return _with_fused_linears(spec)


def _with_fast_attention(spec: ModuleSpec) -> ModuleSpec:
    """SdpaAttention (fused when dropout is off; adds T5's relative bias when given) everywhere."""
    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.submodules.core_attention = SdpaAttention
    cross = getattr(spec.submodules, "cross_attention", None)
    if cross is not None and hasattr(cross, "submodules"):
        cross.submodules.core_attention = SdpaAttention
    return _with_fused_linears(spec)


def t5_encoder_layer_spec(relative_bias: bool = False) -> ModuleSpec:
    # The relative bias, when the model has one, reaches the attention as `attention_bias`.
    # ResidualOrderLayer: an encoder warm-started from BERT keeps BERT's post-LN ordering.
    spec = _with_fast_attention(encoder_model_with_local_spec())
    spec.module = ResidualOrderLayer
    return spec


def t5_decoder_layer_spec(relative_bias: bool = False) -> ModuleSpec:
    return _with_fast_attention(decoder_model_with_local_spec())
