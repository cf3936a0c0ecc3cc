"""``python -m analysis``: the command line, :func:`cli.main.main`.

The one module of the engine's folder that imports a layer above it (``pyproject.toml``'s
import contracts name this import): the command line composes the engine with the charts
and the demo, and ``python -m analysis`` is the name users know it by.
"""

import sys

from cli import main

sys.exit(main())
