"""Retriever towers, the FiD reader, and their Hugging Face converters (see DESIGN.md §1-3)."""
