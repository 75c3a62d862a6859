"""What a curious cloud keeps: every feature frame it received, with a timestamp, in SQLite.

The server (``splitshield serve --record transcript.db``) appends each accepted frame *exactly as it
arrived on the wire* (the codec bytes, so nothing is re-encoded or lost) and commits before it sends
the response: a request that got an answer is on disk even if the server is killed right after.
The database is in WAL mode with ``synchronous=FULL`` (each commit is fsynced, so it survives a
process kill and a power cut) and is append-only: triggers make ``UPDATE`` and ``DELETE`` fail.

:func:`read_features` turns a transcript back into the feature tensor the attacks consume, so
``splitshield attack --transcript transcript.db`` runs the inversion attacks on what was really sent.

Schema (table ``frames``)::

    id           INTEGER PRIMARY KEY AUTOINCREMENT   arrival order
    received_at  REAL      seconds since the Unix epoch (server clock)
    request_id   TEXT      the client's X-Request-ID header, or NULL
    batch        INTEGER   number of feature vectors in the frame (its first dim)
    frame        BLOB      the codec frame (see :mod:`splitshield.runtime.codec`)
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError, DataError
from .codec import decode, read_header

if TYPE_CHECKING:
    from ..attacks.base import InversionAttack

__all__ = ["TranscriptWriter", "invert_transcript", "read_features", "read_records", "save_reconstructions"]

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
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection guarded by a lock: SQLite serialises writers anyway, and a single
        # connection avoids "database is locked" retries between our own threads.
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
            self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise DataError(f"cannot record to {self.path}: {exc} (is it a splitshield transcript?)") from None

    def append(self, frame: bytes, batch: int, request_id: str | None = None) -> int:
        """Store one frame and commit it; returns its row id. Blocks until the commit is durable."""
        with self._lock:
            cur = self._conn.execute(
                "INSERT INTO frames (received_at, request_id, batch, frame) VALUES (?, ?, ?, ?)",
                (time.time(), request_id, int(batch), sqlite3.Binary(frame)),
            )
            return int(cur.lastrowid)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _open_readonly(path: str | Path) -> sqlite3.Connection:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"transcript {path} does not exist (record one with: splitshield serve ... --record {path})")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        conn.execute("SELECT id, received_at, request_id, batch, frame FROM frames LIMIT 0")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise DataError(f"{path} is not a splitshield transcript: {exc}") from None
    return conn


def read_records(path: str | Path) -> list[tuple[int, float, str | None, bytes]]:
    """All rows of a transcript in arrival order: ``(id, received_at, request_id, frame)``."""
    conn = _open_readonly(path)
    try:
        rows = conn.execute("SELECT id, received_at, request_id, frame FROM frames ORDER BY id").fetchall()
    finally:
        conn.close()
    return [(int(i), float(t), r, bytes(f)) for i, t, r, f in rows]


def read_features(path: str | Path, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every recorded frame into one feature tensor.

    Parameters
    ----------
    path : str or Path
        A transcript written by :class:`TranscriptWriter`.
    limit : int, optional
        Return at most this many feature vectors (the earliest).

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
    chunks: list[torch.Tensor] = []
    stamps: list[torch.Tensor] = []
    shape: tuple[int, ...] | None = None
    total = 0
    for row_id, received_at, _, frame in read_records(path):
        header = read_header(frame)
        if shape is None:
            shape = header.shape[1:]
        elif header.shape[1:] != shape:
            raise DataError(f"{path}: frame {row_id} has feature shape {header.shape[1:]}, earlier ones {shape}")
        z = decode(frame, max_bytes=len(frame) + 8 * header.numel + 1024)
        chunks.append(z)
        stamps.append(torch.full((z.shape[0],), received_at, dtype=torch.float64))
        total += z.shape[0]
        if limit is not None and total >= limit:
            break
    if not chunks:
        raise DataError(f"transcript {path} holds no frames")
    features, timestamps = torch.cat(chunks), torch.cat(stamps)
    if limit is not None:
        features, timestamps = features[:limit], timestamps[:limit]
    return features, timestamps


def invert_transcript(attack: InversionAttack, path: str | Path, feature_shape: tuple[int, ...],
                      limit: int | None = None, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a fitted inversion attack on every feature a transcript recorded.

    Parameters
    ----------
    attack : InversionAttack
        Already fitted (``attack.fit(victim)``) against the model the server hosts.
    path : str or Path
        The transcript.
    feature_shape : tuple of int
        The hosted model's feature shape (``target.feature_shape()``); recorded features must match.
    limit : int, optional
        Invert at most this many (the earliest) features.
    batch_size : int
        Features per ``invert`` call.

    Returns
    -------
    images : torch.Tensor
        Reconstructions ``[N, C, H, W]`` in [0, 1].
    timestamps : torch.Tensor
        ``[N]`` arrival times (seconds since the Unix epoch).
    """
    features, timestamps = read_features(path, limit=limit)
    if tuple(features.shape[1:]) != tuple(feature_shape):
        raise ConfigError(f"transcript {path} holds features of shape {tuple(features.shape[1:])}, the checkpoint's "
                          f"split gives {tuple(feature_shape)}: attack it with the checkpoint the server hosted")
    images = torch.cat([attack.invert(features[i : i + batch_size]).detach().cpu()
                        for i in range(0, len(features), batch_size)])
    return images, timestamps


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
