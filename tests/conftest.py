"""Fixtures shared by the Python tests in tests/sdk, tests/system and
tests/deploy: live `eddy serve` processes from tests/eddy_harness.py."""

import signal
import tempfile

import pytest

from eddy_harness import Cluster, Node


@pytest.fixture(scope="session")
def node():
    with tempfile.TemporaryDirectory(prefix="eddy-sdk-") as d:
        n = Node(d).start()
        yield n
        n.kill(signal.SIGTERM)


@pytest.fixture
def tmpdir_factory_path():
    with tempfile.TemporaryDirectory(prefix="eddy-test-") as d:
        yield d


@pytest.fixture(scope="module")
def cluster():
    with tempfile.TemporaryDirectory(prefix="eddy-cluster-") as d:
        c = Cluster(d).start()
        yield c
        c.kill_all()
