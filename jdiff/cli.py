"""The programs' door: every expected failure of `train.py`, `sample.py`, `python -m
jdiff.interop` and `python -m jdiff.evaluation` ends in one line on stderr and exit status 2.

    error: config.train.keep_checkpoints=0: expected an integer >= 1

A traceback is shown only for what is not expected (a bug), or for everything with
`JDIFF_DEBUG=1` in the environment. Expected are `validate.InputError` and the other
ValueErrors the library raises for bad input, file errors (missing, unreadable, read-only,
disk full), undecodable text, a damaged checkpoint and a run that went non-finite.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

from jdiff.validate import OS_HINTS, InputError, unknown_key

DEBUG = "JDIFF_DEBUG"


def expected() -> tuple[type[BaseException], ...]:
    """The exception types that mean bad input or a bad file, not a bug."""
    from jdiff.checkpoints import CheckpointDamaged, CheckpointWriteFailed

    kinds: list[type[BaseException]] = [
        ValueError, OSError, UnicodeError, CheckpointDamaged, CheckpointWriteFailed,
    ]  # fmt: skip
    try:
        from safetensors import SafetensorError

        kinds.append(SafetensorError)
    except ImportError:  # an older safetensors: its errors are OSError / ValueError
        pass
    return tuple(kinds)


def describe(error: BaseException) -> str:
    """One line for an expected error: file errors name the file and say what would help."""
    if isinstance(error, OSError) and error.strerror and not isinstance(error, InputError):
        where = f"{error.filename}: " if error.filename else ""
        hint = f" ({OS_HINTS[error.errno]})" if error.errno in OS_HINTS else ""
        return f"{where}{error.strerror}{hint}"
    text = str(error).strip() or type(error).__name__
    if type(error).__name__ == "SafetensorError":
        text = f"not a readable .safetensors file ({text})"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def fail(message: str) -> NoReturn:
    """Print `error: message` on stderr and exit with status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def guarded(main: Callable[..., object], *extra: type[BaseException]) -> Callable[..., object]:
    """`main` with its expected failures (`expected()` and `extra`) as one line and exit 2."""

    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (*expected(), *extra) as e:
            if os.environ.get(DEBUG):
                raise
            fail(describe(e))

    return run


class _BackgroundReports(logging.Filter):
    """Drops the error reports (each with its traceback) that orbax's background threads and
    asyncio log for a failed checkpoint write (a full disk printed some 2,000 lines): the
    failure reaches the program as one exception (`checkpoints.CheckpointWriteFailed`), and
    its one line says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        return not (record.name == "asyncio" or f"{os.sep}orbax{os.sep}" in record.pathname)


class _ClosedLoopReports:
    """sys.stderr without the tracebacks tensorstore prints (bypassing sys.excepthook) for
    each callback it still makes into orbax's event loop once a failed write has closed it:
    a traceback whose every frame is asyncio's and that ends in "Event loop is closed". Any
    other text, tracebacks included, passes as written (a line starting a traceback is held
    until the traceback ends). Each thread's text is read apart: the main thread's error line
    written while a background thread prints a traceback neither breaks it nor is held."""

    _START = "Traceback (most recent call last):"
    _END = "RuntimeError: Event loop is closed"

    def __init__(self, stream):
        self._stream, self._lock = stream, threading.Lock()
        self._pending: dict[int, str] = {}
        self._held: dict[int, list[str]] = {}

    def write(self, text: str) -> int:
        me = threading.get_ident()
        with self._lock:
            pending = self._pending.pop(me, "") + text
            while "\n" in pending:
                line, pending = pending.split("\n", 1)
                self._line(me, line + "\n")
            if me not in self._held and not self._START.startswith(pending):
                self._stream.write(pending)  # a progress bar's "\r..." shows at once
            elif pending:
                self._pending[me] = pending
        return len(text)

    def _line(self, me: int, line: str) -> None:
        held = self._held.get(me)
        if held is None and line.rstrip("\n") != self._START:
            self._stream.write(line)
            return
        held = self._held.setdefault(me, [])
        held.append(line)
        if line.startswith(" "):  # a frame
            return
        if len(held) > 1:  # the traceback's last line
            if not (_asyncio_only(held) and line.rstrip("\n") == self._END):
                self._stream.write("".join(held))
            del self._held[me]

    def flush(self) -> None:
        """Writes out what the calling thread holds (another thread's traceback in the middle
        is its own to finish) and flushes the stream."""
        with self._lock:
            me = threading.get_ident()
            self._stream.write("".join(self._held.pop(me, [])) + self._pending.pop(me, ""))
        self._stream.flush()

    def close_reports(self) -> None:
        """At exit: whatever other threads still hold, but for a traceback that so far is
        asyncio's own (the closed-loop one, cut short by the exit)."""
        with self._lock:
            for me in set(self._held) | set(self._pending):
                held = self._held.pop(me, [])
                if not _asyncio_only(held):
                    self._stream.write("".join(held))
                self._stream.write(self._pending.pop(me, ""))
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _asyncio_only(traceback_lines: list[str]) -> bool:
    """Whether every frame of a traceback's lines is in asyncio's base_events."""
    frames = [x for x in traceback_lines if x.lstrip().startswith("File ")]
    return all(os.path.join("asyncio", "base_events.py") in x for x in frames)


def quiet_background_reports() -> None:
    """Unless JDIFF_DEBUG is set: `_BackgroundReports` on the loggers orbax (absl's) and
    asyncio write through, and no report of the callbacks tensorstore still makes into
    orbax's event loop once a failed write has closed it."""
    if not os.environ.get(DEBUG):
        for name in ("absl", "asyncio"):
            logging.getLogger(name).addFilter(_BackgroundReports())
        sys.stderr = _ClosedLoopReports(sys.stderr)
        atexit.register(sys.stderr.close_reports)


def run_absl(main: Callable[[list[str]], None], *extra: type[BaseException]) -> None:
    """`absl.app.run(main)` behind the door: flag errors and usage errors are one line too."""
    from absl import app, flags

    quiet_background_reports()

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            fail(f"{e} (--helpshort lists the flags)")

    def usage_checked(argv):
        try:
            main(argv)
        except app.UsageError as e:
            fail(str(e))

    app.run(guarded(usage_checked, *extra), flags_parser=parse)


def check_config_argv(argv: list[str], default: str) -> None:
    """Before ml_collections reads `--config` (it applies the overrides as the flag is
    defined): the config file exists and loads, and every `--config.KEY` override names a key
    it has (else the nearest ones). Fails with one line."""
    path = default
    for i, arg in enumerate(argv[1:], 1):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    config = load_config(path)
    for key in overridden_keys(argv):
        if (why := unknown_key(config, key)) is not None:
            fail(why)


def overridden_keys(argv: list[str]) -> list[str]:
    """The dotted keys that `--config.KEY=value` arguments of `argv` set."""
    return [a[len("--config.") :].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]


def load_config(spec: str):
    """The ConfigDict of `path[:variant]`, failing with one line for a missing or broken file
    (the folder above the file's becomes importable, for its imports of its siblings)."""
    import importlib.util
    import pathlib

    name, _, variant = spec.partition(":")
    path = pathlib.Path(name)
    if not path.is_file():
        configs = pathlib.Path(__file__).resolve().parent.parent / "configs"
        known = ", ".join(sorted(p.name for p in configs.glob("*.py"))) if configs.is_dir() else ""
        fail(f"--config {spec}: no such file{f' (configs/ has {known})' if known else ''}")
    # a config imports its siblings as <its folder>.<name> (configs.default): the folder
    # above is importable, whatever the working directory
    above = str(path.resolve().parent.parent)
    if above not in sys.path:
        sys.path.append(above)
    try:
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.get_config(variant) if variant else module.get_config()
    except Exception as e:  # a config file is user code: any failure is its author's to fix
        if os.environ.get(DEBUG):
            raise
        fail(f"--config {spec}: {type(e).__name__}: {describe(e)}")
