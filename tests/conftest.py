"""Shared fixtures: every storage test runs on SQLite and on PostgreSQL.

PostgreSQL tests use ``MAILSLOT_TEST_PG_URL`` (default: the local server's ``test`` database) in a
schema of their own, dropped at the end. Under ``CI=true`` an unreachable PostgreSQL fails the run
instead of skipping its tests.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from mailslot.app import create_app
from mailslot.config import Settings, load_settings

PG_URL = os.environ.get("MAILSLOT_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
TEST_NUMBERS = {f"+1555555{i:04d}": "123456" for i in range(100)}


async def _pg_exec(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_URL.replace("postgresql://", "postgres://"), timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _pg_available() -> bool:
    try:
        asyncio.run(_pg_exec("SELECT 1"))
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_schema() -> Iterator[str]:
    if not _pg_available():
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is not reachable at {PG_URL} and CI=true: refusing to skip")
        pytest.skip("PostgreSQL is not reachable")
    schema = f"mailslot_test_{os.getpid()}_{secrets.token_hex(3)}"
    asyncio.run(_pg_exec(f"CREATE SCHEMA {schema}"))
    yield schema
    asyncio.run(_pg_exec(f"DROP SCHEMA {schema} CASCADE"))


def _truncate_all(schema: str) -> None:
    from mailslot.backends.sql.tables import metadata

    names = ", ".join(f"{schema}.{t.name}" for t in metadata.sorted_tables if t.name != "schema_migrations")

    async def run() -> None:
        try:
            await _pg_exec(f"TRUNCATE {names} CASCADE")
        except Exception as exc:  # tables not created yet on the first test
            if "does not exist" not in str(exc):
                raise

    asyncio.run(run())


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_settings(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, truncate: bool = True, **extra: Any
) -> Settings:
    storage: dict[str, Any] = {"data_dir": str(tmp_path)}
    if backend == "postgres":
        schema = request.getfixturevalue("pg_schema")
        if truncate:
            _truncate_all(schema)
        storage.update(url=PG_URL, schema=schema, pool_size=5)
    else:
        storage["url"] = f"sqlite:///{tmp_path}/mailslot.db"
    registration = {"test_numbers": TEST_NUMBERS, **extra.pop("registration", {})}
    return load_settings(storage=storage, registration=registration, **extra)


@pytest.fixture
def settings(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    return make_settings(backend, tmp_path, request)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client
