"""Frozen parts of the EMDR² step take their shortcuts without changing the result: a frozen
context tower embeds each passage once (eval mode) and never triggers an index refresh; a frozen
reader encoder runs without autograd while the decoder and the query tower still learn."""

import dataclasses

import torch

from test_mss_task import _task, fresh_port  # noqa: F401  (fixture)


def test_frozen_context_tower_and_reader_encoder(tmp_path, fresh_port):  # noqa: F811
    from megatron.emdr2 import initialize

    initialize.initialize(1, 1, seed=3)
    try:
        task, _ = _task(tmp_path)
        task.qa = dataclasses.replace(task.qa, shared_towers=False, freeze_context_tower=True,
                                      freeze_reader_encoder=True)
        models = task.build_models()
        biencoder, reader = models["biencoder"], models["reader"]
        assert task.index_manager.cfg.interval == 0  # nothing to refresh
        batch = task.make_batch(list(range(4)))
        biencoder.train(), reader.train()
        loss, _ = task.forward_step(models, batch)
        loss.backward()

        # the cached passage embeddings are the frozen tower's eval-mode embeddings
        _, ids, _ = task.retrieve(biencoder, batch, task.qa.top_k)
        cached = task._frozen_context_embeddings(biencoder, ids, task.passages(ids))
        assert set(ids.reshape(-1).tolist()) <= set(task._frozen_contexts)
        from megatron.emdr2.data.inputs import encode_context

        flat = [p for ps in task.passages(ids) for p in ps]
        c_ids, c_mask = encode_context(task.rtok, flat, task.qa.context_max_len, pad_to="longest")
        biencoder.context_encoder.eval()
        with torch.no_grad():
            direct = biencoder.context_encoder(c_ids, c_mask).view(cached.shape)
        assert torch.allclose(cached, direct, atol=1e-5)

        grads = lambda module: [p.grad for p in module.parameters()]
        assert all(g is None for g in grads(biencoder.context_encoder))
        assert any(g is not None and g.abs().sum() > 0 for g in grads(biencoder.query_tower))
        assert all(g is None for g in grads(reader.encoder)) and all(g is None for g in grads(reader.embedding))
        assert any(g is not None and g.abs().sum() > 0 for g in grads(reader.decoder))
        task.close()
    finally:
        initialize.shutdown()


def test_shared_tower_retriever_starts_separate_towers(tmp_path, fresh_port):  # noqa: F811
    from megatron.emdr2 import initialize

    initialize.initialize(1, 1, seed=3)
    try:
        task, _ = _task(tmp_path)
        task.qa = dataclasses.replace(task.qa, shared_towers=True)
        shared = task.build_models()["biencoder"]
        task.close()
        torch.save({"model": shared.state_dict()}, tmp_path / "ict.pt")

        (tmp_path / "b").mkdir()
        task, _ = _task(tmp_path / "b")
        task.qa = dataclasses.replace(task.qa, shared_towers=False, retriever_load=str(tmp_path / "ict.pt"))
        separate = task.build_models()["biencoder"]
        task.close()
        want = shared.query_tower.state_dict()
        for tower in (separate.query_tower, separate.context_tower):
            got = tower.state_dict()
            assert all(torch.equal(got[k], want[k]) for k in want if torch.is_tensor(want[k]))
    finally:
        initialize.shutdown()
