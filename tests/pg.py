"""A real PostgreSQL server for the tests, started by the test session itself.

Debian's `postgresql` package (scripts/install-system.sh installs it): `initdb` into a temporary
folder as an unprivileged user (initdb refuses to run as root, and CI runs as root), `pg_ctl start` on
a free 127.0.0.1 port, stopped and deleted at the end of the session (one server per xdist worker).
Each test gets its own fresh database on it, dropped after the test.

Durability is switched off (fsync, synchronous_commit): a test server that loses its data in a power
cut loses nothing of value, and the suite runs faster.
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

BACKENDS = ("sqlite", "postgresql")
# Runs a database test on SQLite and on PostgreSQL: `@ON_BOTH_DATABASES` or a module's pytestmark.
ON_BOTH_DATABASES = pytest.mark.parametrize("db_backend", BACKENDS, indirect=True)
# A test that opens the SQLite file itself: it stays on SQLite under GPTOSS_TEST_DATABASE=postgresql.
SQLITE_ONLY = pytest.mark.parametrize("db_backend", ["sqlite"], indirect=True)
# Every other test's database: sqlite, or postgresql to run the whole suite on PostgreSQL.
DEFAULT_BACKEND = os.environ.get("GPTOSS_TEST_DATABASE", "sqlite")
MISSING = (
    "PostgreSQL binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin; "
    "scripts/install-system.sh installs Debian's postgresql package"
)
UNPRIVILEGED_USER = "nobody"


def find_bin_dir() -> Path | None:
    """The folder holding initdb and pg_ctl: PATH first, else Debian's newest versioned folder (the
    package keeps them off PATH)."""
    found = shutil.which("initdb")
    if found and (Path(found).resolve().parent / "pg_ctl").exists():
        return Path(found).resolve().parent

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.parent.name))

    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=version)
    return candidates[-1].parent if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="gptoss-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._names = itertools.count()
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam(UNPRIVILEGED_USER)
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as_user = ["runuser", "-u", UNPRIVILEGED_USER, "--"]

    def _run(self, *args: str) -> None:
        command = [*self._as_user, *args]
        done = subprocess.run(command, cwd=self.root, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}\n{tail}")

    def start(self) -> None:
        initdb, pg_ctl = str(self.bin_dir / "initdb"), str(self.bin_dir / "pg_ctl")
        self._run(initdb, "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=300 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c shared_buffers=32MB"
        )
        self._run(pg_ctl, "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60",
                  "-o", options, "start")  # fmt: skip

    def stop(self) -> None:
        try:
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres") as conn:
            conn.autocommit = True  # CREATE / DROP DATABASE cannot run inside a transaction
            conn.execute(sql)  # type: ignore[arg-type]

    def create_database(self) -> str:
        name = f"test_{os.getpid()}_{next(self._names)}"
        self._admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        """FORCE ends the connections a test's engines still hold (pools outlive their test)."""
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
