"""Fixtures of the multi-process cluster tests (see cluster_support.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.cluster_support import Cluster, running_cluster

# prekeys: a small bucket, so that test_multinode can exhaust it through one node and see it on another.
MULTINODE_LIMITS: dict[str, dict[str, float]] = {"prekeys": {"capacity": 2, "permit_seconds": 600}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three nodes for the whole module (fresh schema and key prefix); the sweep is 300 s, so only the
    Redis wake-ups can make a cross-node delivery happen within a test."""
    with running_cluster(tmp_path_factory.mktemp("cluster"), nodes=3, sweep_seconds=300,
                         rate_limits=MULTINODE_LIMITS) as started:
        yield started
