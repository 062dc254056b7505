"""EMDR²: end-to-end training of a multi-document reader and retriever, on megatron-core.

This is a regular package inside ``megatron``, a namespace package shared with
megatron-core (``megatron/`` itself must never get an ``__init__.py``).
"""
