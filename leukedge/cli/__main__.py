"""``python -m leukedge.cli``: the ``leukedge`` command."""

from . import main

main()
