"""LPIPS perceptual distance (Zhang et al. 2018, the VGG16 variant VQGAN and VAR train with).

d(x, y) = Σ_l mean_hw ‖w_l ⊙ (n(φ_l(x)) − n(φ_l(y)))‖²,  φ_l: VGG16 features at relu1_2, relu2_2,
relu3_3, relu4_3, relu5_3 of inputs shifted/scaled from [-1, 1]; n: unit length over channels; w_l:
the learned 1×1 "lin" layers. Nothing is downloaded: the VGG16 weights (torchvision's
`vgg16-397923af.pth`) and the lin layers (LPIPS's `weights/v0.1/vgg.pth`, keys `lin{l}.model.1.weight`)
are files named in the config; a missing one is a one-line error.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

SLICES = (4, 9, 16, 23, 30)  # VGG16 `features` indices after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
CHANNELS = (64, 128, 256, 512, 512)


def _load(path: str | Path, what: str) -> dict[str, Tensor]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file ({what}); copy it here or set tokenizer.lpips_weight=0")
    from nextdetail.storage.checkpoints import read_weights_file

    return read_weights_file(p, str(p))


class LPIPS(nn.Module):
    def __init__(self, vgg16_path: str | Path, lin_path: str | Path) -> None:
        super().__init__()
        from torchvision.models import vgg16

        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        features = vgg16(weights=None).features[: SLICES[-1]]
        vgg = {k.removeprefix("features."): v for k, v in _load(vgg16_path, "torchvision vgg16 weights").items()
               if k.startswith("features.")}
        wanted = features.state_dict()
        missing = sorted(set(wanted) - set(vgg))
        if missing:
            raise ValueError(f"{vgg16_path}: not torchvision's vgg16 state dict (missing features.{missing[0]})")
        features.load_state_dict({k: vgg[k] for k in wanted})
        self.features = features
        lin = _load(lin_path, "LPIPS lin layers")
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in CHANNELS)
        for i, conv in enumerate(self.lins):
            key = f"lin{i}.model.1.weight"
            if key not in lin:
                raise ValueError(f"{lin_path}: not LPIPS's vgg.pth (no {key})")
            assert lin[key].shape == conv.weight.shape, f"{key}: {tuple(lin[key].shape)} vs {tuple(conv.weight.shape)}"
            conv.weight.data.copy_(lin[key])
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # a fixed metric: never dropout / batch statistics

    def forward(self, x: Tensor, y: Tensor) -> Tensor:  # (B, 3, H, W) in [-1, 1] twice → (B,)
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)
        total = x.new_zeros(x.shape[0])
        start = 0
        for lin, end in zip(self.lins, SLICES, strict=True):
            h = self.features[start:end](h)
            start = end
            fx, fy = h.chunk(2)
            fx = fx / (fx.square().sum(1, keepdim=True).sqrt() + 1e-10)
            fy = fy / (fy.square().sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((fx - fy).square()).mean((1, 2, 3))
        return total
