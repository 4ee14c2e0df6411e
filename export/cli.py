"""What the build-time entry points (`python -m export.build`, `python -m export.tiny`, `python -m engine`)
do with a user's mistake: one `error: <what to do>` line on stderr, exit status 2, no traceback
(`-v` / `--verbose` keeps it, for a bug report).

`UserError` is the base of the mistakes the code raises with a message that says what to do;
`USER_ERRORS` adds the project's existing error classes that are user mistakes too (missing weights,
a bad --base file, an unknown component, a manifest that is not there, ...). `ArgumentParser`
turns argparse's usage dump into the same one line; its help is the runtime commands' (runtime.console).
The runtime's commands share the behaviour through runtime.console.run_command; these differ in that a
message may carry an indented list under its `error:` line (every missing checkpoint and its flag).
Anything else is a bug: its traceback is shown.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, Sequence

from runtime.console import HelpFormatter  # the runtime's commands' help: examples kept, defaults shown

EXIT_USAGE = 2


class UserError(Exception):
    """A mistake in the command line or its inputs; the message says what to do instead."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a help that keeps the description's and the epilog's layout (examples), and one
    `error:` line instead of the usage block on a bad argument."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        """One `error:` line on stderr, exit status 2 (argparse's status; the usage block stays in --help)."""
        if wants_traceback(sys.argv[1:]):
            traceback.print_stack()
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes that mean "the user must change something": UserError and the project's
    own error classes of the modules this process imported (one not imported raised nothing)."""
    classes: list[type[BaseException]] = [UserError]
    for module, names in (("export.weights", ("WeightsNotFound", "SourceError", "UnsafePickle")),
                          ("export.lora", ("LoraError",)),
                          ("export.controlnets", ("ControlNetSourceError",)),
                          ("export.single_file", ("SingleFileError",)),
                          ("export.pipelines", ("UnsupportedComponent",)),
                          ("export.checkpoint_dims", ("CheckpointMismatch",)),
                          ("engine.manifest", ("ManifestError",)),
                          ("engine.profiles", ("ProfileError",)),
                          ("engine.backend", ("BackendError",))):
        imported = sys.modules.get(module)
        classes += [getattr(imported, name) for name in names if hasattr(imported, name)]
    return tuple(classes)


def wants_traceback(argv: Sequence[str]) -> bool:
    """True when the command line asks for tracebacks (-v, --verbose, -vv ...)."""
    return any(arg in ("-v", "--verbose") or (arg.startswith("-v") and set(arg[1:]) == {"v"}) for arg in argv)


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run an entry point's `main(argv)`; a user mistake becomes one `error:` line and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = wants_traceback(argv)
    try:
        return main(argv) or 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped (`... --help | head`): end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except SystemExit as exit_:  # a `raise SystemExit("message")` is a user mistake said in words
        if isinstance(exit_.code, str):
            return fail(exit_.code, verbose)
        raise
    except Exception as error:
        if isinstance(error, user_errors()):
            return fail(str(error), verbose)
        raise


def fail(message: str, verbose: bool) -> int:
    """Print the one `error:` line (the traceback first with -v); returns the exit status."""
    if verbose:
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE
