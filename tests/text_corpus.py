"""A small generated corpus for ``recipes/text.py``: sentences from a fixed grammar (subject,
verb, object, an optional clause), so a language model learns it well below the uniform
perplexity in a few steps. As ``train.txt``/``valid.txt``/``test.txt`` or as a ``datasets``
DatasetDict written by ``save_to_disk``."""

from __future__ import annotations

import random
from pathlib import Path

SUBJECTS = "the cat|a dog|my neighbour|the old sailor|every child|the committee".split("|")
VERBS = "sees|likes|builds|paints|follows|forgets|remembers|sells".split("|")
OBJECTS = "a boat|the house|red apples|the river|a song|old letters|the garden".split("|")
CLAUSES = ("", "", " because it rains", " in the morning", " with great care",
           " before the winter")


def lines(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
                     f"{rng.choice(CLAUSES)} ." for _ in range(rng.randint(1, 3))) + "\n"
            for _ in range(n)]


def splits(n_train: int = 600) -> dict[str, list[str]]:
    return {"train": lines(n_train, 0), "valid": lines(n_train // 6, 1),
            "test": lines(n_train // 6, 2)}


def write(root: Path, n_train: int = 600) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in splits(n_train).items():
        (root / f"{name}.txt").write_text("".join(text), encoding="utf-8")
    return root


def write_datasets(root: Path, n_train: int = 600) -> Path:
    import datasets

    names = {"train": "train", "valid": "validation", "test": "test"}
    datasets.DatasetDict({names[k]: datasets.Dataset.from_dict({"body": [t.rstrip("\n") for t in v]})
                          for k, v in splits(n_train).items()}).save_to_disk(str(root))
    return root
