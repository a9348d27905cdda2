#!/usr/bin/env python
"""Write a model bundle's ``trained_on.txt``: the pixel digests of every cell it was trained on.

    python scripts/write_trained_on.py BUNDLE DATA [DATA ...] [--note TEXT]

DATA are the folders (or files, globs, list files) the model's training cache was made from, e.g.
``../shared/data/cnmc_fold0 ../shared/data/cnmc_fold1``. Each image is decoded by the Rust core and its RGB
pixels hashed (``leukedge.data.pixel_digest``), so a copy of a training cell in another container or under
another name is still recognised. ``leukedge demo`` scores the shipped model only on sample cells that are
not in this list. ``scripts/train_default.py`` runs this as its last step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's leukedge, whatever is installed
from leukedge.artifacts import write_trained_on  # noqa: E402
from leukedge.data import discover, pixel_digests  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("data", nargs="+")
    ap.add_argument("--note", default="", help="A line for the file's header (default: the DATA folder names).")
    args = ap.parse_args(argv)
    t0 = time.time()
    paths = [r.path for r in discover(args.data)]
    digests = pixel_digests(paths)
    bad = [p for p, d in digests.items() if d is None]
    for p in bad:
        print(f"not decodable, left out: {p}", file=sys.stderr)
    note = args.note or "data: " + ", ".join(Path(d).name for d in args.data) + f" ({len(paths) - len(bad)} images)"
    out = write_trained_on(args.bundle, [d for d in digests.values() if d], note=note)
    print(f"{out}: {len(set(d for d in digests.values() if d))} distinct cells from {len(paths)} files "
          f"({time.time() - t0:.1f} s)")
    return 1 if bad and len(bad) == len(paths) else 0


if __name__ == "__main__":
    sys.exit(main())
