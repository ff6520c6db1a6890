import pytest

from dsaforge.config import SandboxConfig
from dsaforge.synth import sandbox as sbx

requires_bwrap = pytest.mark.skipif(sbx.bwrap_problem() is not None, reason=f"bwrap unusable: {sbx.bwrap_problem()}")


@pytest.fixture(scope="session")
def sandbox():
    return sbx.Sandbox(SandboxConfig(wall_seconds=30))
