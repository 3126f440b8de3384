"""Pictures people look at: PNG strips and grids, written atomically under the storage root."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

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


def reconstruction_grid(images: Any, recons: Any) -> Image.Image:
    """Originals (top row) over reconstructions (bottom row): tensors (N, 3, H, W) in [-1, 1]."""
    panels = [(f"I{i}", to_uint8((np.asarray(x) + 1) / 2)) for i, x in enumerate(images)]
    panels += [(f"rec{i}", to_uint8((np.asarray(x) + 1) / 2)) for i, x in enumerate(recons)]
    n = len(images)
    scale = max(1, 96 // images.shape[-1])
    top, bottom = labelled_strip(panels[:n], scale), labelled_strip(panels[n:], scale)
    grid = Image.new("RGB", (top.width, top.height + bottom.height), "white")
    grid.paste(top, (0, 0))
    grid.paste(bottom, (0, top.height))
    return grid


def training_curves(metrics: list[dict[str, Any]], keys: tuple[str, ...] = ("loss", "rec", "vq", "lpips", "gan_g")) -> Image.Image:
    """Loss curves over steps (log scale), one line per metric present: a PNG people look at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [m["step"] for m in metrics]
    for key in keys:
        values = [m.get(key) for m in metrics]
        if any(v is not None for v in values):
            ax.plot(steps, [v if v is not None else np.nan for v in values], label=key, linewidth=1)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")
