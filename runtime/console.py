"""What the project's command lines share: help that teaches, one error line per user mistake, a
per-step progress line, and quiet library warnings.

    def main(argv=None) -> int:
        return run_command(_main, argv)      # user mistakes: "error: ..." on stderr, exit status 2

    parser = Parser(prog="python -m runtime.serve", description=..., epilog=EXAMPLES)

A user mistake is an exception of a type in USER_ERRORS (a bad flag, request value, photo, build,
backend...) or a flag argparse refuses: `run_command` prints it as ONE line `error: <message>` on
stderr and returns 2. With -v / --verbose it re-raises, so the traceback shows. Any other
exception is a bug and keeps its traceback. Imports nothing heavy: the types are looked up among
the modules already imported (an exception of a module never imported cannot have been raised).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from typing import Callable, TextIO

VERBOSE_FLAGS = ("-v", "--verbose")

# (module, name) of the exceptions whose message tells a user what to do
USER_ERRORS = (
    ("runtime.requests", "RequestError"), ("runtime.requests", "ResolutionError"),
    ("runtime.images", "ImageError"), ("runtime.face.analyzer", "NoFaceError"),
    ("runtime.face.analyzer", "FaceIndexError"), ("runtime.session_base", "SessionError"),
    ("runtime.pipelines.sdxl", "NonFiniteError"), ("runtime.assets", "AssetError"),
    ("engine.manifest", "ManifestError"), ("engine.cache", "EngineCheckError"),
    ("engine.backend", "BackendError"), ("engine.profiles", "ProfileError"),
)

# Library warnings that repeat on every run of these commands and tell a user nothing to act on:
# (category, message regex, module regex). Seen on this project's runs (torch 2.13, diffusers 0.42,
# numpy 2): diffusers' schedulers, once per scheduler built by the PyTorch baseline (benchmarks).
NOISY_WARNINGS = (
    (DeprecationWarning, r"__array__ implementation doesn't accept a copy keyword", r"diffusers\.schedulers\..*"),
)

# Library log records that repeat on every run and say nothing to act on: (logger, text in the message)
NOISY_LOGS = (
    # diffusers, on every .to(dtype) of a model that has no float32-only module (the list is empty)
    ("diffusers.models.modeling_utils", "should be kept in float32: []."),
)


class UsageError(Exception):
    """A command-line mistake (a flag missing, refused or contradicting another): the message says
    what to do."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types a user can fix: UsageError, FileNotFoundError and USER_ERRORS' types of
    the modules imported so far."""
    found: list[type[BaseException]] = [UsageError, FileNotFoundError]
    for module, name in USER_ERRORS:
        kind = getattr(sys.modules.get(module), name, None)
        if isinstance(kind, type):
            found.append(kind)
    return tuple(found)


def error_line(error: BaseException) -> str:
    """`error: <message>` on one line (a message's own line breaks become spaces)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return f"error: {text}"


def run_command(main: Callable[[list[str]], int], argv: list[str] | None = None,
                errors: tuple[type[BaseException], ...] = ()) -> int:
    """main(argv) with the shared error handling: a user mistake (user_errors() and `errors`) is one
    `error: ...` line on stderr and status 2, unless argv has -v / --verbose (then it re-raises);
    Ctrl-C is 'interrupted' and status 130; a closed output pipe ends quietly with status 141. Library warnings of NOISY_WARNINGS are filtered."""
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = any(arg in VERBOSE_FLAGS for arg in argv)
    with warnings.catch_warnings():
        quiet_library_warnings()
        try:
            return main(argv)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # output piped into a reader that stopped (`... --help | head`): end quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except Exception as error:
            if verbose or not isinstance(error, user_errors() + tuple(errors)):
                raise
            print(error_line(error), file=sys.stderr)
            return 2


def quiet_library_warnings() -> None:
    """Filter NOISY_WARNINGS (precisely: category, message and module) and NOISY_LOGS; every other
    warning shows. The Hugging Face libraries' per-checkpoint 'Loading weights' bars are off (the
    commands print a line per stage instead)."""
    for category, message, module in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, text in NOISY_LOGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessage(text))
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported


class _DropMessage(logging.Filter):
    """Drops the records whose message contains `text`."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Description and epilog as written (examples keep their lines); every option's help ends with
    its default, unless the help already says it, the option is required, or it is a switch."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.required or not action.option_strings:
            return text
        if action.default in (None, argparse.SUPPRESS, [], "") or isinstance(action.default, bool):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes raise UsageError (one `error:` line through run_command, not
    argparse's usage block), with HelpFormatter and a -v / --verbose flag (verbose=False: none)."""

    def __init__(self, *args, verbose: bool = True, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        if verbose:
            self.add_argument(*VERBOSE_FLAGS, action="store_true",
                              help="on an error, show the full traceback; show per-phase timings where there are")

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def backend_choice(text: str) -> str:
    """argparse type of a --backend flag: the name as runtime.sessions normalises it ('ort' ->
    'onnxruntime'); an unknown name is argparse's error naming the choices."""
    from runtime.sessions import BACKENDS, SessionError, normalize_backend

    try:
        return normalize_backend(text)
    except SessionError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a backend: choose one of {', '.join(BACKENDS)}") from None


def check_backend(backend: str) -> None:
    """Before anything loads: a TensorRT backend needs its Python package (engine.backend's
    BackendError names the install) and an NVIDIA GPU torch can see (UsageError otherwise)."""
    if backend not in ("tensorrt", "tensorrt-rtx"):
        return
    import torch

    from engine.backend import load_backend

    load_backend(backend)
    if not torch.cuda.is_available():
        raise UsageError(f"--backend {backend} runs the build's TensorRT engines, which need an NVIDIA GPU, and torch "
                         "sees none here (torch.cuda.is_available() is False): use --backend onnxruntime (or torch) "
                         "on this machine")


class StepProgress:
    """`progress(done, steps)` for `pipe(..., progress=...)`: on a terminal a bar redrawn in place on
    `stream` (stderr); otherwise nothing until `finish()`, which prints one line, e.g.
    'denoised 8 steps at 0.21 s/step (1.9 s with the prompt and image encoding)'."""

    def __init__(self, label: str = "denoising", stream: TextIO | None = None, width: int = 24):
        self.label, self.width = label, width
        self.stream = sys.stderr if stream is None else stream
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self.first: tuple[float, int] | None = None  # (when, steps done) at the first report
        self.last: tuple[float, int] = (self.start, 0)
        self.steps = 0

    def __call__(self, done: int, steps: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, done)
        self.last, self.steps = (now, done), steps
        if self.tty:
            filled = self.width * done // max(steps, 1)
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r{self.label} [{bar}] {done}/{steps} {now - self.start:.1f} s")
            self.stream.flush()

    def finish(self) -> None:
        """End the bar (a newline) and print the summary line; nothing when no step was reported."""
        if self.first is None:
            return
        if self.tty:
            self.stream.write("\n")
        (first_at, first_done), (last_at, last_done) = self.first, self.last
        if last_done > first_done:  # per step, after the first (which also pays the encoders)
            rate = f"at {(last_at - first_at) / (last_done - first_done):.2f} s/step"
        else:  # one report: the whole loop ran as one graph
            rate = "in one graph"
        print(f"denoised {last_done} steps {rate} ({last_at - self.start:.1f} s with the prompt and image encoding)",
              file=self.stream)
