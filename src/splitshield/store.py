"""The results store: one SQLite file (``results.db``, WAL mode) holding every run, cell and metric.

Tables
------
``runs``       one row per ``splitshield run`` invocation (spec JSON, executor, start/end times).
``cells``      one row per cell, keyed by the hash of its full configuration; ``status`` is ``pending``,
               ``done`` or ``failed``; timings in seconds.
``metrics``    ``(cell, name, image_index, value)``; ``image_index = -1`` is the cell's aggregate (mean
               over the evaluation images), ``>= 0`` a single evaluation image.
``artifacts``  ``(cell, kind, path)``: checkpoints, reconstruction tensors (safetensors), PNG grids; paths
               relative to the database's folder.

A cell's metrics, artifacts and ``done`` status are written in **one transaction**, so a process killed
at any instant leaves each cell either complete or absent: rerunning finishes the rest, never
duplicating a row (the primary keys forbid it) and never losing a finished one.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    executor TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    cells_total INTEGER,
    cells_run INTEGER
);
CREATE TABLE IF NOT EXISTS cells (
    hash TEXT PRIMARY KEY,
    run_id INTEGER REFERENCES runs(id),
    target_hash TEXT NOT NULL,
    dataset TEXT NOT NULL,
    model TEXT NOT NULL,
    split TEXT NOT NULL,
    defense TEXT NOT NULL,
    defense_label TEXT NOT NULL,
    attack TEXT NOT NULL,
    attack_label TEXT NOT NULL,
    seed INTEGER NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    error TEXT,
    started_at REAL,
    finished_at REAL,
    train_seconds REAL,
    attack_seconds REAL,
    compute_seconds REAL,
    target_cached INTEGER
);
CREATE TABLE IF NOT EXISTS metrics (
    cell_hash TEXT NOT NULL REFERENCES cells(hash),
    name TEXT NOT NULL,
    image_index INTEGER NOT NULL,
    value REAL,
    PRIMARY KEY (cell_hash, name, image_index)
);
CREATE TABLE IF NOT EXISTS artifacts (
    cell_hash TEXT NOT NULL REFERENCES cells(hash),
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY (cell_hash, kind)
);
"""


@dataclass
class CellRecord:
    """What a finished cell contributes to the store (produced by a worker, written by the driver).

    Attributes
    ----------
    metrics:
        ``(name, image_index, value)``; ``image_index = -1`` for the aggregate.
    timings:
        ``train_seconds``, ``attack_seconds``, ``compute_seconds`` (worker wall time for the cell).
    artifacts:
        ``kind -> path`` relative to the database folder.
    """

    cell_hash: str
    metrics: list[tuple[str, int, float]]
    timings: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    target_cached: bool = False


#: The tables every splitshield results store has (those :data:`SCHEMA` creates).
TABLES: tuple[str, ...] = tuple(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", SCHEMA))


class ResultStore:
    """A results database. Open it with the path of ``results.db`` (created when missing), or read one
    without writing anything with :meth:`open_readonly` (``readonly=True``). Either way, a file that is not
    SQLite, or an SQLite database of another program (tables, but not a store's), is refused untouched."""

    def __init__(self, path: str | Path, *, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        if readonly:
            self.conn = _connect_readonly(self.path)
            self.conn.row_factory = sqlite3.Row
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
        except sqlite3.Error as exc:
            raise ConfigError(f"{self.path}: cannot open it as a results database ({exc})") from None
        try:
            _check_tables(self.conn, self.path, new_ok=True)  # before WAL mode rewrites the file's header
            self.conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            raise ConfigError(f"{self.path} is not a usable SQLite results database: {exc}") from None
        self.conn.execute("PRAGMA synchronous=NORMAL")  # durable at each commit's WAL sync, safe with WAL
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.row_factory = sqlite3.Row
        self.conn.executescript(f"BEGIN IMMEDIATE;{SCHEMA}COMMIT;")  # all the tables or none

    @classmethod
    def open_readonly(cls, path: str | Path) -> ResultStore:
        """Open an existing results store for reading only (SQLite ``mode=ro``): nothing is created or written.

        A missing file, a file that is not SQLite, and an SQLite database without the store's tables
        (:data:`TABLES`) are each refused with a one-line :class:`ConfigError`; the file is left as it was.
        """
        return cls(path, readonly=True)

    @property
    def root(self) -> Path:
        """The folder artifact paths are relative to."""
        return self.path.parent

    def close(self) -> None:
        self.conn.close()

    def checkpoint(self) -> bool:
        """Copy every committed write from the write-ahead log into ``results.db`` itself, so the one file holds
        the whole store (e.g. before copying or committing it). It never waits for, or blocks, runs writing to
        the store; returns ``False`` when one kept part of the log from being copied (nothing is lost; call
        again when it has finished)."""
        if self.readonly:
            raise ConfigError(f"{self.path} is open read-only; open it writable to checkpoint it")
        busy, logged, copied = self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return not busy and logged == copied

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writing ----------------------------------------------------------------------------

    def _transaction(self):
        return _Transaction(self.conn)

    def start_run(self, name: str, spec: dict[str, Any], executor: str, cells_total: int) -> int:
        with self._transaction():
            cur = self.conn.execute(
                "INSERT INTO runs (name, spec, executor, started_at, cells_total) VALUES (?, ?, ?, ?, ?)",
                (name, json.dumps(spec, sort_keys=True), executor, time.time(), cells_total))
        return int(cur.lastrowid)

    def finish_run(self, run_id: int, cells_run: int) -> None:
        with self._transaction():
            self.conn.execute("UPDATE runs SET finished_at = ?, cells_run = ? WHERE id = ?",
                              (time.time(), cells_run, run_id))

    def register_cells(self, run_id: int, cells: Iterable[dict[str, Any]]) -> None:
        """Insert cells not yet known (status ``pending``); known cells keep their status and results."""
        rows = [(c["hash"], run_id, c["target_hash"], c["dataset"], c["model"], c["split"],
                 json.dumps(c["defense"], sort_keys=True), c["defense_label"], json.dumps(c["attack"], sort_keys=True),
                 c["attack_label"], c["seed"], json.dumps(c["config"], sort_keys=True)) for c in cells]
        with self._transaction():
            self.conn.executemany(
                "INSERT OR IGNORE INTO cells (hash, run_id, target_hash, dataset, model, split, defense, defense_label,"
                " attack, attack_label, seed, config) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def record(self, rec: CellRecord) -> None:
        """Write a finished cell: its metrics, artifacts and ``done`` status, atomically."""
        with self._transaction():
            # Leftovers of an earlier attempt cannot exist (writes are atomic), but a cell re-run on
            # purpose replaces its rows rather than failing on the primary key.
            self.conn.execute("DELETE FROM metrics WHERE cell_hash = ?", (rec.cell_hash,))
            self.conn.execute("DELETE FROM artifacts WHERE cell_hash = ?", (rec.cell_hash,))
            self.conn.executemany("INSERT INTO metrics (cell_hash, name, image_index, value) VALUES (?, ?, ?, ?)",
                                  [(rec.cell_hash, n, i, _finite_or_none(v)) for n, i, v in rec.metrics])
            self.conn.executemany("INSERT INTO artifacts (cell_hash, kind, path) VALUES (?, ?, ?)",
                                  [(rec.cell_hash, k, p) for k, p in rec.artifacts.items()])
            t = rec.timings
            self.conn.execute(
                "UPDATE cells SET status = 'done', error = NULL, finished_at = ?, train_seconds = ?, "
                "attack_seconds = ?, compute_seconds = ?, target_cached = ? WHERE hash = ?",
                (time.time(), t.get("train_seconds"), t.get("attack_seconds"), t.get("compute_seconds"),
                 int(rec.target_cached), rec.cell_hash))

    def record_failure(self, cell_hash: str, error: str) -> None:
        with self._transaction():
            self.conn.execute("UPDATE cells SET status = 'failed', error = ?, finished_at = ? WHERE hash = ?",
                              (error, time.time(), cell_hash))

    # ---- reading ----------------------------------------------------------------------------

    def status(self, hashes: Iterable[str] | None = None) -> dict[str, str]:
        """``cell hash -> status`` for the given cells (all when ``None``)."""
        rows = self.conn.execute("SELECT hash, status FROM cells").fetchall()
        wanted = None if hashes is None else set(hashes)
        return {r["hash"]: r["status"] for r in rows if wanted is None or r["hash"] in wanted}

    def cells(self, status: str | None = "done") -> list[dict[str, Any]]:
        """Cells (``done`` ones by default) with their configs decoded and aggregate metrics attached.

        Each dict has the ``cells`` columns plus ``metrics`` (``name -> aggregate value``) and
        ``artifacts`` (``kind -> absolute path``).
        """
        query = "SELECT * FROM cells" + (" WHERE status = ?" if status else "") + " ORDER BY rowid"
        rows = [dict(r) for r in self.conn.execute(query, (status,) if status else ())]
        metrics: dict[str, dict[str, float]] = {}
        for r in self.conn.execute("SELECT cell_hash, name, value FROM metrics WHERE image_index = -1"):
            metrics.setdefault(r["cell_hash"], {})[r["name"]] = r["value"]
        artifacts: dict[str, dict[str, Path]] = {}
        for r in self.conn.execute("SELECT cell_hash, kind, path FROM artifacts"):
            artifacts.setdefault(r["cell_hash"], {})[r["kind"]] = self.root / r["path"]
        for row in rows:
            for key in ("defense", "attack", "config"):
                row[key] = json.loads(row[key])
            row["metrics"] = metrics.get(row["hash"], {})
            row["artifacts"] = artifacts.get(row["hash"], {})
        return rows

    def metric_rows(self) -> list[tuple[str, str, int, float | None]]:
        """Every metrics row ``(cell_hash, name, image_index, value)``, in a stable order."""
        return [tuple(r) for r in self.conn.execute(
            "SELECT cell_hash, name, image_index, value FROM metrics ORDER BY cell_hash, name, image_index")]

    def runs(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM runs ORDER BY id")]


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection to the results store at ``path``, its tables checked; ``ConfigError`` otherwise."""
    if not path.is_file():
        raise ConfigError(f"results database {path} does not exist; run `splitshield run SPEC --db {path}` first")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0, isolation_level=None)
    except sqlite3.Error as exc:
        raise ConfigError(f"{path}: cannot open it for reading ({exc})") from None
    try:
        _check_tables(conn, path, new_ok=False)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise ConfigError(f"{path} is not a splitshield results store: not an SQLite database ({exc}); "
                          "expected the results.db written by `splitshield run`") from None
    except ConfigError:
        conn.close()
        raise
    return conn


def _check_tables(conn: sqlite3.Connection, path: Path, new_ok: bool) -> None:
    """``ConfigError`` unless the database holds every table of a store (:data:`TABLES`), or, with ``new_ok``,
    no table at all (a new store). Reads only; ``sqlite3.DatabaseError`` when the file is not SQLite."""
    found = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    missing = [t for t in TABLES if t not in found]
    if missing and (found or not new_ok):
        has = f"its tables are {', '.join(sorted(found))}" if found else "it has no tables"
        conn.close()
        raise ConfigError(f"{path} is not a splitshield results store: expected the tables {', '.join(TABLES)}, "
                          f"{has}; it was left unchanged")


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ``ROLLBACK`` on error) on an autocommit connection."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _finite_or_none(value: float) -> float | None:
    """SQLite stores inf but not NaN distinctly; NaN (an undefined metric) is stored as NULL."""
    value = float(value)
    return None if value != value else value
