"""`python -m jdiff.interop`: see `jdiff.interop.cli`."""

from jdiff.interop.cli import main

main()
