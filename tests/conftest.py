"""Fixtures shared by the NI kernel's and the simulated-driver tests (test_kernel, test_hostile_scanner, test_quarantine,
test_streams, test_tcp_reassembly, test_stream_edit).  tests/ is on sys.path (rootdir conftest), so helpers import as `nikit`, `vdriver`."""
import pytest

from nibench import Bench
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


@pytest.fixture
def make_bench():
    """make_bench(names=("a", "b"), **kw) -> a simulated-driver Bench (tests/nibench.py); all
    closed after."""
    benches = []

    def make(names=("a", "b"), **kw) -> Bench:
        b = Bench(names, **kw)
        benches.append(b)
        return b

    yield make
    for b in benches:
        b.close()


@pytest.fixture
def bench(make_bench):
    """One Bench of guests a and b."""
    return make_bench()
