"""The command line's user-facing failure: printed as `error: …`, exit code 1 (cluster/cli.py)."""


class CliError(Exception):
    """A failure the user can act on; its message says how."""
