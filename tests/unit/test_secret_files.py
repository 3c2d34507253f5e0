"""Generated secrets when several nodes start at once on one empty data_dir: every starter gets the same
complete value, nobody fails (this raced: one got an empty key, another FileExistsError)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailslot.sealed_sender_setup import _generated
from mailslot.wiring import _secret_file


def race(starters: int, start: Callable[[], Any]) -> list[Any]:
    barrier = threading.Barrier(starters)
    results: list[Any] = [None] * starters

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = start()
        except Exception as exc:  # noqa: BLE001 - the test reports whatever a starter raised
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(starters)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_secret_files_are_created_once_under_a_race(tmp_path: Path) -> None:
    for trial in range(30):
        directory = tmp_path / str(trial)
        results = race(6, lambda d=directory: _secret_file(d, "jwt.secret"))
        assert all(isinstance(r, bytes) and len(r) == 32 for r in results), results
        assert len(set(results)) == 1
        assert [p.name for p in directory.iterdir()] == ["jwt.secret"]  # no temporary file left behind
        assert (directory / "jwt.secret").stat().st_mode & 0o777 == 0o600


def test_generated_sealed_sender_keys_are_created_once_under_a_race(tmp_path: Path) -> None:
    for trial in range(10):
        directory = tmp_path / str(trial)
        results = race(4, lambda d=directory: _generated(d))
        assert all(isinstance(r, dict) for r in results), results
        assert all(r == results[0] for r in results)
