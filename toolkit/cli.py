"""``toolkit`` console entry point, and the wrapper that turns errors into one line.

    toolkit plot RUN_DIR        loss, lr and beta1 curves from RUN_DIR/metrics.jsonl
    toolkit sweep RECIPE --out DIR [--grid post] [--seeds ...] [--vary F=V1,V2] [-- ARGS]
                                a grid of runs, one folder per cell (--help for options)
    toolkit report RUN_DIRS... [--out DIR] [--metric KEY]
                                the post's tables (mean +- std over seeds) and plots
    toolkit evaluate RUN_DIR [--checkpoint step_N] [-- RECIPE FLAGS]
                                score a trained run again (eval.json)
    toolkit wd-find RECIPE --out DIR [--wds ...] [--lr LR] [-- ARGS]
                                the best weight decay for L2 and for decoupled decay
    toolkit memory --params N   bytes of params, grads and optimizer states per device and
                                per process (offload) for each strategy; --help for options
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from toolkit.errors import UserError, error_line


def run(main: Callable[[], object]) -> None:
    """Run a recipe's ``main``; a :class:`UserError` exits 2 with one line, no traceback."""
    try:
        main()
    except UserError as e:
        error_line(e)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"plot": _plot, "memory": _memory, "sweep": _sweep, "report": _report,
                "evaluate": _evaluate,
                "wd-find": _wd_find}
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if argv else 2)
    if argv[0] not in commands:
        print(f"error: command {argv[0]!r} is unknown; choose one of {', '.join(commands)}",
              file=sys.stderr)
        sys.exit(2)
    run(lambda: commands[argv[0]](argv[1:]))


def _plot(args: list[str]) -> None:
    import argparse

    from toolkit.experiments.plot import plot_run
    from toolkit.run_folder import RunFolder

    parser = argparse.ArgumentParser(prog="toolkit plot",
                                     description=f"Plot a run's {RunFolder.METRICS}")
    parser.add_argument("run_dir")
    parser.add_argument("--out", help=f"image path (default RUN_DIR/{RunFolder.METRICS_PLOT})")
    ns = parser.parse_args(args)
    print(plot_run(ns.run_dir, ns.out))


def _sweep(args: list[str]) -> None:
    from toolkit.experiments.sweep import main as sweep

    sweep(args)


def _report(args: list[str]) -> None:
    from toolkit.experiments.report import main as report

    report(args)


def _evaluate(args: list[str]) -> None:
    from toolkit.evaluate import main as evaluate

    evaluate(args)


def _wd_find(args: list[str]) -> None:
    from toolkit.experiments.wd_find import main as wd_find

    wd_find(args)


def _memory(args: list[str]) -> None:
    import argparse

    from toolkit.experiments import memory
    from toolkit.distributed import PRECISIONS
    from toolkit.parallel import CONCRETE

    parser = argparse.ArgumentParser(
        prog="toolkit memory",
        description="Memory of parameters, gradients and optimizer states per process, for "
                    "each strategy (activations not counted).")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--params", help="parameter count, e.g. 1.01e9")
    size.add_argument("--model", help=f"count a toolkit model's parameters: {', '.join(memory.MODELS)}")
    parser.add_argument("--vocab", type=int, default=33278,
                        help="vocabulary of --model (default 33278, WikiText-2)")
    parser.add_argument("--world", type=int, default=1, help="processes (devices)")
    # Choices are checked by the estimator, so a bad value is one `error:` line.
    parser.add_argument("--precision", default="fp32", help=", ".join(PRECISIONS))
    parser.add_argument("--optimizer", default="adamw", help=", ".join(memory.LABELS))
    parser.add_argument("--amsgrad", action="store_true")
    parser.add_argument("--strategy", action="append",
                        help=f"only this strategy (repeatable): {', '.join(CONCRETE)}")
    ns = parser.parse_args(args)
    n = memory.parse_count(ns.params) if ns.params is not None else memory.model_params(
        ns.model, ns.vocab)
    print(memory.table(n, ns.world, ns.precision, ns.optimizer, ns.amsgrad,
                       tuple(ns.strategy or CONCRETE)))


if __name__ == "__main__":  # python -m toolkit.cli plot RUN_DIR
    main()
