"""AdamW and super-convergence (1cycle) training, from one CPU to many GPU nodes.

The layers, each importing only those above it in this list (``tests/test_layers.py``
checks it):

- **Base**: :mod:`~toolkit.errors` (one-line errors), :mod:`~toolkit.atomic` (whole-file
  writes), :mod:`~toolkit.run_folder` (every file of a run folder, named once).
- **Parts**: :mod:`~toolkit.config` (the flags), :mod:`~toolkit.optim` (Adam-L2, AdamW,
  AMSGrad, SGD: torch's kernels), :mod:`~toolkit.schedule` (1cycle as a pure function of
  progress), :mod:`~toolkit.sampler` and :mod:`toolkit.data` (the data order, a function of
  the step), :mod:`~toolkit.batchnorm`, :mod:`toolkit.models`, :mod:`~toolkit.tta`.
- **Parallel**: :mod:`toolkit.parallel`, one :class:`~toolkit.parallel.base.Strategy` per
  way of spreading a step over processes (``ddp``, ``zero``: DeepSpeed, ``fsdp2``), with
  :mod:`~toolkit.distributed` (process group, world-size check, collectives) and
  :mod:`~toolkit.lifecycle` (one run per folder, no worker outliving its launcher).
- **Engine**: :mod:`~toolkit.trainer` (the loop alone), :mod:`~toolkit.stages`,
  :mod:`~toolkit.checkpoint` (atomic, verified), :mod:`~toolkit.resume` (a run in its
  folder), :mod:`~toolkit.lr_finder`, :mod:`~toolkit.provenance`.
- **Language models**: :mod:`toolkit.lm` (WikiText-2, AWD-LSTM/QRNN, their trainer, the
  cache pointer), built on the engine.
- **Entry**: :mod:`~toolkit.recipe` (a recipe's one ``main``: parse, seed, build, train,
  exit codes), :mod:`~toolkit.evaluate` (``toolkit evaluate``).
- **Experiments**: :mod:`toolkit.experiments` (sweep, report, wd-find, plot, memory): tools
  over run folders that launch recipes as programs.
- :mod:`~toolkit.cli`: the ``toolkit`` command.

``docs/design.md`` says why it is cut this way.
"""
