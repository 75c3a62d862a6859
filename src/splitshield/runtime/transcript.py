"""What a curious cloud keeps: every feature frame it received, with a timestamp, in SQLite.

The server (``splitshield serve --record transcript.db``) appends each accepted frame *exactly as it
arrived on the wire* (the codec bytes, so nothing is re-encoded or lost) and commits before it sends
the response: a request that got an answer is on disk even if the server is killed right after.
The database is in WAL mode with ``synchronous=FULL`` (each commit is fsynced, so it survives a
process kill and a power cut) and is append-only: triggers make ``UPDATE`` and ``DELETE`` fail.

:func:`read_features` turns a transcript back into the feature tensor the attacks consume, so
``splitshield attack --transcript transcript.db`` runs the inversion attacks on what was really sent.
Reading streams: rows are fetched one at a time, so ``--limit N`` holds at most N feature vectors.

Size bound (``splitshield serve --record transcript.db --record-max-mb M [--record-keep K]``): rows are
never deleted. When the file passes M MiB it is closed and *rotated*, as logrotate does:
``transcript.db`` becomes ``transcript.1.db``, an older ``transcript.1.db`` becomes ``transcript.2.db``, and
so on, and a fresh ``transcript.db`` is started. With ``--record-keep K`` only the K newest rotated files
are kept (the oldest is deleted), so the disk holds at most about (K + 1) x M MiB; without it every rotated
file is kept. Each file is a complete transcript on its own (:func:`rotated_transcripts` lists them).

Schema (table ``frames``)::

    id           INTEGER PRIMARY KEY AUTOINCREMENT   arrival order
    received_at  REAL      seconds since the Unix epoch (server clock)
    request_id   TEXT      the client's X-Request-ID header, or NULL
    batch        INTEGER   number of feature vectors in the frame (its first dim)
    frame        BLOB      the codec frame (see :mod:`splitshield.runtime.codec`)
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import CodecError, ConfigError, DataError
from .codec import decode, read_header

_log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ..attacks.base import InversionAttack

__all__ = ["TranscriptWriter", "check_transcript", "invert_transcript", "iter_features", "iter_records",
           "read_features", "read_records", "rotated_path", "rotated_transcripts", "save_reconstructions"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,
    request_id TEXT,
    batch INTEGER NOT NULL,
    frame BLOB NOT NULL
);
CREATE TRIGGER IF NOT EXISTS frames_no_update BEFORE UPDATE ON frames
BEGIN SELECT RAISE(ABORT, 'transcript is append-only'); END;
CREATE TRIGGER IF NOT EXISTS frames_no_delete BEFORE DELETE ON frames
BEGIN SELECT RAISE(ABORT, 'transcript is append-only'); END;
"""


class TranscriptWriter:
    """Append-only, crash-safe recorder of received frames; safe to call from many threads.

    Parameters
    ----------
    path : str or Path
        SQLite file; created if missing, appended to if it exists (a restarted server keeps
        recording into the same transcript).
    max_bytes : int, optional
        Rotate (see the module's docstring) once the database is larger than this after a commit.
    keep : int, optional
        Rotated files kept (the newest); ``None`` keeps them all.
    """

    def __init__(self, path: str | Path, max_bytes: int | None = None, keep: int | None = None):
        if max_bytes is not None and max_bytes < 1:
            raise ConfigError(f"max_bytes: a positive size, got {max_bytes}")
        if keep is not None and keep < 0:
            raise ConfigError(f"keep: a count >= 0 of rotated transcripts, got {keep}")
        self.path, self.max_bytes, self.keep = Path(path), max_bytes, keep
        self.rotations = 0
        # One connection guarded by a lock: SQLite serialises writers anyway, and a single
        # connection avoids "database is locked" retries between our own threads.
        self._lock = threading.Lock()
        self._conn = self._open()
        self._page_size = int(self._conn.execute("PRAGMA page_size").fetchone()[0])

    def _open(self) -> sqlite3.Connection:
        """Open (creating if needed) the transcript at ``self.path``; refuses an SQLite file of another kind."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.OperationalError) as exc:
            raise ConfigError(f"--record {self.path}: cannot write a transcript there ({exc}); choose a writable "
                              "folder") from None
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables - {"frames", "sqlite_sequence"}:
                raise DataError(f"--record {self.path} is an SQLite file of something else (tables "
                                f"{sorted(tables)}): record to a new file")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.OperationalError as exc:
            conn.close()
            raise ConfigError(f"--record {self.path}: cannot write a transcript there ({exc}); choose a writable "
                              "file") from None
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise DataError(f"cannot record to {self.path}: {exc} (is it a splitshield transcript?)") from None
        except DataError:
            conn.close()
            raise
        return conn

    def append(self, frame: bytes, batch: int, request_id: str | None = None) -> int:
        """Store one frame and commit it; returns its row id. Blocks until the commit is durable, then
        rotates the file if it has passed ``max_bytes``."""
        with self._lock:
            cur = self._conn.execute(
                "INSERT INTO frames (received_at, request_id, batch, frame) VALUES (?, ?, ?, ?)",
                (time.time(), request_id, int(batch), sqlite3.Binary(frame)),
            )
            row_id = int(cur.lastrowid)
            if self.max_bytes is not None and self._size() > self.max_bytes:
                self._rotate()
            return row_id

    def _size(self) -> int:
        """Bytes of the database as its readers see it (main file and write-ahead log together)."""
        return int(self._conn.execute("PRAGMA page_count").fetchone()[0]) * self._page_size

    def _rotate(self) -> None:
        """Close the full file, shift the numbered ones (deleting those beyond ``keep``), start a new one."""
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()
        try:
            for number in sorted(_rotation_numbers(self.path), reverse=True):
                keep_it = self.keep is None or number < self.keep
                _move(rotated_path(self.path, number), rotated_path(self.path, number + 1) if keep_it else None)
            _move(self.path, rotated_path(self.path, 1) if self.keep != 0 else None)
            self.rotations += 1
        except OSError as exc:
            # The frame is committed already: recording goes on (in the current file) rather than every later
            # request failing because a file could not be moved (disk full, permissions).
            _log.warning("transcript %s: rotation failed (%s); recording continues in the same file", self.path, exc)
        finally:
            self._conn = self._open()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def rotated_path(path: str | Path, number: int) -> Path:
    """The ``number``-th rotated file of transcript ``path``: ``transcript.db`` -> ``transcript.1.db``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.{number}{path.suffix}")


def _rotation_numbers(path: Path) -> list[int]:
    numbers = []
    for candidate in path.parent.glob(f"{path.stem}.*{path.suffix}"):
        middle = candidate.name[len(path.stem) + 1 : len(candidate.name) - len(path.suffix)]
        if middle.isdigit() and rotated_path(path, int(middle)) == candidate:
            numbers.append(int(middle))
    return numbers


def rotated_transcripts(path: str | Path) -> list[Path]:
    """The rotated files of transcript ``path`` that exist, newest first (``transcript.1.db``, ...)."""
    path = Path(path)
    return [rotated_path(path, n) for n in sorted(_rotation_numbers(path))]


def _move(path: Path, to: Path | None) -> None:
    """Rename (to ``to``) or delete (``None``) an SQLite file with its ``-wal`` and ``-shm`` companions."""
    for suffix in ("", "-wal", "-shm"):
        source = path.with_name(path.name + suffix)
        if not source.exists():
            continue
        if to is None:
            source.unlink()
        else:
            source.replace(to.with_name(to.name + suffix))


def _open_readonly(path: str | Path) -> sqlite3.Connection:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"transcript {path} does not exist (record one with: splitshield serve ... --record {path})")
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        conn.execute("SELECT id, received_at, request_id, batch, frame FROM frames LIMIT 0")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise DataError(f"{path} is not a splitshield transcript: {exc}") from None
    return conn


def iter_records(path: str | Path, limit: int | None = None) -> Iterator[tuple[int, float, str | None, bytes]]:
    """Rows of a transcript in arrival order, ``(id, received_at, request_id, frame)``, fetched one at a
    time from SQLite (at most ``limit`` rows)."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit: a positive number, got {limit}")
    conn = _open_readonly(path)
    sql = "SELECT id, received_at, request_id, frame FROM frames ORDER BY id"
    try:
        rows = conn.execute(sql + " LIMIT ?", (limit,)) if limit is not None else conn.execute(sql)
        for i, t, r, f in rows:
            yield int(i), float(t), r, bytes(f)
    except sqlite3.DatabaseError as exc:
        raise DataError(f"transcript {path} cannot be read: {exc}") from None
    finally:
        conn.close()


def read_records(path: str | Path) -> list[tuple[int, float, str | None, bytes]]:
    """All rows of a transcript in arrival order: ``(id, received_at, request_id, frame)``."""
    return list(iter_records(path))


def check_transcript(path: str | Path, feature_shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Validate a transcript before an attack is fitted on it; returns its feature shape.

    The file must be a readable SQLite transcript (the ``frames`` table with its columns) holding at least
    one frame, whose header is a valid codec frame of features of ``feature_shape``. Only the first row is
    read, so this is cheap on any size; :func:`iter_features` checks every later frame as it reads it.

    Raises
    ------
    DataError
        Missing, not a transcript, empty, or a first frame that is not a codec frame.
    ConfigError
        Features of another shape than ``feature_shape`` (the transcript of another model or split).
    """
    conn = _open_readonly(path)
    try:
        row = conn.execute("SELECT id, frame FROM frames ORDER BY id LIMIT 1").fetchone()
    except sqlite3.DatabaseError as exc:
        raise DataError(f"transcript {path} cannot be read: {exc}") from None
    finally:
        conn.close()
    if row is None:
        raise DataError(f"transcript {path} holds no frames")
    try:
        shape = tuple(read_header(bytes(row[1])).shape[1:])
    except CodecError as exc:
        raise DataError(f"transcript {path}: frame {row[0]} is not a codec frame ({exc})") from None
    if feature_shape is not None and shape != tuple(feature_shape):
        raise ConfigError(f"transcript {path} holds features of shape {shape}, the checkpoint's split gives "
                          f"{tuple(feature_shape)}: attack it with the checkpoint the server hosted")
    return shape


def iter_features(path: str | Path, limit: int | None = None, batch_size: int = 256,
                  feature_shape: tuple[int, ...] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Stream a transcript's features in batches of ``batch_size`` vectors (the last may be smaller).

    Yields ``(features [n, *shape] float32, timestamps [n] float64)`` in arrival order, at most ``limit``
    vectors in all (reading at most ``limit`` rows); memory holds about one batch and one frame.

    Raises
    ------
    DataError
        Frames that disagree on the feature shape, or are not valid codec frames.
    ConfigError
        Features not of ``feature_shape`` (when given), or ``limit`` / ``batch_size`` below 1.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size: a positive number of vectors, got {batch_size}")
    zs: list[torch.Tensor] = []
    ts: list[torch.Tensor] = []
    pending = total = 0
    shape = tuple(feature_shape) if feature_shape is not None else None
    for row_id, received_at, _, frame in iter_records(path, limit=limit):
        z = _decode_row(path, row_id, frame, shape)
        shape = tuple(z.shape[1:])
        if limit is not None:
            z = z[: limit - total]
        zs.append(z)
        ts.append(torch.full((len(z),), received_at, dtype=torch.float64))
        pending, total = pending + len(z), total + len(z)
        while pending >= batch_size:
            z_all, t_all = torch.cat(zs), torch.cat(ts)
            yield z_all[:batch_size], t_all[:batch_size]
            zs, ts, pending = [z_all[batch_size:]], [t_all[batch_size:]], pending - batch_size
        if limit is not None and total >= limit:
            break
    if pending:
        yield torch.cat(zs), torch.cat(ts)


def _decode_row(path: str | Path, row_id: int, frame: bytes, shape: tuple[int, ...] | None) -> torch.Tensor:
    """One row's features; the shape must be ``shape`` (the first frame's, or the target's) when given."""
    try:
        header = read_header(frame)
        if shape is not None and tuple(header.shape[1:]) != shape:
            raise DataError(f"{path}: frame {row_id} has feature shape {tuple(header.shape[1:])}, earlier frames "
                            f"(or the model) {shape}")
        return decode(frame, max_bytes=len(frame) + 8 * header.numel + 1024)
    except CodecError as exc:
        raise DataError(f"{path}: frame {row_id} is not a valid codec frame ({exc})") from None


def read_features(path: str | Path, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the recorded frames (at most ``limit`` vectors) into one feature tensor.

    Parameters
    ----------
    path : str or Path
        A transcript written by :class:`TranscriptWriter`.
    limit : int, optional
        Return at most this many feature vectors (the earliest); at most that many rows are read.

    Returns
    -------
    features : torch.Tensor
        float32 ``[N, *feature_shape]``: the frames' batches concatenated in arrival order, values as
        the server decoded them (quantized encodings are dequantized).
    timestamps : torch.Tensor
        float64 ``[N]``, seconds since the Unix epoch at which each vector's frame arrived.

    Raises
    ------
    DataError
        If the file is missing, not a transcript, empty, or its frames disagree on the feature shape.
    """
    parts = list(iter_features(path, limit=limit, batch_size=4096))
    if not parts:
        raise DataError(f"transcript {path} holds no frames")
    return torch.cat([z for z, _ in parts]), torch.cat([t for _, t in parts])


def invert_transcript(attack: InversionAttack, path: str | Path, feature_shape: tuple[int, ...],
                      limit: int | None = None, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a fitted inversion attack on the features a transcript recorded, streaming them.

    Parameters
    ----------
    attack : InversionAttack
        Already fitted (``attack.fit(victim)``) against the model the server hosts.
    path : str or Path
        The transcript (validated first, :func:`check_transcript`).
    feature_shape : tuple of int
        The hosted model's feature shape (``target.feature_shape()``); recorded features must match.
    limit : int, optional
        Invert at most this many (the earliest) features; at most that many rows are read.
    batch_size : int
        Features per ``invert`` call; besides the reconstructions, memory holds about one batch.

    Returns
    -------
    images : torch.Tensor
        Reconstructions ``[N, C, H, W]`` in [0, 1].
    timestamps : torch.Tensor
        ``[N]`` arrival times (seconds since the Unix epoch).
    """
    check_transcript(path, feature_shape)
    images, stamps = [], []
    for z, t in iter_features(path, limit=limit, batch_size=batch_size, feature_shape=tuple(feature_shape)):
        images.append(attack.invert(z).detach().cpu())
        stamps.append(t)
    return torch.cat(images), torch.cat(stamps)


def save_reconstructions(images: torch.Tensor, timestamps: torch.Tensor, out_dir: str | Path,
                         grid: int = 64) -> tuple[Path, Path]:
    """Write ``reconstructions.safetensors`` (``x_hat`` [N, C, H, W] in [0, 1], ``received_at`` [N]) and a PNG
    grid of the first ``grid`` reconstructions (8 per row); returns the two paths."""
    from safetensors.torch import save_file
    from torchvision.utils import save_image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = out / "reconstructions.safetensors"
    save_file({"x_hat": images.detach().cpu().contiguous(), "received_at": timestamps.contiguous()}, str(tensors))
    png = out / "transcript_grid.png"
    save_image(images[:grid].detach().cpu().clamp(0, 1), png, nrow=8, padding=1)
    return tensors, png
