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
    check_transcript,
    invert_transcript,
    iter_features,
    iter_records,
    read_features,
    read_records,
    rotated_path,
    rotated_transcripts,
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


# -- bounded transcript: rotation, --limit, validation -------------------------------------------------------


def frames_of(n: int, size: int = 4096) -> list[bytes]:
    """``n`` distinct float32 frames of one vector of ``size`` values (about 16 KB each)."""
    return [encode(torch.full((1, size), float(i))) for i in range(n)]


def test_rotation_into_numbered_files_keeps_every_row(tmp_path: Path) -> None:
    db = tmp_path / "transcript.db"
    writer = TranscriptWriter(db, max_bytes=64 * 1024)
    for i, frame in enumerate(frames_of(20)):
        writer.append(frame, batch=1, request_id=f"r{i}")
    writer.close()
    rotated = rotated_transcripts(db)
    assert writer.rotations >= 3 and rotated == [rotated_path(db, n) for n in range(1, writer.rotations + 1)]
    assert rotated[0].name == "transcript.1.db"
    assert not any(p.with_name(p.name + "-wal").exists() for p in rotated)  # checkpointed before the rename
    # Oldest file first, then newer ones: every row, in arrival order, none lost.
    ids = [rid for path in (*reversed(rotated), db) for _, _, rid, _ in read_records(path)]
    assert ids == [f"r{i}" for i in range(20)]
    for path in rotated:  # each file is a transcript on its own, a little over the limit at most
        assert path.stat().st_size <= 64 * 1024 + 2 * 16 * 1024
        assert read_features(path)[0].shape[1:] == (4096,)


def test_rotation_keeps_only_the_newest_files(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    writer = TranscriptWriter(db, max_bytes=40 * 1024, keep=2)
    for i, frame in enumerate(frames_of(30)):
        writer.append(frame, batch=1, request_id=f"r{i}")
    writer.close()
    assert writer.rotations > 2 and rotated_transcripts(db) == [tmp_path / "t.1.db", tmp_path / "t.2.db"]
    ids = [rid for path in (tmp_path / "t.2.db", tmp_path / "t.1.db", db) for _, _, rid, _ in read_records(path)]
    assert ids == [f"r{i}" for i in range(30 - len(ids), 30)]  # the newest rows, contiguous
    none_kept = TranscriptWriter(tmp_path / "u.db", max_bytes=40 * 1024, keep=0)
    for frame in frames_of(10):
        none_kept.append(frame, batch=1)
    none_kept.close()
    assert none_kept.rotations > 0 and rotated_transcripts(tmp_path / "u.db") == []


def test_a_failed_rotation_keeps_recording_in_the_same_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A rotation that cannot move its file (disk full, permissions) is logged; no frame and no later request
    is lost."""
    from splitshield.runtime import transcript

    def disk_full(source: Path, target: Path | None) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transcript, "_move", disk_full)
    db = tmp_path / "transcript.db"
    writer = TranscriptWriter(db, max_bytes=40 * 1024)
    for i, frame in enumerate(frames_of(10)):
        writer.append(frame, batch=1, request_id=f"r{i}")
    writer.close()
    assert writer.rotations == 0 and rotated_transcripts(db) == []
    assert [rid for _, _, rid, _ in read_records(db)] == [f"r{i}" for i in range(10)]
    assert "rotation failed" in caplog.text and "No space left" in caplog.text


def test_server_rotates_its_transcript(tmp_path: Path) -> None:
    full = tiny_checkpoint(tmp_path)
    cloud = export(full, tmp_path / "edge.safetensors", tmp_path / "cloud.safetensors").cloud
    (tmp_path / "token.txt").write_text(TOKEN)
    db = tmp_path / "transcript.db"
    server = ServerProcess(cloud, "--token-file", str(tmp_path / "token.txt"), "--record", str(db),
                           "--record-max-mb", "0.05", "--record-keep", "1")
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            for i in range(12):  # 4 x 16 x 8 x 8 float32 = 16 KB a frame; 0.05 MiB holds about 3
                r = http.post("/v1/infer", content=encode(torch.rand(4, 16, 8, 8)), headers={"X-Request-ID": f"r{i}"})
                assert r.status_code == 200, r.text
    finally:
        server.stop()
    assert rotated_transcripts(db) == [tmp_path / "transcript.1.db"]  # --record-keep 1
    ids = [rid for path in (tmp_path / "transcript.1.db", db) for _, _, rid, _ in read_records(path)]
    assert ids == [f"r{i}" for i in range(12 - len(ids), 12)] and len(ids) < 12


def test_limit_reads_at_most_n_rows_streaming(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import splitshield.runtime.transcript as transcript

    db = tmp_path / "t.db"
    writer = TranscriptWriter(db)
    for i in range(50):
        writer.append(encode(torch.full((3, 4), float(i))), batch=3)
    writer.close()
    assert [r[0] for r in iter_records(db, limit=2)] == [1, 2]
    features, stamps = read_features(db, limit=4)
    assert features[:, 0].tolist() == [0, 0, 0, 1] and stamps.shape == (4,)
    decoded = []
    monkeypatch.setattr(transcript, "decode", lambda frame, **kw: decoded.append(1) or decode(frame, **kw))
    batches = iter_features(db, batch_size=5)
    z, t = next(batches)
    assert z.shape == (5, 4) and t.shape == (5,)
    assert len(decoded) == 2  # two rows read for the first batch: the rest of the file is not
    assert sum(len(z) for z, _ in iter_features(db, limit=7, batch_size=5)) == 7
    with pytest.raises(ConfigError, match="--limit"):
        read_features(db, limit=0)


def test_transcripts_are_checked_before_use(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    writer = TranscriptWriter(db)
    writer.append(encode(torch.ones(2, 16, 8, 8)), batch=2)
    writer.close()
    assert check_transcript(db, (16, 8, 8)) == (16, 8, 8)
    with pytest.raises(ConfigError, match=r"shape \(16, 8, 8\).*\(8, 14, 14\)"):
        check_transcript(db, (8, 14, 14))
    TranscriptWriter(tmp_path / "empty.db").close()
    with pytest.raises(DataError, match="no frames"):
        check_transcript(tmp_path / "empty.db")
    foreign = sqlite3.connect(tmp_path / "foreign.db")
    foreign.execute("CREATE TABLE results (x)")
    foreign.commit()
    foreign.close()
    with pytest.raises(DataError, match="not a splitshield transcript"):
        check_transcript(tmp_path / "foreign.db")
    with pytest.raises(DataError, match="something else"):  # the writer does not add tables to it
        TranscriptWriter(tmp_path / "foreign.db")
    assert {r[0] for r in sqlite3.connect(tmp_path / "foreign.db").execute("SELECT name FROM sqlite_master")} == {
        "results"}
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(ConfigError, match="--record .*writable"):
        TranscriptWriter(tmp_path / "file" / "t.db")


def test_cli_attack_transcript_limit_and_validation(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from splitshield.cli import app

    torch.manual_seed(0)
    target = ss.split(ss.build_model("lenet"), "ReLU2", input_shape=(1, 28, 28))
    checkpoint = ss.save_checkpoint(tmp_path / "lenet", target)
    db = tmp_path / "t.db"
    writer = TranscriptWriter(db)
    with torch.no_grad():
        for _ in range(4):
            writer.append(encode(target.head(torch.rand(3, 1, 28, 28))), batch=3)
    writer.close()
    runner = CliRunner()
    attack = ["attack", str(checkpoint), "--attack", "rmle", "--options", '{"iters": 5}']
    result = runner.invoke(app, [*attack, "--transcript", str(db), "--limit", "5", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    saved = load_file(str(tmp_path / "out" / "reconstructions.safetensors"))
    assert saved["x_hat"].shape == (5, 1, 28, 28)
    TranscriptWriter(tmp_path / "other.db").append(encode(torch.ones(1, 8, 14, 14)), batch=1)
    (tmp_path / "junk.db").write_bytes(b"junk" * 100)
    for args, expected in (([*attack, "--transcript", str(db), "--limit", "0"], "--limit"),
                           ([*attack, "--limit", "3"], "--transcript"),
                           ([*attack, "--transcript", str(tmp_path / "other.db")], "shape"),
                           ([*attack, "--transcript", str(tmp_path / "junk.db")], "not a splitshield transcript"),
                           (["attack", str(checkpoint), "--attack", "model_completion", "--transcript", str(db)],
                            "inversion attack")):
        start = time.monotonic()
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and expected in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and time.monotonic() - start < 30  # before fitting
