"""``python -m demo``: build the offline demo (the same as ``python -m analysis demo``)."""

from __future__ import annotations

import argparse
import sys

from analysis.errors import InputError
from demo.cli import DESCRIPTION, add_arguments, run

parser = add_arguments(argparse.ArgumentParser(prog="python -m demo", description=DESCRIPTION))
try:
    sys.exit(run(parser.parse_args()))
except InputError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
