"""Data sets of the image recipes and the data protocol the trainer reads
(:mod:`~toolkit.data.source`); WikiText-2 is :mod:`toolkit.lm.data`'s."""
