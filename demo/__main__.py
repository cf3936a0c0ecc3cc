"""``python -m demo``: build the offline demo (the same as ``python -m analysis demo``)."""

import sys

from analysis.cli import main

sys.exit(main(["demo", *sys.argv[1:]]))
