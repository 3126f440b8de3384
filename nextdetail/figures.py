"""Pictures people look at: PNG strips and grids, written atomically under the storage root."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def to_uint8(x: np.ndarray) -> np.ndarray:
    """(3, H, W) float in [0, 1] → (H, W, 3) uint8."""
    return (np.clip(x.transpose(1, 2, 0), 0, 1) * 255 + 0.5).astype(np.uint8)


def stretch_detail(d: np.ndarray) -> np.ndarray:
    """A detail layer (3, H, W), signed and small, mapped to [0, 1] around grey: 0.5 + d / (2 · p99.5|d|)."""
    scale = float(np.percentile(np.abs(d), 99.5)) or 1.0
    return np.clip(0.5 + d / (2 * scale), 0, 1)


def labelled_strip(panels: list[tuple[str, np.ndarray]], scale: int = 1) -> Image.Image:
    """Panels (label, (H, W, 3) uint8) side by side with their labels above, like CART's Figure 3."""
    h, w = panels[0][1].shape[:2]
    h, w = h * scale, w * scale
    pad, label_h = 4, 14
    strip = Image.new("RGB", (len(panels) * (w + pad) + pad, h + label_h + 2 * pad), "white")
    draw = ImageDraw.Draw(strip)
    for i, (label, img) in enumerate(panels):
        x = pad + i * (w + pad)
        strip.paste(Image.fromarray(img).resize((w, h), Image.NEAREST), (x, label_h + pad))
        draw.text((x, 2), label, fill="black")
    return strip


def decomposition_strip(image: np.ndarray, bases: np.ndarray) -> Image.Image:
    """I, B_1 … B_n, D_1 … D_n for one image: image (3, H, W), bases (n, 3, H, W), floats in [0, 1]."""
    previous = np.concatenate([image[None], bases[:-1]])
    details = previous - bases  # D_k = B_{k-1} − B_k
    panels = [("I", to_uint8(image))]
    panels += [(f"B{k + 1}", to_uint8(b)) for k, b in enumerate(bases)]
    panels += [(f"D{k + 1}", to_uint8(stretch_detail(d))) for k, d in enumerate(details)]
    scale = max(1, 128 // image.shape[-1])  # tiny images are enlarged (nearest) to be seen
    return labelled_strip(panels, scale)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def safe_name(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key) or "image"


def write_png(path: Path, img: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".png.tmp")
    tmp.write_bytes(png_bytes(img))
    tmp.replace(path)
