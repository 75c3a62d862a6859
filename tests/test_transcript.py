"""Tests of the curious cloud's transcript (splitshield.runtime.transcript), including a crash test:
a real server recording 500 requests from 4 concurrent clients is SIGKILLed mid-way and restarted, and
every request that got a 200 must be in the transcript."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file
from test_server import TOKEN, ServerProcess, free_port, tiny_checkpoint

import splitshield as ss
from splitshield.errors import ConfigError, DataError
from splitshield.runtime.artifacts import export
from splitshield.runtime.codec import CodecOptions, decode, encode
from splitshield.runtime.transcript import (
    TranscriptWriter,
    invert_transcript,
    read_features,
    read_records,
    save_reconstructions,
)


def test_roundtrip_keeps_order_values_and_timestamps(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    writer = TranscriptWriter(db)
    zs = [torch.rand(b, 3, 2, 2, generator=torch.Generator().manual_seed(b)) for b in (2, 1, 3)]
    frames = [encode(zs[0]), encode(zs[1], CodecOptions("uint8", "zstd")), encode(zs[2], CodecOptions("float16"))]
    before = time.time()
    for i, frame in enumerate(frames):
        writer.append(frame, batch=len(zs[i]), request_id=f"r{i}")
    writer.close()
    features, stamps = read_features(db)
    assert features.shape == (6, 3, 2, 2) and stamps.shape == (6,)
    # Exactly what the server decoded from each frame, concatenated in arrival order.
    assert torch.equal(features, torch.cat([decode(f) for f in frames]))
    assert torch.equal(features[:2], zs[0])  # float32 is lossless
    assert before <= float(stamps[0]) <= float(stamps[-1]) <= time.time()
    assert torch.all(stamps[1:] >= stamps[:-1])
    assert [r[2] for r in read_records(db)] == ["r0", "r1", "r2"]
    assert read_features(db, limit=3)[0].shape[0] == 3


def test_transcript_is_append_only_and_reopens(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    TranscriptWriter(db).append(encode(torch.ones(1, 4)), batch=1)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for sql in ("UPDATE frames SET batch = 7", "DELETE FROM frames"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute(sql)
    conn.close()
    writer = TranscriptWriter(db)  # a restarted server appends to the same file
    writer.append(encode(torch.zeros(2, 4)), batch=2)
    writer.close()
    assert read_features(db)[0].tolist() == [[1.0] * 4, [0.0] * 4, [0.0] * 4]


def test_bad_transcripts_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_features(tmp_path / "missing.db")
    (tmp_path / "junk.db").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(DataError, match="not a splitshield transcript"):
        read_features(tmp_path / "junk.db")
    TranscriptWriter(tmp_path / "empty.db").close()
    with pytest.raises(DataError, match="no frames"):
        read_features(tmp_path / "empty.db")
    writer = TranscriptWriter(tmp_path / "mixed.db")
    writer.append(encode(torch.ones(1, 4)), batch=1)
    writer.append(encode(torch.ones(1, 5)), batch=1)
    writer.close()
    with pytest.raises(DataError, match="feature shape"):
        read_features(tmp_path / "mixed.db")


def test_every_answered_request_survives_sigkill(tmp_path: Path) -> None:
    """4 clients x 125 requests; SIGKILL after ~250 answers; restart on the same db; finish."""
    full = tiny_checkpoint(tmp_path)  # served as deployed: the tail alone
    checkpoint = export(full, tmp_path / "edge.safetensors", tmp_path / "cloud.safetensors").cloud
    (tmp_path / "token.txt").write_text(TOKEN)
    db = tmp_path / "transcript.db"
    args = ("--token-file", str(tmp_path / "token.txt"), "--record", str(db))
    port = free_port()
    server = ServerProcess(checkpoint, *args, port=port)
    answered: dict[str, str] = {}  # request id -> sha256 of the frame, for every 200
    lock = threading.Lock()
    failures: list[str] = []
    deadline = time.monotonic() + 90  # bounded: the whole exchange must end well before this

    def client(cid: int) -> None:
        g = torch.Generator().manual_seed(cid)
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as http:
            for i in range(125):
                rid = f"c{cid}-{i}"
                frame = encode(torch.rand(1 + i % 3, 16, 8, 8, generator=g), CodecOptions("float16", "zstd"))
                while time.monotonic() < deadline:  # retry across the crash until the restart answers
                    try:
                        r = http.post("/v1/infer", content=frame, headers={"X-Request-ID": rid})
                    except httpx.TransportError:
                        time.sleep(0.05)
                        continue
                    if r.status_code == 200:
                        with lock:
                            answered[rid] = hashlib.sha256(frame).hexdigest()
                    else:
                        failures.append(f"{rid}: {r.status_code} {r.text[:100]}")
                    break

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    try:
        for t in threads:
            t.start()
        while len(answered) < 250 and time.monotonic() < deadline:
            time.sleep(0.005)
        server.kill()
        killed_after = len(answered)
        server.stop()
        server = ServerProcess(checkpoint, *args, port=port)
        for t in threads:
            t.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        server.stop()
    assert not any(t.is_alive() for t in threads) and failures == []
    assert 250 <= killed_after < 500 and len(answered) == 500
    recorded: dict[str, set[str]] = {}
    for _, _, rid, frame in read_records(db):
        recorded.setdefault(rid, set()).add(hashlib.sha256(frame).hexdigest())
    missing = [rid for rid, digest in answered.items() if digest not in recorded.get(rid, set())]
    assert missing == []
    features, _ = read_features(db)
    assert features.shape[1:] == (16, 8, 8) and features.shape[0] >= sum(1 + i % 3 for i in range(125)) * 4


def test_attack_runs_on_recorded_features(tmp_path: Path, one_thread: None) -> None:
    """A white-box attack on recorded conv1 features reconstructs the images the device saw."""
    torch.manual_seed(0)
    target = ss.split(ss.build_model("lenet"), "conv1", input_shape=(1, 28, 28))
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    writer = TranscriptWriter(tmp_path / "t.db")
    for i in range(3):
        with torch.no_grad():
            writer.append(encode(target.head(x[i : i + 1])), batch=1)
    writer.close()
    attack = ss.WhiteBoxInversion(iters=100, lr=0.05, tv=0.0, progress=False).fit(ss.Victim(target, threat="white_box"))
    images, stamps = invert_transcript(attack, tmp_path / "t.db", target.feature_shape(), batch_size=2)
    assert images.shape == (3, 1, 28, 28) and stamps.shape == (3,)
    # A conv1 feature of an untrained LeNet (8 filters > 1 channel) determines the image almost exactly
    # (34.6 dB after 100 steps when this test was written);
    # a blind guess (all 0.5) of a uniform random image is at about 10.8 dB.
    assert float(ss.metrics.psnr(images, x)) > 25
    tensors, png = save_reconstructions(images, stamps, tmp_path / "out")
    saved = load_file(str(tensors))
    assert torch.equal(saved["x_hat"], images) and torch.equal(saved["received_at"], stamps)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="shape"):
        invert_transcript(attack, tmp_path / "t.db", (16, 8, 8))
