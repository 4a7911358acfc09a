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


class NonFiniteError(UserError):
    """A stage produced NaN or inf (an fp16 overflow, an extreme guidance): reported, never saved as an image."""


class ExportError(UserError):
    """A model cannot be exported as asked."""


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` is a full disk (ENOSPC), raised as an OSError or as a library's own exception carrying the
    OS message (the tokenizers library's ``Exception: No space left on device (os error 28)``), or chained to one."""
    import errno

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(current) or "(os error 28)" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def check_no_conflicting_distribution() -> None:
    """Refuse to run beside the registry's unrelated ``lcm-export`` (an LCM log-file exporter, 2019).

    It installs a module of the same import name, ``lcm_export``, and an ``lcm-export`` command, so in one
    environment the two overwrite each other's files; whichever ran would be broken in ways no message explains.
    """
    import importlib.metadata

    for other in importlib.metadata.distributions(name="lcm-export"):
        summary = other.metadata.get("Summary") or ""
        if "Latent Consistency" in summary:  # this project, installed under its old distribution name
            continue
        raise UserError(
            f"the unrelated package 'lcm-export' {other.version} ({summary.strip() or 'not this project'}) is "
            "installed here and uses the same module name lcm_export: pip uninstall lcm-export, then reinstall lcm-edge"
        )


def run_cli(main, argv=None) -> int:
    """Run a command-line ``main``: a :class:`UserError` becomes one line on stderr and exit code 1.

    Other exceptions are bugs and keep their traceback. Warnings (e.g. a prompt cut to the text encoder's length)
    print as one ``warning:`` line each.
    """
    import sys
    import warnings

    def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"warning: {message}", file=sys.stderr)

    warnings.showwarning = one_line_warning
    try:
        check_no_conflicting_distribution()
        return int(main(argv) or 0)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
