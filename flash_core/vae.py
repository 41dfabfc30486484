"""The SD3 16-channel VAE (KL autoencoder) with the official parameter names.

docs/checkpoints.md "VAE": 16 latent channels, ch_mult (1, 2, 4, 4), 2 res blocks per encoder level (3 per decoder
level), no quant_conv / post_quant_conv, GroupNorm(32, eps 1e-6) + SiLU, one single-head attention block in
each mid block, downsample = asymmetric pad (0, 1, 0, 1) + stride-2 3x3 conv, upsample = nearest x2 + 3x3 conv.
Parameter names are those of Stability's ``sd3_impls.SDVAE`` and of ComfyUI's ``first_stage_model`` with the
prefix stripped (``encoder.down.{i}.block.{j}.conv1.weight``, ``decoder.up.{i}.upsample.conv.weight``,
``encoder.mid.attn_1.q.weight`` ...), so official files load with ``load_state_dict(strict=True)``;
diffusers files are converted by :mod:`.keymaps.vae` first.

Latent spaces: :meth:`SD3VAE.encode` returns *raw* VAE latents and :meth:`SD3VAE.decode` takes raw latents.
The MM-DiT works in "model space", ``process_in(z) = (z - LATENT_SHIFT) * LATENT_SCALE`` (ComfyUI
``latent_formats.SD3``); ``process_out`` is its inverse.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError

RELEASED_DOWNSCALE = 8  # pixels per latent of the released SD3 VAE: what ComfyUI's EmptySD3LatentImage assumes

LATENT_SCALE = 1.5305
LATENT_SHIFT = 0.0609
LATENT_CHANNELS = 16
NORM_GROUPS = 32
NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)


def process_in(z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latent -> model space (ComfyUI ``latent_formats.SD3.process_in``)."""
    return (z - LATENT_SHIFT) * LATENT_SCALE


def process_out(z: torch.Tensor) -> torch.Tensor:
    """Model space -> raw VAE latent; the inverse of :func:`process_in`."""
    return z / LATENT_SCALE + LATENT_SHIFT


# --------------------------------------------------------------------------------------------------------
# Config inferred from the weights


@dataclass(frozen=True)
class VAEConfig:
    """Shape of an SD3-style VAE; the defaults are the released SD3 / SD3.5 VAE (docs/checkpoints.md "VAE")."""

    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = LATENT_CHANNELS
    in_channels: int = 3

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        widths = [self.base_channels * m for m in self.channel_mult]
        if not self.channel_mult or any(w <= 0 or w % NORM_GROUPS for w in widths):
            raise ValueError(f"VAE level widths {widths} (base_channels * channel_mult) must be positive "
                             f"multiples of {NORM_GROUPS}, the GroupNorm group count")
        if self.num_res_blocks < 1 or self.latent_channels < 1 or self.in_channels < 1:
            raise ValueError(f"invalid VAE config {self}: block and channel counts must be positive")

    @property
    def downscale_factor(self) -> int:
        """Pixels per latent along each axis: one halving per level after the first (8 for the SD3 VAE, 1 for
        the toy world's one-level VAE). Pipelines size latents by it, not by a fixed 8."""
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (``channel_mult`` as a list)."""
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> VAEConfig:
        """Inverse of :meth:`to_dict`; unknown fields are an error rather than silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown VAEConfig fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> VAEConfig:
        """Infer the config from official-named weights (shapes only, so meta tensors work).

        Raises :class:`CheckpointError` naming the missing key when the dict is not an SD3-style VAE,
        and naming the key and the channel count found when the VAE is not a 16-channel one (SD1/SDXL: 4).
        """
        conv_in = _require(sd, "encoder.conv_in.weight")
        base_channels, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
        latent_channels = _latent_channels(sd)
        _require(sd, "encoder.down.0.block.0.conv1.weight")
        levels = _count_indices(sd, r"encoder\.down\.(\d+)\.")
        num_res_blocks = _count_indices(sd, r"encoder\.down\.0\.block\.(\d+)\.")
        channel_mult = tuple(
            int(_require(sd, f"encoder.down.{i}.block.0.conv1.weight").shape[0]) // base_channels
            for i in range(levels))
        _check_decoder(sd, len(channel_mult), num_res_blocks, in_channels)
        try:
            return cls(base_channels, channel_mult, num_res_blocks, latent_channels, in_channels)
        except ValueError as e:
            raise CheckpointError(f"the VAE weights do not describe a valid SD3 VAE: {e}") from None


def _require(sd: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key in sd:
        return sd[key]
    hint = ""
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd):
        hint = " (these are diffusers names: convert them with keymaps.vae.diffusers_to_official first)"
    elif any(k.startswith("first_stage_model.") for k in sd):
        hint = " (strip the 'first_stage_model.' prefix first)"
    raise CheckpointError(f"not an SD3 VAE state dict: missing key '{key}'{hint} (docs/checkpoints.md 'VAE')")


def _latent_channels(sd: Mapping[str, torch.Tensor]) -> int:
    """16 for SD3; anything else is a different VAE family and is refused with the key and shape found."""
    key = "decoder.conv_in.weight"
    found = int(_require(sd, key).shape[1])
    if found != LATENT_CHANNELS:
        family = " (an SD1/SD2/SDXL VAE has 4)" if found == 4 else ""
        raise CheckpointError(f"expected an SD3 VAE with {LATENT_CHANNELS} latent channels, but '{key}' has shape "
                              f"{list(sd[key].shape)}: {found} latent channels{family}")
    moments = int(_require(sd, "encoder.conv_out.weight").shape[0])
    if moments != 2 * LATENT_CHANNELS:
        raise CheckpointError(f"expected 'encoder.conv_out.weight' to output {2 * LATENT_CHANNELS} channels "
                              f"(mean and logvar of {LATENT_CHANNELS} latent channels), found {moments}")
    return found


def _count_indices(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    """1 + the largest index captured by ``pattern`` at the start of a key; 0 when none matches."""
    rx = re.compile(pattern)
    found = [int(m[1]) for m in map(rx.match, sd) if m]
    return max(found) + 1 if found else 0


def _check_decoder(sd: Mapping[str, torch.Tensor], levels: int, num_res_blocks: int, in_channels: int):
    """The decoder must mirror the encoder: same level count, one more res block per level, same image channels."""
    up_levels = _count_indices(sd, r"decoder\.up\.(\d+)\.")
    up_blocks = _count_indices(sd, r"decoder\.up\.0\.block\.(\d+)\.")
    out_channels = int(_require(sd, "decoder.conv_out.weight").shape[0])
    if (up_levels, up_blocks, out_channels) != (levels, num_res_blocks + 1, in_channels):
        raise CheckpointError(
            f"the VAE decoder does not mirror its encoder: found {up_levels} 'decoder.up.N' levels with "
            f"{up_blocks} blocks and {out_channels} output channels, expected {levels} levels with "
            f"{num_res_blocks + 1} blocks and {in_channels} channels")


# --------------------------------------------------------------------------------------------------------
# Layers (official names)


def _silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU, in place when no graph is recorded (saves one full-resolution activation per call)."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


def _group_norm(channels: int, **factory) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, channels, eps=NORM_EPS, affine=True, **factory)


class ResnetBlock(nn.Module):
    """``x + conv2(silu(norm2(conv1(silu(norm1(x))))))``, with a 1x1 ``nin_shortcut`` when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, **factory):
        super().__init__()
        self.norm1 = _group_norm(in_channels, **factory)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, **factory)
        self.norm2 = _group_norm(out_channels, **factory)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, **factory)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One name for the running activation, so each intermediate is freed as soon as the next exists:
        # at most x and two activations are alive at once (this matters at 1024 px, 128 channels).
        h = _silu(self.norm1(x))
        h = self.conv1(h)
        h = _silu(self.norm2(h))
        h = self.conv2(h)
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return h.add_(shortcut)  # h is a fresh conv output: adding in place is safe for autograd too


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, channels as the head dim; q/k/v/proj_out are 1x1 convs."""

    def __init__(self, channels: int, **factory):
        super().__init__()
        self.norm = _group_norm(channels, **factory)
        self.q = nn.Conv2d(channels, channels, 1, **factory)
        self.k = nn.Conv2d(channels, channels, 1, **factory)
        self.v = nn.Conv2d(channels, channels, 1, **factory)
        self.proj_out = nn.Conv2d(channels, channels, 1, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, 1 head, H*W, C]
            return t.reshape(b, 1, c, height * width).transpose(-1, -2)

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.transpose(-1, -2).reshape(b, c, height, width)
        return self.proj_out(out).add_(x)


class Downsample(nn.Module):
    """Pad right and bottom by one pixel, then a stride-2 3x3 conv without padding (halves H and W)."""

    def __init__(self, channels: int, **factory):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int, **factory):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """``block_1`` -> ``attn_1`` -> ``block_2`` at the lowest resolution."""

    def __init__(self, channels: int, **factory):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, **factory)
        self.attn_1 = AttnBlock(channels, **factory)
        self.block_2 = ResnetBlock(channels, channels, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ``block`` (res blocks) then an optional ``downsample`` or ``upsample``."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, resample: type[nn.Module] | None,
                 resample_name: str, **factory):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b, **factory) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.resample_name = resample_name if resample is not None else None
        if resample is not None:
            self.add_module(resample_name, resample(out_channels, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return getattr(self, self.resample_name)(x) if self.resample_name else x


class Encoder(nn.Module):
    """Image [B, in, H, W] -> moments [B, 2 * latent, H / f, W / f] (mean then logvar)."""

    def __init__(self, config: VAEConfig, **factory):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(config.in_channels, config.base_channels, 3, padding=1, **factory)
        self.down = nn.ModuleList(
            Level(([config.base_channels] + widths)[i], widths[i], config.num_res_blocks,
                  Downsample if i != last else None, "downsample", **factory)
            for i in range(len(widths)))
        self.mid = MidBlock(widths[-1], **factory)
        self.norm_out = _group_norm(widths[-1], **factory)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(_silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, latent, h, w] -> image [B, in, h * f, w * f]. ``up[i]`` is stored finest-first but run
    coarsest-first (``up[n-1]`` .. ``up[0]``), as in the official code."""

    def __init__(self, config: VAEConfig, **factory):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        self.conv_in = nn.Conv2d(config.latent_channels, widths[-1], 3, padding=1, **factory)
        self.mid = MidBlock(widths[-1], **factory)
        self.up = nn.ModuleList(
            Level((widths + [widths[-1]])[i + 1], widths[i], config.num_res_blocks + 1,
                  Upsample if i != 0 else None, "upsample", **factory)
            for i in range(len(widths)))
        self.norm_out = _group_norm(widths[0], **factory)
        self.conv_out = nn.Conv2d(widths[0], config.in_channels, 3, padding=1, **factory)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(_silu(self.norm_out(h)))


# --------------------------------------------------------------------------------------------------------
# The autoencoder


class SD3VAE(nn.Module):
    """The SD3 / SD3.5 VAE. ``state_dict()`` keys are the official ones (``first_stage_model.`` stripped).

    ``encode`` returns the posterior *mean* by default: deterministic, and what ComfyUI's VAE Encode does
    (its ``DiagonalGaussianRegularizer`` does not sample). Pass a ``torch.Generator`` to draw
    ``mean + std * eps`` instead, as Stability's ``SDVAE.encode`` does.
    """

    def __init__(self, config: VAEConfig = VAEConfig(), dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None):
        super().__init__()
        self.config = config
        factory = {"dtype": dtype, "device": device}
        self.encoder = Encoder(config, **factory)
        self.decoder = Decoder(config, **factory)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def downscale_factor(self) -> int:
        """Pixels per latent along each axis (:attr:`VAEConfig.downscale_factor`)."""
        return self.config.downscale_factor

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] (H, W multiples of f) -> raw latents [B, 16, H/f, W/f], with
        f = :attr:`downscale_factor` (8 for the released VAE).

        Returns the posterior mean unless ``generator`` is given, then a sample drawn with it (noise is drawn
        on the generator's device, then moved). Output dtype is the module's dtype.
        """
        self._check_images(images)
        moments = self.encoder(images.to(device=self.device, dtype=self.dtype))
        mean, logvar = moments.chunk(2, dim=1)
        if generator is None:
            return mean.contiguous()
        std = torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))
        eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
        return torch.addcmul(mean, std, eps.to(mean.device))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents [B, 16, h, w] (NOT ``process_in``'d) -> images [B, 3, f h, f w] (f =
        :attr:`downscale_factor`), nominally in [-1, 1].

        The output is not clamped: the decoder can overshoot slightly, and callers that convert to pixels
        clamp (``(x.clamp(-1, 1) + 1) / 2``). Output dtype is the module's dtype.
        """
        if latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(f"VAE decode expects raw latents [B, {self.config.latent_channels}, h, w], "
                             f"got shape {list(latents.shape)}")
        return self.decoder(latents.to(device=self.device, dtype=self.dtype))

    def _check_images(self, images: torch.Tensor):
        f, c = self.config.downscale_factor, self.config.in_channels
        if images.ndim != 4 or images.shape[1] != c or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"VAE encode expects images [B, {c}, H, W] with H and W multiples of {f}, "
                             f"got shape {list(images.shape)}")
