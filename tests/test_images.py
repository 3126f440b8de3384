"""The image codec on every bad-input kind real folders contain (generated here, not shipped)."""

import io

import numpy as np
import pytest
from PIL import Image

from nextdetail.storage.images import SkipImage, center_crop, decode_image, encode_image, preprocess


def _encode(mode: str, fmt: str, size=(64, 48)) -> bytes:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (size[1], size[0], len(mode)), dtype=np.uint8)
    im = Image.fromarray(arr[..., 0] if mode == "L" else arr)
    if mode == "CMYK":
        im = Image.fromarray(arr[..., :3]).convert("CMYK")
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def test_rgb_jpeg_decodes_without_conversion():
    d = decode_image(_encode("RGB", "JPEG"), "x.JPEG")
    assert d.image.mode == "RGB" and (d.width, d.height) == (64, 48) and d.conversions == []


@pytest.mark.parametrize("mode, fmt, name, conversion", [
    ("CMYK", "JPEG", "x.JPEG", "cmyk"),
    ("L", "JPEG", "x.JPEG", "greyscale"),
    ("RGB", "PNG", "x.JPEG", "content_is_png"),
])
def test_convertible_inputs(mode, fmt, name, conversion):
    d = decode_image(_encode(mode, fmt), name)
    assert d.image.mode == "RGB" and conversion in d.conversions


def test_cmyk_conversion_keeps_colour():
    rgb = Image.new("RGB", (16, 16), (200, 30, 40))
    buf = io.BytesIO()
    rgb.convert("CMYK").save(buf, format="JPEG", quality=95)
    r, g, b = np.asarray(decode_image(buf.getvalue(), "c.jpg").image).reshape(-1, 3).mean(0)
    assert r > 150 and g < 80 and b < 80


@pytest.mark.parametrize("data, reason", [
    (b"", "empty_file"),
    (b"this is a text file, not a picture\n", "not_an_image"),
])
def test_skipped_inputs(data, reason):
    with pytest.raises(SkipImage) as info:
        decode_image(data, "x.JPEG")
    assert info.value.reason == reason


def test_truncated_jpeg_is_skipped():
    data = _encode("RGB", "JPEG", size=(256, 256))
    with pytest.raises(SkipImage) as info:
        decode_image(data[: len(data) // 2], "t.JPEG")
    assert info.value.reason == "truncated"


def test_center_crop_matches_resolution_and_small_policy():
    d = decode_image(_encode("RGB", "PNG", size=(300, 200)), "a.png")
    out = preprocess(d, 64, "center_crop", "upscale")
    assert out.size == (64, 64) and d.conversions == []
    small = decode_image(_encode("RGB", "PNG", size=(20, 30)), "s.png")
    assert preprocess(small, 32, "center_crop", "upscale").size == (32, 32) and "upscaled" in small.conversions
    with pytest.raises(SkipImage, match="too_small"):
        preprocess(decode_image(_encode("RGB", "PNG", size=(20, 30)), "s.png"), 32, "center_crop", "skip")


def test_center_crop_takes_the_middle():
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, 100:200] = 255  # a white central square
    out = np.asarray(center_crop(Image.fromarray(arr), 50))
    assert out.shape == (50, 50, 3) and out[5:-5, 5:-5].min() > 240


def test_encoding_is_deterministic():
    im = decode_image(_encode("RGB", "PNG"), "a.png").image
    for fmt in ("jpg", "png"):
        assert encode_image(im, fmt) == encode_image(im.copy(), fmt)
