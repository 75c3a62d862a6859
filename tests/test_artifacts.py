"""Split artifacts: the cloud file holds only the tail, both files carry one fingerprint, and the runtime
(server, edge client, CLI) uses them.

Files are read back with safetensors' own reader, independently of the loader under test. Servers run
in-process (uvicorn in a thread on a free loopback port), so every request still goes over real HTTP.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import splitshield as ss
from splitshield.cli import app as cli
from splitshield.defenses import build_defense
from splitshield.errors import CheckpointError, ConfigError
from splitshield.runtime.artifacts import checkpoint_fingerprint, export, load_cloud, load_edge
from splitshield.runtime.client import EdgeClient
from splitshield.runtime.server import TailService, create_app

SRC = Path(__file__).resolve().parents[1] / "src"
TOKEN = "artifact-token-0123456789"
SHAPE = (1, 28, 28)


def lenet_checkpoint(path: Path, seed: int) -> Path:
    """An untrained LeNet cut at ReLU2 with a Shredder defense (it has parameters), initialised from ``seed``."""
    target = ss.split(ss.build_model("lenet", seed=seed), "ReLU2", input_shape=SHAPE)
    defense = build_defense({"name": "shredder", "feature_shape": [16, 8, 8], "seed": seed})
    return ss.save_checkpoint(path, target, defense)


def tensors_and_meta(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["splitshield"])


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(checkpoint, edge artifact, cloud artifact) of one model."""
    folder = tmp_path_factory.mktemp("pair")
    checkpoint = lenet_checkpoint(folder / "lenet", seed=0)
    done = export(checkpoint, folder / "edge.safetensors", folder / "cloud.safetensors")
    return checkpoint, done.edge, done.cloud


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(pair: tuple[Path, Path, Path]) -> Iterator[str]:
    """The cloud artifact served over loopback HTTP by the real app; yields its URL."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(create_app(TailService(pair[2], allow_head_weights=False), TOKEN), host="127.0.0.1",
                            port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert uv.started, "server did not start"
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(timeout=10)


# -- what each file holds ----------------------------------------------------------------------------------


def test_cloud_file_holds_the_tail_and_nothing_of_the_head_or_defense(pair: tuple[Path, Path, Path]) -> None:
    checkpoint, _, cloud = pair
    full = load_file(str(checkpoint))
    cloud_tensors, meta = tensors_and_meta(cloud)
    assert cloud_tensors and all(k.startswith("tail.") for k in cloud_tensors)
    assert not any(k.startswith(("head.", "model.head.", "defense.", "model.", "optim.")) for k in cloud_tensors)
    # Under no name either: no tensor of the head or the defense is in the file, bit for bit.
    secret = {k: v for k, v in full.items() if k.startswith(("model.head.", "defense."))}
    assert any(k.startswith("defense.") for k in secret)  # the test checkpoint has defense parameters
    for name, tensor in secret.items():
        same = [k for k, other in cloud_tensors.items()
                if other.shape == tensor.shape and other.dtype == tensor.dtype and torch.equal(other, tensor)]
        assert not same, f"{name} is in the cloud file as {same}"
    # The tail's tensors are all there, unchanged.
    tail = {k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.tail.")}
    assert cloud_tensors.keys() == tail.keys()
    assert all(torch.equal(cloud_tensors[k], tail[k]) for k in tail)
    # Nor does its description know the defense.
    assert meta["kind"] == "cloud" and "defense" not in meta
    assert meta["split"] == "ReLU2" and meta["input_shape"] == [1, 28, 28] and meta["feature_shape"] == [16, 8, 8]
    assert meta["dtype"] == "float32" and meta["num_classes"] == 10 and meta["model_spec"]["name"] == "lenet"


def test_edge_file_holds_the_head_and_the_defense_only(pair: tuple[Path, Path, Path]) -> None:
    checkpoint, edge, _ = pair
    full = load_file(str(checkpoint))
    tensors, meta = tensors_and_meta(edge)
    expected = {k.removeprefix("model."): v for k, v in full.items() if k.startswith(("model.head.", "defense."))}
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    assert meta["kind"] == "edge" and meta["defense"]["name"] == "shredder"


def test_both_files_carry_the_checkpoints_fingerprint(pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    checkpoint, edge, cloud = pair
    fingerprint = tensors_and_meta(edge)[1]["fingerprint"]
    assert len(fingerprint) == 64 and tensors_and_meta(cloud)[1]["fingerprint"] == fingerprint
    assert checkpoint_fingerprint(checkpoint) == fingerprint
    assert load_cloud(cloud).fingerprint == load_edge(edge).fingerprint == fingerprint
    # Same architecture and split, other weights: another fingerprint.
    other = lenet_checkpoint(tmp_path / "other", seed=1)
    assert checkpoint_fingerprint(other) != fingerprint


def test_the_cloud_process_holds_no_head_module(pair: tuple[Path, Path, Path]) -> None:
    # A fresh interpreter that loads only the cloud artifact: the model it rebuilt had a (freshly
    # initialised) head; once loaded, the only parameters alive are the tail's and no conv layer remains.
    code = ("import gc, torch\n"
            "from splitshield.runtime.artifacts import load_cloud\n"
            f"c = load_cloud({str(pair[2])!r})\n"
            "gc.collect()\n"
            "live = [o for o in gc.get_objects() if isinstance(o, torch.nn.Parameter)]\n"
            "convs = [o for o in gc.get_objects() if isinstance(o, torch.nn.Conv2d)]\n"
            "print(len(live), len(list(c.tail.parameters())), len(convs))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}, check=True)
    live, tail, convs = map(int, out.stdout.split())
    assert live == tail == 6 and convs == 0


# -- serving and the edge client -----------------------------------------------------------------------------


def test_served_cloud_artifact_gives_the_full_models_logits(pair: tuple[Path, Path, Path], server: str) -> None:
    checkpoint, edge, _ = pair
    target, _, _ = ss.load_checkpoint(checkpoint)
    x = torch.rand(6, *SHAPE, generator=torch.Generator().manual_seed(3))
    # Shredder's noise is drawn per call from the client's seeded stream: a twin client with the same seed
    # computes the features the first one sent.
    with EdgeClient(edge, server, TOKEN, batch_size=4, seed=5) as client, \
            EdgeClient(edge, server, TOKEN, seed=5) as twin, EdgeClient(checkpoint, server, TOKEN, seed=5) as full:
        assert client.model_info()["fingerprint"] == client.fingerprint == full.fingerprint
        remote = client.predict(x)
        z = twin.features(x)
        assert torch.equal(z, full.features(x))  # the edge artifact's features are the checkpoint's
        assert not torch.equal(z, twin.features(x))  # (and the noise is really drawn)
    with torch.no_grad():
        assert torch.allclose(remote, target.tail(z), atol=1e-6)
    # The full checkpoint still works on the device, against the cloud artifact: one fingerprint.
    with EdgeClient(checkpoint, server, TOKEN, seed=5) as client:
        assert torch.allclose(client.predict(x), remote, atol=1e-6)


def test_edge_client_refuses_a_cloud_with_another_fingerprint(pair: tuple[Path, Path, Path], server: str,
                                                              tmp_path: Path) -> None:
    other = lenet_checkpoint(tmp_path / "other", seed=1)  # same architecture, split and shapes
    done = export(other, tmp_path / "edge.safetensors", tmp_path / "cloud.safetensors")
    theirs = tensors_and_meta(pair[2])[1]["fingerprint"]
    for device_side in (done.edge, other):
        # predict(), and send() of features computed by the caller: neither reaches a cloud of another model
        for call in (lambda c: c.predict(torch.rand(2, *SHAPE)), lambda c: c.send(c.features(torch.rand(2, *SHAPE)))):
            with EdgeClient(device_side, server, TOKEN) as client, pytest.raises(ConfigError) as info:
                call(client)
            message = str(info.value)
            assert theirs in message and done.fingerprint in message and "\n" not in message


def test_each_side_refuses_the_other_sides_file(pair: tuple[Path, Path, Path]) -> None:
    _, edge, cloud = pair
    with pytest.raises(CheckpointError, match="cloud artifact"):
        EdgeClient(cloud, "http://127.0.0.1:9")
    with pytest.raises(CheckpointError, match="edge artifact"):
        TailService(edge)


def test_tampered_or_padded_cloud_file_is_refused(pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    checkpoint, edge, cloud = pair
    tensors, meta = tensors_and_meta(cloud)
    changed = {**tensors, "tail.fc3.bias": tensors["tail.fc3.bias"] + 1}
    save_file(changed, str(tmp_path / "changed.safetensors"), metadata={"splitshield": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="digest"):
        load_cloud(tmp_path / "changed.safetensors")
    # A cloud file that smuggles the head in is refused, whatever its digests say.
    padded = {**tensors, **{k: v for k, v in tensors_and_meta(edge)[0].items() if k.startswith("head.")}}
    save_file(padded, str(tmp_path / "padded.safetensors"), metadata={"splitshield": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="does not belong in a cloud artifact"):
        load_cloud(tmp_path / "padded.safetensors")
    meta = {**meta, "split": "conv1"}  # an edited description no longer matches its fingerprint
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata={"splitshield": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="fingerprint does not match"):
        load_cloud(tmp_path / "edited.safetensors")


# -- serve refuses head weights ----------------------------------------------------------------------------


def test_serve_refuses_a_full_checkpoint_without_the_flag(pair: tuple[Path, Path, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from splitshield.runtime.server import main

    checkpoint = pair[0]
    result = CliRunner().invoke(cli, ["serve", str(checkpoint), "--no-auth", "--port", "1"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--allow-head-weights" in lines[0] and "splitshield export" in lines[0]
    assert "serving" not in result.output
    assert main([str(checkpoint), "--no-auth", "--port", "1"]) == 2
    assert "head's weights" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="--allow-head-weights"):
        TailService(checkpoint, allow_head_weights=False)


def test_serve_with_the_flag_warns_and_reports_the_same_fingerprint(pair: tuple[Path, Path, Path],
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import uvicorn

    from splitshield.runtime import server

    ran = []  # the app each serve() would run: the server is built and bound, never started
    def started(server: uvicorn.Server, sockets=None) -> None:
        ran.append(server.config.app)
        server.started = True

    monkeypatch.setattr(uvicorn.Server, "run", started)
    server.serve(pair[0], token=None, port=0, allow_head_weights=True)
    assert "WARNING" in capsys.readouterr().err
    service = ran[0].state.service
    assert service.head_weights and service.fingerprint == checkpoint_fingerprint(pair[0])
    server.serve(pair[2], token=None, port=0)  # the cloud artifact: no warning
    assert "WARNING" not in capsys.readouterr().err and not ran[1].state.service.head_weights


# -- the export command --------------------------------------------------------------------------------------


def test_cli_export_writes_both_files(pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["export", str(pair[0]), "--edge", str(tmp_path / "e.safetensors"),
                                      "--cloud", str(tmp_path / "c" / "c.safetensors")])
    assert result.exit_code == 0, result.output
    fingerprint = tensors_and_meta(tmp_path / "e.safetensors")[1]["fingerprint"]
    assert fingerprint in result.output and tensors_and_meta(tmp_path / "c" / "c.safetensors")[1]["kind"] == "cloud"
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("case", ["missing checkpoint", "not safetensors", "edge suffix", "same file",
                                  "artifact as input"])
def test_cli_export_errors_are_one_line(pair: tuple[Path, Path, Path], tmp_path: Path, case: str) -> None:
    checkpoint, edge, _ = pair
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    source, e, c = {
        "missing checkpoint": (tmp_path / "nope.safetensors", "e.safetensors", "c.safetensors"),
        "not safetensors": (tmp_path / "junk.safetensors", "e.safetensors", "c.safetensors"),
        "edge suffix": (checkpoint, "edge.pt", "c.safetensors"),
        "same file": (checkpoint, "x.safetensors", "x.safetensors"),
        "artifact as input": (edge, "e.safetensors", "c.safetensors"),
    }[case]
    result = CliRunner().invoke(cli, ["export", str(source), "--edge", str(tmp_path / e), "--cloud", str(tmp_path / c)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "c.safetensors").exists()


def test_edge_client_needs_a_fingerprint_from_the_server(pair: tuple[Path, Path, Path]) -> None:
    # A server that reports none (an older one) is refused too: the device cannot tell what it runs.
    edge = pair[1]
    info = {"split": "ReLU2", "feature_shape": [16, 8, 8],
            "codec": {"encodings": ["float32"], "compressions": ["none"]}, "max_batch": 8}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=info))
    with EdgeClient(edge, "http://test") as client:
        client._http = httpx.Client(base_url="http://test", transport=transport)
        with pytest.raises(ConfigError, match=r"\(none reported\)"):
            client.predict(torch.rand(1, *SHAPE))
