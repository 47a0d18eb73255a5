"""The recipes, one file each: a config, its presets and a ``build`` over :mod:`toolkit.recipe`.

Run one as a script (``python recipes/digits.py``, ``accelerate launch recipes/wt2.py``);
import one to reuse its parts (``from recipes import wt2``: tests, benchmarks, sweeps).
"""
