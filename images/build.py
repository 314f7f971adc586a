#!/usr/bin/env python3
"""Build the vhostni test guest into images/out (what `make images` runs).

    python3 images/build.py --out images/out [--cache images/cache] [--add SRC[:DEST]] [--hook SCRIPT] [--force]

A thin entry point for a checkout: the builder is vhostni/images.py, which an installed vhostni runs as
`vhostni images build` (same options; its defaults are ~/.cache/vhostni/images and ~/.cache/vhostni/debs).
This file imports the checkout's own vhostni package, so it needs no install, and re-exports the builder's
names (tests and scripts that load this file keep working).
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from vhostni.images import *  # noqa: E402,F401,F403
from vhostni.images import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_out=HERE / "out", default_cache=HERE / "cache", prog="images/build.py"))
