"""A Zarr v3 codec storing quantized factor chunks as lossless images (imagecodecs' WebP or JPEG-XL).

A base factor is a smooth RGB image: an image codec's spatial prediction compresses it far better than a generic
byte compressor. A chunk of shape (…, 3, H, W) — images × order × RGB planes — is written as one lossless image per
(…) index: WebP for uint8, JPEG-XL for uint16 (WebP has no 16-bit mode). Lossless, so what is decoded is exactly
what was quantized (`storage/factors.py` quantizes and records the error).

Encoder effort is chosen by measurement (2 real photographs at 256 px, order 3, per image, one core): the solver
decomposes ≈ 40 images/s, so the encoder must keep up. WebP method 6 / level 100 gives 120 KB but encodes 0.14
images/s; method 0 / level 25 gives 156 KB at 91 images/s (decodes 247/s); PNG level 6: 179 KB at 19/s. For 16
bits: JPEG-XL effort 1, 645 KB at 267/s (decodes 103/s) — float16's size at 30× its precision; PNG 901 KB and
blosc-zstd bit-shuffled 973 KB are larger than float16 (640 KB).

Chunk layout: b"NDIC" · uint32 count · count × uint32 byte lengths · the images, in C order of the leading axes.
The codec name is `nextdetail.lossless_image`; `storage/codecs.py` allows it, so a store a team shares still refuses
any codec nextdetail does not write.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.core.common import JSON, parse_named_configuration

if TYPE_CHECKING:
    from zarr.core.array_spec import ArraySpec

NAME = "nextdetail.lossless_image"
MAGIC = b"NDIC"
FORMATS = ("webp", "jpegxl")


def _codec(fmt: str) -> tuple[Any, Any]:
    import imagecodecs

    if fmt == "webp":
        return (lambda rgb: imagecodecs.webp_encode(rgb, level=25, lossless=True, method=0)), imagecodecs.webp_decode
    return (lambda rgb: imagecodecs.jpegxl_encode(rgb, lossless=True, effort=1)), imagecodecs.jpegxl_decode


def encode_planes(planes: np.ndarray, fmt: str) -> bytes:
    """(…, 3, H, W) uint8/uint16 → the chunk's bytes: one lossless image per leading index."""
    if planes.ndim < 3 or planes.shape[-3] != 3:
        raise ValueError(f"{NAME}: chunks of shape (…, 3, H, W), not {planes.shape}")
    if fmt == "webp" and planes.dtype != np.uint8:
        raise ValueError(f"{NAME}: WebP stores uint8 only (got {planes.dtype}); use jpegxl for uint16")
    encode, _ = _codec(fmt)
    flat = planes.reshape(-1, *planes.shape[-3:])
    images = [encode(np.ascontiguousarray(p.transpose(1, 2, 0))) for p in flat]
    return MAGIC + struct.pack(f"<I{len(images)}I", len(images), *(len(b) for b in images)) + b"".join(images)


def decode_planes(data: bytes, shape: tuple[int, ...], dtype: np.dtype, fmt: str) -> np.ndarray:
    """The inverse of `encode_planes`: the chunk's bytes → (…, 3, H, W) of `dtype`."""
    if data[:4] != MAGIC:
        raise ValueError(f"{NAME}: not a chunk this codec wrote (no {MAGIC!r} header)")
    (count,) = struct.unpack_from("<I", data, 4)
    lengths = struct.unpack_from(f"<{count}I", data, 8)
    expected = int(np.prod(shape[:-3], dtype=np.int64))
    if count != expected:
        raise ValueError(f"{NAME}: a chunk of {count} images where its shape {shape} holds {expected}")
    _, decode = _codec(fmt)
    out = np.empty((count, *shape[-3:]), dtype=dtype)
    offset = 8 + 4 * count
    for i, n in enumerate(lengths):
        rgb = decode(data[offset:offset + n])
        offset += n
        if rgb.shape != (shape[-2], shape[-1], 3) or rgb.dtype != dtype:
            raise ValueError(f"{NAME}: image {i} decodes to {rgb.shape} {rgb.dtype}, not "
                             f"{(shape[-2], shape[-1], 3)} {dtype}")
        out[i] = rgb.transpose(2, 0, 1)
    return out.reshape(shape)


@dataclass(frozen=True)
class LosslessImageCodec(ArrayBytesCodec):
    """Zarr v3 array → bytes codec: each (3, H, W) plane of a chunk as one lossless WebP or JPEG-XL image."""

    is_fixed_size = False
    format: str = "webp"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"{NAME}: format {self.format!r} is not one of {FORMATS}")

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> LosslessImageCodec:
        _, configuration = parse_named_configuration(data, NAME, require_configuration=False)
        return cls(**(configuration or {}))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, JSON]:
        return {"name": NAME, "configuration": {"format": self.format}}

    def evolve_from_array_spec(self, array_spec: ArraySpec) -> LosslessImageCodec:
        dtype = np.dtype(array_spec.dtype.to_native_dtype())
        if dtype not in (np.uint8, np.uint16) or (self.format == "webp" and dtype != np.uint8):
            raise ValueError(f"{NAME}: {self.format} cannot store {dtype} (webp: uint8; jpegxl: uint8 or uint16)")
        return self

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        dtype = np.dtype(chunk_spec.dtype.to_native_dtype())
        array = decode_planes(chunk_bytes.to_bytes(), tuple(chunk_spec.shape), dtype, self.format)
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(array)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        data = encode_planes(np.asarray(chunk_array.as_numpy_array()), self.format)
        return chunk_spec.prototype.buffer.from_bytes(data)

    def compute_encoded_size(self, input_byte_length: int, _chunk_spec: ArraySpec) -> int:
        raise NotImplementedError  # variable size: Zarr asks only fixed-size codecs


def register() -> None:
    """Make the codec known to Zarr (idempotent): every process that opens a quantized factor array calls it."""
    from zarr.registry import register_codec

    register_codec(NAME, LosslessImageCodec)
