"""Hugging Face <-> megatron-core state dicts for the BERT towers and the T5 reader.

Pure tensor re-arrangement (no model is built, no process group needed):

- names: HF's module paths -> megatron-core's (``convert.py`` is the single place that knows both);
- fused attention projections: megatron keeps Q, K, V in one matrix, interleaved per head
  (rows ``[q_h; k_h; v_h]`` for head h, see ``SelfAttention.get_query_key_value_tensors``),
  and cross-attention's K, V as ``[k_h; v_h]`` per head;
- norms: Hugging Face BERT is post-LN; it maps onto megatron layers with original-BERT residual
  ordering by moving each LayerNorm to the *next* sub-layer's input norm (the embedding norm
  becomes layer 0's input norm, layer i's output norm becomes layer i+1's input norm, the last
  one the block's final norm). Megatron-style pre-LN towers export to HF's ``MegatronBertModel``;
- tensor parallelism: column-parallel weights split on the output dim (rows), row-parallel on
  the input dim (columns); a gated MLP's fc1 splits its gate and its up half separately;
  the vocabulary splits on rows, after padding to a size divisible by the TP size.

Every conversion checks names and shapes on the way in and raises ``ConversionError`` naming the
offending parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

StateDict = Dict[str, Optional[Tensor]]

# Hugging Face entries that are not parameters, or are heads/poolers a retriever does not use.
HF_BERT_IGNORED_PREFIXES = ("embeddings.position_ids", "pooler.", "cls.")
HF_T5_IGNORED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")
# Present in Google's original t5-* files, never used (transformers ignores it as well).
HF_T5_UNUSED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


class ConversionError(ValueError):
    """A checkpoint that does not fit the expected architecture; the message names the parameter."""


# ============================================================== checks
def _shape(t) -> Optional[tuple]:
    return None if t is None else tuple(t.shape)


def check_state_dict(sd: Mapping[str, Optional[Tensor]], expected: Mapping[str, Optional[tuple]],
                     what: str, optional: Iterable[str] = ()) -> None:
    """Raise ConversionError naming every missing, unexpected or wrongly shaped parameter.

    ``expected`` maps names to shapes (None: any value, e.g. megatron's ``_extra_state``).
    """
    optional = set(optional)
    problems = []
    for name, shape in expected.items():
        if name not in sd:
            if name not in optional and not name.endswith("._extra_state"):
                problems.append(f"missing parameter '{name}'")
        elif shape is not None and _shape(sd[name]) != tuple(shape):
            problems.append(f"parameter '{name}' has shape {_shape(sd[name])}, expected "
                            f"{tuple(shape)}")
    for name in sd:
        if name not in expected:
            problems.append(f"unexpected parameter '{name}'")
    if problems:
        shown = "; ".join(problems[:8]) + ("" if len(problems) <= 8 else
                                          f"; and {len(problems) - 8} more")
        raise ConversionError(f"{what}: {shown}")


def _require(sd, name, what):
    if name not in sd:
        raise ConversionError(f"{what}: missing parameter '{name}'")
    return sd[name]


# ============================================================== fused attention layouts
def fuse_heads(parts: Sequence[Tensor], num_heads: int) -> Tensor:
    """[q; k; v] (each [heads*hn, ...]) -> megatron's per-head interleaving [heads*len(parts)*hn, ...]."""
    per_head = [p.reshape(num_heads, -1, *p.shape[1:]) for p in parts]
    fused = torch.stack(per_head, dim=1)  # [heads, parts, hn, ...]
    return fused.reshape(-1, *parts[0].shape[1:])


def unfuse_heads(fused: Tensor, num_heads: int, num_parts: int) -> List[Tensor]:
    """Inverse of ``fuse_heads``."""
    grouped = fused.reshape(num_heads, num_parts, -1, *fused.shape[1:])
    return [grouped[:, i].reshape(-1, *fused.shape[1:]).contiguous() for i in range(num_parts)]


# ============================================================== tensor parallelism
_COLUMN_PARALLEL = ("word_embeddings.weight", "linear_qkv.weight", "linear_qkv.bias",
                    "linear_q.weight", "linear_q.bias", "linear_kv.weight", "linear_kv.bias",
                    "linear_fc1.weight", "linear_fc1.bias", "output_layer.weight",
                    "output_layer.bias")
_ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")


def partition_dim(name: str) -> Optional[int]:
    """0 for column-parallel (output rows), 1 for row-parallel (input columns), None if replicated."""
    if name.endswith(_COLUMN_PARALLEL):
        return 0
    if name.endswith(_ROW_PARALLEL):
        return 1
    return None


def tp_split(sd: StateDict, tp_size: int, tp_rank: int, gated_mlp: bool = False,
             num_heads: Optional[int] = None) -> StateDict:
    """The ``tp_rank`` shard of a full (TP=1) megatron state dict.

    ``num_heads`` (when given) is checked to divide over the ranks: fused QKV rows split per
    whole head, and a row count that happens to divide is not enough.
    """
    if not 0 <= tp_rank < tp_size:
        raise ConversionError(f"tensor-parallel rank {tp_rank} outside size {tp_size}")
    if num_heads is not None and num_heads % tp_size:
        raise ConversionError(f"{num_heads} attention heads do not divide over tensor-parallel "
                              f"size {tp_size}")
    out = {}
    for name, t in sd.items():
        dim = None if t is None else partition_dim(name)
        if dim is None or tp_size == 1:
            out[name] = t
            continue
        if t.size(dim) % tp_size:
            raise ConversionError(f"parameter '{name}' of shape {tuple(t.shape)} does not split "
                                  f"into {tp_size} tensor-parallel shards along dim {dim}")
        if gated_mlp and name.endswith(("linear_fc1.weight", "linear_fc1.bias")):
            gate, up = t.chunk(2, dim=0)  # each rank holds [gate_r; up_r]
            out[name] = torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]])
        else:
            out[name] = t.chunk(tp_size, dim=dim)[tp_rank]
        out[name] = out[name].clone()
    return out


def tp_merge(shards: Sequence[StateDict], gated_mlp: bool = False) -> StateDict:
    """Reassemble a full state dict from all tensor-parallel ranks' state dicts (in rank order)."""
    if not shards:
        raise ConversionError("no tensor-parallel shards given")
    names = list(shards[0])
    for r, shard in enumerate(shards[1:], 1):
        if set(shard) != set(names):
            diff = sorted(set(shard) ^ set(names))
            raise ConversionError(f"tensor-parallel rank {r} has different parameters than rank 0, "
                                  f"e.g. '{diff[0]}'")
    if len(shards) == 1:
        return dict(shards[0])
    out = {}
    for name in names:
        parts = [s[name] for s in shards]
        dim = None if parts[0] is None else partition_dim(name)
        if dim is None:
            if parts[0] is not None and any(not torch.equal(parts[0], p) for p in parts[1:]):
                raise ConversionError(f"replicated parameter '{name}' differs between "
                                      f"tensor-parallel ranks")
            out[name] = parts[0]
        elif gated_mlp and name.endswith(("linear_fc1.weight", "linear_fc1.bias")):
            halves = [p.chunk(2, dim=0) for p in parts]
            out[name] = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        else:
            out[name] = torch.cat(parts, dim=dim)
    return out


def _as_full(sd_or_shards, gated_mlp=False) -> StateDict:
    if isinstance(sd_or_shards, Mapping):
        return dict(sd_or_shards)
    return tp_merge(list(sd_or_shards), gated_mlp)


def _pad_rows(t: Tensor, rows: Optional[int], name: str) -> Tensor:
    if rows is None or rows == t.size(0):
        return t
    if rows < t.size(0):
        raise ConversionError(f"padded vocabulary {rows} is smaller than the {t.size(0)} rows "
                              f"of '{name}'")
    return torch.cat([t, t.new_zeros(rows - t.size(0), *t.shape[1:])])


def _linear_keys(prefix: str, shape_w, bias: bool) -> dict:
    keys = {f"{prefix}.weight": shape_w, f"{prefix}._extra_state": None}
    if bias:
        keys[f"{prefix}.bias"] = (shape_w[0],)
    return keys


def _norm_keys(prefix: str, hidden: int, bias: bool) -> dict:
    keys = {f"{prefix}.weight": (hidden,)}
    if bias:
        keys[f"{prefix}.bias"] = (hidden,)
    return keys


# ============================================================== BERT
@dataclass(frozen=True)
class BertShape:
    num_layers: int
    hidden: int
    num_heads: int
    ffn: int
    vocab: int
    max_positions: int
    tokentypes: int


def _strip_prefix(sd: Mapping[str, Tensor], prefix: str) -> dict:
    """Drop a model-class prefix ("bert.") and rename TF-era LayerNorm gamma/beta."""
    if sd and all(k.startswith(prefix) for k in sd if not k.startswith("cls.")):
        sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
    renamed = {}
    for k, v in sd.items():
        if "LayerNorm." in k and k.endswith((".gamma", ".beta")):
            k = k.rsplit(".", 1)[0] + (".weight" if k.endswith(".gamma") else ".bias")
        renamed[k] = v
    return renamed


def hf_bert_layout(hf_sd: Mapping[str, Tensor]) -> str:
    """"bert" (post-LN, BertModel) or "megatron_bert" (pre-LN, MegatronBertModel)."""
    sd = _strip_prefix(hf_sd, "bert.")
    return "megatron_bert" if "encoder.ln.weight" in sd else "bert"


def _bert_shape_from_hf(sd, num_layers, num_heads) -> BertShape:
    what = "Hugging Face BERT checkpoint"
    word = _require(sd, "embeddings.word_embeddings.weight", what)
    ffn = _require(sd, "encoder.layer.0.intermediate.dense.weight", what).size(0)
    types = sd.get("embeddings.token_type_embeddings.weight")
    return BertShape(num_layers, word.size(1), num_heads, ffn, word.size(0),
                     _require(sd, "embeddings.position_embeddings.weight", what).size(0),
                     0 if types is None else types.size(0))


def hf_bert_expected(s: BertShape, layout: str = "bert") -> dict:
    H, F = s.hidden, s.ffn
    keys = {"embeddings.word_embeddings.weight": (s.vocab, H),
            "embeddings.position_embeddings.weight": (s.max_positions, H)}
    if s.tokentypes:
        keys["embeddings.token_type_embeddings.weight"] = (s.tokentypes, H)
    if layout == "bert":
        keys.update({"embeddings.LayerNorm.weight": (H,), "embeddings.LayerNorm.bias": (H,)})
    for i in range(s.num_layers):
        p = f"encoder.layer.{i}."
        for proj in ("query", "key", "value"):
            keys[p + f"attention.self.{proj}.weight"] = (H, H)
            keys[p + f"attention.self.{proj}.bias"] = (H,)
        keys.update({p + "attention.output.dense.weight": (H, H),
                     p + "attention.output.dense.bias": (H,),
                     p + "intermediate.dense.weight": (F, H), p + "intermediate.dense.bias": (F,),
                     p + "output.dense.weight": (H, F), p + "output.dense.bias": (H,)})
        if layout == "bert":
            keys.update(_norm_keys(p + "attention.output.LayerNorm", H, True))
            keys.update(_norm_keys(p + "output.LayerNorm", H, True))
        else:
            keys.update(_norm_keys(p + "attention.ln", H, True))
            keys.update(_norm_keys(p + "ln", H, True))
    if layout == "megatron_bert":
        keys.update(_norm_keys("encoder.ln", H, True))
    return keys


def megatron_bert_expected(s: BertShape) -> dict:
    """Names and full (TP=1) shapes of ``BertTower``'s state dict."""
    H, F = s.hidden, s.ffn
    keys = {"embedding.word_embeddings.weight": (s.vocab, H),
            "embedding.position_embeddings.weight": (s.max_positions, H)}
    if s.tokentypes:
        keys["embedding.tokentype_embeddings.weight"] = (s.tokentypes, H)
    for i in range(s.num_layers):
        p = f"encoder.layers.{i}."
        keys.update(_norm_keys(p + "input_layernorm", H, True))
        keys.update(_linear_keys(p + "self_attention.linear_qkv", (3 * H, H), True))
        keys.update(_linear_keys(p + "self_attention.linear_proj", (H, H), True))
        keys.update(_norm_keys(p + "pre_mlp_layernorm", H, True))
        keys.update(_linear_keys(p + "mlp.linear_fc1", (F, H), True))
        keys.update(_linear_keys(p + "mlp.linear_fc2", (H, F), True))
    keys.update(_norm_keys("encoder.final_layernorm", H, True))
    return keys


def _hf_bert_norm_names(layout: str, num_layers: int) -> Dict[str, str]:
    """megatron norm prefix -> HF norm prefix, for the given HF layout."""
    names = {}
    if layout == "bert":  # post-LN: every norm moves to the next sub-layer's input
        names["encoder.layers.0.input_layernorm"] = "embeddings.LayerNorm"
        for i in range(num_layers):
            names[f"encoder.layers.{i}.pre_mlp_layernorm"] = f"encoder.layer.{i}.attention.output.LayerNorm"
            nxt = (f"encoder.layers.{i + 1}.input_layernorm" if i + 1 < num_layers
                   else "encoder.final_layernorm")
            names[nxt] = f"encoder.layer.{i}.output.LayerNorm"
    else:
        for i in range(num_layers):
            names[f"encoder.layers.{i}.input_layernorm"] = f"encoder.layer.{i}.attention.ln"
            names[f"encoder.layers.{i}.pre_mlp_layernorm"] = f"encoder.layer.{i}.ln"
        names["encoder.final_layernorm"] = "encoder.ln"
    return names


_BERT_LINEARS = {"self_attention.linear_proj": "attention.output.dense",
                 "mlp.linear_fc1": "intermediate.dense", "mlp.linear_fc2": "output.dense"}


def hf_bert_to_megatron(hf_state_dict: Mapping[str, Tensor], num_layers: int, num_heads: int,
                        tp_size: int = 1, tp_rank: int = 0,
                        padded_vocab_size: Optional[int] = None) -> StateDict:
    """A Hugging Face BERT (``BertModel``/``BertForPreTraining`` or ``MegatronBertModel``)
    state dict -> ``BertTower`` state dict for one tensor-parallel rank.

    Build the tower with ``bert_config(post_layernorm=(hf_bert_layout(sd) == "bert"))``.
    Poolers and pre-training heads are dropped (``hf_bert_extras`` returns them).
    """
    sd = _strip_prefix(hf_state_dict, "bert.")
    sd = {k: v for k, v in sd.items() if not k.startswith(HF_BERT_IGNORED_PREFIXES)}
    layout = hf_bert_layout(sd)
    s = _bert_shape_from_hf(sd, num_layers, num_heads)
    if s.hidden % num_heads:
        raise ConversionError(f"hidden size {s.hidden} is not divisible by {num_heads} heads")
    check_state_dict(sd, hf_bert_expected(s, layout), f"Hugging Face BERT checkpoint ({layout})")

    out: StateDict = {
        "embedding.word_embeddings.weight": _pad_rows(sd["embeddings.word_embeddings.weight"],
                                                      padded_vocab_size, "word_embeddings"),
        "embedding.position_embeddings.weight": sd["embeddings.position_embeddings.weight"],
    }
    if s.tokentypes:
        out["embedding.tokentype_embeddings.weight"] = sd["embeddings.token_type_embeddings.weight"]
    for ours, theirs in _hf_bert_norm_names(layout, num_layers).items():
        out[ours + ".weight"], out[ours + ".bias"] = sd[theirs + ".weight"], sd[theirs + ".bias"]
    for i in range(num_layers):
        p, q = f"encoder.layers.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            out[p + f"self_attention.linear_qkv.{kind}"] = fuse_heads(
                [sd[q + f"attention.self.{n}.{kind}"] for n in ("query", "key", "value")], num_heads)
            for ours, theirs in _BERT_LINEARS.items():
                out[p + f"{ours}.{kind}"] = sd[q + f"{theirs}.{kind}"]
        for ours in ("self_attention.linear_qkv", *_BERT_LINEARS):
            out[p + ours + "._extra_state"] = None
    out = {k: (v.clone() if v is not None else None) for k, v in out.items()}
    return tp_split(out, tp_size, tp_rank, num_heads=num_heads)


def hf_bert_extras(hf_state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """The pooler (and nothing else) of a HF BERT checkpoint, to carry through a round trip."""
    sd = _strip_prefix(hf_state_dict, "bert.")
    return {k: v for k, v in sd.items() if k.startswith("pooler.")}


def megatron_to_hf_bert(state_dict: Union[StateDict, Sequence[StateDict]], num_layers: int,
                        num_heads: int, post_layernorm: bool = True,
                        vocab_size: Optional[int] = None,
                        extras: Optional[Mapping[str, Tensor]] = None) -> Dict[str, Tensor]:
    """``BertTower`` state dict (or all TP ranks' state dicts, in rank order) -> Hugging Face.

    A post-LN tower gives ``BertModel`` weights, a pre-LN (Megatron) tower ``MegatronBertModel``
    weights. ``vocab_size`` drops vocabulary padding rows; ``extras`` (e.g. a pooler) are
    copied through.
    """
    sd = _as_full(state_dict)
    what = "megatron BERT tower checkpoint"
    word = _require(sd, "embedding.word_embeddings.weight", what)
    pos = _require(sd, "embedding.position_embeddings.weight", what)
    fc1 = _require(sd, "encoder.layers.0.mlp.linear_fc1.weight", what)
    types = sd.get("embedding.tokentype_embeddings.weight")
    s = BertShape(num_layers, word.size(1), num_heads, fc1.size(0), word.size(0), pos.size(0),
                  0 if types is None else types.size(0))
    check_state_dict(sd, megatron_bert_expected(s), what)
    layout = "bert" if post_layernorm else "megatron_bert"

    vocab = vocab_size or s.vocab
    out = {"embeddings.word_embeddings.weight": word[:vocab],
           "embeddings.position_embeddings.weight": pos}
    if types is not None:
        out["embeddings.token_type_embeddings.weight"] = types
    for ours, theirs in _hf_bert_norm_names(layout, num_layers).items():
        out[theirs + ".weight"], out[theirs + ".bias"] = sd[ours + ".weight"], sd[ours + ".bias"]
    for i in range(num_layers):
        p, q = f"encoder.layers.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            qkv = unfuse_heads(sd[p + f"self_attention.linear_qkv.{kind}"], num_heads, 3)
            for n, t in zip(("query", "key", "value"), qkv):
                out[q + f"attention.self.{n}.{kind}"] = t
            for ours, theirs in _BERT_LINEARS.items():
                out[q + f"{theirs}.{kind}"] = sd[p + f"{ours}.{kind}"]
    out = {k: v.clone().contiguous() for k, v in out.items()}
    out.update({k: v.clone() for k, v in (extras or {}).items()})
    return out


# ============================================================== T5
@dataclass(frozen=True)
class T5Shape:
    encoder_layers: int
    decoder_layers: int
    hidden: int
    num_heads: int
    kv_channels: int
    ffn: int
    vocab: int
    gated: bool
    tied: bool
    buckets: int


def _count_layers(sd, prefix) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def hf_t5_expected(s: T5Shape) -> dict:
    H, D, F = s.hidden, s.num_heads * s.kv_channels, s.ffn
    keys = {"shared.weight": (s.vocab, H)}
    if not s.tied:
        keys["lm_head.weight"] = (s.vocab, H)
    for stack, n in (("encoder", s.encoder_layers), ("decoder", s.decoder_layers)):
        keys[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (s.buckets, s.num_heads)
        keys[f"{stack}.final_layer_norm.weight"] = (H,)
        for i in range(n):
            p = f"{stack}.block.{i}.layer."
            attn = [("0", "SelfAttention")] + ([("1", "EncDecAttention")] if stack == "decoder" else [])
            for idx, name in attn:
                keys[p + f"{idx}.layer_norm.weight"] = (H,)
                for proj in ("q", "k", "v"):
                    keys[p + f"{idx}.{name}.{proj}.weight"] = (D, H)
                keys[p + f"{idx}.{name}.o.weight"] = (H, D)
            f = "2" if stack == "decoder" else "1"
            keys[p + f"{f}.layer_norm.weight"] = (H,)
            for w in (("wi_0", "wi_1") if s.gated else ("wi",)):
                keys[p + f"{f}.DenseReluDense.{w}.weight"] = (F, H)
            keys[p + f"{f}.DenseReluDense.wo.weight"] = (H, F)
    return keys


def megatron_t5_expected(s: T5Shape) -> dict:
    """Names and full (TP=1) shapes of a relative-position, bias-free ``FiDReader``."""
    H, D, F = s.hidden, s.num_heads * s.kv_channels, s.ffn
    keys = {"embedding.word_embeddings.weight": (s.vocab, H),
            "encoder_relative_pos_emb.relative_attention_bias.weight": (s.buckets, s.num_heads),
            "decoder_relative_pos_emb.relative_attention_bias.weight": (s.buckets, s.num_heads)}
    for stack, n in (("encoder", s.encoder_layers), ("decoder", s.decoder_layers)):
        for i in range(n):
            p = f"{stack}.layers.{i}."
            keys.update(_norm_keys(p + "input_layernorm", H, False))
            keys.update(_linear_keys(p + "self_attention.linear_qkv", (3 * D, H), False))
            keys.update(_linear_keys(p + "self_attention.linear_proj", (H, D), False))
            if stack == "decoder":
                keys.update(_norm_keys(p + "pre_cross_attn_layernorm", H, False))
                keys.update(_linear_keys(p + "cross_attention.linear_q", (D, H), False))
                keys.update(_linear_keys(p + "cross_attention.linear_kv", (2 * D, H), False))
                keys.update(_linear_keys(p + "cross_attention.linear_proj", (H, D), False))
            keys.update(_norm_keys(p + "pre_mlp_layernorm", H, False))
            keys.update(_linear_keys(p + "mlp.linear_fc1", ((2 if s.gated else 1) * F, H), False))
            keys.update(_linear_keys(p + "mlp.linear_fc2", (H, F), False))
        keys.update(_norm_keys(f"{stack}.final_layernorm", H, False))
    for head in ("lm_head.output_layer", "output_layer"):  # megatron registers the head twice
        if s.tied:  # megatron's tied head has a bias; Google T5's has none (kept at zero)
            keys.update({f"{head}.bias": (s.vocab,), f"{head}._extra_state": None})
        else:
            keys.update(_linear_keys(head, (s.vocab, H), False))
    return keys


def hf_t5_is_tied(hf_state_dict: Mapping[str, Tensor]) -> bool:
    """Whether a HF T5 checkpoint's LM head is the input embedding (absent or equal)."""
    head = hf_state_dict.get("lm_head.weight")
    return head is None or ("shared.weight" in hf_state_dict
                            and torch.equal(head, hf_state_dict["shared.weight"]))


def hf_t5_scales_decoder_output(hf_config) -> bool:
    """Original T5 scales the decoder output by d_model**-0.5 before the head; T5 v1.1 does not.
    (transformers >= 5 says so in ``scale_decoder_outputs``; older configs in
    ``tie_word_embeddings``.)"""
    return bool(getattr(hf_config, "scale_decoder_outputs",
                        getattr(hf_config, "tie_word_embeddings", True)))


def hf_t5_to_megatron(hf_state_dict: Mapping[str, Tensor], num_heads: int,
                      tie_word_embeddings: Optional[bool] = None, tp_size: int = 1,
                      tp_rank: int = 0, padded_vocab_size: Optional[int] = None) -> StateDict:
    """A Hugging Face ``T5ForConditionalGeneration`` state dict -> ``FiDReader`` state dict
    (relative positions; see ``reader_from_hf_t5_config``) for one tensor-parallel rank.

    ``tie_word_embeddings``: whether the LM head is the embedding; default: inferred with
    ``hf_t5_is_tied`` (T5 v1.1 files carry a separate head; transformers 5 always ties).
    """
    what = "Hugging Face T5 checkpoint"
    sd = {k: v for k, v in hf_state_dict.items() if k not in HF_T5_UNUSED}
    shared = _require(sd, "shared.weight", what)
    if tie_word_embeddings is None:
        tie_word_embeddings = hf_t5_is_tied(sd)
    for alias in HF_T5_IGNORED:
        if alias in sd and (tie_word_embeddings or alias != "lm_head.weight"):
            if not torch.equal(sd[alias], shared):
                raise ConversionError(f"{what}: parameter '{alias}' should be tied to "
                                      f"'shared.weight' but differs")
            del sd[alias]
    q0 = _require(sd, "encoder.block.0.layer.0.SelfAttention.q.weight", what)
    bias = _require(sd, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", what)
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    ffn = _require(sd, "encoder.block.0.layer.1.DenseReluDense."
                   + ("wi_0" if gated else "wi") + ".weight", what).size(0)
    if q0.size(0) % num_heads:
        raise ConversionError(f"attention width {q0.size(0)} is not divisible by {num_heads} heads")
    s = T5Shape(_count_layers(sd, "encoder.block."), _count_layers(sd, "decoder.block."),
                shared.size(1), num_heads, q0.size(0) // num_heads, ffn, shared.size(0), gated,
                tie_word_embeddings, bias.size(0))
    check_state_dict(sd, hf_t5_expected(s), what)

    out: StateDict = {
        "embedding.word_embeddings.weight": _pad_rows(shared, padded_vocab_size, "shared.weight"),
        "encoder_relative_pos_emb.relative_attention_bias.weight":
            sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"],
        "decoder_relative_pos_emb.relative_attention_bias.weight":
            sd["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"],
    }
    for stack, n in (("encoder", s.encoder_layers), ("decoder", s.decoder_layers)):
        for i in range(n):
            p, q = f"{stack}.layers.{i}.", f"{stack}.block.{i}.layer."
            out[p + "input_layernorm.weight"] = sd[q + "0.layer_norm.weight"]
            out[p + "self_attention.linear_qkv.weight"] = fuse_heads(
                [sd[q + f"0.SelfAttention.{x}.weight"] for x in "qkv"], num_heads)
            out[p + "self_attention.linear_proj.weight"] = sd[q + "0.SelfAttention.o.weight"]
            f = "1"
            if stack == "decoder":
                out[p + "pre_cross_attn_layernorm.weight"] = sd[q + "1.layer_norm.weight"]
                out[p + "cross_attention.linear_q.weight"] = sd[q + "1.EncDecAttention.q.weight"]
                out[p + "cross_attention.linear_kv.weight"] = fuse_heads(
                    [sd[q + f"1.EncDecAttention.{x}.weight"] for x in "kv"], num_heads)
                out[p + "cross_attention.linear_proj.weight"] = sd[q + "1.EncDecAttention.o.weight"]
                f = "2"
            out[p + "pre_mlp_layernorm.weight"] = sd[q + f"{f}.layer_norm.weight"]
            ff = q + f"{f}.DenseReluDense."
            out[p + "mlp.linear_fc1.weight"] = (
                torch.cat([sd[ff + "wi_0.weight"], sd[ff + "wi_1.weight"]]) if gated
                else sd[ff + "wi.weight"])  # megatron's GLU: act(first half) * second half
            out[p + "mlp.linear_fc2.weight"] = sd[ff + "wo.weight"]
        out[f"{stack}.final_layernorm.weight"] = sd[f"{stack}.final_layer_norm.weight"]
    vocab = padded_vocab_size or s.vocab
    for head in ("lm_head.output_layer", "output_layer"):
        if tie_word_embeddings:
            out[f"{head}.bias"] = torch.zeros(vocab, dtype=shared.dtype)
        else:
            out[f"{head}.weight"] = _pad_rows(sd["lm_head.weight"], padded_vocab_size, "lm_head.weight")
        out[f"{head}._extra_state"] = None
    for k in [k for k in out if k.endswith(".weight") and ("linear_" in k)]:
        out.setdefault(k[:-len(".weight")] + "._extra_state", None)
    out = {k: (v.clone() if v is not None else None) for k, v in out.items()}
    return tp_split(out, tp_size, tp_rank, gated_mlp=gated, num_heads=num_heads)


def megatron_to_hf_t5(state_dict: Union[StateDict, Sequence[StateDict]], num_heads: int,
                      gated: Optional[bool] = None,
                      vocab_size: Optional[int] = None) -> Dict[str, Tensor]:
    """``FiDReader`` state dict (or all TP ranks', in rank order) -> Hugging Face
    ``T5ForConditionalGeneration`` state dict (with its tied aliases; an untied reader's own
    head goes to ``lm_head.weight``).

    ``gated`` (gated-GeLU MLP) is needed to merge tensor-parallel shards of fc1; with one
    state dict it is inferred from the fc1/fc2 shapes.
    """
    what = "megatron T5 reader checkpoint"
    shards = [state_dict] if isinstance(state_dict, Mapping) else list(state_dict)
    if any(k.startswith("copy_head.") for k in shards[0]):
        raise ConversionError(f"{what}: has a copy head, which Hugging Face T5 has no place for")
    if gated is None:
        fc1 = _require(shards[0], "encoder.layers.0.mlp.linear_fc1.weight", what)
        fc2 = _require(shards[0], "encoder.layers.0.mlp.linear_fc2.weight", what)
        gated = fc1.size(0) == 2 * fc2.size(1)
    sd = _as_full(shards, gated_mlp=gated)
    tie_word_embeddings = "lm_head.output_layer.weight" not in sd
    word = _require(sd, "embedding.word_embeddings.weight", what)
    qkv = _require(sd, "encoder.layers.0.self_attention.linear_qkv.weight", what)
    bias = _require(sd, "encoder_relative_pos_emb.relative_attention_bias.weight", what)
    fc2 = _require(sd, "encoder.layers.0.mlp.linear_fc2.weight", what)
    s = T5Shape(_count_layers(sd, "encoder.layers."), _count_layers(sd, "decoder.layers."),
                word.size(1), num_heads, qkv.size(0) // (3 * num_heads), fc2.size(1), word.size(0),
                gated, tie_word_embeddings, bias.size(0))
    check_state_dict(sd, megatron_t5_expected(s), what)
    if tie_word_embeddings:
        for head in ("lm_head.output_layer.bias", "output_layer.bias"):
            if torch.count_nonzero(sd[head]):
                raise ConversionError(f"{what}: parameter '{head}' is non-zero; Hugging Face T5 "
                                      f"has no output bias to hold it")
    vocab = vocab_size or s.vocab
    out = {"shared.weight": word[:vocab],
           "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
               sd["encoder_relative_pos_emb.relative_attention_bias.weight"],
           "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
               sd["decoder_relative_pos_emb.relative_attention_bias.weight"]}
    for stack, n in (("encoder", s.encoder_layers), ("decoder", s.decoder_layers)):
        for i in range(n):
            p, q = f"{stack}.layers.{i}.", f"{stack}.block.{i}.layer."
            out[q + "0.layer_norm.weight"] = sd[p + "input_layernorm.weight"]
            for x, t in zip("qkv", unfuse_heads(sd[p + "self_attention.linear_qkv.weight"], num_heads, 3)):
                out[q + f"0.SelfAttention.{x}.weight"] = t
            out[q + "0.SelfAttention.o.weight"] = sd[p + "self_attention.linear_proj.weight"]
            f = "1"
            if stack == "decoder":
                out[q + "1.layer_norm.weight"] = sd[p + "pre_cross_attn_layernorm.weight"]
                out[q + "1.EncDecAttention.q.weight"] = sd[p + "cross_attention.linear_q.weight"]
                for x, t in zip("kv", unfuse_heads(sd[p + "cross_attention.linear_kv.weight"], num_heads, 2)):
                    out[q + f"1.EncDecAttention.{x}.weight"] = t
                out[q + "1.EncDecAttention.o.weight"] = sd[p + "cross_attention.linear_proj.weight"]
                f = "2"
            out[q + f"{f}.layer_norm.weight"] = sd[p + "pre_mlp_layernorm.weight"]
            ff = q + f"{f}.DenseReluDense."
            fc1 = sd[p + "mlp.linear_fc1.weight"]
            if gated:
                out[ff + "wi_0.weight"], out[ff + "wi_1.weight"] = fc1.chunk(2, dim=0)
            else:
                out[ff + "wi.weight"] = fc1
            out[ff + "wo.weight"] = sd[p + "mlp.linear_fc2.weight"]
        out[f"{stack}.final_layer_norm.weight"] = sd[f"{stack}.final_layernorm.weight"]
    out = {k: v.clone().contiguous() for k, v in out.items()}
    out["lm_head.weight"] = (out["shared.weight"] if tie_word_embeddings
                             else sd["lm_head.output_layer.weight"][:vocab].clone())
    out["encoder.embed_tokens.weight"] = out["shared.weight"]
    out["decoder.embed_tokens.weight"] = out["shared.weight"]
    return out


# ============================================================== model builders from HF configs
def bert_tower_from_hf_config(hf_config, layout: str = "bert", tensor_parallel: int = 1,
                              precision: str = "fp32", padded_vocab_size: Optional[int] = None,
                              **overrides):
    """A ``BertTower`` with the architecture of a HF ``BertConfig`` (needs megatron initialised)."""
    from megatron.emdr2.models.bert_tower import BertTower
    from megatron.emdr2.models.config import bert_config

    if getattr(hf_config, "hidden_act", "gelu") != "gelu":
        raise ConversionError(f"hidden_act {hf_config.hidden_act!r} is not supported (gelu only)")
    cfg = bert_config(hf_config.num_hidden_layers, hf_config.hidden_size,
                      hf_config.num_attention_heads, hf_config.intermediate_size,
                      hidden_dropout=hf_config.hidden_dropout_prob,
                      attention_dropout=hf_config.attention_probs_dropout_prob,
                      precision=precision, tensor_parallel=tensor_parallel,
                      layernorm_epsilon=hf_config.layer_norm_eps,
                      post_layernorm=layout == "bert", **overrides)
    return BertTower(cfg, padded_vocab_size or hf_config.vocab_size,
                     hf_config.max_position_embeddings, hf_config.type_vocab_size)


def reader_from_hf_t5_config(hf_config, tied: Optional[bool] = None, tensor_parallel: int = 1,
                             precision: str = "fp32", padded_vocab_size: Optional[int] = None,
                             **overrides):
    """A ``FiDReader`` with the architecture of a HF ``T5Config`` (needs megatron initialised).

    ``tied``: LM head shared with the embedding (default: the config's tie_word_embeddings;
    pass ``hf_t5_is_tied(state_dict)`` for checkpoints with a separate head).
    """
    from megatron.emdr2.models.config import t5_config
    from megatron.emdr2.models.fid import FiDReader

    style = {"relu": "t5", "gated-gelu": "t5-gated-gelu"}.get(hf_config.feed_forward_proj)
    if style is None:
        raise ConversionError(f"feed_forward_proj {hf_config.feed_forward_proj!r} is not "
                              f"supported (relu or gated-gelu)")

    def stack(layers):
        return t5_config(layers, hf_config.d_model, hf_config.num_heads, hf_config.d_ff,
                         kv_channels=hf_config.d_kv, hidden_dropout=hf_config.dropout_rate,
                         attention_dropout=hf_config.dropout_rate, precision=precision,
                         tensor_parallel=tensor_parallel, style=style,
                         layernorm_epsilon=hf_config.layer_norm_epsilon, **overrides)

    decoder_layers = hf_config.num_decoder_layers or hf_config.num_layers
    tied = bool(getattr(hf_config, "tie_word_embeddings", True)) if tied is None else tied
    return FiDReader(stack(decoder_layers), padded_vocab_size or hf_config.vocab_size,
                     max_sequence_length=512, encoder_config=stack(hf_config.num_layers),
                     position_embedding_type="relative",
                     relative_attention_num_buckets=hf_config.relative_attention_num_buckets,
                     relative_attention_max_distance=hf_config.relative_attention_max_distance,
                     share_embeddings_and_output_weights=tied,
                     scale_decoder_output=hf_t5_scales_decoder_output(hf_config),
                     real_vocab_size=hf_config.vocab_size)
