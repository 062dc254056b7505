"""One BERT retriever tower: megatron-core embedding + TransformerBlock, one vector per text.

The vector is the final-layer [CLS] state (the paper's, ``pooling="cls"``) or, with
``pooling="weighted-mean"``, the mean of all final-layer token states weighted by a learned
per-vocabulary-entry weight, scaled to length sqrt(hidden). The second is what a tower
initialised from a lexical model needs (``tools/init_lexical_retriever.py``): an idf-weighted
mean of normalised token vectors scored by cosine, which a [CLS] state cannot express.

Built from megatron-core's parts rather than ``BertModel`` because BertModel only creates the
block's final LayerNorm together with its LM/binary heads (``post_process``), and the retriever
needs the former without the latter (a vocabulary-sized head would be dead weight in both
towers). The state-dict names are BertModel's (``embedding.*``, ``encoder.*``).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron.emdr2.models.layers import bert_layer_spec
from megatron.emdr2.models.recompute import checkpointable_input


def padding_attention_mask(mask: Tensor) -> Tensor:
    """[B, S] with 1 for tokens -> megatron's boolean mask [B, 1, 1, S], True = do not attend.

    Masking keys only (not query rows) is what Hugging Face does; padded query rows compute
    values nobody reads.
    """
    return (mask < 0.5).view(mask.size(0), 1, 1, mask.size(1))


POOLINGS = ("cls", "weighted-mean")


class BertTower(MegatronModule):
    """BERT encoder returning one vector per text from its final-layer states.

    Args:
        config: from ``config.bert_config`` (``post_layernorm=True`` for Hugging Face weights).
        vocab_size: vocabulary size (divisible by the tensor-parallel size; pad it if not).
        max_sequence_length: number of learned position embeddings.
        num_tokentypes: 2 for BERT's segment embeddings, 0 for none.
        pooling: "cls" or "weighted-mean" (see the module docstring).
    """

    def __init__(self, config: TransformerConfig, vocab_size: int, max_sequence_length: int,
                 num_tokentypes: int = 2, pooling: str = "cls"):
        super().__init__(config=config)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        tp = config.tensor_model_parallel_size
        if vocab_size % tp:
            raise ValueError(f"vocab_size {vocab_size} must be divisible by the tensor-parallel "
                             f"size {tp}; pad the vocabulary")
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.num_tokentypes = num_tokentypes
        self.pooling = pooling
        if pooling == "weighted-mean":
            # One weight per vocabulary entry (replicated on tensor-parallel ranks: it is tiny).
            self.token_weight = torch.nn.Parameter(torch.ones(vocab_size))
        self.embedding = LanguageModelEmbedding(
            config=config, vocab_size=vocab_size, max_sequence_length=max_sequence_length,
            position_embedding_type="learned_absolute", num_tokentypes=num_tokentypes)
        self.encoder = TransformerBlock(config=config, spec=bert_layer_spec(),
                                        pre_process=True, post_process=True)
        # Some submodules (position embeddings, norms) ignore params_dtype; put everything in
        # it, as megatron's Float16Module would.
        self.to(config.params_dtype)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor,
                      tokentype_ids: Optional[Tensor] = None) -> Tensor:
        """All final-layer states, batch-first [B, S, H]."""
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"expected input_ids and attention_mask of one shape [B, S], got "
                             f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        if input_ids.size(1) > self.max_sequence_length:
            raise ValueError(f"sequence length {input_ids.size(1)} exceeds the "
                             f"{self.max_sequence_length} position embeddings")
        if self.num_tokentypes > 0 and tokentype_ids is None:
            tokentype_ids = torch.zeros_like(input_ids)
        positions = torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)
        emb = self.embedding(input_ids=input_ids, position_ids=positions,
                             tokentype_ids=tokentype_ids if self.num_tokentypes > 0 else None)
        hidden = self.encoder(hidden_states=checkpointable_input(emb, self.encoder),
                              attention_mask=padding_attention_mask(attention_mask))
        return hidden.transpose(0, 1)  # megatron is sequence-first inside

    def forward(self, input_ids: Tensor, attention_mask: Tensor,
                tokentype_ids: Optional[Tensor] = None) -> Tensor:
        """input_ids, attention_mask (1 = token): [B, S] -> embeddings [B, H]."""
        hidden = self.hidden_states(input_ids, attention_mask, tokentype_ids)
        if self.pooling == "cls":
            return hidden[:, 0].contiguous()
        return self._weighted_mean(hidden, input_ids, attention_mask)

    def _weighted_mean(self, hidden: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        # Negative weights would let a token push the text away from itself; clamp them.
        weights = self.token_weight[input_ids].float().clamp(min=0) * attention_mask.float()
        pooled = torch.einsum("bs,bsh->bh", weights, hidden.float())
        pooled = pooled / weights.sum(1, keepdim=True).clamp(min=1e-6)
        # Length sqrt(H): the biencoder's default score scale 1/sqrt(H) then makes a score
        # sqrt(H) x cosine (temperature 1/16 at H = 256), and fp16 index entries stay near 1.
        unit = pooled / pooled.norm(dim=1, keepdim=True).clamp(min=1e-6)
        return (unit * self.hidden_size ** 0.5).to(hidden.dtype)
