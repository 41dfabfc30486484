"""MM-DiT and MM-DiT-X (SD3, SD3.5 Medium, SD3.5 Large) with the official parameter names.

The parameter names are those of Stability's ``mmditx.py`` and ComfyUI's ``mmdit.py`` with the
``model.diffusion_model.`` prefix stripped, so an official state dict loads with ``strict=True``.
The architecture is inferred from the state dict (docs/checkpoints.md "Architecture inferred from the MM-DiT state dict"); the block math follows docs/checkpoints.md "Block anatomy":

- ``c = t_embedder(sinusoid(1000 * sigma)) + y_embedder(pooled)``; every adaLN is ``Linear(SiLU(c))``.
- ``joint_blocks.i = (context_block, x_block)``; both streams are LayerNorm-ed (no affine, eps 1e-6),
  modulated by their own (shift, scale), projected to q, k, v by the fused ``qkv`` Linear, and attend
  jointly over ``cat(context, x)``. Each stream then adds ``gate * proj(attn)`` and a gated GELU(tanh) MLP.
- The last context block is "pre-only": it has only (shift, scale), no attention projection and no MLP.
- Dual-attention x_blocks (MM-DiT-X) also self-attend over the image tokens with ``attn2``, from the same
  normalised x modulated by (shift2, scale2): ``x += gate * attn + gate2 * attn2``.
- The final layer is LayerNorm + adaLN(shift, scale) + Linear(hidden, patch * patch * out_channels).

Speed notes (the matmuls are the same as in any implementation; the work is around them):
- q, k and v are three matmuls on row slices of the fused ``qkv`` weight (views, no copy), so each lands
  contiguous in ``[B, tokens, heads, 64]``: the RMS qk-norm takes its fused kernel, and SDPA reads the
  transposed views without copies and returns that same layout.
- LayerNorm and modulation are one ``layer_norm`` call when the batch shares one conditioning row; every
  gated residual is one ``addcmul``; SiLU(c) is computed once for all adaLN layers.
- Without autograd (``no_grad`` / ``inference_mode``) residuals and GELU run in place: fewer fresh
  allocations, which on CPU also means fewer page faults.
- The last block's context stream is pre-only, so its queries are never needed: the last joint attention
  uses the image queries only (the context keys and values still enter).
- Patchify is a reshape + Linear (no strided conv followed by a transpose copy); the positional table is
  added through a strided view of its centre crop (no crop copy).
- On the CPU, half-precision Linear layers compute in fp32 (inputs and weights upcast on the fly, result
  rounded back: the same math as a half GEMM with fp32 accumulation) unless a native half GEMM measures
  clearly faster on this machine (:mod:`.compute`). See :data:`CPU_HALF_MATMUL_IN_FP32`.
- On the CPU without autograd, attention runs through torch's SDPA kernel pick unless its math kernel, or (half
  inputs) SDPA in fp32, measures clearly faster here (:func:`.compute.attention_choice`).
  See :data:`CPU_ATTENTION_PATH`.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .compute import attention_choice, half_matmul_choice, sdpa
from .errors import CheckpointError

HEAD_DIM = 64
LN_EPS = 1e-6
RMS_EPS = 1e-6
TIMESTEP_FREQS = 256
POS_EMBED_BASE_SIZE = 64
"""The sin-cos table spans 64 patch units whatever its size (diffusers: ``sample_size 128 // patch 2``)."""

CPU_HALF_MATMUL_IN_FP32: bool | None = None
"""Compute bf16/fp16 Linear layers in fp32 on CPU: None = whichever measures faster here (:mod:`.compute`),
True / False = always / never. A module-level switch so benchmarks and tests can pin either."""

CPU_ATTENTION_PATH: str | None = None
"""CPU inference attention: None = whichever measures fastest here (:func:`.compute.attention_choice`), or one of
:data:`.compute.ATTENTION_PATHS` pinned ("upcast" applies to half inputs only)."""


# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class MMDiTConfig:
    """Shape of an SD3-class MM-DiT. Prefer :meth:`from_state_dict`: the weights are the truth."""

    depth: int
    hidden_size: int
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    pos_embed_max_size: int = 384
    adm_in_channels: int = 2048
    context_in_channels: int = 4096
    qk_norm: bool = True
    dual_attention_layers: tuple[int, ...] = field(default=())
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "dual_attention_layers", tuple(int(i) for i in self.dual_attention_layers))
        if self.hidden_size % HEAD_DIM:
            raise ValueError(
                f"hidden_size must be a multiple of {HEAD_DIM} (head_dim), got {self.hidden_size}"
            )
        if self.depth < 1:
            raise ValueError(f"depth must be at least 1, got {self.depth}")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"dual_attention_layers {bad} are outside the {self.depth} blocks")

    @property
    def num_heads(self) -> int:
        return self.hidden_size // HEAD_DIM

    @property
    def mlp_hidden_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def sd35_medium(cls) -> MMDiTConfig:
        return cls(depth=24, hidden_size=1536, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)))

    @classmethod
    def sd35_large(cls) -> MMDiTConfig:
        return cls(depth=38, hidden_size=2432, pos_embed_max_size=192)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MMDiTConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown MMDiTConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> MMDiTConfig:
        """Infer the architecture from official, unprefixed keys (docs/checkpoints.md "Architecture inferred from the MM-DiT state dict")."""

        def need(key: str) -> torch.Tensor:
            if key not in sd:
                hint = ""
                if any(k.startswith("model.diffusion_model.") for k in sd):
                    hint = " (the keys carry the 'model.diffusion_model.' prefix: strip it first)"
                raise CheckpointError(f"not an SD3-class MM-DiT state dict: missing key '{key}'{hint}")
            return sd[key]

        proj = need("x_embedder.proj.weight")
        need("joint_blocks.0.context_block.attn.qkv.weight")
        hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
        block_ids = {int(m.group(1)) for k in sd if (m := re.match(r"joint_blocks\.(\d+)\.", k))}
        depth = max(block_ids) + 1
        for i in range(depth):
            need(f"joint_blocks.{i}.x_block.attn.qkv.weight")
        pos_positions = need("pos_embed").shape[1]
        pos_max = math.isqrt(pos_positions)
        if pos_max * pos_max != pos_positions:
            raise CheckpointError(f"'pos_embed' has {pos_positions} positions, not a square number")
        out_features = need("final_layer.linear.weight").shape[0]
        dual = tuple(i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in sd)
        return cls(
            depth=depth,
            hidden_size=hidden,
            patch_size=patch,
            in_channels=in_channels,
            out_channels=out_features // (patch * patch),
            pos_embed_max_size=pos_max,
            adm_in_channels=need("y_embedder.mlp.0.weight").shape[1],
            context_in_channels=need("context_embedder.weight").shape[1],
            qk_norm="joint_blocks.0.context_block.attn.ln_k.weight" in sd,
            dual_attention_layers=dual,
            mlp_ratio=need("joint_blocks.0.x_block.mlp.fc1.weight").shape[0] / hidden,
        )


# ------------------------------------------------------------------------------------- fixed embeddings


def timestep_embedding(
    timestep: torch.Tensor, dim: int = TIMESTEP_FREQS, max_period: float = 1e4
) -> torch.Tensor:
    """Sinusoidal embedding of ``timestep = 1000 * sigma`` in fp32, cos first (docs/checkpoints.md "Block anatomy")."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    )
    args = timestep.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed_table(
    hidden_size: int, max_size: int, base_size: int = POS_EMBED_BASE_SIZE
) -> torch.Tensor:
    """The fixed 2-D sin-cos table ``[1, max_size**2, hidden]`` (row-major patches; first half encodes the
    column, second half the row; sin then cos), positions scaled so the table spans ``base_size`` units."""
    quarter = hidden_size // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(max_size, dtype=torch.float64) * (base_size / max_size)
    angles = torch.outer(pos, omega)  # [max, quarter]
    one_d = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # [max, hidden / 2]
    cols = one_d[None, :, :].expand(max_size, max_size, -1)
    rows = one_d[:, None, :].expand(max_size, max_size, -1)
    return torch.cat([cols, rows], dim=-1).reshape(1, max_size * max_size, hidden_size).float()


# ------------------------------------------------------------------------------------------ primitives


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype :func:`linear` multiplies in: for half inputs on the CPU, fp32 unless a native half GEMM of this
    width measured clearly faster here (:func:`.compute.half_matmul_choice`)."""
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        upcast = CPU_HALF_MATMUL_IN_FP32
        if upcast is None:
            upcast = half_matmul_choice(x.dtype, x.shape[-1], x.numel() // max(x.shape[-1], 1)).upcast
        if upcast:
            return torch.float32
    return x.dtype


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, computed in fp32 for half inputs on CPUs without native half matmul (see the module doc)."""
    dtype = matmul_dtype(x)
    if dtype != x.dtype:
        bias = None if bias is None else bias.to(dtype)
        return F.linear(x.to(dtype), weight.to(dtype), bias).to(x.dtype)
    return F.linear(x, weight, bias)


def modulated_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` (no affine, eps 1e-6); x ``[B, N, D]``, shift/scale ``[B, D]``.

    With one conditioning row (batch 1) the modulation rides in ``layer_norm``'s own weight and bias: one
    pass over x instead of three. Otherwise: the norm, then one fused ``addcmul``.
    """
    if shift.shape[0] == 1:
        return F.layer_norm(x, x.shape[-1:], (1 + scale[0]), shift[0], LN_EPS)
    return torch.addcmul(shift[:, None], F.layer_norm(x, x.shape[-1:], eps=LN_EPS), (1 + scale)[:, None])


def gated_residual(x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``x + gate * update`` in one pass (in place on x when autograd is off); gate ``[B, D]``."""
    if torch.is_grad_enabled():
        return torch.addcmul(x, gate[:, None], update)
    return x.addcmul_(gate[:, None], update)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU (tanh approximation), in place when autograd is off."""
    if torch.is_grad_enabled():
        return F.gelu(x, approximate="tanh")
    return torch.ops.aten.gelu_(x, approximate="tanh")


def attention_path(q: torch.Tensor, k: torch.Tensor) -> str:
    """The SDPA path for ``[B, N, heads, 64]`` q and k: measured on the CPU without autograd
    (:data:`CPU_ATTENTION_PATH`), torch's own pick elsewhere (GPUs, and training, whose backward was not timed)."""
    if q.device.type != "cpu" or torch.is_grad_enabled():
        return "sdpa"
    path = CPU_ATTENTION_PATH or attention_choice(q.dtype, max(q.shape[1], k.shape[1])).path
    return "sdpa" if path == "upcast" and q.dtype == torch.float32 else path


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA over ``[B, N, heads, 64]`` tensors; returns ``[B, Nq, heads * 64]``.

    SDPA is given the transposed views; its CPU and CUDA kernels read strided inputs and return an output
    whose memory is ``[B, Nq, heads, 64]``, so the final reshape is free.
    """
    out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_path(q, k))
    b, _, n, _ = out.shape
    return out.transpose(1, 2).reshape(b, n, -1)


def apply_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A plain ``nn.Linear`` through :func:`linear`; any other module (a quantized or LoRA-wrapped Linear
    swapped in later) through its own ``forward``, so replacing a layer is all it takes to change it."""
    if type(layer) is nn.Linear:
        return linear(x, layer.weight, layer.bias)
    return layer(x)


def embed_context(layer: nn.Module, context: torch.Tensor) -> torch.Tensor:
    """``context_embedder(context)``, on the CPU over the used input channels only.

    Narrow text encoders (the demo's, test models) are zero-padded to the 4096-channel context
    (flash_core/text/encoders.py), and zero channels add nothing to the product: with a 64-wide T5 the full matmul is
    60x the work. The used width is found with one pass over the context; on GPUs the full matmul is cheaper
    than the device sync that finding it would cost.
    """
    if type(layer) is not nn.Linear or context.device.type != "cpu":
        return apply_linear(layer, context)
    used = torch.nonzero(context.abs().amax(dim=tuple(range(context.ndim - 1))))
    width = int(used.max()) + 1 if used.numel() else 1
    if width >= context.shape[-1]:
        return apply_linear(layer, context)
    return linear(context[..., :width], layer.weight[:, :width], layer.bias)


class RMSNorm(nn.Module):
    """RMSNorm over the head dim with a learned scale (official ``ln_q`` / ``ln_k``, eps 1e-6)."""

    def __init__(self, dim: int, eps: float = RMS_EPS, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.device.type != "cpu":
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # CPU inference: F.rms_norm runs as several elementwise passes there (about 5x slower than this);
        # here one fp32 reduction and two multiplies.
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
        inv_rms = torch.rsqrt(norm.square_().div_(x.shape[-1]).add_(self.eps)).to(x.dtype)
        return x.mul(inv_rms).mul_(self.weight)


class Mlp(nn.Module):
    """``fc2(GELU_tanh(fc1(x)))``."""

    def __init__(self, dim: int, hidden: int, dtype=None, device=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, dtype=dtype, device=device)
        self.fc2 = nn.Linear(hidden, dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_linear(self.fc2, gelu_tanh(apply_linear(self.fc1, x)))


class SelfAttention(nn.Module):
    """Fused ``qkv`` projection, optional RMS qk-norm, and (unless pre-only) the output ``proj``."""

    def __init__(
        self, dim: int, num_heads: int, qk_norm: bool, pre_only: bool = False, dtype=None, device=None
    ):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, dtype=dtype, device=device)
        if qk_norm:
            self.ln_q = RMSNorm(HEAD_DIM, dtype=dtype, device=device)
            self.ln_k = RMSNorm(HEAD_DIM, dtype=dtype, device=device)
        else:
            self.ln_q = self.ln_k = None
        self.proj = None if pre_only else nn.Linear(dim, dim, dtype=dtype, device=device)

    def _project(self, x: torch.Tensor, part: int) -> torch.Tensor:
        """Rows ``part`` (0 q, 1 k, 2 v) of the fused ``qkv`` Linear, as ``[B, N, heads, 64]``."""
        d = self.qkv.weight.shape[0] // 3
        out = linear(x, self.qkv.weight[part * d : (part + 1) * d], self.qkv.bias[part * d : (part + 1) * d])
        return out.view(*x.shape[:-1], self.num_heads, HEAD_DIM)

    def _project_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v from the ``qkv`` module's own forward (a replaced, e.g. quantized, layer)."""
        qkv = self.qkv(x).view(*x.shape[:-1], 3, self.num_heads, HEAD_DIM)
        return tuple(t.contiguous() for t in qkv.unbind(-3))

    def pre_attention(self, x: torch.Tensor, need_q: bool = True):
        """(q, k, v) as contiguous ``[B, N, heads, 64]`` (q and k normalised per head); q is None when
        ``need_q`` is False."""
        if type(self.qkv) is nn.Linear:
            q = self._project(x, 0) if need_q else None
            k, v = self._project(x, 1), self._project(x, 2)
        else:
            q, k, v = self._project_all(x)
            q = q if need_q else None
        if self.ln_q is not None:
            q = None if q is None else self.ln_q(q)
            k = self.ln_k(k)
        return q, k, v

    def self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """``proj(attention(x))`` over this stream alone (the dual x_block's ``attn2``)."""
        return apply_linear(self.proj, attention(*self.pre_attention(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens. Kept as ``proj`` (a Conv2d) for the official names; run as a
    reshape + Linear, which gives ``[B, N, D]`` tokens directly."""

    def __init__(self, patch_size: int, in_channels: int, hidden: int, dtype=None, device=None):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch_size
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        return linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)


class EmbedMLP(nn.Module):
    """``mlp = (Linear, SiLU, Linear)``: official TimestepEmbedder / VectorEmbedder."""

    def __init__(self, in_features: int, hidden: int, dtype=None, device=None):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_features, hidden, dtype=dtype, device=device),
            nn.SiLU(),
            nn.Linear(hidden, hidden, dtype=dtype, device=device),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_linear(self.mlp[2], F.silu(apply_linear(self.mlp[0], x)))


def _adaln(dim: int, n_mods: int, dtype, device) -> nn.Sequential:
    """``adaLN_modulation = (SiLU, Linear(dim, n_mods * dim))``; the model applies SiLU(c) once for all."""
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, n_mods * dim, dtype=dtype, device=device))


# -------------------------------------------------------------------------------------------- blocks


class DismantledBlock(nn.Module):
    """One stream of a joint block (docs/checkpoints.md "Block anatomy").

    ``pre_only`` (the last context block): adaLN (shift, scale) only; no attention proj, no MLP.
    ``dual`` (MM-DiT-X x_block): adds ``attn2``, a self-attention over this stream, and 3 more modulations.
    """

    def __init__(
        self, config: MMDiTConfig, pre_only: bool = False, dual: bool = False, dtype=None, device=None
    ):
        super().__init__()
        dim, heads = config.hidden_size, config.num_heads
        self.pre_only, self.dual = pre_only, dual
        self.attn = SelfAttention(dim, heads, config.qk_norm, pre_only, dtype=dtype, device=device)
        self.attn2 = SelfAttention(dim, heads, config.qk_norm, dtype=dtype, device=device) if dual else None
        self.mlp = None if pre_only else Mlp(dim, config.mlp_hidden_size, dtype=dtype, device=device)
        self.n_mods = 2 if pre_only else (9 if dual else 6)
        self.adaLN_modulation = _adaln(dim, self.n_mods, dtype, device)

    def modulation(self, silu_c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The ``n_mods`` rows ``[B, D]``: (shift_msa, scale_msa[, gate_msa, shift_mlp, scale_mlp, gate_mlp
        [, shift_msa2, scale_msa2, gate_msa2]])."""
        return apply_linear(self.adaLN_modulation[1], silu_c).chunk(self.n_mods, dim=1)

    def pre_attention(self, x: torch.Tensor, mods: tuple[torch.Tensor, ...], need_q: bool = True):
        """(q, k, v) for the joint attention and, for a dual block, attn2's output (else None)."""
        shift_msa, scale_msa = mods[0], mods[1]
        if not self.dual:
            return self.attn.pre_attention(modulated_layer_norm(x, shift_msa, scale_msa), need_q), None
        shift_msa2, scale_msa2 = mods[6], mods[7]
        x_norm = F.layer_norm(x, x.shape[-1:], eps=LN_EPS)
        attn2 = self.attn2.self_attention(
            torch.addcmul(shift_msa2[:, None], x_norm, (1 + scale_msa2)[:, None])
        )
        x0 = torch.addcmul(shift_msa[:, None], x_norm, (1 + scale_msa)[:, None])
        return self.attn.pre_attention(x0, need_q), attn2

    def post_attention(
        self, x: torch.Tensor, attn: torch.Tensor, attn2: torch.Tensor | None, mods: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        """Gated attention residual(s), then the gated MLP residual."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[2:6]
        x = gated_residual(x, gate_msa, apply_linear(self.attn.proj, attn))
        if attn2 is not None:
            x = gated_residual(x, mods[8], attn2)
        return gated_residual(x, gate_mlp, self.mlp(modulated_layer_norm(x, shift_mlp, scale_mlp)))


class JointBlock(nn.Module):
    """``(context_block, x_block)`` attending jointly over ``cat(context, x)``."""

    def __init__(self, config: MMDiTConfig, index: int, dtype=None, device=None):
        super().__init__()
        pre_only = index == config.depth - 1
        dual = index in config.dual_attention_layers
        self.context_block = DismantledBlock(config, pre_only=pre_only, dtype=dtype, device=device)
        self.x_block = DismantledBlock(config, dual=dual, dtype=dtype, device=device)

    def forward(
        self, context: torch.Tensor, x: torch.Tensor, silu_c: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """New (context, x); context is None after the last (pre-only) block. Without autograd the inputs
        are updated in place."""
        ctx_mods = self.context_block.modulation(silu_c)
        x_mods = self.x_block.modulation(silu_c)
        with_context_out = not self.context_block.pre_only
        # The pre-only block's context queries only feed discarded outputs; with autograd on they are kept
        # so that every parameter still receives a gradient (DDP expects that).
        ctx_queries = with_context_out or torch.is_grad_enabled()
        ctx_attn, x_attn, attn2 = self._joint_attention(context, x, ctx_mods, x_mods, ctx_queries)
        x = self.x_block.post_attention(x, x_attn, attn2, x_mods)
        if not with_context_out:
            return None, x
        return self.context_block.post_attention(context, ctx_attn, None, ctx_mods), x

    def _joint_attention(self, context, x, ctx_mods, x_mods, ctx_queries: bool):
        """Attention over ``cat(context, x)`` (context first, as official); without ``ctx_queries`` only the
        image tokens query. Returns (context out or None, x out, attn2 out or None)."""
        ctx_q, ctx_k, ctx_v = self.context_block.pre_attention(context, ctx_mods, need_q=ctx_queries)[0]
        (x_q, x_k, x_v), attn2 = self.x_block.pre_attention(x, x_mods)
        k = torch.cat([ctx_k, x_k], dim=1)
        v = torch.cat([ctx_v, x_v], dim=1)
        del ctx_k, ctx_v, x_k, x_v
        if ctx_q is None:
            return None, attention(x_q, k, v), attn2
        out = attention(torch.cat([ctx_q, x_q], dim=1), k, v)
        n_ctx = context.shape[1]
        return out[:, :n_ctx], out[:, n_ctx:], attn2


class FinalLayer(nn.Module):
    """LayerNorm + adaLN(shift, scale) + Linear(hidden, patch * patch * out_channels)."""

    def __init__(self, hidden: int, patch_size: int, out_channels: int, dtype=None, device=None):
        super().__init__()
        self.linear = nn.Linear(hidden, patch_size * patch_size * out_channels, dtype=dtype, device=device)
        self.adaLN_modulation = _adaln(hidden, 2, dtype, device)

    def forward(self, x: torch.Tensor, silu_c: torch.Tensor) -> torch.Tensor:
        shift, scale = apply_linear(self.adaLN_modulation[1], silu_c).chunk(2, dim=1)
        return apply_linear(self.linear, modulated_layer_norm(x, shift, scale))


# --------------------------------------------------------------------------------------------- model


class MMDiT(nn.Module):
    """The SD3-class MM-DiT: ``forward(x, timestep, context, y) -> velocity``."""

    def __init__(self, config: MMDiTConfig, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        kw = {"dtype": dtype, "device": device}
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, dim, **kw)
        self.t_embedder = EmbedMLP(TIMESTEP_FREQS, dim, **kw)
        self.y_embedder = EmbedMLP(config.adm_in_channels, dim, **kw)
        self.context_embedder = nn.Linear(config.context_in_channels, dim, **kw)
        table = sincos_pos_embed_table(dim, config.pos_embed_max_size)
        self.register_buffer("pos_embed", table.to(**{k: v for k, v in kw.items() if v is not None}))
        self.joint_blocks = nn.ModuleList(JointBlock(config, i, **kw) for i in range(config.depth))
        self.final_layer = FinalLayer(dim, config.patch_size, config.out_channels, **kw)
        self.reset_parameters()

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Training-code init: xavier Linears, zero biases, N(0, 0.02) timestep MLP, zero adaLN and final
        layer (so a fresh block is the identity). The sin-cos table is left as built."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.out_channels, -1))
        nn.init.zeros_(proj.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.joint_blocks:
            for stream in (block.context_block, block.x_block):
                nn.init.zeros_(stream.adaLN_modulation[1].weight)
        for linear in (self.final_layer.adaLN_modulation[1], self.final_layer.linear):
            nn.init.zeros_(linear.weight)

    def add_pos_embed(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Add the centre ``h x w`` crop of the table (in patches) through a strided view: no crop copy."""
        m = self.config.pos_embed_max_size
        if h > m or w > m:
            raise ValueError(
                f"latent of {h}x{w} patches is larger than the positional table ({m}x{m} patches, i.e. "
                f"{m * self.config.patch_size}x{m * self.config.patch_size} latent pixels)"
            )
        top, left = (m - h) // 2, (m - w) // 2
        crop = self.pos_embed.view(m, m, -1)[top : top + h, left : left + w]
        b, n, d = tokens.shape
        return (tokens.view(b, h, w, d) + crop.to(tokens.dtype)).view(b, n, d)

    def unpatchify(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``[B, h*w, p*p*C]`` (p, q, c order) -> ``[B, C, h*p, w*p]``."""
        p, c = self.config.patch_size, self.config.out_channels
        b = tokens.shape[0]
        return tokens.view(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * p, w * p)

    def forward(
        self, x: torch.Tensor, timestep: torch.Tensor | float, context: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """Velocity ``[B, out_channels, H, W]`` in x's dtype.

        x ``[B, in_channels, H, W]`` (H, W multiples of patch_size); timestep ``1000 * sigma``, ``[B]`` or a
        scalar; context ``[B, T, context_in_channels]``; y (pooled text) ``[B, adm_in_channels]``.
        """
        b, _, height, width = x.shape
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"latent height and width must be multiples of {p}, got {height}x{width}")
        h, w = height // p, width // p
        dtype = self.dtype
        timestep = torch.as_tensor(timestep, device=x.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(b)

        tokens = self.add_pos_embed(self.x_embedder(x.to(dtype)), h, w)
        c = self.t_embedder(timestep_embedding(timestep).to(dtype)) + self.y_embedder(y.to(dtype))
        silu_c = F.silu(c)
        ctx = embed_context(self.context_embedder, context.to(dtype))
        for block in self.joint_blocks:
            ctx, tokens = block(ctx, tokens, silu_c)
        out = self.final_layer(tokens, silu_c)
        return self.unpatchify(out, h, w).to(x.dtype)


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (buffers such as ``pos_embed`` not included)."""
    return sum(p.numel() for p in module.parameters())
