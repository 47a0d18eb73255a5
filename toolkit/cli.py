"""``toolkit`` console entry point, and the wrapper that turns errors into one line.

    toolkit plot RUN_DIR        loss, lr and beta1 curves from RUN_DIR/metrics.jsonl
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from toolkit.errors import UserError


def run(main: Callable[[], object]) -> None:
    """Run a recipe's ``main``; a :class:`UserError` exits 2 with one line, no traceback."""
    try:
        main()
    except UserError as e:
        rank = os.environ.get("RANK")
        prefix = "error" if rank in (None, "0") else f"error (rank {rank})"
        print(f"{prefix}: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"plot": _plot}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__.strip())
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    run(lambda: commands[argv[0]](argv[1:]))


def _plot(args: list[str]) -> None:
    import argparse

    from toolkit.plot import plot_run

    parser = argparse.ArgumentParser(prog="toolkit plot", description="Plot a run's metrics.jsonl")
    parser.add_argument("run_dir")
    parser.add_argument("--out", help="image path (default RUN_DIR/metrics.png)")
    ns = parser.parse_args(args)
    print(plot_run(ns.run_dir, ns.out))


if __name__ == "__main__":  # python -m toolkit.cli plot RUN_DIR
    main()
