"""The consistent-hash ring: stable placement, and adding a shard moves only about 1/N of the keys."""

from __future__ import annotations

import random
import uuid
from collections import Counter

import pytest

from mailslot.backends.sharding.ring import HashRing


def _ids(count: int, seed: int = 7) -> list[uuid.UUID]:
    rng = random.Random(seed)
    return [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(count)]


def test_placement_is_deterministic_and_independent_of_the_process() -> None:
    ids = _ids(200)
    first, second = HashRing(4), HashRing(4)
    assert [first.shard_for(i) for i in ids] == [second.shard_for(i) for i in ids]
    # SHA-256 based, so fixed forever (a changed hash function would strand every row).
    assert HashRing(4).shard_for("number:+15555550100") == HashRing(4).shard_for(b"number:+15555550100")
    assert HashRing(1).shard_for(uuid.uuid4()) == 0


def test_adding_a_fourth_shard_moves_about_a_quarter_and_only_to_it() -> None:
    ids = _ids(10_000)
    old, new = HashRing(3), HashRing(4)
    moved = [i for i in ids if old.shard_for(i) != new.shard_for(i)]
    assert 0.18 <= len(moved) / len(ids) <= 0.32
    assert all(new.shard_for(i) == 3 for i in moved)


def test_keys_spread_roughly_evenly() -> None:
    ring = HashRing(4)
    counts = Counter(ring.shard_for(i) for i in _ids(10_000))
    assert sorted(counts) == [0, 1, 2, 3]
    assert all(1_800 <= n <= 3_200 for n in counts.values()), counts


def test_a_ring_needs_a_shard() -> None:
    with pytest.raises(ValueError):
        HashRing(0)
