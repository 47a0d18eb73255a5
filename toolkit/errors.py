"""The one exception type that recipes turn into a one-line message and a non-zero exit."""


class UserError(Exception):
    """A bad config, missing data, corrupt checkpoint or diverged run: the user can fix it."""
