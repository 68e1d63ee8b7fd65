"""`python -m jdiff.interop`: see `jdiff.interop.cli`; expected failures end in one line."""

from jdiff import cli
from jdiff.interop.cli import main

cli.guarded(main)()
