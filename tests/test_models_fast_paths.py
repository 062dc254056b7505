"""The fused inference paths (SDPA attention, bias-fused linears) compute what megatron's own
layers compute: the same model, run with autograd on (megatron's path) and off (fused)."""

import torch

from spawn import run_ranks


def _compare(rank, world):
    from megatron.emdr2.config import ModelSize
    from megatron.emdr2.initialize import initialize, shutdown
    from megatron.emdr2.openqa import builders

    initialize(seed=3)
    try:
        size = ModelSize(2, 64, 4, seq_length=64, hidden_dropout=0.1, attention_dropout=0.1)
        tower = builders.build_tower(size, 512).eval()
        reader = builders.build_reader(size, 512, 500).eval()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(5, 500, (3, 20), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 12:] = 0
        mask[2, :] = 0  # an all-padding row must not turn into NaN on the fused path
        mask[2, 0] = 1
        slow = tower(ids, mask)  # autograd on: megatron's layers
        with torch.no_grad():
            fast = tower(ids, mask)
        r_ids, r_mask = ids.view(3, 1, 20), mask.view(3, 1, 20)
        r_mask = r_mask.clone()
        r_mask[2] = 0  # an all-padding passage
        dec = torch.randint(5, 500, (3, 6), generator=g)
        slow_logits = reader(r_ids, r_mask, dec)
        with torch.no_grad():
            fast_logits = reader(r_ids, r_mask, dec)
        real = slice(0, 500)  # ids >= 500 are vocabulary padding: -inf logits on both paths
        return (float((slow - fast).abs().max()),
                float((slow_logits[..., real] - fast_logits[..., real]).abs().max()),
                bool(torch.isfinite(fast_logits[..., real]).all()))
    finally:
        shutdown()


def test_fused_inference_paths_match_megatron_layers():
    (tower_diff, reader_diff, finite), = run_ranks(_compare, 1)
    assert tower_diff < 1e-5
    assert reader_diff < 1e-4
    assert finite
