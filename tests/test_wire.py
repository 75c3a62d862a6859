"""What was measured is what ships: one quantiser, and :func:`wire_roundtrip` equals the deployed wire.

- the ``quantize`` defense and the codec's uint8/uint4 encodings are one quantiser;
- ``wire_roundtrip`` gives exactly what the real server decodes from what the real edge client encodes;
- ``WireFormat`` rejects bad fields with one-line errors;
- float32 is exact, uint8 within half a step, checked against an independent numpy computation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import splitshield as ss
from splitshield._quantize import affine_range, fake_quantize
from splitshield.defenses import Quantize
from splitshield.errors import ConfigError
from splitshield.runtime.client import EdgeClient
from splitshield.runtime.codec import CodecOptions, WireFormat, encode, read_header, wire_roundtrip

pytest.importorskip("zstandard")

DTYPES = ["float32", "float16", "uint8", "uint4"]
COMPRESS = ["none", "zstd"]


def features(seed: int = 0) -> dict[str, torch.Tensor]:
    """Feature batches ``[B, C, H, W]`` of the kinds a head emits, plus awkward rows."""
    g = torch.Generator().manual_seed(seed)
    relu = torch.relu(torch.randn(6, 4, 5, 5, generator=g)) * 3
    mixed = torch.randn(6, 4, 5, 5, generator=g) * torch.logspace(-3, 3, 6).view(-1, 1, 1, 1)
    mixed[2] = -1.25  # a constant sample
    mixed[3, 0, 0, 0] = 1e4  # one outlier stretches only its own sample's range
    return {"relu": relu, "mixed": mixed}


# -- (a) one quantiser ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["relu", "mixed"])
@pytest.mark.parametrize(("bits", "dtype"), [(8, "uint8"), (4, "uint4")])
def test_quantize_defense_equals_codec_per_sample(kind: str, bits: int, dtype: str) -> None:
    z = features()[kind]
    defended = Quantize(bits).obfuscate(z, training=False)
    assert torch.equal(defended, wire_roundtrip(z, WireFormat(dtype, "zstd"), batch_size=1))


@pytest.mark.parametrize(("bits", "dtype"), [(8, "uint8"), (4, "uint4")])
def test_codec_frame_carries_the_shared_quantisers_range(bits: int, dtype: str) -> None:
    z = features()["mixed"]
    scale, offset = affine_range(z, bits)  # one range for the whole frame
    header = read_header(encode(z, CodecOptions(dtype)))
    assert (header.scale, header.offset) == (float(scale), float(offset))
    assert torch.equal(wire_roundtrip(z, WireFormat(dtype), batch_size=None), fake_quantize(z, bits))


def test_quantize_keeps_its_config_and_straight_through_gradient() -> None:
    assert Quantize(8).config() == {"name": "quantize", "bits": 8}
    z = features()["relu"].requires_grad_()
    Quantize(8).obfuscate(z, training=True).sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


# -- (b) the engine's wire features are the server's ------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    target = ss.split(ss.build_model("lenet"), "ReLU2", input_shape=(1, 28, 28))
    return ss.save_checkpoint(tmp_path_factory.mktemp("ckpt") / "lenet", target)


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("compress", COMPRESS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_wire_roundtrip_equals_what_the_server_decodes(checkpoint: Path, dtype: str, compress: str,
                                                        batch_size: int) -> None:
    from splitshield.runtime.server import TailService

    wire = WireFormat(dtype, compress)
    service = TailService(checkpoint, max_batch=8, allow_head_weights=True)
    x = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    # The client never connects: frame() is the body send() posts, TailService.decode what /v1/infer runs.
    with EdgeClient(checkpoint, "http://127.0.0.1:9", codec=wire, batch_size=batch_size) as client:
        z = client.features(x)
        received = torch.cat([service.decode(client.frame(chunk)) for chunk in z.split(client.batch_size)])
    engine = wire_roundtrip(z, wire, batch_size=batch_size)
    assert torch.equal(engine, received)
    target, _, _ = ss.load_checkpoint(checkpoint)
    with torch.no_grad():
        assert torch.equal(target.tail(engine), service.forward(received))


# -- (c) WireFormat validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "int8"}, "wire dtype must be one of float32, float16, uint8, uint4, got 'int8'"),
        ({"dtype": 8}, "wire dtype must be one of"),
        ({"dtype": None}, "wire dtype must be one of"),
        ({"compress": "zlib"}, r"wire compress must be one of none, zstd \(or null\), got 'zlib'"),
        ({"compress": True}, "wire compress must be one of"),
    ],
)
def test_bad_wire_format_fields_raise_one_line_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        WireFormat(**kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_wire_format_defaults_and_null_compress() -> None:
    assert WireFormat() == WireFormat("float32", "none")
    assert WireFormat("uint8", None) == WireFormat("uint8", "none")  # YAML `compress: null`
    assert WireFormat("uint8", "zstd").options == CodecOptions("uint8", "zstd")


@pytest.mark.parametrize("bad", [0, -1, True, 2.0])
def test_wire_roundtrip_rejects_bad_batch_size(bad: object) -> None:
    with pytest.raises(ConfigError, match="batch_size must be a positive int or None"):
        wire_roundtrip(torch.zeros(2, 3), WireFormat("uint8"), batch_size=bad)  # type: ignore[arg-type]


# -- (d) accuracy against an independent computation ------------------------------------------------------


@pytest.mark.parametrize("compress", COMPRESS)
@pytest.mark.parametrize("batch_size", [1, None])
def test_float32_roundtrip_is_bit_exact(compress: str, batch_size: int | None) -> None:
    z = features()["mixed"]
    z[0, 0, 0, :3] = torch.tensor([-0.0, 1e-45, -3.4e38])  # signed zero, subnormal, near -FLT_MAX
    out = wire_roundtrip(z, WireFormat("float32", compress), batch_size=batch_size)
    assert out.dtype == torch.float32 and out.shape == z.shape and not out.requires_grad
    assert np.array_equal(out.numpy().view(np.uint32), z.numpy().view(np.uint32))


def numpy_uint8(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample uint8 round trip of the documented scheme, in numpy; also returns each row's step."""
    rows = arr.reshape(len(arr), -1).astype(np.float64)
    lo, hi = rows.min(1, keepdims=True), rows.max(1, keepdims=True)
    step = (hi - lo) / 255
    scale = step.astype(np.float32)
    scale = np.where(scale > step, np.nextafter(scale, np.float32(0)), scale).astype(np.float64)
    scale = np.maximum(scale, np.finfo(np.float32).tiny)
    q = np.clip(np.round((rows - lo) / scale), 0, 255)
    return (scale * q + lo).astype(np.float32).reshape(arr.shape), step


@pytest.mark.parametrize("kind", ["relu", "mixed"])
def test_uint8_roundtrip_within_half_a_step(kind: str) -> None:
    z = features()[kind]
    out = wire_roundtrip(z, WireFormat("uint8", "zstd")).numpy()
    expected, step = numpy_uint8(z.numpy())
    assert np.array_equal(out, expected)
    err = np.abs(out.astype(np.float64) - z.numpy().astype(np.float64)).reshape(len(z), -1)
    half_step = step / 2 * (1 + 1e-6) + 2**-24 * np.abs(z.numpy()).reshape(len(z), -1).max(1, keepdims=True)
    assert (err <= half_step).all()
    if kind == "mixed":
        assert np.array_equal(out[2], z[2].numpy())  # the constant sample is exact


def test_wire_roundtrip_keeps_shape_and_returns_float32() -> None:
    z = features()["relu"].double()
    for dtype in DTYPES:
        out = wire_roundtrip(z, WireFormat(dtype))
        assert out.shape == z.shape and out.dtype == torch.float32 and out.device == z.device
