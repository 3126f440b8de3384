"""Image codec for the `shard` stage: decode by content (never by extension), convert to RGB,
resize + center-crop as ADM/VAR prepare ImageNet, and encode deterministically.

Bad inputs raise `SkipImage(reason)`; inputs that decode after a fix report it in `Decoded.conversions`.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

from PIL import Image, ImageOps, UnidentifiedImageError

# Decompression bombs are errors, not warnings: a 1 GPixel "JPEG" in a class folder is bad input.
Image.MAX_IMAGE_PIXELS = 16384 * 16384

# Extension → the PIL formats a file with that name may legitimately hold.
_EXPECTED = {"jpg": {"JPEG", "MPO"}, "jpeg": {"JPEG", "MPO"}, "png": {"PNG"}, "webp": {"WEBP"},
             "bmp": {"BMP"}, "gif": {"GIF"}, "tif": {"TIFF"}, "tiff": {"TIFF"}}


class SkipImage(Exception):
    """This input cannot become a sample; `reason` is a short code recorded in the manifest."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Decoded:
    image: Image.Image  # RGB
    width: int  # of the original
    height: int
    format: str
    conversions: list[str] = field(default_factory=list)


def decode_image(data: bytes, name: str = "", exif: str = "apply", max_pixels: int | None = None) -> Decoded:
    """Decode `data` by its content; convert CMYK, greyscale, palette and alpha images to RGB. `exif="apply"`
    turns a photo upright by its EXIF orientation (recorded as conversion `exif_orientation_<tag>`); "ignore"
    keeps the stored pixels, as ADM/VAR prepare ImageNet. An image of more than `max_pixels` pixels (its header
    read, nothing decoded) is `too_large`; Pillow's warnings are errors here, reasons in the manifest, never lines
    on the terminal."""
    if len(data) == 0:
        raise SkipImage("empty_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # DecompressionBombWarning, truncated-EXIF warnings: skip with a reason
            im = Image.open(io.BytesIO(data))
            fmt = im.format or "?"
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise SkipImage("too_large", f"{im.width}×{im.height} pixels > shard.max_pixels={max_pixels}")
            im.load()
    except UnidentifiedImageError:
        raise SkipImage("not_an_image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise SkipImage("too_large", str(err).split(".")[0]) from None
    except Warning as err:  # any other Pillow warning while decoding: not a clean image
        raise SkipImage("decode_error", f"{type(err).__name__}: {err}") from None
    except OSError as err:  # PIL reports truncation as OSError("image file is truncated ...")
        if "truncated" in str(err) or "broken data stream" in str(err):
            raise SkipImage("truncated", str(err)) from None
        raise SkipImage("decode_error", str(err)) from None
    except (SyntaxError, ValueError) as err:
        raise SkipImage("decode_error", str(err)) from None
    conversions: list[str] = []
    orientation = im.getexif().get(0x0112, 1) if exif == "apply" else 1
    if orientation not in (None, 1):
        im = ImageOps.exif_transpose(im)
        conversions.append(f"exif_orientation_{orientation}")
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if ext in _EXPECTED and fmt not in _EXPECTED[ext]:
        conversions.append(f"content_is_{fmt.lower()}")
    if im.mode == "CMYK":
        conversions.append("cmyk")
    elif im.mode in ("1", "L", "LA", "I", "I;16", "F"):
        conversions.append("greyscale")
    elif im.mode in ("P", "PA", "RGBA"):
        conversions.append("palette" if im.mode.startswith("P") else "alpha")
    width, height = im.size
    if im.mode in ("I", "I;16", "F"):  # 16-bit / float greyscale: scale to 8 bit before RGB
        im = im.point(lambda v: v / 256).convert("L") if im.mode != "F" else im.convert("L")
    rgb = im.convert("RGB") if im.mode != "RGB" else im
    return Decoded(rgb, width, height, fmt, conversions)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's ImageNet preparation (VAR and torch-fidelity reference batches use the same):
    halve with a box filter while the short side is ≥ 2·size (cheap, alias-free), bicubic-resize the
    short side to `size`, then take the central size×size square."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(
        (round(image.width * scale), round(image.height * scale)), resample=Image.Resampling.BICUBIC
    )
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def preprocess(decoded: Decoded, resolution: int | None, mode: str, small_images: str) -> Image.Image:
    """Apply the configured preprocessing; records an upscale in `decoded.conversions`."""
    if mode == "keep" or resolution is None:
        return decoded.image
    if min(decoded.image.size) < resolution:
        if small_images == "skip":
            raise SkipImage("too_small", f"{decoded.width}x{decoded.height} < {resolution}")
        decoded.conversions.append("upscaled")
    return center_crop(decoded.image, resolution)


def encode_image(image: Image.Image, fmt: str, jpeg_quality: int = 95) -> bytes:
    """Deterministic encoding: same pixels + settings → same bytes (no timestamps or random state)."""
    buf = io.BytesIO()
    if fmt == "jpg":
        # 4:4:4 chroma: the detail layers of CART live in exactly the high frequencies 4:2:0 discards.
        image.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0)
    elif fmt == "png":
        image.save(buf, format="PNG", compress_level=4)
    else:
        raise ValueError(f"unknown image format {fmt!r} (allowed: jpg, png)")
    return buf.getvalue()
