"""Evaluation-time add-ons to a trained model (they change no weights)."""

from toolkit.eval.cache_pointer import CachePointer, cache_pointer_reference

__all__ = ["CachePointer", "cache_pointer_reference"]
