"""Run many invocations of the programs as real processes that skip the libraries' imports.

    python tests/forked_programs.py CASES.json OUTCOMES.json [--parallel 3] [--timeout 300]

CASES.json is a list of {"name", "argv"} (argv[0] a script path, or "-m" and a module name,
then its arguments; an argument given as {"bytes": [...]} is passed as those bytes). This
process imports JAX, Flax, orbax, tfds and jdiff once, without starting a JAX backend, then
forks a child per case: the child sets sys.argv, sends stdout and stderr to one file, runs
the script or module as `__main__` (runpy) and exits with its status, as `python PROGRAM
ARGS` would, without the two seconds of imports each. OUTCOMES.json: {name: [status,
output]}; a child past the timeout is killed (status -9).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import runpy
import signal
import sys
import tempfile
import time
import traceback


def preload() -> None:
    """The libraries every program imports (no JAX backend starts: children may fork)."""
    import absl.app  # noqa: F401
    import flax.linen  # noqa: F401
    import jax  # noqa: F401
    import ml_collections.config_flags  # noqa: F401
    import optax  # noqa: F401
    import orbax.checkpoint  # noqa: F401
    import tensorflow_datasets  # noqa: F401

    import jdiff.evaluation
    import jdiff.interop
    import jdiff.programs
    import jdiff.sampling
    import jdiff.trainer  # noqa: F401


def child(argv: list[str], output: str) -> None:
    """In the forked child: run argv as `python argv...` would; never returns."""
    code = 1
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = str(pathlib.Path(argv[0]).resolve().parent)
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:  # as the interpreter exits for `sys.exit(code)`
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cases")
    parser.add_argument("outcomes")
    parser.add_argument("--parallel", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    cases = json.loads(pathlib.Path(args.cases).read_text())
    preload()
    folder = pathlib.Path(tempfile.mkdtemp(prefix="forked_programs_"))
    running: dict[int, tuple[str, pathlib.Path, float]] = {}
    outcomes: dict[str, list] = {}
    queue = list(cases)
    while queue or running:
        while queue and len(running) < args.parallel:
            case = queue.pop(0)
            argv = [os.fsdecode(bytes(a["bytes"])) if isinstance(a, dict) else a
                    for a in case["argv"]]  # fmt: skip
            output = folder / f"{len(outcomes) + len(running)}.txt"
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                child(argv, str(output))
            running[pid] = (case["name"], output, time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for other, (_, _, started) in running.items():
                if time.monotonic() - started > args.timeout:
                    os.kill(other, signal.SIGKILL)
            time.sleep(0.02)
            continue
        name, output, _ = running.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        outcomes[name] = [code, output.read_text(errors="replace")]
    pathlib.Path(args.outcomes).write_text(json.dumps(outcomes))


if __name__ == "__main__":
    main()
