"""The SQLite store: WAL mode, one transaction per cell, no duplicates, results survive reopening."""

from __future__ import annotations

import sqlite3

import pytest

from splitshield.errors import ConfigError
from splitshield.store import CellRecord, ResultStore


def _cell(h: str, target: str = "t1") -> dict:
    return {"hash": h, "target_hash": target, "dataset": "mnist-5k", "model": "lenet", "split": "ReLU2",
            "defense": {"name": "none"}, "defense_label": "none", "attack": {"name": "white_box"},
            "attack_label": "white_box", "seed": 0, "config": {"k": h}}


def _record(h: str, value: float = 0.5) -> CellRecord:
    return CellRecord(h, [("ssim", 0, value), ("ssim", 1, value + 0.1), ("ssim", -1, value + 0.05)],
                      {"compute_seconds": 1.0}, {"reconstruction": f"artifacts/{h}.safetensors"})


@pytest.fixture
def store(tmp_path):
    with ResultStore(tmp_path / "results.db") as s:
        run = s.start_run("test", {"a": 1}, "local", 2)
        s.register_cells(run, [_cell("a"), _cell("b")])
        yield s


def test_wal_mode_and_tables(store):
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    names = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"runs", "cells", "metrics", "artifacts"} <= names


def test_record_writes_rows_status_and_artifacts(store):
    store.record(_record("a"))
    assert store.status() == {"a": "done", "b": "pending"}
    done = store.cells()
    assert [c["hash"] for c in done] == ["a"]
    assert done[0]["metrics"] == {"ssim": pytest.approx(0.55)}
    assert done[0]["artifacts"]["reconstruction"] == store.root / "artifacts/a.safetensors"
    assert done[0]["config"] == {"k": "a"} and done[0]["defense"] == {"name": "none"}
    assert len(store.metric_rows()) == 3


def test_recording_twice_replaces_rows_without_duplicates(store):
    store.record(_record("a", 0.5))
    store.record(_record("a", 0.7))
    rows = store.metric_rows()
    assert len(rows) == 3
    assert sorted(v for _, _, i, v in rows if i >= 0) == pytest.approx([0.7, 0.8])


def test_a_failing_write_leaves_the_cell_untouched(store):
    store.record(_record("a", 0.5))
    # A duplicate (name, image_index) violates the primary key half-way through the inserts.
    bad = CellRecord("a", [("psnr", 0, 1.0), ("psnr", 0, 2.0)], {}, {})
    with pytest.raises(sqlite3.IntegrityError):
        store.record(bad)
    assert store.status()["a"] == "done"
    assert {(n, i) for _, n, i, _ in store.metric_rows()} == {("ssim", 0), ("ssim", 1), ("ssim", -1)}
    bad_new = CellRecord("b", [("psnr", 0, 1.0), ("psnr", 0, 2.0)], {}, {})
    with pytest.raises(sqlite3.IntegrityError):
        store.record(bad_new)
    assert store.status()["b"] == "pending"
    assert all(h == "a" for h, *_ in store.metric_rows())


def test_register_again_keeps_finished_cells_and_reopen_persists(tmp_path):
    path = tmp_path / "results.db"
    with ResultStore(path) as s:
        run = s.start_run("test", {}, "local", 1)
        s.register_cells(run, [_cell("a")])
        s.record(_record("a"))
    with ResultStore(path) as s:
        run = s.start_run("test", {}, "local", 2)
        s.register_cells(run, [_cell("a"), _cell("c")])
        assert s.status() == {"a": "done", "c": "pending"}
        assert len(s.runs()) == 2


def test_failure_is_recorded_and_nan_stored_as_null(store):
    store.record_failure("b", "RuntimeError: boom")
    assert store.status()["b"] == "failed"
    assert store.cells(status="failed")[0]["error"] == "RuntimeError: boom"
    store.record(CellRecord("a", [("psnr", -1, float("nan")), ("mse", -1, 0.0)], {}, {}))
    assert store.cells()[0]["metrics"] == {"psnr": None, "mse": 0.0}


def test_not_a_database_is_a_config_error(tmp_path):
    from splitshield.errors import ConfigError

    path = tmp_path / "results.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError, match="not a usable SQLite"):
        ResultStore(path)


def test_a_database_of_another_program_is_refused_untouched(tmp_path):
    import hashlib

    from splitshield.errors import ConfigError

    path = tmp_path / "mlflow.db"
    with sqlite3.connect(path) as conn:  # MLflow's store has runs and metrics tables too
        conn.execute("CREATE TABLE runs (run_uuid TEXT PRIMARY KEY)")
        conn.execute("CREATE TABLE metrics (key TEXT, value REAL)")
    conn.close()
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    for opener in (ResultStore, ResultStore.open_readonly):
        with pytest.raises(ConfigError, match="not a splitshield results store: expected the tables runs, cells, "
                                              "metrics, artifacts, its tables are metrics, runs"):
            opener(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_open_readonly_reads_beside_a_writer_and_cannot_write(store):
    store.record(_record("a"))
    with ResultStore.open_readonly(store.path) as ro:
        assert ro.readonly and ro.status() == {"a": "done", "b": "pending"}
        assert ro.cells()[0]["metrics"] == {"ssim": pytest.approx(0.55)}
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            ro.record_failure("b", "nope")
    assert store.status()["b"] == "pending"


def test_checkpoint_puts_every_write_in_the_database_file(store, tmp_path):
    store.record(_record("a"))
    wal = store.path.with_name(store.path.name + "-wal")
    assert wal.stat().st_size > 0  # the write is still in the log, not in results.db
    assert store.checkpoint()
    copy = tmp_path / "copy" / "results.db"  # the database file alone, as git would commit it
    copy.parent.mkdir()
    copy.write_bytes(store.path.read_bytes())
    with ResultStore.open_readonly(copy) as ro:
        assert ro.status() == {"a": "done", "b": "pending"}
    with ResultStore.open_readonly(store.path) as ro, pytest.raises(ConfigError, match="read-only"):
        ro.checkpoint()
