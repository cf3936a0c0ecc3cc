"""The real offline demo, built once per test session, for any test that wants it.

Import the fixture into a conftest (``from tests.demo_fixture import demo_build``) or a
test module. It trains the real demo (:func:`analysis.demo.build_demo`, default steps)
into a folder shared by every pytest-xdist worker of the run: the first worker builds it
under the demo's own file lock, the others wait and reuse it.

The build takes about three minutes on two idle cores and can take several times that
on a busy machine, more than the suite's default 600 s timeout: tests that use the
fixture should carry ``pytest.mark.timeout(DEMO_BUILD_TIMEOUT_S)``.
"""

from __future__ import annotations

import pytest

from analysis.demo import DemoManifest, build_demo

DEMO_BUILD_TIMEOUT_S = 1800


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> DemoManifest:
    """The demo as ``python -m analysis demo`` builds it, in a temporary folder."""
    base = tmp_path_factory.getbasetemp()
    # Under xdist each worker has its own basetemp; their parent is shared by the run.
    root = (base if worker_id == "master" else base.parent) / "offline-demo"
    return build_demo(root, progress=False)
