"""Data sets and the batching that goes with them (WikiText-2 streams for language models)."""
