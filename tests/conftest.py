"""Fixtures shared by the NI kernel's tests (test_kernel, test_hostile_scanner, test_quarantine,
test_streams, test_tcp_reassembly, test_stream_edit).  tests/ is on sys.path (rootdir conftest), so helpers import as `nikit`, `vdriver`."""
import pytest

from nikit import Kit


@pytest.fixture
def kits():
    """kits(policies, **kw) -> a running Kit (daemon + two simulated guests); all closed after."""
    made = []

    def make(policies=None, **kw) -> Kit:
        k = Kit(policies, **kw)
        made.append(k)
        return k

    yield make
    for k in made:
        k.close()


@pytest.fixture
def kit():
    """One running Kit with default policies, closed after."""
    k = Kit()
    yield k
    k.close()
