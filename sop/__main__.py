"""``python -m sop`` = the ``sop`` command (used to start child processes with this interpreter)."""

from sop.cli import main

main()
