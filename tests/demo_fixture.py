"""The real offline demo for any test that wants it, reused where one is built.

Import the fixture into a conftest (``from tests.demo_fixture import demo_build``) or a
test module. It uses the demo in :data:`DEMO_ROOT`: the one ``./run.sh`` (the dashboard)
or ``python -m analysis demo`` built in ``cache/demo`` is reused at once when its
manifest is complete and of the current :data:`demo.DEMO_VERSION` and default
steps; otherwise it is built there once (and then serves the dashboard too). Every
pytest-xdist worker asks :func:`demo.build_demo`, whose file lock makes one
build and the others wait and reuse it; tests only read it.

A build takes about three minutes on two idle cores and can take several times that on
a busy machine, more than the suite's default 600 s timeout: tests that use the fixture
carry ``pytest.mark.timeout(DEMO_BUILD_TIMEOUT_S)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from demo import DemoManifest, build_demo, default_demo_root

DEMO_BUILD_TIMEOUT_S = 1800
#: Where the tests find (or build) the demo: ``$WSE_TEST_DEMO_ROOT``, else the default
#: ``<cache dir>/demo``, fixed when the tests are collected (before any test changes
#: ``WSE_CACHE_DIR``).
DEMO_ROOT = Path(os.environ.get("WSE_TEST_DEMO_ROOT") or default_demo_root())


@pytest.fixture(scope="session")
def demo_build() -> DemoManifest:
    """The demo as ``python -m analysis demo`` builds it (reused, or built once)."""
    return build_demo(DEMO_ROOT, progress=False)
