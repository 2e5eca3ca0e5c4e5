"""A throwaway PostgreSQL cluster for the tests: made once per session in a temporary folder
(listening on a unix socket there, no TCP port), a fresh database for each test that asks for
one, stopped and removed at the end.

Where PostgreSQL's binaries are missing, the tests that need them are skipped, or fail when
IMGSIM_REQUIRE_POSTGRES=1, as CI sets it, so that they never pass there by not running. The
`database` fixture runs a test once with each item store: SQLite (None) and PostgreSQL.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from index.database import Database
from index.folder import ITEMS_FILE

BINARIES = Path("/usr/lib/postgresql/15/bin")  # Debian's postgresql-15
PORT = 5432  # names the socket file only: the cluster listens on no TCP port
_names = itertools.count()


@dataclass(frozen=True)
class Cluster:
    """A running PostgreSQL server for tests, reached through the socket in its folder."""

    folder: Path
    as_owner: list[str]  # how its commands run as the cluster's owner
    options: str  # the server's settings, as pg_ctl -o takes them

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def log(self) -> Path:
        return self.folder / "server.log"  # the server's output: a pipe would keep _run waiting

    def restart(self) -> None:
        """Stop the server (closing every connection to it) and start it again."""
        pg_ctl = [*self.as_owner, BINARIES / "pg_ctl", "-D", self.data, "-l", self.log]
        _run([*pg_ctl, "-m", "fast", "-w", "restart"])  # with the options it was started with

    def stop(self) -> None:
        """Stop the server, closing every connection to it (start brings it back)."""
        _run([*self.as_owner, BINARIES / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop"])

    def start(self) -> None:
        """Start the stopped server again."""
        pg_ctl = [*self.as_owner, BINARIES / "pg_ctl", "-D", self.data, "-l", self.log]
        _run([*pg_ctl, "-o", self.options, "-w", "start"])

    def url(self, name: str) -> str:
        return f"postgresql://postgres@/{name}?host={self.folder}&port={PORT}"

    def new_database(self) -> str:
        """The URL of a new, empty database."""
        import psycopg

        name = f"test_{next(_names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """A PostgreSQL server of its own for the session (initdb, pg_ctl start; stop, remove)."""
    missing = [name for name in ("initdb", "pg_ctl", "postgres") if not (BINARIES / name).is_file()]
    if missing:
        message = (
            f"PostgreSQL's {', '.join(missing)} not found in {BINARIES}: install postgresql-15 "
            "(apt-get install -y postgresql-15) to run the tests of the PostgreSQL item store"
        )
        if os.environ.get("IMGSIM_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{message}; IMGSIM_REQUIRE_POSTGRES=1 requires them", pytrace=False)
        pytest.skip(message)
    with throwaway_cluster() as cluster:
        yield cluster


@contextmanager
def throwaway_cluster() -> Iterator[Cluster]:
    """A new PostgreSQL server in a temporary folder, stopped and removed afterwards (also used
    by benchmarks/replicas.py)."""
    folder = Path(tempfile.mkdtemp(prefix="imgsim-pg-"))
    as_owner: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: the postgres user owns the folder
        shutil.chown(folder, "postgres", "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    settings = f"-k {folder} -p {PORT} -c listen_addresses='' -c max_connections=300"
    cluster = Cluster(folder, as_owner, settings)
    data = cluster.data
    try:
        _run([*as_owner, BINARIES / "initdb", "-D", data, "-U", "postgres", "-A", "trust",
              "-E", "UTF8", "--no-sync"])  # fmt: skip
        cluster.start()
        yield cluster
    finally:
        if (data / "postmaster.pid").exists():
            _run([*as_owner, BINARIES / "pg_ctl", "-D", data, "-m", "immediate", "stop"])
        shutil.rmtree(folder, ignore_errors=True)


def _run(command: Sequence[object]) -> None:
    """Run a command; AssertionError with its output if it fails."""
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}{done.stderr}"


@pytest.fixture
def postgres_url(postgres: Cluster) -> str:
    """The URL of a new, empty database on the session's server."""
    return postgres.new_database()


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest) -> Database | None:
    """Where a test's collection keeps its items: None, its folder's items.sqlite; or a new
    PostgreSQL database. A test that takes it runs once with each."""
    if request.param == "sqlite":
        return None
    return Database(request.getfixturevalue("postgres_url"))


def behind_imgsims_back(
    directory: Path, database: Database | None, statement: str, parameters: Sequence[Any] = ()
) -> list[tuple]:
    """Run one statement on a collection's item database, SQLite's or PostgreSQL's (? marks
    its parameters), committed; returns the rows it gives."""
    if database is None:
        connection = sqlite3.connect(directory / ITEMS_FILE)
        try:
            with connection:
                return connection.execute(statement, parameters).fetchall()
        finally:
            connection.close()
    import psycopg

    options = f"-c search_path={database.schema}"
    with psycopg.connect(database.url, autocommit=True, options=options) as connection:
        cursor = connection.execute(statement.replace("?", "%s"), parameters or None)
        return cursor.fetchall() if cursor.description else []
