"""AdamW and super-convergence (1cycle) training, from one CPU to many GPU nodes.

The layers, each importing only its own and those above it in this list
(``tests/test_layers.py`` checks it):

- **Base**: :mod:`~toolkit.errors` (one-line errors), :mod:`~toolkit.atomic` (whole-file
  writes).
- **Math and models**: :mod:`~toolkit.optim` (Adam-L2, AdamW, AMSGrad, SGD, schedule-free
  AdamW, Muon), :mod:`~toolkit.schedule` (1cycle and today's shapes, pure functions of the step),
  :mod:`~toolkit.target` (time to target), :mod:`~toolkit.batchnorm`, :mod:`toolkit.models`,
  :mod:`toolkit.parallel.base` (what a strategy is), :mod:`~toolkit.cpu_adam` (DeepSpeed's
  CPU Adam kernel, ``--optim.impl deepspeed``: with ``parallel.zero`` the only modules that
  import DeepSpeed).
- **Parallel**: :mod:`toolkit.parallel` (``ddp``, ``zero``: DeepSpeed, ``fsdp2``),
  :mod:`~toolkit.distributed` (process group, world-size check, collectives),
  :mod:`~toolkit.lifecycle` (one run per folder, no worker outliving its launcher).
- **Data**: :mod:`~toolkit.sampler` and :mod:`toolkit.data` (the data order, a function of
  the step), :mod:`~toolkit.tta`.
- **Config**: :mod:`~toolkit.config` (the flags, validated).
- **Engine**: :mod:`~toolkit.trainer` (the loop alone), :mod:`~toolkit.stages`,
  :mod:`~toolkit.checkpoint` (atomic, verified), :mod:`~toolkit.run_folder` (every file of a
  run folder, named once), :mod:`~toolkit.resume` (a run in its folder),
  :mod:`~toolkit.lr_finder`, :mod:`~toolkit.provenance`, :mod:`~toolkit.trackers`
  (``--trackers``: TensorBoard, W&B, MLflow, CSV).
- **Language models**: :mod:`toolkit.lm` (WikiText-2, AWD-LSTM/QRNN, their trainer, the
  cache pointer), built on the engine.
- **Entry**: :mod:`~toolkit.recipe` (a recipe's one ``main``: parse, seed, build, train,
  exit codes), :mod:`~toolkit.evaluate` (``toolkit evaluate``).
- **Experiments**: :mod:`toolkit.experiments` (sweep, contenders, report, wd-find, plot,
  memory): tools
  over run folders that launch recipes as programs.
- :mod:`~toolkit.cli`: the ``toolkit`` command.

``docs/design.md`` says why it is cut this way.
"""
