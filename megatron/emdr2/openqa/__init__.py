"""Open-domain QA: the EMDR² reader-retriever system built from the models, data and index."""
