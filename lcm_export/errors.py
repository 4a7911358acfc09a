"""User-facing errors (standard library only, shared by the exporter and the runtime).

A :class:`UserError` is a problem with what the user gave us (a path, a flag, a bundle): the command-line
tools print its message on one line and exit 1 without a traceback. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the input and says what to do."""


class BundleError(UserError):
    """A bundle is missing, incomplete, modified or of another format version."""


class ExportError(UserError):
    """A model cannot be exported as asked."""


def run_cli(main, argv=None) -> int:
    """Run a command-line ``main``: a :class:`UserError` becomes one line on stderr and exit code 1.

    Other exceptions are bugs and keep their traceback.
    """
    import sys

    try:
        return int(main(argv) or 0)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
