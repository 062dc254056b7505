"""The data layer: tokenisers, evidence passages, QA files, model inputs, samplers, answer scoring.

Import from the submodules (e.g. `from megatron.emdr2.data.qa import load_qa`); this package
imports nothing heavy itself, so worker processes that only tokenise never load torch.
"""

from .errors import DataError  # noqa: F401
