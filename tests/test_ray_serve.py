"""The tail on Ray Serve (:mod:`splitshield.runtime.ray_serve`): the same HTTP API as ``splitshield serve``.

One local Ray cluster (``ray.init(address="local", num_cpus=2)``) and one Serve deployment on a free loopback
port are shared by every test that needs them (module fixture); each request goes over real HTTP through
Ray's proxy to the replica. Option checks run without Ray.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray.serve")

import httpx  # noqa: E402

import splitshield as ss  # noqa: E402
from splitshield.errors import CheckpointError, ConfigError  # noqa: E402
from splitshield.runtime.artifacts import export  # noqa: E402
from splitshield.runtime.client import EdgeClient  # noqa: E402
from splitshield.runtime.codec import CodecOptions, encode  # noqa: E402
from splitshield.runtime.ray_serve import build, tail_application  # noqa: E402

TOKEN = "ray-token-0123456789"
SHAPE = (1, 28, 28)
FEATURE = (16, 8, 8)  # LeNet at ReLU2
MAX_BATCH = 8


def lenet(folder: Path, seed: int) -> tuple[torch.nn.Module, Path, Path, Path]:
    """(uncut model, checkpoint, edge artifact, cloud artifact) of an untrained LeNet cut at ReLU2, no defense."""
    model = ss.build_model("lenet", seed=seed).eval()
    checkpoint = ss.save_checkpoint(folder / "lenet", ss.split(model, "ReLU2", input_shape=SHAPE))
    done = export(checkpoint, folder / "edge.safetensors", folder / "cloud.safetensors")
    return model, checkpoint, done.edge, done.cloud


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path, Path, Path]:
    return lenet(tmp_path_factory.mktemp("ray"), seed=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(files: tuple[torch.nn.Module, Path, Path, Path]) -> Iterator[str]:
    """The cloud artifact deployed on a fresh local Ray cluster; yields the proxy's URL. Ray starts once."""
    import ray
    from ray import serve

    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(tail_application(files[3], token=TOKEN, max_batch=MAX_BATCH, max_delay_ms=20,
                                   ray_actor_options={"num_cpus": 1}), name="splitshield-tail", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and "\n" not in error["message"]


# -- through Ray ---------------------------------------------------------------------------------------------


def test_edge_client_gets_the_full_models_logits(files: tuple[torch.nn.Module, Path, Path, Path], url: str) -> None:
    model, _, edge, _ = files
    x = torch.rand(11, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    with EdgeClient(edge, url, TOKEN, batch_size=4) as client:  # 3 requests of 4, 4 and 3 rows
        info = client.model_info()
        assert info["fingerprint"] == client.fingerprint and info["max_batch"] == MAX_BATCH
        assert info["split"] == "ReLU2" and info["feature_shape"] == list(FEATURE)
        assert torch.allclose(client.predict(x), expected, atol=1e-5)


def test_concurrent_requests_each_get_their_own_rows(files: tuple[torch.nn.Module, Path, Path, Path],
                                                      url: str) -> None:
    # Sent at once, within max_delay_ms: Ray's batching may run them through the tail together (at most
    # MAX_BATCH rows per batch); every request must still get its own rows back, in order.
    model, _, edge, _ = files
    inputs = [torch.rand(rows, *SHAPE, generator=torch.Generator().manual_seed(rows)) for rows in (1, 2, 3, 5, 8, 2)]
    # Clients are built here, one at a time (loading an edge artifact traces the head: not thread-safe); a
    # first send checks each client against the server, so the threads only post their frames.
    clients = [EdgeClient(edge, url, TOKEN) for _ in inputs]
    features = [client.features(x) for client, x in zip(clients, inputs, strict=True)]
    for client, z in zip(clients, features, strict=True):
        client.send(z[:1])
    results: dict[int, torch.Tensor] = {}
    start = threading.Barrier(len(inputs))

    def send(i: int) -> None:
        start.wait(timeout=30)
        results[i] = clients[i].send(features[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for client in clients:
        client.close()
    assert sorted(results) == list(range(len(inputs)))
    with torch.no_grad():
        for i, x in enumerate(inputs):
            assert torch.allclose(results[i], model(x), atol=1e-5), i


def test_edge_client_refuses_a_deployment_of_another_model(url: str, tmp_path: Path) -> None:
    _, _, other_edge, _ = lenet(tmp_path, seed=1)  # same architecture, split and shapes; other weights
    with EdgeClient(other_edge, url, TOKEN) as client:
        theirs = httpx.get(f"{url}/v1/model", headers={"Authorization": f"Bearer {TOKEN}"}).json()["fingerprint"]
        with pytest.raises(ConfigError) as info:
            client.predict(torch.rand(2, *SHAPE))
    message = str(info.value)
    assert theirs in message and client.fingerprint in message and theirs != client.fingerprint
    assert "\n" not in message


def test_wrong_or_missing_token_is_401_with_the_error_json(url: str) -> None:
    frame = encode(torch.zeros(1, *FEATURE))
    for headers in ({"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"}, {}):
        response = httpx.post(f"{url}/v1/infer", content=frame, headers=headers)
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
        assert_error(httpx.get(f"{url}/v1/model", headers=headers), 401, "unauthorized")
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}  # no auth, for load balancers


def test_bad_frames_get_the_servers_error_codes(url: str) -> None:
    auth = {"Authorization": f"bearer {TOKEN}"}  # the scheme is case-insensitive
    small = CodecOptions(encoding="uint8")  # a batch over MAX_BATCH rows, yet a body under the size limit
    for shape in ((2, 16, 8, 7), (2, *FEATURE[1:]), (MAX_BATCH + 1, *FEATURE)):
        response = httpx.post(f"{url}/v1/infer", content=encode(torch.rand(shape), small), headers=auth)
        assert_error(response, 422, "wrong_shape")
    assert_error(httpx.post(f"{url}/v1/infer", content=b"not a frame", headers=auth), 400, "malformed_frame")
    too_big = b"x" * (4 * MAX_BATCH * 16 * 8 * 8 * 2)  # twice the largest legal frame
    assert_error(httpx.post(f"{url}/v1/infer", content=too_big, headers=auth), 413, "payload_too_large")
    assert_error(httpx.get(f"{url}/v1/nothing", headers=auth), 404, "not_found")
    assert_error(httpx.get(f"{url}/v1/infer", headers=auth), 405, "method_not_allowed")
    # The replica is still fine.
    response = httpx.post(f"{url}/v1/infer", content=encode(torch.zeros(3, *FEATURE)),
                          headers={**auth, "X-Request-ID": "r1"})
    assert response.status_code == 200 and response.json()["request_id"] == "r1"
    assert torch.tensor(response.json()["logits"]).shape == (3, 10)


# -- before Ray ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("option", "value"), [
    ("max_batch", 0), ("max_delay_ms", -1.0), ("num_replicas", 0), ("max_ongoing_requests", True),
    ("max_queued_requests", 0), ("ray_actor_options", "num_cpus=1"), ("request_timeout", float("nan")),
    ("token", ""),
])
def test_bad_options_are_one_line_config_errors(files: tuple[torch.nn.Module, Path, Path, Path], option: str,
                                                value: object) -> None:
    kwargs = {"token": TOKEN, option: value}
    with pytest.raises(ConfigError) as info:
        tail_application(files[3], **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_a_full_checkpoint_or_an_edge_artifact_is_refused(files: tuple[torch.nn.Module, Path, Path, Path]) -> None:
    _, checkpoint, edge, _ = files
    with pytest.raises(CheckpointError, match="allow-head-weights") as info:
        tail_application(checkpoint, token=TOKEN)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="edge artifact"):
        tail_application(edge, token=TOKEN)
    with pytest.warns(UserWarning, match="head's weights"):
        tail_application(checkpoint, token=TOKEN, allow_head_weights=True)


def test_builder_reads_serve_run_arguments(files: tuple[torch.nn.Module, Path, Path, Path], tmp_path: Path) -> None:
    from ray.serve import Application

    token_file = tmp_path / "token.txt"
    token_file.write_text(TOKEN + "\n")
    app = build({"cloud_artifact": str(files[3]), "token_file": str(token_file), "num_replicas": "2",
                 "max_delay_ms": "2.5", "num_cpus": "1"})
    assert isinstance(app, Application)
    for args, match in (({"token_file": str(token_file)}, "cloud_artifact"),
                        ({"cloud_artifact": str(files[3]), "token": TOKEN}, "unknown arguments"),
                        ({"cloud_artifact": str(files[3]), "no_auth": "maybe"}, "true/false"),
                        ({"cloud_artifact": str(files[3])}, "--token-file is required")):
        with pytest.raises(ConfigError, match=match):
            build(args)


def test_without_ray_serve_the_import_error_says_what_to_install() -> None:
    import subprocess
    import sys

    code = ("import sys\nsys.modules['ray.serve'] = None  # as if ray[serve] were not installed\n"
            "import splitshield.runtime.ray_serve\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1 and last.startswith("ImportError:") and "pip install 'splitshield[ray]'" in last
