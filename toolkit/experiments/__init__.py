"""Experiment tools over run folders: ``toolkit sweep`` (grids of runs, in turn or as a
Slurm array), ``toolkit report`` (the post's tables and curves), ``toolkit wd-find``,
``toolkit plot`` and ``toolkit memory`` (bytes per strategy), with the post's words in
:mod:`~toolkit.experiments.post`. They read runs through :class:`toolkit.run_folder.RunFolder`
and launch recipes as programs; none of them touches the training engine."""
