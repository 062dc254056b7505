"""Fusion-in-Decoder reader on megatron-core's T5Model.

Layout conventions of this module's API: batch-first tensors; masks are 1 for real tokens and
0 for padding. Inside, megatron is sequence-first ([S, B, H]).

FiD: B questions x K passages are encoded as B*K independent sequences ([question; passage k]),
the K encoder outputs of a question are concatenated to one memory of K*S states, and the decoder
cross-attends over all of it, padding masked out.

Retrieval-biased cross-attention (the joint top-k reader of Sachan et al., ACL 2021): every
decoder call takes an optional ``memory_bias`` [N, M], added to the unnormalised cross-attention
logits of every head in every decoder layer (``memory_attention_mask``); with log p(z_k|q) on
passage k's positions (``passage_memory_bias``) the decoder attends to the passages in
proportion to the retriever's belief, and the retriever gets the reader's gradient. The copy
head's own attention over the memory is not biased.

Per-passage likelihood (EMDR²'s retriever term): the same encoder states, viewed as B*K memories
of S states each, and the decoder run once on B*K sequences in eval mode without autograd;
only the log-probability of each gold token is kept.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.T5.t5_model import T5Model
from megatron.core.tensor_parallel.utils import VocabUtility
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron.emdr2.models.bert_tower import padding_attention_mask
from megatron.emdr2.models.layers import t5_decoder_layer_spec, t5_encoder_layer_spec
from megatron.emdr2.models.recompute import checkpointable_input
from megatron.emdr2.models.relative_attention import local_heads_bias

IGNORE_INDEX = -100


def causal_attention_mask(length: int, device, key_mask: Optional[Tensor] = None) -> Tensor:
    """Boolean [1|B, 1, T, T] mask, True = do not attend: future positions (and padded keys)."""
    mask = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)[None, None]
    if key_mask is not None:
        mask = mask | padding_attention_mask(key_mask)
    return mask


class FiDReader(T5Model):
    """T5 encoder-decoder reading K passages per question.

    Args:
        config: decoder config (``config.t5_config``); also the encoder's unless encoder_config.
        vocab_size: vocabulary size (divisible by the tensor-parallel size).
        max_sequence_length: learned position embeddings (unused with relative positions).
        encoder_config: encoder config when it differs (e.g. another depth).
        position_embedding_type: "learned_absolute" (Megatron's T5) or "relative" (Google T5).
        relative_attention_num_buckets, relative_attention_max_distance: T5's bucketing.
        share_embeddings_and_output_weights: tie the LM head to the input embedding (Megatron's
            tied head has a bias; Google T5 has none, keep it at zero).
        scale_decoder_output: multiply the decoder output by hidden_size**-0.5 before the LM
            head, as the original Google T5 does (T5 v1.1 / Flan-T5 do not).
        real_vocab_size: ids >= this are vocabulary padding (for tensor parallelism) and get
            -inf logits, so they are never generated and do not dilute likelihoods.
        copy_head: mix a copy distribution over the memory's tokens into the output
            (``copy_head.CopyHead``); every likelihood and decoding call then needs the memory's
            token ids (``memory_ids``). Replicated over tensor-parallel ranks (see copy_head.py).
    """

    def __init__(self, config: TransformerConfig, vocab_size: int, max_sequence_length: int,
                 encoder_config: Optional[TransformerConfig] = None,
                 position_embedding_type: str = "learned_absolute",
                 relative_attention_num_buckets: int = 32,
                 relative_attention_max_distance: int = 128,
                 share_embeddings_and_output_weights: bool = True,
                 scale_decoder_output: bool = False,
                 real_vocab_size: Optional[int] = None,
                 copy_head: bool = False, copy_continuation: bool = False):
        if position_embedding_type not in ("learned_absolute", "relative"):
            raise ValueError(f"position_embedding_type must be 'learned_absolute' or 'relative', "
                             f"got {position_embedding_type!r}")
        tp = config.tensor_model_parallel_size
        if vocab_size % tp:
            raise ValueError(f"vocab_size {vocab_size} must be divisible by the tensor-parallel "
                             f"size {tp}; pad the vocabulary")
        relative = position_embedding_type == "relative"
        super().__init__(
            config=config, encoder_config=encoder_config or config,
            transformer_encoder_layer_spec=t5_encoder_layer_spec(relative),
            transformer_decoder_layer_spec=t5_decoder_layer_spec(relative),
            vocab_size=vocab_size, max_sequence_length=max_sequence_length,
            parallel_output=True,
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            position_embedding_type=position_embedding_type,
            relative_attention_num_buckets=relative_attention_num_buckets,
            relative_attention_max_distance=relative_attention_max_distance)
        self.scale_decoder_output = scale_decoder_output
        self.to(config.params_dtype)  # norms / position tables ignore params_dtype
        self.real_vocab_size = real_vocab_size if real_vocab_size is not None else vocab_size
        self.encoder_frozen = False
        self.copy_head = None
        if copy_head:
            from megatron.emdr2.models.copy_head import CopyHead

            self.copy_head = CopyHead(config.hidden_size, config.init_method_std,
                                      continuation=copy_continuation).to(config.params_dtype)
        elif copy_continuation:
            raise ValueError("span continuation is part of the copy head: it needs copy_head=True")

    def freeze_encoder(self) -> None:
        """Train the decoder only: the encoder and the (shared) embeddings keep their weights,
        and the encoder runs without autograd, which is most of the reader's training cost.
        Useful with a pretrained encoder (e.g. a BERT warm start) and a fresh decoder."""
        self.encoder_frozen = True
        for p in (*self.encoder.parameters(), *self.embedding.parameters()):
            p.requires_grad_(False)

    # ---------------------------------------------------------------- building blocks
    def embed(self, input_ids: Tensor, offset: int = 0) -> Tensor:
        """[N, L] token ids (at positions offset..offset+L-1) -> [L, N, H]."""
        positions = None
        if self.position_embedding_type == "learned_absolute":
            length = input_ids.size(1)
            if offset + length > self.max_sequence_length:
                raise ValueError(f"position {offset + length - 1} exceeds the "
                                 f"{self.max_sequence_length} position embeddings")
            positions = torch.arange(offset, offset + length, device=input_ids.device)
            positions = positions.expand_as(input_ids)
        return self.embedding(input_ids=input_ids, position_ids=positions)

    def relative_bias(self, stack: str, query_length: int, key_length: int) -> Optional[Tensor]:
        """This rank's heads' position bias [1, heads/tp, q, k] for "encoder" or "decoder"."""
        if self.position_embedding_type != "relative":
            return None
        table = self.encoder_relative_pos_emb if stack == "encoder" else self.decoder_relative_pos_emb
        return local_heads_bias(table, query_length, key_length)

    def vocab_parallel_logits(self, hidden: Tensor) -> Tensor:
        """Decoder output [..., H] -> this rank's vocabulary slice of the logits [..., V/tp]."""
        if self.scale_decoder_output:
            hidden = hidden * (self.config.hidden_size ** -0.5)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits = self.lm_head(hidden, word_embeddings_weight=weight)
        if self.real_vocab_size < self.vocab_size:
            per_rank = logits.size(-1)
            start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(
                per_rank, parallel_state.get_tensor_model_parallel_rank(),
                parallel_state.get_tensor_model_parallel_world_size())
            padded = torch.arange(start, start + per_rank, device=logits.device) >= self.real_vocab_size
            logits = logits.masked_fill(padded, float("-inf"))
        return logits

    @staticmethod
    def gather_vocab(logits: Tensor) -> Tensor:
        """All ranks' vocabulary slices side by side (a no-op without tensor parallelism)."""
        if parallel_state.get_tensor_model_parallel_world_size() == 1:
            return logits
        return tensor_parallel.gather_from_tensor_model_parallel_region(logits)

    # ---------------------------------------------------------------- encoder
    def encode(self, input_ids: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
        """Encode each (question, passage) pair on its own and concatenate per question.

        input_ids, mask: [B, K, S] -> (states [B, K*S, H], mask [B, K*S]).
        """
        if input_ids.dim() != 3 or mask.shape != input_ids.shape:
            raise ValueError(f"expected input_ids and mask of one shape [B, K, S], got "
                             f"{tuple(input_ids.shape)} and {tuple(mask.shape)}")
        B, K, S = input_ids.shape
        ids = input_ids.reshape(B * K, S)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder_frozen):
            hidden = self.encoder(hidden_states=checkpointable_input(self.embed(ids), self.encoder),
                                  attention_mask=padding_attention_mask(mask.reshape(B * K, S)),
                                  attention_bias=self.relative_bias("encoder", S, S))
        states = hidden.transpose(0, 1).reshape(B, K * S, hidden.size(-1))
        return states, mask.reshape(B, K * S)

    # ---------------------------------------------------------------- decoder
    @staticmethod
    def memory_attention_mask(mask: Tensor, memory_bias: Optional[Tensor] = None) -> Tensor:
        """The decoder's cross-attention mask over a memory ``mask`` [N, M]: megatron's boolean
        padding mask, or with ``memory_bias`` [N, M] an additive float mask [N, 1, 1, M] (fp32):
        memory_bias at real positions, -10000 (megatron's masked value) at padding. The attention
        modules (``relative_attention.fold_additive_mask``) add it to every head's logits."""
        padding = padding_attention_mask(mask)
        if memory_bias is None:
            return padding
        if memory_bias.shape != mask.shape:
            raise ValueError(f"memory_bias {tuple(memory_bias.shape)} must be shaped like the memory "
                             f"mask {tuple(mask.shape)}")
        return memory_bias.float()[:, None, None, :].masked_fill(padding, -10000.0)

    @staticmethod
    def passage_memory_bias(log_p_z: Tensor, passage_length: int) -> Tensor:
        """Joint top-k's bias: log p(z_k|q) [B, K] on each of passage k's S positions -> [B, K*S]
        (``encode``'s memory layout)."""
        return log_p_z.repeat_interleave(passage_length, dim=1)

    def decoder_hidden(self, states: Tensor, mask: Tensor, decoder_input_ids: Tensor,
                       decoder_mask: Optional[Tensor] = None, memory_bias: Optional[Tensor] = None) -> Tensor:
        """Teacher-forced decoder over a memory: states [N, M, H], mask [N, M],
        decoder_input_ids [N, T] -> final hidden states [T, N, H] (after the final norm).
        memory_bias [N, M]: added to the cross-attention logits (``memory_attention_mask``)."""
        if states.size(0) != decoder_input_ids.size(0):
            raise ValueError(f"{states.size(0)} memories for {decoder_input_ids.size(0)} "
                             f"decoder sequences")
        T = decoder_input_ids.size(1)
        return self.decoder(
            hidden_states=checkpointable_input(self.embed(decoder_input_ids), self.decoder),
            attention_mask=causal_attention_mask(T, decoder_input_ids.device, decoder_mask),
            context=states.transpose(0, 1).contiguous(),
            context_mask=self.memory_attention_mask(mask, memory_bias),
            attention_bias=self.relative_bias("decoder", T, T))

    def forward_from_states(self, states: Tensor, mask: Tensor, decoder_input_ids: Tensor,
                            decoder_mask: Optional[Tensor] = None,
                            memory_bias: Optional[Tensor] = None) -> Tensor:
        """Logits [B, T, V] (whole vocabulary) of the decoder over precomputed FiD states."""
        hidden = self.decoder_hidden(states, mask, decoder_input_ids, decoder_mask, memory_bias)
        logits = self.gather_vocab(self.vocab_parallel_logits(hidden))
        return logits.transpose(0, 1).contiguous()

    def forward(self, input_ids: Tensor, mask: Tensor, decoder_input_ids: Tensor,
                decoder_mask: Optional[Tensor] = None) -> Tensor:
        """input_ids, mask [B, K, S]; decoder_input_ids, decoder_mask [B, T] -> logits [B, T, V]."""
        states, memory_mask = self.encode(input_ids, mask)
        return self.forward_from_states(states, memory_mask, decoder_input_ids, decoder_mask)

    def _memory_ids(self, memory_ids: Optional[Tensor], mask: Tensor) -> Optional[Tensor]:
        if self.copy_head is None:
            return None
        if memory_ids is None or memory_ids.shape != mask.shape:
            raise ValueError(f"a reader with a copy head needs the memory's token ids, shaped like "
                             f"its mask {tuple(mask.shape)}; got "
                             f"{None if memory_ids is None else tuple(memory_ids.shape)}")
        return memory_ids

    def token_nll(self, states: Tensor, mask: Tensor, decoder_input_ids: Tensor, labels: Tensor,
                  label_mask: Optional[Tensor] = None, memory_ids: Optional[Tensor] = None,
                  memory_bias: Optional[Tensor] = None) -> Tensor:
        """Teacher-forced cross-entropy per token [B, T] over the FiD memory (0 where masked).

        labels [B, T] (IGNORE_INDEX allowed where label_mask is None); computed with megatron's
        vocab-parallel cross-entropy, so no rank ever holds the whole vocabulary's logits.
        memory_ids [B, M]: the memory's token ids (``encode``'s input, flattened), needed with a
        copy head. memory_bias [B, M]: added to the cross-attention logits (joint top-k).
        """
        label_mask = _label_mask(labels, label_mask)
        memory_ids = self._memory_ids(memory_ids, mask)
        hidden = self.decoder_hidden(states, mask, decoder_input_ids, memory_bias=memory_bias)
        logits = self.vocab_parallel_logits(hidden).float()
        target = labels.masked_fill(~label_mask, 0).t().contiguous()
        nll = tensor_parallel.vocab_parallel_cross_entropy(logits, target)  # [T, B]
        if self.copy_head is not None:
            nll = -self.copy_head.mix_gold(-nll, hidden, self.copy_head.keys(states), mask, memory_ids, target,
                                           decoder_input_ids)
        return nll.t() * label_mask

    def loss(self, input_ids: Tensor, mask: Tensor, decoder_input_ids: Tensor, labels: Tensor,
             label_mask: Optional[Tensor] = None) -> Tensor:
        """Mean token cross-entropy of the answers given all K passages (a scalar)."""
        label_mask = _label_mask(labels, label_mask)
        states, memory_mask = self.encode(input_ids, mask)
        nll = self.token_nll(states, memory_mask, decoder_input_ids, labels, label_mask,
                             memory_ids=input_ids.reshape(memory_mask.shape))
        return nll.sum() / label_mask.sum().clamp(min=1)

    # ---------------------------------------------------------------- EMDR² per-passage term
    def per_passage_log_likelihood(self, states: Tensor, mask: Tensor, K: int,
                                   decoder_input_ids: Tensor, labels: Tensor,
                                   label_mask: Optional[Tensor] = None,
                                   max_logit_elements: Optional[int] = None,
                                   max_sequences: Optional[int] = None,
                                   memory_ids: Optional[Tensor] = None
                                   ) -> Tuple[Tensor, Tensor]:
        """log p(answer | question, passage k) for every k, reusing the FiD encoder states.

        Args:
            states, mask: ``encode``'s output, [B, K*S, H] and [B, K*S] (detached here).
            K: passages per question.
            decoder_input_ids, labels: [B, T] (teacher forcing; labels are the next tokens).
            label_mask: [B, T], 1 for answer tokens; default ``labels != IGNORE_INDEX``.
            max_logit_elements: bound on the logits held at once (rows x vocabulary slice);
                default B*T rows, what one single-passage reader run holds anyway.
            max_sequences: run the decoder on at most this many of the B*K (question, passage)
                sequences at a time (default: all at once, the fastest); B bounds the memory
                by that of one single-passage run.
            memory_ids: [B, K*S] the memory's token ids (needed with a copy head: each passage
                then copies from its own tokens only).
        Returns:
            (seq_logprob [B, K], token_logprob [B, K, T]) in fp32; token_logprob is 0 at masked
            positions. Runs in eval mode (no dropout) under ``torch.no_grad``: EMDR² uses it
            under a stop-gradient. A passage that is all padding gets a meaningless value;
            mask such passages out of the retrieval distribution.
        """
        label_mask = _label_mask(labels, label_mask)
        memory_ids = self._memory_ids(memory_ids, mask)
        B, T = labels.shape
        if states.size(1) % K:
            raise ValueError(f"memory length {states.size(1)} is not K={K} passages long")
        S = states.size(1) // K
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                memory = states.detach().reshape(B * K, S, states.size(-1))
                memory_mask = mask.reshape(B * K, S)
                ids = memory_ids.reshape(B * K, S) if memory_ids is not None else None
                dec = decoder_input_ids.repeat_interleave(K, dim=0)
                tgt = labels.masked_fill(~label_mask, 0).repeat_interleave(K, dim=0)
                keep = label_mask.repeat_interleave(K, dim=0)
                vocab_slice = self.vocab_size // self.config.tensor_model_parallel_size
                chunk = (B * T if max_logit_elements is None
                         else max(1, max_logit_elements // vocab_slice))
                group = B * K if max_sequences is None else max(1, max_sequences)
                token = torch.zeros(B * K, T, dtype=torch.float32, device=states.device)
                for first in range(0, B * K, group):
                    seqs = slice(first, first + group)
                    hidden = self.decoder_hidden(memory[seqs], memory_mask[seqs], dec[seqs])
                    gold = self._gold_token_log_probs(hidden, tgt[seqs], keep[seqs], chunk)
                    if self.copy_head is not None:
                        gold = self.copy_head.mix_gold(
                            gold.t(), hidden, self.copy_head.keys(memory[seqs]), memory_mask[seqs],
                            ids[seqs], tgt[seqs].t(), dec[seqs]).t() * keep[seqs]
                    token[seqs] = gold
                token = token.reshape(B, K, T)
        finally:
            self.train(was_training)
        return token.sum(-1), token

    def _gold_token_log_probs(self, hidden: Tensor, targets: Tensor, keep: Tensor,
                              rows_per_chunk: int) -> Tensor:
        """hidden [T, N, H] -> log p(target) [N, T] at ``keep`` positions (0 elsewhere),
        forming the logits of at most ``rows_per_chunk`` positions at a time."""
        rows = hidden.transpose(0, 1)[keep]  # only positions with a gold token: [R, H]
        wanted = targets[keep]
        gold = torch.empty(rows.size(0), dtype=torch.float32, device=rows.device)
        for start in range(0, rows.size(0), rows_per_chunk):
            logits = self.vocab_parallel_logits(rows[start:start + rows_per_chunk]).float()
            gold[start:start + rows_per_chunk] = gold_log_probs(
                logits, wanted[start:start + rows_per_chunk])
            del logits
        out = torch.zeros(targets.shape, dtype=torch.float32, device=rows.device)
        out[keep] = gold
        return out

    # ---------------------------------------------------------------- decoding
    def generate(self, input_ids: Tensor, mask: Tensor, max_length: int, num_beams: int = 1,
                 bos_id: int = 0, eos_id: int = 1, pad_id: Optional[int] = None,
                 length_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                 memory_bias: Optional[Tensor] = None) -> Tensor:
        """Greedy (num_beams=1) or beam search with a key/value cache; the FiD memory is
        encoded once. input_ids, mask [B, K, S] -> generated ids [B, <=max_length] (without
        the start token; after eos, pad_id, which defaults to bos_id as in T5). With
        ``no_repeat_ngram_size`` n > 0, no n-gram occurs twice in an output. memory_bias
        [B, K*S]: added to the cross-attention logits (joint top-k)."""
        from megatron.emdr2.models import generation

        pad_id = bos_id if pad_id is None else pad_id
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                states, memory_mask = self.encode(input_ids, mask)
                memory_ids = input_ids.reshape(memory_mask.shape) if self.copy_head is not None else None
                return generation.generate(self, states, memory_mask, max_length, num_beams,
                                           bos_id, eos_id, pad_id, length_penalty, memory_ids,
                                           no_repeat_ngram_size, memory_bias=memory_bias)
        finally:
            self.train(was_training)


def gold_log_probs(vocab_parallel_logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[target] per row, without forming the log-softmax of every word.

    With tensor parallelism the logits are vocabulary slices: megatron's vocab-parallel
    cross-entropy combines the ranks' partial max / sum-exp / gold logit.
    """
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        return -tensor_parallel.vocab_parallel_cross_entropy(vocab_parallel_logits, targets)
    gold = vocab_parallel_logits.gather(-1, targets[..., None])[..., 0]
    return gold - torch.logsumexp(vocab_parallel_logits, dim=-1)


def _label_mask(labels: Tensor, label_mask: Optional[Tensor]) -> Tensor:
    if label_mask is None:
        return labels != IGNORE_INDEX
    if label_mask.shape != labels.shape:
        raise ValueError(f"label_mask {tuple(label_mask.shape)} and labels "
                         f"{tuple(labels.shape)} differ in shape")
    return label_mask.bool()
