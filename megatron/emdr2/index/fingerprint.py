"""Which context tower embedded an index: a fingerprint written in the manifest, checked at load.

An index is only meaningful for the context tower that embedded it: searching it with the query
tower of another checkpoint silently retrieves worse passages (the original release's one user
report with numbers, TriviaQA 68.6 instead of 71.4, came from such a mismatched embedding file).
Every index version therefore records ``extra["context_tower_sha256"]``: sha256 over the tower's
tensors (sorted by name; name, shape and values, floating-point values as float32, so a tower
and its bf16/fp16 copy hash alike only when their values are equal). Wherever an index is loaded
for a model (evaluation, answering, retrieval evaluation, a training task that starts from an
existing index) the model's context tower is hashed the same way and compared:

  * equal: accepted;
  * the manifest has no fingerprint (an index built before fingerprints were recorded, or
    converted from the original's embeddings): accepted with a logged warning;
  * different: ``IndexMismatchError`` naming both, unless the user opted out
    (``--allow-index-mismatch``: accepted with a logged warning).

During training the index legitimately lags the towers (asynchronous or periodic refresh): the
training tasks check only when they start, and accept a version built earlier by the same run.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Mapping, Optional, Union

import torch

from megatron.emdr2.index.shard_store import IndexStoreError, Manifest

logger = logging.getLogger(__name__)

FINGERPRINT_KEY = "context_tower_sha256"
OPT_OUT_FLAG = "--allow-index-mismatch"


class IndexMismatchError(IndexStoreError):
    """An index embedded by another context tower than the model that is to search it."""


def tower_fingerprint(tower: Union[torch.nn.Module, Mapping[str, object]]) -> str:
    """sha256 (hex) of a context tower's tensors, independent of device and storage precision
    of equal values. Megatron's ``_extra_state`` entries (no weights) are skipped. A
    tensor-parallel tower is hashed whole (collective over its tensor-parallel group), so an
    index embedded at one tensor-parallel size is recognised at any other."""
    if isinstance(tower, torch.nn.Module):
        from megatron.emdr2.models.tp_state import full_state_dict

        state = full_state_dict(tower)
    else:
        state = tower
    h = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        if name.endswith("_extra_state") or not torch.is_tensor(value):
            continue
        t = value.detach().cpu()
        if t.is_floating_point():
            t = t.float()
        t = t.contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def recorded_fingerprint(manifest: Manifest) -> Optional[str]:
    return (manifest.extra or {}).get(FINGERPRINT_KEY)


def _short(fp: str) -> str:
    return fp[:12]


def check(manifest: Manifest, fingerprint: str, model: str, allow_mismatch: bool = False,
          log: Optional[logging.Logger] = None) -> str:
    """Compare an index's recorded fingerprint with a model's (``model`` names where the tower
    came from, e.g. a checkpoint path). Returns "match", "unrecorded" or "allowed-mismatch";
    raises ``IndexMismatchError`` (one line naming the index directory and the model) otherwise."""
    log = log or logger
    where = manifest.directory
    recorded = recorded_fingerprint(manifest)
    if recorded is None:
        log.warning("%s: index records no context-tower fingerprint (built before fingerprints were "
                    "recorded, or converted): cannot check that %s embedded it", where, model)
        return "unrecorded"
    if recorded == fingerprint:
        log.info("%s: embedded by the context tower of %s (fingerprint %s)", where, model, _short(fingerprint))
        return "match"
    message = (f"{where}: index was embedded by another context tower (fingerprint {_short(recorded)}) "
               f"than the one of {model} ({_short(fingerprint)})")
    if allow_mismatch:
        log.warning("%s; searching it anyway (%s)", message, OPT_OUT_FLAG)
        return "allowed-mismatch"
    raise IndexMismatchError(f"{message}: re-embed the evidence with this model (--rebuild-index or "
                             f"another index directory) or pass {OPT_OUT_FLAG}")
