"""``python -m leukedge`` (and ``torchrun ... -m leukedge train ...``): the ``leukedge`` command line."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="leukedge")
