"""Interoperability with other code bases' files (the original EMDR² release: ``original``)."""
