"""`mailslot migrate` with `[storage] urls` migrates every shard."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path


def test_migrate_applies_every_step_on_every_shard(tmp_path: Path) -> None:
    shards = [tmp_path / f"shard{i}.db" for i in range(3)]
    config = tmp_path / "mailslot.toml"
    urls = ", ".join(f'"sqlite:///{path}"' for path in shards)
    config.write_text(f'[storage]\nurls = [{urls}]\ndata_dir = "{tmp_path}/data"\n')
    result = subprocess.run([sys.executable, "-m", "mailslot", "migrate", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, check=True)
    applied = json.loads(result.stdout.strip().splitlines()[-1])["applied"]
    assert len(applied) == 3 and all(steps == applied[0] and steps for steps in applied)
    for path in shards:
        with sqlite3.connect(path) as conn:
            versions = [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
        assert versions == sorted(applied[0])
