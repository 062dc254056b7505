"""A non-finite (fp16-overflowing) embedding on one rank stops every rank of the evidence
embedding at once with the same one-line error, publishing nothing (issue 33: the rank raised
alone and the others embedded on, then waited out the 30-minute collective timeout)."""

from spawn import run_ranks


def _embed(rank, world, out_dir):
    import time

    import numpy as np
    import torch
    import torch.distributed as dist

    from megatron.emdr2.index import IndexStoreError, embed_evidence

    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls = []

    def encoder(ids, mask):
        calls.append(len(ids))
        emb = torch.nn.functional.one_hot(ids[:, 0] % 8, 8).float()
        if rank == 1 and len(calls) == 2:
            emb[0, 0] = 1e6  # finite in fp32, beyond fp16's 65504: the fp16 index cannot hold it
        return emb

    def tokenize(rows):
        ids = torch.tensor(list(rows)).unsqueeze(1)
        return ids, torch.ones_like(ids)

    t0 = time.perf_counter()
    try:
        embed_evidence(encoder, tokenize, np.arange(401), out_dir, batch_size=8, progress=False)
        return None, len(calls), time.perf_counter() - t0
    except IndexStoreError as e:
        return str(e), len(calls), time.perf_counter() - t0
    finally:
        dist.destroy_process_group()


def test_non_finite_embedding_on_one_rank_stops_every_rank_with_one_error(tmp_path):
    out = tmp_path / "index" / "step-00000004"
    (e0, calls0, t0), (e1, calls1, t1) = run_ranks(_embed, 2, str(out), timeout=120)
    assert e0 and e0 == e1, (e0, e1)  # the same error on both ranks
    assert "\n" not in e0 and "non-finite (or fp16-overflowing) embeddings for evidence rows [208, 216)" in e0
    assert "no version was published" in e0
    # Both stopped at the failing batch (rank 0 has 25 more to go): no rank embedded on alone.
    assert calls0 == calls1 == 2, (calls0, calls1)
    assert not (out / "manifest.json").exists() and not (tmp_path / "index" / "LATEST").exists()
