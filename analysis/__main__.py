"""``python -m analysis``: the command line, :func:`analysis.cli.main`."""

import sys

from analysis.cli import main

sys.exit(main())
