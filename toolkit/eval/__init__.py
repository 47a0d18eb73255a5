"""Evaluation-time add-ons to a trained image model: test-time augmentation (they change no
weights; the language models' cache pointer is :mod:`toolkit.lm.cache_pointer`)."""
