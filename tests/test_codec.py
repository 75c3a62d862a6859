"""Tests of the feature-tensor wire format (splitshield.runtime.codec).

Malformed frames are crafted with :func:`craft`, which follows the layout
table in the codec's module docstring and shares no code with the codec, so
the tests also pin the documented layout.
"""

from __future__ import annotations

import struct
import sys
import time
import tracemalloc
import zlib
from collections.abc import Callable

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitshield.errors import CodecError, ConfigError
from splitshield.runtime.codec import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ELEMENTS,
    CodecOptions,
    decode,
    encode,
    read_header,
)

zstandard = pytest.importorskip("zstandard")

ENCODINGS = ["float32", "float16", "uint8", "uint4"]
COMPRESSIONS = ["none", "zstd"]
ENC_CODE = {"float32": 0, "float16": 1, "uint8": 2, "uint4": 3}
QMAX = {"uint8": 255, "uint4": 15}
F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)
FAST = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])


def craft(
    payload: bytes,
    shape: tuple[int, ...],
    *,
    encoding: int = 0,
    compression: int = 0,
    quant: tuple[float, float] | None = None,
    magic: bytes = b"SSFT",
    version: int = 1,
    payload_len: int | None = None,
    crc: int | None = None,
) -> bytes:
    """Build a frame by hand from the documented layout; CRC is valid unless given."""
    head = struct.pack("<4sBBBB", magic, version, encoding, compression, len(shape))
    head += struct.pack(f"<{len(shape)}I", *shape)
    if quant is not None:
        head += struct.pack("<ff", *quant)
    head += struct.pack("<Q", len(payload) if payload_len is None else payload_len)
    if crc is None:
        crc = zlib.crc32(payload, zlib.crc32(head))
    return head + struct.pack("<I", crc) + payload


def header_size(encoding: str, ndim: int) -> int:
    """Documented header size: 20 + 4*ndim, plus 8 for quantized encodings."""
    return 20 + 4 * ndim + (8 if encoding in QMAX else 0)


def reseal(frame: bytes, fix_length: bool) -> bytes:
    """Recompute the CRC (and optionally payload_len) of a possibly mutated frame.

    Lets corruption reach the checks behind the CRC; returns the frame unchanged
    when its header is too broken to locate the CRC field.
    """
    if len(frame) < 8 or frame[5] > 3 or frame[7] > 8:
        return frame
    size = 20 + 4 * frame[7] + (8 if frame[5] in (2, 3) else 0)
    if len(frame) < size:
        return frame
    out = bytearray(frame)
    if fix_length:
        out[size - 12 : size - 4] = struct.pack("<Q", len(out) - size)
    out[size - 4 : size] = struct.pack("<I", zlib.crc32(out[size:], zlib.crc32(out[: size - 4])))
    return bytes(out)


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak Python/numpy heap allocation (bytes) while running ``fn``."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def raises_codec_error(frame: bytes, match: str | None = None, **limits: int) -> None:
    with pytest.raises(CodecError, match=match):
        decode(frame, **limits)


def quant_tolerance(arr: np.ndarray, qmax: int) -> float:
    """Error bound from min/max alone: half a step, plus float32 rounding slack."""
    lo, hi = float(arr.min()), float(arr.max())
    step = (hi - lo) / qmax
    max_abs = max(abs(lo), abs(hi))
    return max(step, F32_TINY) / 2 * (1 + 1e-6) + 2**-22 * max_abs + 2**-149


finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6)


def f32_arrays(elements: st.SearchStrategy[float] = finite_f32) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(np.float32, shapes, elements=elements)


# ---------------------------------------------------------------- round trip


@FAST
@given(arr=f32_arrays(), compression=st.sampled_from(COMPRESSIONS))
def test_float32_roundtrip_is_bit_exact(arr: np.ndarray, compression: str) -> None:
    out = decode(encode(torch.from_numpy(arr), CodecOptions("float32", compression)))
    assert out.dtype == torch.float32 and out.shape == arr.shape
    assert np.array_equal(out.numpy().view(np.uint32), arr.view(np.uint32))  # also keeps -0.0


@FAST
@given(
    arr=f32_arrays(st.floats(-65504, 65504, width=32)),
    compression=st.sampled_from(COMPRESSIONS),
)
def test_float16_roundtrip_is_float16_rounding(arr: np.ndarray, compression: str) -> None:
    z = torch.from_numpy(arr)
    out = decode(encode(z, CodecOptions("float16", compression)))
    assert out.dtype == torch.float32 and out.shape == z.shape
    assert torch.equal(out, z.to(torch.float16).to(torch.float32))
    # Half an ulp of float16 relative, or half the float16 subnormal spacing.
    assert bool(((out - z).abs() <= 2**-11 * z.abs() + 2**-25).all())


@FAST
@given(
    arr=f32_arrays(),
    encoding=st.sampled_from(["uint8", "uint4"]),
    compression=st.sampled_from(COMPRESSIONS),
)
def test_quantized_roundtrip_within_half_step(arr: np.ndarray, encoding: str, compression: str) -> None:
    out = decode(encode(torch.from_numpy(arr), CodecOptions(encoding, compression)))
    assert out.dtype == torch.float32 and out.shape == arr.shape
    err = np.abs(out.numpy().astype(np.float64) - arr.astype(np.float64))
    assert err.max() <= quant_tolerance(arr, QMAX[encoding])


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("value", [0.0, -2.5, 7.0, -1e-3])
def test_constant_tensor_roundtrips_exactly(encoding: str, compression: str, value: float) -> None:
    z = torch.full((3, 5, 2), value).to(torch.float16).to(torch.float32)  # representable in all
    assert torch.equal(decode(encode(z, CodecOptions(encoding, compression))), z)


@pytest.mark.parametrize("encoding", ["float32", "uint8", "uint4"])
def test_huge_constant_roundtrips_exactly(encoding: str) -> None:
    z = torch.full((4,), -3.0e30)
    assert torch.equal(decode(encode(z, CodecOptions(encoding))), z)


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("shape", [(), (1,), (1, 1, 1)])
def test_single_element_and_scalar(encoding: str, compression: str, shape: tuple[int, ...]) -> None:
    z = torch.full(shape, -1.25)
    out = decode(encode(z, CodecOptions(encoding, compression)))
    assert out.shape == z.shape and torch.equal(out, z)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_negative_values(encoding: str) -> None:
    z = -torch.rand(2, 3, 7) * 40 - 1
    out = decode(encode(z, CodecOptions(encoding)))
    tol = {"float32": 0.0, "float16": 2**-11 * 41}.get(encoding)
    if tol is None:
        tol = quant_tolerance(z.numpy(), QMAX[encoding])
    assert float((out - z).abs().max()) <= tol
    assert bool((out < 0).all())


@pytest.mark.parametrize("encoding", ["uint8", "uint4"])
def test_quantized_full_float32_range_stays_finite(encoding: str) -> None:
    z = torch.tensor([-F32_MAX, 0.0, F32_MAX])
    out = decode(encode(z, CodecOptions(encoding)))
    assert out[0] == -F32_MAX and out[2] == F32_MAX


def test_encode_accepts_views_grad_and_other_float_dtypes() -> None:
    base = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    z = base.t()  # non-contiguous, float64, requires grad
    expected = z.detach().to(torch.float32)
    assert torch.equal(decode(encode(z)), expected)
    b = torch.randn(3, 3).to(torch.bfloat16)
    assert torch.equal(decode(encode(b)), b.to(torch.float32))


def test_decode_accepts_bytearray_and_memoryview() -> None:
    z = torch.randn(2, 3)
    frame = encode(z, CodecOptions("float32", "zstd"))
    assert torch.equal(decode(bytearray(frame)), z)
    assert torch.equal(decode(memoryview(frame)), z)


# ------------------------------------------------------- layout and compactness


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_frame_is_header_plus_raw_elements(encoding: str) -> None:
    z = torch.randn(16, 8, 8)
    frame = encode(z, CodecOptions(encoding))
    raw = {"float32": 4 * 1024, "float16": 2 * 1024, "uint8": 1024, "uint4": 512}[encoding]
    assert len(frame) == header_size(encoding, 3) + raw
    assert read_header(frame).header_size == header_size(encoding, 3)
    if encoding == "float16":
        assert len(frame) < 2048 + header_size("float16", 3) + 1  # 32-byte header


def test_zstd_shrinks_redundant_features() -> None:
    z = torch.zeros(64, 32, 32)
    z[:, :4] = 1.0  # post-ReLU-like sparsity
    plain, packed = encode(z), encode(z, CodecOptions("float32", "zstd"))
    assert len(packed) < len(plain) // 20
    assert torch.equal(decode(packed), z)


def test_float32_frame_matches_documented_layout() -> None:
    z = torch.tensor([[1.0, -2.0, 3.5]])
    assert encode(z) == craft(np.array([1.0, -2.0, 3.5], "<f4").tobytes(), (1, 3))


def test_uint4_nibble_order_low_first() -> None:
    z = torch.arange(16.0)  # min 0, max 15 -> scale exactly 1, codes == values
    frame = encode(z, CodecOptions("uint4"))
    assert frame[header_size("uint4", 1) :] == bytes([0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE])
    odd = torch.cat([torch.arange(14.0), torch.tensor([15.0])])  # 15 codes: padding nibble 0
    frame = encode(odd, CodecOptions("uint4"))
    assert frame[header_size("uint4", 1) :] == bytes([0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0x0F])
    assert torch.equal(decode(frame), odd)


def test_read_header_fields() -> None:
    z = torch.tensor([[-1.0, 0.0], [2.0, 4.1]])
    frame = encode(z, CodecOptions("uint8", "zstd"))
    h = read_header(frame)
    assert (h.version, h.encoding, h.compression, h.shape) == (1, "uint8", "zstd", (2, 2))
    assert h.offset == -1.0
    assert h.scale == pytest.approx((4.1 - -1.0) / 255, rel=1e-6)
    assert h.numel == 4 and h.raw_size == 4
    assert h.header_size == header_size("uint8", 2)
    assert h.payload_length == len(frame) - h.header_size
    assert h.crc32 == struct.unpack_from("<I", frame, h.header_size - 4)[0]
    assert read_header(encode(torch.ones(3))).scale is None


def test_default_limits_are_documented_values() -> None:
    assert DEFAULT_MAX_ELEMENTS == 64 * 2**20
    assert DEFAULT_MAX_BYTES == 256 * 2**20 == 4 * DEFAULT_MAX_ELEMENTS


# ------------------------------------------------------------ encode refusals


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_encode_rejects_non_finite(encoding: str, bad: float) -> None:
    with pytest.raises(CodecError, match="NaN or inf"):
        encode(torch.tensor([1.0, bad]), CodecOptions(encoding))


def test_encode_rejects_float64_overflowing_float32() -> None:
    with pytest.raises(CodecError, match="NaN or inf"):
        encode(torch.tensor([1e300], dtype=torch.float64))


def test_encode_rejects_float16_overflow() -> None:
    with pytest.raises(CodecError, match="float16 range"):
        encode(torch.tensor([70000.0]), CodecOptions("float16"))


@pytest.mark.parametrize(
    ("z", "match"),
    [
        (torch.arange(4), "floating-point"),
        (torch.zeros(0, 3), "every dim"),
        (torch.zeros((1,) * 9), "at most 8"),
    ],
)
def test_encode_rejects_bad_tensors(z: torch.Tensor, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        encode(z)


def test_encode_type_errors() -> None:
    with pytest.raises(TypeError):
        encode(np.zeros(3, np.float32))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode(torch.zeros(3), {"encoding": "uint8"})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"encoding": "int8"}, "allowed: float32, float16, uint8, uint4"),
        ({"compression": "gzip"}, "allowed: none, zstd"),
        ({"zstd_level": 0}, "zstd_level"),
        ({"zstd_level": 23}, "zstd_level"),
        ({"zstd_level": True}, "zstd_level"),
        ({"zstd_level": 3.0}, "zstd_level"),
    ],
)
def test_options_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        CodecOptions(**kwargs)  # type: ignore[arg-type]


def test_missing_zstandard_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    frame = encode(torch.ones(3), CodecOptions("float32", "zstd"))
    monkeypatch.setitem(sys.modules, "zstandard", None)  # makes `import zstandard` fail
    with pytest.raises(CodecError, match=r"pip install 'splitshield\[serve\]'"):
        encode(torch.ones(3), CodecOptions("float32", "zstd"))
    with pytest.raises(CodecError, match=r"pip install 'splitshield\[serve\]'"):
        decode(frame)
    assert torch.equal(decode(encode(torch.ones(3))), torch.ones(3))  # plain frames still work


# ------------------------------------------------------------ malformed frames

GOOD_PAYLOAD = np.array([1.0, 2.0, 3.0], "<f4").tobytes()


def test_craft_helper_builds_a_valid_frame() -> None:
    assert torch.equal(decode(craft(GOOD_PAYLOAD, (3,))), torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("magic", [b"SSFX", b"\x89PNG", b"\x00\x00\x00\x00"])
def test_bad_magic(magic: bytes) -> None:
    raises_codec_error(craft(GOOD_PAYLOAD, (3,), magic=magic), "bad magic")


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unknown_version(version: int) -> None:
    raises_codec_error(craft(GOOD_PAYLOAD, (3,), version=version), "unsupported frame version")


@pytest.mark.parametrize("code", [4, 9, 255])
def test_unknown_encoding_code(code: int) -> None:
    raises_codec_error(craft(GOOD_PAYLOAD, (3,), encoding=code), "unknown encoding code")


@pytest.mark.parametrize("code", [2, 255])
def test_unknown_compression_code(code: int) -> None:
    raises_codec_error(craft(GOOD_PAYLOAD, (3,), compression=code), "unknown compression code")


def test_too_many_dims() -> None:
    raises_codec_error(craft(GOOD_PAYLOAD, (3,) + (1,) * 8), "at most 8")


def test_zero_sized_dim() -> None:
    raises_codec_error(craft(b"", (3, 0)), "zero-sized")


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_truncation_is_rejected(encoding: str, compression: str) -> None:
    frame = encode(torch.tensor([[0.5, -1.0, 2.0]]), CodecOptions(encoding, compression))
    for n in range(len(frame)):
        with pytest.raises(CodecError, match="truncated"):
            decode(frame[:n])


def test_payload_length_mismatch() -> None:
    raises_codec_error(craft(GOOD_PAYLOAD, (3,), payload_len=13), "truncated frame")
    raises_codec_error(craft(GOOD_PAYLOAD, (3,), payload_len=11), "trailing bytes")
    raises_codec_error(encode(torch.ones(3)) + b"\x00", "trailing bytes")


def test_crc_mismatch_in_payload_and_header() -> None:
    frame = bytearray(encode(torch.randn(4, 4), CodecOptions("uint8")))
    flipped = bytearray(frame)
    flipped[-1] ^= 0x01
    raises_codec_error(bytes(flipped), "CRC32 mismatch")
    flipped = bytearray(frame)
    flipped[8 + 4 * 2] ^= 0x01  # low byte of the scale: covered by the CRC too
    raises_codec_error(bytes(flipped), "CRC32 mismatch")
    raises_codec_error(craft(GOOD_PAYLOAD, (3,), crc=0), "CRC32 mismatch")


def test_absurd_dims_rejected_before_allocation() -> None:
    frame = craft(b"\x00" * 8, (2**16, 2**15))  # claims 2**31 float32 elements
    start = time.perf_counter()
    peak = peak_bytes(lambda: raises_codec_error(frame, "max_elements"))
    assert time.perf_counter() - start < 0.5
    assert peak < 256 * 1024
    raises_codec_error(craft(b"", (2**32 - 1,) * 8), "max_elements")


def test_custom_limits() -> None:
    frame = encode(torch.zeros(10, 10))  # 100 elements, 400 decoded bytes
    assert decode(frame, max_elements=100, max_bytes=len(frame)).shape == (10, 10)
    raises_codec_error(frame, "max_elements", max_elements=99)
    raises_codec_error(frame, "max_bytes", max_bytes=len(frame) - 1)  # frame itself too long
    small = encode(torch.zeros(10, 10), CodecOptions("uint4", "zstd"))
    raises_codec_error(small, "decodes to 400 bytes", max_bytes=399)  # float32 output too big


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, None])
def test_limit_arguments_validated(bad: object) -> None:
    with pytest.raises(ConfigError):
        decode(encode(torch.ones(1)), max_elements=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        decode(encode(torch.ones(1)), max_bytes=bad)  # type: ignore[arg-type]


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(TypeError):
        decode("SSFT")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("encoding", "shape", "payload"),
    [
        (0, (3,), b"\x00" * 8),  # float32 needs 12
        (0, (2, 2), b"\x00" * 20),  # float32 needs 16
        (1, (3,), b"\x00" * 4),  # float16 needs 6
        (2, (5,), b"\x00" * 4),  # uint8 needs 5
        (3, (5,), b"\x00" * 2),  # uint4 needs ceil(5/2) = 3
    ],
)
def test_shape_times_dtype_must_equal_payload(encoding: int, shape: tuple[int, ...], payload: bytes) -> None:
    quant = (1.0, 0.0) if encoding >= 2 else None
    raises_codec_error(craft(payload, shape, encoding=encoding, quant=quant), "needs")


def test_zstd_payload_of_wrong_size() -> None:
    payload = zstandard.ZstdCompressor().compress(b"\x00" * 8)
    raises_codec_error(craft(payload, (3,), compression=1), "declares 8 decompressed bytes")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_float32_frame_rejected(bad: float) -> None:
    payload = np.array([1.0, bad, 3.0], "<f4").tobytes()
    raises_codec_error(craft(payload, (3,)), "NaN or inf")
    raises_codec_error(craft(zstandard.ZstdCompressor().compress(payload), (3,), compression=1), "NaN or inf")


def test_non_finite_float16_frame_rejected() -> None:
    raises_codec_error(craft(np.array([np.inf, 0], "<f2").tobytes(), (2,), encoding=1), "NaN or inf")


@pytest.mark.parametrize(
    "quant",
    [(0.0, 0.0), (-1.0, 0.0), (float("nan"), 0.0), (float("inf"), 0.0), (1.0, float("inf"))],
)
def test_invalid_quantization_parameters(quant: tuple[float, float]) -> None:
    raises_codec_error(craft(b"\x01\x02", (2,), encoding=2, quant=quant), "quantization parameters")


def test_quantized_overflow_rejected() -> None:
    frame = craft(b"\xff", (1,), encoding=2, quant=(F32_MAX, F32_MAX))  # 255*MAX + MAX -> inf
    raises_codec_error(frame, "NaN or inf")


def test_uint4_padding_nibble_must_be_zero() -> None:
    assert torch.equal(decode(craft(b"\x10\x02", (3,), encoding=3, quant=(1.0, 0.0))), torch.arange(3.0))
    raises_codec_error(craft(b"\x10\xf2", (3,), encoding=3, quant=(1.0, 0.0)), "padding nibble")


def test_corrupt_zstd_payloads() -> None:
    raises_codec_error(craft(b"definitely not zstd", (3,), compression=1), "zstd")
    good = zstandard.ZstdCompressor().compress(GOOD_PAYLOAD * 100)
    raises_codec_error(craft(good[:-4], (300,), compression=1), "zstd")
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(GOOD_PAYLOAD)
    raises_codec_error(craft(unsized, (3,), compression=1), "does not declare")


# ---------------------------------------------------------- decompression bomb


@pytest.fixture(scope="module")
def zeros_50mb_zstd() -> dict[str, bytes]:
    zeros = bytes(50_000_000)
    sized = zstandard.ZstdCompressor(level=3).compress(zeros)
    unsized = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(zeros)
    assert len(sized) < 10_000 and len(unsized) < 10_000
    return {"sized": sized, "unsized": unsized}


BOMB_PEAK_LIMIT = 1024 * 1024  # far below the 50 MB the bomb expands to


@pytest.mark.parametrize("kind", ["sized", "unsized"])
def test_zstd_bomb_rejected_without_expanding(zeros_50mb_zstd: dict[str, bytes], kind: str) -> None:
    frame = craft(zeros_50mb_zstd[kind], (4,), compression=1)  # claims 16 raw bytes
    start = time.perf_counter()
    peak = peak_bytes(lambda: raises_codec_error(frame, "zstd"))
    assert time.perf_counter() - start < 1.0
    assert peak < BOMB_PEAK_LIMIT


def test_zstd_bomb_behind_honest_first_frame(zeros_50mb_zstd: dict[str, bytes]) -> None:
    # The first zstd frame truthfully declares 16 bytes, so only the hard output
    # cap (not the content-size check) stands between us and 50 MB.
    honest = zstandard.ZstdCompressor().compress(b"\x00" * 16)
    frame = craft(honest + zeros_50mb_zstd["unsized"], (4,), compression=1)
    peak = peak_bytes(lambda: raises_codec_error(frame, "more than the 16 bytes"))
    assert peak < BOMB_PEAK_LIMIT


# --------------------------------------------------------- random corruption

mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete"]), st.integers(0, 2**16), st.integers(0, 255)
    ),
    min_size=1,
    max_size=4,
)


def mutate(frame: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(frame)
    for op, pos, value in ops:
        i = pos % (len(out) + 1)
        if op == "insert":
            out.insert(i, value)
        elif out and i < len(out):
            if op == "flip":
                out[i] ^= 1 << (value % 8)
            elif op == "set":
                out[i] = value
            else:
                del out[i]
    return bytes(out)


def assert_decodes_or_codec_error(frame: bytes) -> None:
    try:
        out = decode(frame)
    except CodecError:
        return
    assert out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    arr=hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=5), elements=finite_f32),
    encoding=st.sampled_from(ENCODINGS),
    compression=st.sampled_from(COMPRESSIONS),
    ops=mutations,
    resealed=st.sampled_from([None, False, True]),
)
def test_random_corruption_only_raises_codec_error(
    arr: np.ndarray, encoding: str, compression: str, ops: list[tuple[str, int, int]], resealed: bool | None
) -> None:
    z = torch.from_numpy(arr).clamp(-6e4, 6e4)  # stay encodable as float16
    frame = mutate(encode(z, CodecOptions(encoding, compression)), ops)
    if resealed is not None:  # fix the CRC (and maybe length) so deeper checks are reached
        frame = reseal(frame, fix_length=resealed)
    assert_decodes_or_codec_error(frame)


@settings(deadline=None, max_examples=200)
@given(tail=st.binary(max_size=64), prefix=st.sampled_from([b"", b"SSFT", b"SSFT\x01", b"SSFT\x01\x03\x01"]))
def test_random_bytes_only_raise_codec_error(tail: bytes, prefix: bytes) -> None:
    assert_decodes_or_codec_error(prefix + tail)
    assert_decodes_or_codec_error(reseal(prefix + tail, fix_length=True))


def test_frame_compression_reads_only_the_prefix() -> None:
    from splitshield.runtime.codec import frame_compression

    z = torch.rand(2, 3)
    assert frame_compression(encode(z)) == "none"
    assert frame_compression(encode(z, CodecOptions("float16", "zstd"))) == "zstd"
    assert frame_compression(b"SS") is None  # shorter than the prefix
    assert frame_compression(encode(z, CodecOptions("float16", "zstd"))[:8]) == "zstd"  # the rest is not read
