"""CART's base-detail VQ-VAE (cart.txt §3.2, Algorithms 1–2) on VAR's tokenizer.

Images and factors are (B, 3, H, W) in [-1, 1] (VAR's convention; the factors cache stores [0, 1]:
use `to_model_range`). Encoding an image with its base factors B_1 … B_n (Eq. 11):

    f_{B_k} = quant_conv(E(B_k)),  k = 0 … n,  B_0 = I           one encoder pass over (n + 1)·B images
    sources = [f_{B_n}, f_{D_n}, …, f_{D_1}],  f_{D_k} = f_{B_{k−1}} − f_{B_k}      (Eq. 12)
    token maps r_1 … r_M = Algorithm 1 over the token schedule (`quant.py`)
    Î = D(post_quant_conv(Σ_k φ_k(z_k)))                                            (Algorithm 2)

Order 0 is VAR's VQVAE exactly (one source, f_I); `load_var_state_dict` takes VAR's released
`vae_ch160v4096z32.pth` (names map one to one; every shape asserted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nextdetail.models.configs import TokenizerSpec
from nextdetail.models.quant import MultiScaleQuantizer, QuantOutput, schedule_of
from nextdetail.models.vae import Decoder, Encoder


class BaseDetailVQVAE(nn.Module):
    def __init__(self, spec: TokenizerSpec) -> None:
        super().__init__()
        self.spec = spec
        dd = dict(ch=spec.ch, ch_mult=tuple(spec.ch_mult), num_res_blocks=spec.num_res_blocks, dropout=spec.dropout,
                  in_channels=3, z_channels=spec.z_channels, using_sa=spec.using_sa, using_mid_sa=spec.using_mid_sa)
        self.encoder = Encoder(**dd)
        self.decoder = Decoder(**dd)
        self.schedule = schedule_of(spec)
        self.quantize = MultiScaleQuantizer(spec.vocab_size, spec.z_channels, self.schedule, beta=spec.beta,
                                            using_znorm=spec.using_znorm, normalized_codes=spec.normalized_codes,
                                            quant_resi=spec.quant_resi,
                                            share_quant_resi=spec.share_quant_resi, residual=spec.residual)
        ks = spec.quant_conv_ks
        self.quant_conv = nn.Conv2d(spec.z_channels, spec.z_channels, ks, stride=1, padding=ks // 2)
        self.post_quant_conv = nn.Conv2d(spec.z_channels, spec.z_channels, ks, stride=1, padding=ks // 2)

    @classmethod
    def from_checkpoint(cls, checkpoint: bytes | str | Path, map_location: str = "cpu",
                        where: str | None = None) -> BaseDetailVQVAE:
        """The model of a `tokenizer.pt` written by train_tokenizer ({"spec", "model"}), in eval mode."""
        from nextdetail.errors import UserError
        from nextdetail.storage.checkpoints import NOT_OURS, REWRITE, read_torch

        where = where or ("tokenizer.pt" if isinstance(checkpoint, bytes) else str(checkpoint))
        saved = read_torch(checkpoint, where, map_location, keys=("spec", "model"))
        try:
            spec = TokenizerSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["spec"].items()})
            model = cls(spec)
            model.load_state_dict(saved["model"])
        except (AttributeError, TypeError, ValueError, AssertionError, RuntimeError) as err:  # another layout/shape
            raise UserError(f"{where}: {NOT_OURS} (its spec or weights do not fit the tokenizer: "
                            f"{(str(err).splitlines() or [''])[0][:120]}); {REWRITE}") from None
        return model.eval()

    # ---- encoding ------------------------------------------------------------------------------

    def sources(self, images: Tensor, bases: Tensor | None = None) -> list[Tensor]:
        """[f_{B_n}, f_{D_n}, …, f_{D_1}] from images (B, 3, H, W) and bases (n, B, 3, H, W), in [-1, 1]."""
        n = self.spec.order
        if n == 0:
            return [self._normalized(self.quant_conv(self.encoder(images)).unsqueeze(0))[0]]
        if bases is None or bases.shape[0] != n or bases.shape[1:] != images.shape:
            raise ValueError(f"order {n} needs bases of shape ({n}, {', '.join(map(str, images.shape))}), got "
                             f"{None if bases is None else tuple(bases.shape)}")
        b = images.shape[0]
        stacked = torch.cat([images.unsqueeze(0), bases]).flatten(0, 1)  # ((n+1)·B, 3, H, W): B_0 = I, B_1 … B_n
        f = self._normalized(self.quant_conv(self.encoder(stacked)).unflatten(0, (n + 1, b)))  # (n+1, B, C, h, w)
        return [f[n]] + [f[k - 1] - f[k] for k in range(n, 0, -1)]  # f_{B_n}, f_{D_n} … f_{D_1}

    def _normalized(self, f_nBChw: Tensor) -> Tensor:
        """With `normalized_codes` (LlamaGen's normalized latent) every f_{B_k} divided by f_I's norm per position
        (f_I = f[0]), so the sources still sum to f_I / ‖f_I‖; else f."""
        if not self.spec.normalized_codes:
            return f_nBChw
        return f_nBChw / f_nBChw[0].norm(dim=1, keepdim=True).clamp_min(1e-6)

    def forward(self, images: Tensor, bases: Tensor | None = None,
                present: list[Tensor] | None = None) -> tuple[Tensor, QuantOutput]:
        """Training pass: (reconstruction of `images`, the quantizer's output incl. vq_loss). `present`:
        decode only these tokens per map (a quadtree state; NDP's region-wise truncation)."""
        q = self.quantize(self.sources(images, bases), present)
        return self.decoder(self.post_quant_conv(q.f_hat)), q

    @torch.no_grad()
    def img_to_indices(self, images: Tensor, bases: Tensor | None = None) -> list[Tensor]:
        """Algorithm 1: M token maps (B, h_k, w_k), base scales first, then the detail factors coarse to fine."""
        return self.quantize.f_to_indices(self.sources(images, bases))

    @torch.no_grad()
    def indices_to_img(self, indices: list[Tensor]) -> Tensor:
        """Algorithm 2: Î = D(Σ φ_k(z_k)), clamped to [-1, 1]."""
        f_hat = self.quantize.indices_to_f(indices, self.spec.latent_side)
        return self.fhat_to_img(f_hat)

    @torch.no_grad()
    def indices_to_img_mixed(self, indices: list[Tensor], present: list[Tensor]) -> Tensor:
        """NDP's mixed-scale decoding: an image from the tokens of a quadtree state (`present` per map)."""
        return self.fhat_to_img(self.quantize.indices_to_f_mixed(indices, present, self.spec.latent_side))

    def fhat_to_img(self, f_hat: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)


def to_model_range(x: Tensor) -> Tensor:
    """[0, 1] (images, cached factors) → [-1, 1]."""
    return x.mul(2).sub_(1)


# ---- VAR's released tokenizer -------------------------------------------------------------------

VAR_SPEC = TokenizerSpec()  # vae_ch160v4096z32.pth: ch 160, V 4096, z 32, 16×, VAR's 10 scales, φ shared by 4
VAR_CHECKPOINT_URL = "https://huggingface.co/FoundationVision/var/resolve/main/vae_ch160v4096z32.pth"


def load_var_state_dict(model: BaseDetailVQVAE, state_dict: dict[str, Tensor] | str | Path) -> BaseDetailVQVAE:
    """Load VAR's tokenizer weights (a state dict or the path of `vae_ch160v4096z32.pth`) into `model`.

    Names map one to one (our modules follow VAR's); every tensor's shape is asserted. The one
    exception is the per-map code-hit statistics `quantize.ema_vocab_hit_SV` (M, V): a model whose
    token schedule has another number of maps than VAR's 10 keeps its own (statistics, not weights).
    """
    if not isinstance(state_dict, dict):
        path = Path(state_dict)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such tokenizer checkpoint; download VAR's from {VAR_CHECKPOINT_URL} "
                                    "(no network here: copy it in) and point the config at it")
        from nextdetail.storage.checkpoints import read_weights_file

        state_dict = read_weights_file(path, str(path))
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}  # DDP-saved copies
    ours = model.state_dict()
    unknown = sorted(set(state_dict) - set(ours))
    missing = sorted(set(ours) - set(state_dict))
    if unknown or missing:
        raise ValueError(f"not a VAR tokenizer state dict for this architecture: unknown keys {unknown[:5]}, "
                         f"missing keys {missing[:5]} ({len(unknown)} / {len(missing)} in all)")
    loaded = {}
    for key, value in state_dict.items():
        if key == "quantize.ema_vocab_hit_SV" and value.shape != ours[key].shape:
            loaded[key] = ours[key]
            continue
        if value.shape != ours[key].shape:
            raise ValueError(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(ours[key].shape)}")
        loaded[key] = value
    model.load_state_dict(loaded, strict=True)
    return model


def images_to_uint8(images: Tensor) -> Any:
    """(B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def load_tokenizer(url: str, options: dict | None, sha256: str, needed_by: str) -> BaseDetailVQVAE:
    """The tokenizer.pt at `url`, which must still have the `sha256` that `needed_by` (a token cache, a
    transformer) was made with: one line naming both otherwise."""
    from nextdetail.errors import UserError
    from nextdetail.storage.fs import Store
    from nextdetail.storage.hashing import bytes_sha256

    parent, name = url.rstrip("/").rsplit("/", 1)
    data = Store(parent, options or {}).read_bytes(name) if Store(parent, options or {}).exists(name) else None
    if data is None:
        raise UserError(f"{url}: gone, but {needed_by} was made with it; re-run `nextdetail train-tokenizer` with the "
                        "same settings")
    if bytes_sha256(data) != sha256:
        raise UserError(f"{url}: not the tokenizer {needed_by} was made with (its sha256 differs); re-run "
                        "`nextdetail train-tokenizer` and the stages after it")
    return BaseDetailVQVAE.from_checkpoint(data, where=url)


def load_pretrained(source: str, options: dict | None, spec: TokenizerSpec) -> tuple[BaseDetailVQVAE, str]:
    """A released tokenizer adopted as it is (`tokenizer.pretrained`): VAR's layout (a plain state dict, e.g.
    vae_ch160v4096z32.pth; `load_var_state_dict`) or a nextdetail tokenizer.pt ({"spec", "model"}), into the
    declared architecture `spec` → (model in eval mode, "var" | "nextdetail"). Anything that does not fit is one
    line naming the file and the first key or setting that differs."""
    from nextdetail.errors import UserError
    from nextdetail.storage.checkpoints import read_released

    where = f"tokenizer.pretrained={source}"
    saved = read_released("tokenizer.pretrained", source, options)
    if "spec" in saved and "model" in saved:  # ours: its architecture must be the declared one
        theirs = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["spec"].items()}
        for k, v in spec.to_dict().items():
            if k in theirs and theirs[k] != v:
                raise UserError(f"{where}: a nextdetail tokenizer with {k}={theirs[k]!r}, but the config declares "
                                f"{v!r}; set tokenizer.{k} (or shard.resolution / decompose.order) to match it")
        saved, layout = saved["model"], "nextdetail"
    else:
        layout = "var"
    try:
        model = load_var_state_dict(BaseDetailVQVAE(spec), saved)
    except ValueError as err:  # "<key>: checkpoint (…) vs model (…)", or the keys that do not match
        raise UserError(f"{where}: {err}; the tokenizer.* architecture settings must describe this file") from None
    return model.eval(), layout
