"""The one exception type that recipes turn into a one-line message and a non-zero exit."""


class UserError(Exception):
    """A bad config, missing data, corrupt checkpoint or diverged run: the user can fix it."""


def error_line(e: UserError) -> None:
    """Print ``e`` as the one ``error:`` line on stderr (naming the rank beyond rank 0)."""
    import os
    import sys

    rank = os.environ.get("RANK")
    prefix = "error" if rank in (None, "0") else f"error (rank {rank})"
    print(f"{prefix}: {e}", file=sys.stderr, flush=True)
