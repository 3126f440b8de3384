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


def figure_image(fig: Any) -> Image.Image:
    """A finished matplotlib figure as an RGB image (the figure is closed)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


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
    return figure_image(fig)


def ar_curves(metrics: list[dict[str, Any]], uniform_loss: float) -> Image.Image:
    """The transformer's training: cross-entropy (per step, a running mean, held-out points, the uniform
    baseline log V) and token accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([m["step"] for m in metrics])
    loss = np.array([m["loss"] for m in metrics])
    acc = np.array([m["acc"] for m in metrics])
    window = max(1, len(metrics) // 50)
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid") if len(loss) else loss
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    ax.plot(steps, loss, color="0.75", linewidth=0.6, label="train (per step)")
    ax.plot(steps[window - 1:], smooth, color="C0", linewidth=1.2, label=f"train (mean of {window})")
    val = [(m["step"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", color="C3", markersize=3, label="held out")
    ax.axhline(uniform_loss, color="k", linestyle="--", linewidth=0.8, label="uniform (log V)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    bx.plot(steps, acc, color="C0", linewidth=0.8)
    bx.set_xlabel("step")
    bx.set_ylabel("token accuracy")
    bx.grid(alpha=0.3)
    return figure_image(fig)


def _tile(img: np.ndarray, side: int) -> Image.Image:
    return Image.fromarray(img).resize((side, side), Image.NEAREST if img.shape[0] < side else Image.BILINEAR)


# The most classes one grid shows. ImageNet's 1,000 rows of 256 px tiles made a 2,459 × 259,017 px grid (637 MP:
# 1.9 GB in memory, minutes of PNG encoding in a stage's serial merge, nothing a browser shows); each class keeps
# its own grid (`grids/`).
GRID_ROWS = 16


def grid_rows(rows: list[Any], most: int = GRID_ROWS) -> list[Any]:
    """At most `most` of `rows` (one per class, in class order), evenly spread from the first to the last: fixed by
    the rows, never by chance."""
    if len(rows) <= most:
        return list(rows)
    return [rows[round(i * (len(rows) - 1) / (most - 1))] for i in range(most)]


def _shown_of(rows: list[Any], shown: list[Any]) -> str:
    """The grid's corner note when it leaves classes out."""
    return f"{len(shown)} of {len(rows)} classes" if len(shown) < len(rows) else ""


def class_grid(rows: list[tuple[str, np.ndarray | None, np.ndarray]], side: int | None = None) -> Image.Image:
    """One row per class (at most `GRID_ROWS`, `grid_rows`): its name, a real photo of it (framed, when given), then
    its samples (N, H, W, 3)."""
    shown = grid_rows(rows)
    rows, note = shown, _shown_of(rows, shown)
    side = side or max(64, rows[0][2].shape[1])
    pad, name_w, gap = 3, 120, 8
    n = max(len(samples) for _, _, samples in rows)
    width = name_w + side + gap + n * (side + pad) + pad
    grid = Image.new("RGB", (width, len(rows) * (side + pad) + pad + 14), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((name_w, 1), "real", fill="black")
    draw.text((name_w + side + gap, 1), "samples", fill="black")
    if note:
        draw.text((2, 1), note, fill="black")
    for r, (name, reference, samples) in enumerate(rows):
        y = 14 + pad + r * (side + pad)
        draw.text((2, y + side // 2 - 6), name[:18], fill="black")
        if reference is not None:
            draw.rectangle((name_w - 2, y - 2, name_w + side + 1, y + side + 1), outline=(200, 40, 40), width=2)
            grid.paste(_tile(reference, side), (name_w, y))
        for i, img in enumerate(samples):
            grid.paste(_tile(img, side), (name_w + side + gap + i * (side + pad), y))
    return grid


def pair_grid(rows: list[tuple[str, np.ndarray, np.ndarray]], titles: tuple[str, str], note: str = "") -> Image.Image:
    """Per class (at most `GRID_ROWS`, `grid_rows`), images of two methods side by side (CART's Figure 6):
    [a₁ b₁ a₂ b₂ …] at full size; `note` in the corner (`refinement_grid`'s own rows left out)."""
    shown = grid_rows(rows)
    rows, note = shown, note or _shown_of(rows, shown)
    side = max(128, rows[0][1].shape[1])  # small images enlarged (nearest) to be seen
    pad, name_w = 3, 120
    n = max(len(a) for _, a, _ in rows)
    grid = Image.new("RGB", (name_w + 2 * n * (side + pad) + pad, len(rows) * (side + pad) + pad + 14), "white")
    draw = ImageDraw.Draw(grid)
    if note:
        draw.text((2, 1), note, fill="black")
    for i in range(n):
        draw.text((name_w + 2 * i * (side + pad), 1), titles[0], fill="black")
        draw.text((name_w + (2 * i + 1) * (side + pad), 1), titles[1], fill="black")
    for r, (name, a, b) in enumerate(rows):
        y = 14 + pad + r * (side + pad)
        draw.text((2, y + side // 2 - 6), name[:18], fill="black")
        for i in range(len(a)):
            grid.paste(_tile(a[i], side), (name_w + 2 * i * (side + pad), y))
            grid.paste(_tile(b[i], side), (name_w + (2 * i + 1) * (side + pad), y))
    return grid


def metric_curves(rows: list[dict[str, Any]], real_isc: float | None = None) -> Image.Image:
    """Evaluation metrics against training step (one point per evaluated checkpoint)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in rows if r.get("step") is not None), key=lambda r: r["step"])
    steps = [r["step"] for r in rows]
    panels = [(k, t) for k, t in (("fid", "FID ↓"), ("kid_mean", "KID ↓"), ("isc_mean", "IS ↑"), ("precision", "precision / recall ↑"))
              if k in rows[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), dpi=100, squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        ax.plot(steps, [r[key] for r in rows], "o-", color="C0", markersize=4, label=key.split("_")[0])
        if key == "precision":
            ax.plot(steps, [r["recall"] for r in rows], "s-", color="C1", markersize=4, label="recall")
            ax.set_ylim(0, 1.02)
            ax.legend(fontsize=7)
        if key == "isc_mean" and real_isc is not None:
            ax.axhline(real_isc, color="k", linestyle="--", linewidth=0.8, label="real images")
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    return figure_image(fig)


def refinement_heatmap(image: np.ndarray, levels: np.ndarray, n_levels: int) -> np.ndarray:
    """An NDP sample (H, W, 3) uint8 overlaid with how deep each patch was refined: levels (S, S) of the
    quadtree leaves (0 = the 1×1 root … n_levels − 1 = finest) coloured dark blue → yellow (viridis),
    blended half and half, with the leaves' outlines drawn. → (H, W, 3) uint8."""
    from matplotlib import colormaps

    H, S = image.shape[0], levels.shape[0]
    f = H // S
    colours = (colormaps["viridis"](levels / max(n_levels - 1, 1))[..., :3] * 255).astype(np.float32)  # (S, S, 3)
    big = colours.repeat(f, 0).repeat(f, 1)
    out = (0.5 * image.astype(np.float32) + 0.5 * big).round().astype(np.uint8)
    cell = H >> levels.repeat(f, 0).repeat(f, 1).astype(np.int64)  # (H, W): each pixel's leaf side in pixels
    yy, xx = np.mgrid[0:H, 0:H]
    out[(yy % cell == 0) | (xx % cell == 0)] = (255, 255, 255)  # the leaves' top and left edges
    return out


def refinement_grid(rows: list[tuple[str, np.ndarray, np.ndarray]], n_levels: int, per_class: int = 4) -> Image.Image:
    """Per class: [sample, its refinement heat map] pairs (`refinement_heatmap`), enlarged to be seen."""
    shown = grid_rows(rows)  # only the rows the grid shows get their heat maps
    pairs = [(name, images[:per_class], np.stack([refinement_heatmap(i, lv, n_levels) for i, lv in
                                                  zip(images[:per_class], levels[:per_class], strict=True)]))
             for name, images, levels in shown]
    return pair_grid(pairs, ("sample", "refined (dark: coarse)"), _shown_of(rows, shown))


def fid_vs_gflops(rows: list[dict[str, Any]]) -> Image.Image:
    """`nextdetail compare`'s picture: FID against GFLOPs per image, one labelled point per evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    shown = [r for r in rows if r.get("fid") is not None and r.get("gflops_per_image") is not None]
    for r in shown:
        ax.scatter([r["gflops_per_image"]], [r["fid"]], s=36)
        ax.annotate(f"{r['model']} {r['evaluate'][:6]}", (r["gflops_per_image"], r["fid"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(f"{len(shown)} evaluations")
    ax.grid(alpha=0.3)
    return figure_image(fig)
