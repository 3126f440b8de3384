"""Benchmark: does the tokenizer's decoder render a latent twice the trained side as it renders the trained one?

CART's ×2 (§4.2.1, issue 42) decodes a latent twice the side the tokenizer trained on. This separates the decoder
from the transformer and the patches: the held-out split's cached tokens → quantized latents f̂ (B, C, h, w), then
the same latents rendered three ways:

- alone       each f̂ decoded at the trained side (what reconstructions are);
- mosaic      fours of f̂ tiled 2×2 into (2h, 2w) maps and decoded whole — the same content, only the map is larger
              (`tiles_vs_alone_psnr`: how close each tile comes out to its decode alone; a size-independent decoder
              gives the same pixels away from the tiles' joins);
- up_latent   each f̂ resized bilinearly ×2 and decoded (the ×2 sampler's upscaled base is such a latent), beside
              `up_image` (the decode alone, resized ×2: the yardstick).

Each is scored by `fidelity.row_bands` (0–255: how far the mean colour of the edge rows and columns, of the tiles'
joins and of the interior rows strays from the interior's). `tokenizer.mosaic_weight` trains the decoder on the
mosaic too (docs/stages.md, train_tokenizer).

    PYTHONPATH=. python benchmarks/decoder_size.py [--preset tiny] [--root DIR] [-o key=value …]

Prints one JSON line: figure = tiles_vs_alone_psnr (dB), baseline = 30 dB, ratio = figure / baseline, and every
number.
"""

from __future__ import annotations

import json

from preset_root import arguments, built


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    cfg, results = built(args, until="tokenize")
    import numpy as np
    import torch
    import torch.nn.functional as F

    from nextdetail.models.fidelity import row_bands
    from nextdetail.models.tokenizer import images_to_uint8, load_tokenizer
    from nextdetail.stages.train_tokenizer.tasks import tile_2x2

    tok = results["train_tokenizer"]
    model = load_tokenizer(tok.checkpoint_url, cfg.storage.options, tok.summary["tokenizer_sha256"], "this benchmark")
    cache = results["tokenize"].open()
    variant = cache.variants.index("none") if "none" in cache.variants else 0
    rows = [r for r in cache.index().to_pylist() if r["split"] == args.split]
    by_tar: dict[str, list[int]] = {}
    for r in rows:
        by_tar.setdefault(r["shard"], []).append(r["row"])
    with torch.no_grad():
        f_hat = torch.cat([model.quantize.indices_to_f(
            [torch.from_numpy(m.astype(np.int64)) for m in cache.maps(cache.read(args.split, tar)[sorted(rs), variant])],
            model.spec.latent_side) for tar, rs in sorted(by_tar.items())])
        f_hat = f_hat[torch.randperm(len(f_hat), generator=torch.Generator().manual_seed(0))]  # fours of mixed classes
        f_hat = f_hat[: len(f_hat) // 4 * 4]

        def decode(latents: torch.Tensor) -> torch.Tensor:
            return torch.cat([model.fhat_to_img(chunk) for chunk in latents.split(16)])

        alone = decode(f_hat)
        mosaic = decode(tile_2x2(f_hat))
        up_latent = decode(F.interpolate(f_hat, scale_factor=2, mode="bilinear", align_corners=False))
    up_image = F.interpolate(alone, scale_factor=2, mode="bilinear", align_corners=False).clamp(-1, 1)
    n, side = len(f_hat), alone.shape[-1]
    tiles = mosaic.view(n // 4, 3, 2, side, 2, side).permute(0, 2, 4, 1, 3, 5).reshape(n, 3, side, side)

    def psnr(a: torch.Tensor, b: torch.Tensor) -> float:  # images in [-1, 1]: peak-to-peak 2
        return round(float(10 * torch.log10(4 / (a - b).pow(2).mean())), 2)

    def bands(images: torch.Tensor, joins: list[int] = ()) -> dict[str, float]:
        return {k: round(v, 1) for k, v in row_bands(images_to_uint8(images), joins).items()}

    out = {"benchmark": "decoder_size", "tokenizer": tok.checkpoint_url, "images": n,
           "mosaic_weight": cfg.tokenizer.mosaic_weight, "alone": bands(alone), "mosaic": bands(mosaic, [side]),
           "tiles_vs_alone_psnr": psnr(tiles, alone), "up_latent": bands(up_latent), "up_image": bands(up_image),
           "up_latent_vs_up_image_psnr": psnr(up_latent, up_image)}
    out.update(figure=out["tiles_vs_alone_psnr"], baseline=30.0, ratio=round(out["tiles_vs_alone_psnr"] / 30.0, 3))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
