"""Versioned binary wire format for one intermediate feature tensor ``z``.

The edge device encodes the head's output with :func:`encode`, the cloud
decodes it with :func:`decode`.  The cloud must treat every frame as hostile:
:func:`decode` validates each header field, checks every size against an
explicit limit *before* allocating, verifies a CRC32, caps zstd output at the
size the shape implies, and rejects NaN/inf.  Every failure raises
:class:`~splitshield.errors.CodecError`; no other exception escapes for any
``bytes`` input.  No pickle is involved anywhere.

Frame layout (all integers little-endian, offsets in bytes)::

    offset        size   field         meaning
    ------------  -----  ------------  -----------------------------------------
    0             4      magic         b"SSFT" (SplitShield Feature Tensor)
    4             1      version       u8, currently 1
    5             1      encoding      u8: 0 float32, 1 float16, 2 uint8, 3 uint4
    6             1      compression   u8: 0 none, 1 zstd
    7             1      ndim          u8, 0..8 (0 = scalar)
    8             4*n    dims          n = ndim values of u32, each >= 1, C order
    8+4n          4      scale         f32, quantized encodings only
    12+4n         4      offset        f32, quantized encodings only
    8+4n+q        8      payload_len   u64, bytes after the header (q = 8 if
                                       quantized else 0)
    16+4n+q       4      crc32         u32, zlib.crc32 of bytes [0, 16+4n+q)
                                       followed by the payload
    20+4n+q       ...    payload       raw or zstd-compressed element bytes

The header is therefore ``20 + 4*ndim`` bytes, plus 8 for uint8/uint4; e.g.
32 bytes for a float16 ``(C, H, W)`` tensor.  The CRC covers the header as
well as the payload, so a flipped bit in a dimension or in the quantization
scale is caught rather than silently changing the values.

Encodings of the (uncompressed) payload, ``n`` = product of dims:

* ``float32`` -- ``4n`` bytes, IEEE little-endian; round-trip is bit-exact.
* ``float16`` -- ``2n`` bytes; values are rounded to nearest float16, so
  ``|z| <= 65504`` is required.
* ``uint8`` / ``uint4`` -- affine quantization with ``qmax = 2**bits - 1``,
  one range per frame, by :mod:`splitshield._quantize` (the quantiser the
  ``quantize`` defense uses too):
  ``q = clip(round((z - offset) / scale), 0, qmax)`` and
  ``z_hat = scale * q + offset``, where ``offset = min(z)`` and ``scale`` is
  ``(max(z) - min(z)) / qmax``, rounded toward zero to float32 and floored at
  the smallest normal float32.  The offset is the textbook zero point
  expressed in real units (``offset = -zero_point * scale``); storing it that
  way keeps it exact (it *is* ``min(z)``), so ``|z - z_hat| <= scale / 2``
  plus float32 rounding, and a constant tensor round-trips exactly with no
  division by zero.  uint8 payloads are ``n`` bytes.  uint4 payloads are
  ``ceil(n / 2)`` bytes: element ``2i`` is the *low* nibble of byte ``i`` and
  element ``2i + 1`` the *high* nibble; for odd ``n`` the final high nibble
  is padding and must be 0.

Limits (keyword arguments of :func:`decode`):

* ``max_elements`` (default :data:`DEFAULT_MAX_ELEMENTS` = 64 Mi) bounds the
  product of the dims.
* ``max_bytes`` (default :data:`DEFAULT_MAX_BYTES` = 256 MiB) bounds the frame
  length, the uncompressed payload, and the decoded float32 tensor.

Both are checked from the header before anything is allocated, so no buffer
the decoder creates is ever larger than ``max_bytes`` (zstd output is read
through a stream capped at the expected raw size + 1 byte).  Peak memory is a
small multiple of that: the frame, the raw payload, and the float32 result
(plus, for quantized frames, 9 MiB of working space).  Zero-sized dims are
rejected on both sides: an empty feature tensor is never a valid message.

:func:`wire_roundtrip` puts features through exactly this encode/decode path,
framed as :class:`~splitshield.runtime.client.EdgeClient` sends them, so an
experiment can measure accuracy and attacks on what the server receives.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import numpy as np
import torch

from splitshield._quantize import affine_range, dequantize, quantize
from splitshield.errors import CodecError, ConfigError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ELEMENTS",
    "MAGIC",
    "MAX_NDIM",
    "VERSION",
    "CodecOptions",
    "FrameHeader",
    "WireFormat",
    "decode",
    "encode",
    "frame_compression",
    "read_header",
    "wire_roundtrip",
]

MAGIC = b"SSFT"
VERSION = 1
MAX_NDIM = 8
DEFAULT_MAX_ELEMENTS = 64 * 2**20
DEFAULT_MAX_BYTES = 256 * 2**20

Encoding = Literal["float32", "float16", "uint8", "uint4"]
Compression = Literal["none", "zstd"]

# Wire codes.  Never renumber: the codes are part of format version 1.
_ENCODING_CODES: dict[str, int] = {"float32": 0, "float16": 1, "uint8": 2, "uint4": 3}
_COMPRESSION_CODES: dict[str, int] = {"none": 0, "zstd": 1}
_ENCODING_NAMES = {code: name for name, code in _ENCODING_CODES.items()}
_COMPRESSION_NAMES = {code: name for name, code in _COMPRESSION_CODES.items()}
_QUANT_BITS = {"uint8": 8, "uint4": 4}

_PREFIX = struct.Struct("<4sBBBB")  # magic, version, encoding, compression, ndim
_QUANT = struct.Struct("<ff")  # scale, offset
_TAIL = struct.Struct("<QI")  # payload_len, crc32
_U32_MAX = 2**32 - 1
_ZSTD_LEVELS = range(1, 23)
# Dequantization runs in float64 (exact for scale*q + offset up to one rounding)
# but in chunks, so the float64 temporaries stay small whatever the tensor size.
_DEQUANT_CHUNK = 2**20


@dataclass(frozen=True)
class CodecOptions:
    """How :func:`encode` represents a tensor on the wire.

    Parameters
    ----------
    encoding : {"float32", "float16", "uint8", "uint4"}
        Element representation; see the module docstring for the accuracy of
        each.  Bytes per element: 4, 2, 1, 0.5.
    compression : {"none", "zstd"}
        ``"zstd"`` needs the optional ``zstandard`` package
        (``pip install 'splitshield[serve]'``).
    zstd_level : int
        zstd compression level, 1 (fastest) to 22 (smallest); ignored when
        ``compression="none"``.

    Raises
    ------
    ConfigError
        If a name is not one of the allowed values or the level is out of range.
    """

    encoding: Encoding = "float32"
    compression: Compression = "none"
    zstd_level: int = 3

    def __post_init__(self) -> None:
        if self.encoding not in _ENCODING_CODES:
            raise ConfigError(f"unknown encoding {self.encoding!r}; allowed: {', '.join(_ENCODING_CODES)}")
        if self.compression not in _COMPRESSION_CODES:
            raise ConfigError(
                f"unknown compression {self.compression!r}; allowed: {', '.join(_COMPRESSION_CODES)}"
            )
        # bool is an int subclass; zstd_level=True is certainly a mistake.
        if (
            not isinstance(self.zstd_level, int)
            or isinstance(self.zstd_level, bool)
            or self.zstd_level not in _ZSTD_LEVELS
        ):
            raise ConfigError(
                f"zstd_level must be an int in [{_ZSTD_LEVELS.start}, {_ZSTD_LEVELS.stop - 1}], "
                f"got {self.zstd_level!r}"
            )


_DEFAULT_OPTIONS = CodecOptions()


@dataclass(frozen=True)
class WireFormat:
    """How features cross the wire, as an experiment spec states it: ``wire: {dtype: uint8, compress: zstd}``.

    Parameters
    ----------
    dtype : {"float32", "float16", "uint8", "uint4"}
        The frame encoding (:class:`CodecOptions` ``encoding``).
    compress : {"none", "zstd"} or None
        The frame compression; None means ``"none"`` and is stored as ``"none"``. Lossless, so it
        never changes the decoded values; ``"zstd"`` needs the ``zstandard`` package.

    Raises
    ------
    ConfigError
        One line naming the field and its allowed values.
    """

    dtype: Encoding = "float32"
    compress: Compression = "none"

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, str) or self.dtype not in _ENCODING_CODES:
            raise ConfigError(f"wire dtype must be one of {', '.join(_ENCODING_CODES)}, got {self.dtype!r}")
        if self.compress is None:
            object.__setattr__(self, "compress", "none")
        elif not isinstance(self.compress, str) or self.compress not in _COMPRESSION_CODES:
            raise ConfigError(
                f"wire compress must be one of {', '.join(_COMPRESSION_CODES)} (or null), got {self.compress!r}"
            )

    @property
    def options(self) -> CodecOptions:
        """The :class:`CodecOptions` an :class:`~splitshield.runtime.client.EdgeClient` encodes with."""
        return CodecOptions(self.dtype, self.compress)


@dataclass(frozen=True)
class FrameHeader:
    """The parsed, range-checked header of a frame.

    Attributes
    ----------
    version : int
        Format version (currently always :data:`VERSION`).
    encoding : str
        One of ``"float32"``, ``"float16"``, ``"uint8"``, ``"uint4"``.
    compression : str
        ``"none"`` or ``"zstd"``.
    shape : tuple of int
        Tensor shape, every dim >= 1; ``()`` for a scalar.
    scale : float or None
        Quantization step (real units per code), > 0; None unless quantized.
    offset : float or None
        Real value of code 0 (the encoded tensor's minimum); None unless quantized.
    payload_length : int
        Bytes of (possibly compressed) payload the header announces.
    crc32 : int
        CRC32 of the header bytes before this field followed by the payload.
    header_size : int
        Bytes from the start of the frame to the first payload byte.
    """

    version: int
    encoding: str
    compression: str
    shape: tuple[int, ...]
    scale: float | None
    offset: float | None
    payload_length: int
    crc32: int
    header_size: int

    @property
    def numel(self) -> int:
        """Number of tensor elements, the product of :attr:`shape`."""
        return math.prod(self.shape)

    @property
    def raw_size(self) -> int:
        """Bytes of the uncompressed payload that :attr:`shape` and :attr:`encoding` imply."""
        return _raw_size(self.encoding, self.numel)


def _raw_size(encoding: str, numel: int) -> int:
    if encoding == "float32":
        return 4 * numel
    if encoding == "float16":
        return 2 * numel
    if encoding == "uint8":
        return numel
    return (numel + 1) // 2  # uint4: two codes per byte


def _header_size(encoding: str, ndim: int) -> int:
    quant = _QUANT.size if encoding in _QUANT_BITS else 0
    return _PREFIX.size + 4 * ndim + quant + _TAIL.size


def _import_zstd() -> ModuleType:
    # Imported lazily: zstandard belongs to the optional [serve] extra and
    # plain float32/float16 frames must work without it.
    try:
        import zstandard
    except ImportError as exc:
        raise CodecError(
            "compression='zstd' needs the zstandard package: pip install 'splitshield[serve]'"
        ) from exc
    return zstandard


def encode(z: torch.Tensor, options: CodecOptions = _DEFAULT_OPTIONS) -> bytes:
    """Serialize a feature tensor into one self-describing frame.

    Parameters
    ----------
    z : torch.Tensor
        Floating-point tensor of any shape with 0 to :data:`MAX_NDIM` dims,
        every dim in ``[1, 2**32 - 1]``, on any device.  It is first cast to
        float32 (so float64 input is rounded and float32 round-trip is exact).
    options : CodecOptions
        Encoding and compression.

    Returns
    -------
    bytes
        The frame; its layout is documented in the module docstring.

    Raises
    ------
    TypeError
        If ``z`` is not a tensor or ``options`` is not a :class:`CodecOptions`.
    CodecError
        If ``z`` is not floating point, is empty, has too many or too large
        dims, contains NaN/inf (also after the cast to float32), exceeds the
        float16 range under ``encoding="float16"``, or zstd is requested but
        not installed.
    """
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"encode expects a torch.Tensor, got {type(z).__name__}")
    if not isinstance(options, CodecOptions):
        raise TypeError(f"options must be a CodecOptions, got {type(options).__name__}")
    if not z.is_floating_point():
        raise CodecError(f"can only encode floating-point tensors, got dtype {z.dtype}")
    shape = tuple(z.shape)
    if len(shape) > MAX_NDIM:
        raise CodecError(f"tensor has {len(shape)} dims; the frame format allows at most {MAX_NDIM}")
    if any(d < 1 or d > _U32_MAX for d in shape):
        raise CodecError(f"every dim must be in [1, {_U32_MAX}], got shape {shape}")
    zstd = _import_zstd() if options.compression == "zstd" else None

    x = z.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if not bool(torch.isfinite(x).all()):
        raise CodecError("tensor contains NaN or inf (after conversion to float32); refusing to encode")

    quant = b""
    if options.encoding == "float32":
        raw = x.numpy().astype("<f4", copy=False).tobytes()
    elif options.encoding == "float16":
        h = x.to(torch.float16)
        if not bool(torch.isfinite(h).all()):
            raise CodecError(
                "tensor has values beyond the float16 range (|z| > 65504); "
                "use encoding='float32' or a quantized encoding"
            )
        raw = h.numpy().astype("<f2", copy=False).tobytes()
    else:
        bits = _QUANT_BITS[options.encoding]
        scale, offset = affine_range(x, bits)  # float32-representable, so the f32 header holds them exactly
        codes = quantize(x, scale, offset, bits).numpy().ravel()
        if options.encoding == "uint4":
            if codes.size % 2:
                codes = np.append(codes, np.uint8(0))  # padding nibble, must decode as 0
            codes = codes[0::2] | (codes[1::2] << 4)  # element 2i low nibble, 2i+1 high
        raw = codes.tobytes()
        quant = _QUANT.pack(float(scale), float(offset))

    payload = raw if zstd is None else zstd.ZstdCompressor(level=options.zstd_level).compress(raw)
    head = (
        _PREFIX.pack(
            MAGIC,
            VERSION,
            _ENCODING_CODES[options.encoding],
            _COMPRESSION_CODES[options.compression],
            len(shape),
        )
        + struct.pack(f"<{len(shape)}I", *shape)
        + quant
        + struct.pack("<Q", len(payload))
    )
    crc = zlib.crc32(payload, zlib.crc32(head))
    return b"".join((head, struct.pack("<I", crc), payload))


def _as_view(frame: bytes | bytearray | memoryview) -> memoryview:
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise TypeError(f"frame must be bytes, bytearray or memoryview, got {type(frame).__name__}")
    # Slicing a memoryview is zero-copy, so the payload is never duplicated.
    return memoryview(frame).cast("B")


def frame_compression(frame: bytes | bytearray | memoryview) -> str | None:
    """The compression a frame's fixed prefix declares (``"none"``, ``"zstd"``), read without parsing or
    checking the rest of the header; ``None`` if the prefix is too short or names no known compression."""
    if len(frame) < _PREFIX.size:
        return None
    return _COMPRESSION_NAMES.get(_PREFIX.unpack_from(frame, 0)[3])


def read_header(frame: bytes | bytearray | memoryview) -> FrameHeader:
    """Parse and range-check a frame's header without touching its payload.

    Checks magic, version, the encoding and compression codes, ``ndim``, that
    every dim is >= 1, and that the quantization parameters are finite with
    ``scale > 0``.  Does not check size limits, the payload length, or the
    CRC -- :func:`decode` does.  Allocates only the returned object.

    Parameters
    ----------
    frame : bytes, bytearray or memoryview
        A frame, or at least its first ``header_size`` bytes.

    Returns
    -------
    FrameHeader

    Raises
    ------
    CodecError
        If the header is truncated or any field is invalid.
    """
    view = _as_view(frame)
    if len(view) < _PREFIX.size:
        raise CodecError(f"truncated frame: {len(view)} bytes, a header needs at least {_PREFIX.size}")
    magic, version, enc_code, comp_code, ndim = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise CodecError(f"bad magic {bytes(magic)!r} (expected {MAGIC!r}): not a splitshield feature frame")
    if version != VERSION:
        raise CodecError(f"unsupported frame version {version}; this decoder reads version {VERSION}")
    if enc_code not in _ENCODING_NAMES:
        raise CodecError(f"unknown encoding code {enc_code}; known: {_ENCODING_NAMES}")
    if comp_code not in _COMPRESSION_NAMES:
        raise CodecError(f"unknown compression code {comp_code}; known: {_COMPRESSION_NAMES}")
    if ndim > MAX_NDIM:
        raise CodecError(f"frame claims {ndim} dims; at most {MAX_NDIM} are allowed")
    encoding = _ENCODING_NAMES[enc_code]
    header_size = _header_size(encoding, ndim)
    if len(view) < header_size:
        raise CodecError(
            f"truncated frame: {len(view)} bytes, a {encoding} header with {ndim} dims needs {header_size}"
        )
    pos = _PREFIX.size
    shape = struct.unpack_from(f"<{ndim}I", view, pos)
    pos += 4 * ndim
    if any(d == 0 for d in shape):
        raise CodecError(f"frame claims shape {shape}; zero-sized dims are not allowed")
    scale = offset = None
    if encoding in _QUANT_BITS:
        scale, offset = _QUANT.unpack_from(view, pos)
        pos += _QUANT.size
        if not (math.isfinite(scale) and scale > 0 and math.isfinite(offset)):
            raise CodecError(
                f"invalid quantization parameters scale={scale!r}, offset={offset!r}: "
                "need a finite scale > 0 and a finite offset"
            )
    payload_length, crc = _TAIL.unpack_from(view, pos)
    return FrameHeader(
        version=version,
        encoding=encoding,
        compression=_COMPRESSION_NAMES[comp_code],
        shape=shape,
        scale=scale,
        offset=offset,
        payload_length=payload_length,
        crc32=crc,
        header_size=header_size,
    )


def _check_limit(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


def _zstd_decompress(payload: memoryview, expected: int) -> bytes:
    """Decompress a zstd payload that must expand to exactly ``expected`` bytes.

    The frame's own content-size claim is checked first for a clear early
    error, but never trusted for allocation (``ZstdDecompressor.decompress``
    would allocate whatever the zstd header claims): output is read through a
    stream capped at ``expected + 1`` bytes, so a bomb costs at most that.
    """
    zstd = _import_zstd()
    try:
        claimed = zstd.get_frame_parameters(payload).content_size
        if claimed == zstd.CONTENTSIZE_UNKNOWN:
            raise CodecError("zstd payload does not declare its decompressed size")
        if claimed != expected:
            raise CodecError(
                f"zstd payload declares {claimed} decompressed bytes but the shape needs {expected}"
            )
        # read_across_frames=True: extra concatenated frames count toward the cap
        # instead of being silently ignored.
        reader = zstd.ZstdDecompressor().stream_reader(payload, read_across_frames=True)
        raw = reader.read(expected + 1)
    except zstd.ZstdError as exc:
        raise CodecError(f"corrupt zstd payload: {exc}") from exc
    if len(raw) != expected:
        what = "more than" if len(raw) > expected else f"only {len(raw)}, not"
        raise CodecError(f"zstd payload decompresses to {what} the {expected} bytes the shape needs")
    return raw


def _dequantize(codes: np.ndarray, scale: float, offset: float) -> np.ndarray:
    out = torch.empty(codes.size, dtype=torch.float32)
    # A hostile scale can push scale*q + offset past FLT_MAX; that becomes inf
    # and is rejected by the caller's finiteness check.
    for start in range(0, codes.size, _DEQUANT_CHUNK):
        chunk = torch.from_numpy(codes[start : start + _DEQUANT_CHUNK].copy())  # a frame's buffer is read-only
        out[start : start + chunk.numel()] = dequantize(chunk, scale, offset)
    return out.numpy()


def decode(
    frame: bytes | bytearray | memoryview,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    accept: Callable[[FrameHeader], None] | None = None,
) -> torch.Tensor:
    """Validate and deserialize one frame produced by :func:`encode`.

    Checks, in this order, so nothing is allocated on a claim that fails a
    limit: frame length <= ``max_bytes``; header fields (see
    :func:`read_header`); element count <= ``max_elements``; raw payload and
    float32 output <= ``max_bytes``; announced payload length equals the
    bytes actually present; CRC32; raw payload size equals what shape x
    encoding implies (zstd output capped at that size); uint4 padding nibble
    is 0; every decoded value is finite.

    Parameters
    ----------
    frame : bytes, bytearray or memoryview
        One complete frame and nothing else.
    max_elements : int
        Largest accepted product of dims.
    max_bytes : int
        Largest accepted frame, uncompressed payload, and decoded tensor, in bytes.
    accept : callable, optional
        Called with the parsed :class:`FrameHeader` before anything is allocated; it raises to refuse the
        frame (a server checks the encoding and shape it serves, without parsing the header twice).

    Returns
    -------
    torch.Tensor
        float32 CPU tensor with the encoded shape.

    Raises
    ------
    CodecError
        If the frame is malformed, corrupt, exceeds a limit, or holds NaN/inf.
    ConfigError
        If a limit is not a positive int.
    TypeError
        If ``frame`` is not bytes-like.
    """
    max_elements = _check_limit("max_elements", max_elements)
    max_bytes = _check_limit("max_bytes", max_bytes)
    view = _as_view(frame)
    if len(view) > max_bytes:
        raise CodecError(f"frame is {len(view)} bytes, over the max_bytes limit of {max_bytes}")
    header = read_header(view)
    if accept is not None:
        accept(header)
    numel = header.numel
    if numel > max_elements:
        raise CodecError(
            f"frame claims shape {header.shape} = {numel} elements, "
            f"over the max_elements limit of {max_elements}"
        )
    expected = header.raw_size
    # The float32 result is the largest buffer decode creates (4 bytes/element).
    if 4 * numel > max_bytes:
        raise CodecError(
            f"frame claims shape {header.shape}, which decodes to {4 * numel} bytes, "
            f"over the max_bytes limit of {max_bytes}"
        )
    present = len(view) - header.header_size
    if header.payload_length != present:
        problem = "truncated frame" if present < header.payload_length else "trailing bytes after payload"
        raise CodecError(
            f"{problem}: header announces {header.payload_length} payload bytes, frame has {present}"
        )
    payload = view[header.header_size :]
    crc = zlib.crc32(payload, zlib.crc32(view[: header.header_size - 4]))
    if crc != header.crc32:
        raise CodecError(f"CRC32 mismatch: header says {header.crc32:#010x}, frame hashes to {crc:#010x}")

    if header.compression == "zstd":
        raw: bytes | memoryview = _zstd_decompress(payload, expected)
    elif len(payload) != expected:
        raise CodecError(
            f"payload is {len(payload)} bytes but shape {header.shape} with encoding "
            f"{header.encoding} needs {expected}"
        )
    else:
        raw = payload

    if header.encoding == "float32":
        # astype copies into a writable native-endian array that torch can own.
        values = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    elif header.encoding == "float16":
        values = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    else:
        codes = np.frombuffer(raw, dtype=np.uint8)
        if header.encoding == "uint4":
            if numel % 2 and codes[-1] >> 4:
                raise CodecError("uint4 payload has a nonzero padding nibble after the last element")
            unpacked = np.empty(2 * codes.size, dtype=np.uint8)
            unpacked[0::2] = codes & 0x0F
            unpacked[1::2] = codes >> 4
            codes = unpacked[:numel]
        assert header.scale is not None and header.offset is not None  # set for quantized frames
        values = _dequantize(codes, header.scale, header.offset)
    if not np.isfinite(values).all():
        raise CodecError("frame decodes to NaN or inf values")
    return torch.from_numpy(values).reshape(header.shape)


def wire_roundtrip(z: torch.Tensor, wire: WireFormat = WireFormat(), *, batch_size: int | None = 1) -> torch.Tensor:
    """Features as the server receives them: encoded as the edge client sends them, decoded as the server does.

    Each frame is ``encode(z[i : i + batch_size], wire.options)`` -- the bytes
    :class:`~splitshield.runtime.client.EdgeClient` (``batch_size=``) posts -- decoded by :func:`decode`,
    the function the server's ``TailService.decode`` ends in.

    Parameters
    ----------
    z : torch.Tensor
        Floating-point features ``[B, ...]`` (any device).
    wire : WireFormat
        Encoding and compression.
    batch_size : int or None
        Rows of ``z`` per frame; None sends all of ``z`` as one frame. Quantized encodings take their
        range per frame, so a row's uint8/uint4 values depend on the other rows of its frame unless
        ``batch_size=1`` (the default: per sample, independent of how ``z`` was batched, and equal to
        the ``quantize`` defense with 8 or 4 bits). float32/float16 are elementwise, so framing does
        not change them and ``z`` goes as one frame.

    Returns
    -------
    torch.Tensor
        float32, ``z``'s shape, on ``z``'s device, without gradient. Exactly ``z`` (as float32) for
        ``float32``; within half a quantization step of it for uint8/uint4.

    Raises
    ------
    CodecError
        If ``z`` cannot be encoded (see :func:`encode`): NaN/inf, empty, float16 overflow, no zstandard.
    ConfigError
        If ``batch_size`` is not a positive int or None.
    """
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"wire_roundtrip expects a torch.Tensor, got {type(z).__name__}")
    if not isinstance(wire, WireFormat):
        raise TypeError(f"wire must be a WireFormat, got {type(wire).__name__}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"batch_size must be a positive int or None, got {batch_size!r}")
    options = wire.options
    one_frame = batch_size is None or wire.dtype not in _QUANT_BITS or z.dim() == 0
    decoded = []
    for chunk in [z] if one_frame else z.split(batch_size):
        frame = encode(chunk, options)
        decoded.append(decode(frame, max_elements=chunk.numel(), max_bytes=max(len(frame), 4 * chunk.numel())))
    return (decoded[0] if len(decoded) == 1 else torch.cat(decoded)).to(z.device)
