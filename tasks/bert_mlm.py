"""BERT masked-LM on synthetic token streams: the smallest real task on the shared loop.

It exists to exercise the training machinery (data/tensor parallelism, precision, resume)
on a real megatron-core BertModel without any data dependency. Run it with e.g.

    torchrun --nproc_per_node 2 -m tasks.bert_mlm --train-iters 20 --global-batch-size 8
"""

from __future__ import annotations

import numpy as np
import torch

from megatron.emdr2.arguments import (ArgumentParser, add_model_size_args, add_training_args, fail,
                                      model_size_from_args)
from megatron.emdr2.config import ModelSize, TrainingConfig, recompute_flags
from megatron.emdr2.training import launch

TINY = ModelSize(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32,
                 hidden_dropout=0.0, attention_dropout=0.0)


class SyntheticMLMTask:
    """Sample i is a deterministic function of (seed, i): identical on every rank layout."""

    def __init__(self, size: ModelSize, cfg: TrainingConfig, vocab_size: int = 128,
                 num_samples: int = 4096, mask_prob: float = 0.15, overflow_at: int | None = None,
                 nan_loss_at: int | None = None):
        self.size, self.cfg = size, cfg
        self.vocab_size, self.n, self.mask_prob = vocab_size, num_samples, mask_prob
        # Test hooks (counted in forward steps): the gradients of this step overflow (what fp16
        # loss scaling skips) while its loss stays finite; this step's loss itself is NaN.
        self.overflow_at, self.nan_loss_at = overflow_at, nan_loss_at
        self._calls = 0

    def build_models(self):
        from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
        from megatron.core.models.bert.bert_model import BertModel
        from megatron.core.transformer import TransformerConfig

        s, p = self.size, self.cfg.precision
        config = TransformerConfig(
            num_layers=s.num_layers, hidden_size=s.hidden_size, num_attention_heads=s.num_attention_heads,
            ffn_hidden_size=s.ffn_size, hidden_dropout=s.hidden_dropout, attention_dropout=s.attention_dropout,
            tensor_model_parallel_size=self.cfg.parallel.tensor_parallel, use_cpu_initialization=True,
            fp16=p.fp16, bf16=p.bf16, params_dtype=torch.float32, pipeline_dtype=p.params_dtype,
            **recompute_flags(s.num_layers, s.recompute_granularity, s.recompute_method,
                              s.recompute_num_layers, s.recompute_modules),
        )
        model = BertModel(config=config, transformer_layer_spec=bert_layer_local_spec,
                          vocab_size=self.vocab_size, max_sequence_length=s.seq_length,
                          num_tokentypes=0, add_binary_head=False)
        return {"bert": model}

    def num_train_samples(self) -> int:
        return self.n

    def make_batch(self, indices):
        ids, labels, loss_mask = [], [], []
        for i in indices:
            rng = np.random.default_rng([self.cfg.seed, int(i)])
            tokens = rng.integers(4, self.vocab_size, self.size.seq_length)
            masked = rng.random(self.size.seq_length) < self.mask_prob
            masked[0] = True  # at least one prediction per sample
            inp = np.where(masked, 3, tokens)  # 3 = [MASK]
            ids.append(inp)
            labels.append(tokens)
            loss_mask.append(masked)
        as_long = lambda a: torch.as_tensor(np.stack(a), dtype=torch.long)
        return as_long(ids), as_long(labels), torch.as_tensor(np.stack(loss_mask), dtype=torch.float)

    def forward_step(self, models, batch):
        ids, labels, loss_mask = batch
        attention_mask = torch.ones_like(ids)
        token_losses, _ = models["bert"](ids, attention_mask, lm_labels=labels)  # [B, S]
        # Per-sample means, then the mean over samples: every sample weighs the same whatever
        # the micro-batch split, so data-parallel runs see exactly the single-process loss.
        per_sample = (token_losses.float() * loss_mask).sum(1) / loss_mask.sum(1)
        loss = per_sample.mean()
        self._calls += 1
        if self._calls == self.overflow_at:
            loss = _OverflowingGrad.apply(loss)
        if self._calls == self.nan_loss_at:
            loss = loss * float("nan")
        return loss, {}


class _OverflowingGrad(torch.autograd.Function):
    """Identity forward; infinite gradients backward (a test hook)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def build_parser():
    parser = ArgumentParser(prog="bert_mlm", description=__doc__.split("\n")[0])
    add_model_size_args(parser, "", TINY, title="model")
    add_training_args(parser)
    parser.add_argument("--vocab-size", type=int, default=128)
    parser.add_argument("--num-samples", type=int, default=4096)
    return parser


def main(argv=None):
    parser = build_parser()
    args, cfg = launch.parse_and_validate(parser, argv, model_sizes=lambda a: [model_size_from_args(a, "")])
    size = model_size_from_args(args, "")
    if "mlp" in (size.recompute_modules or ()):  # megatron's own MLP returns its bias Parameter (fast_linear.py)
        fail("--recompute-modules mlp needs the project's layers (the towers and reader); bert_mlm builds "
             "megatron-core's BertModel as shipped", parser.prog)
    launch.run(lambda: SyntheticMLMTask(size, cfg, args.vocab_size, args.num_samples), cfg)


if __name__ == "__main__":
    main()
