"""The official vHeat / RS-vHeat computation, re-expressed independently, as a numerical reference and speed baseline.

It follows the official code's *structure* and *state-dict names* (``patch_embed``, ``patch_embed_opt``/``_sar``,
``layers.{i}.{j}.op.*``, ``freq_embed``, ``heat_capacity``, ``classifier``): NCHW activations with a permute around
every LayerNorm, DCT as four ``conv1d`` calls with ``(N, H, 1)`` kernels, filter ``E ** kt`` with
``E = exp(-(w_n^2 + w_m^2))``, MLP as 1x1 convs, fixed input size. Unlike the official RS-vHeat ``infer_init`` it keeps
the SCE in inference mode, so that mode runs. ``scripts/check_against_official.py`` checks it against the real
official modules when a checkout is at hand.

It is not used by the library itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


class _LayerNorm2d(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1).contiguous()).permute(0, 3, 1, 2).contiguous()


class _Permute(nn.Module):
    def __init__(self, *order: int) -> None:
        super().__init__()
        self.order = order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.order)


def _stem_norm(dim: int) -> nn.Sequential:
    # Sequential(permute, LN, permute): its LN is at index 1, as in the official `norm1.1.weight`.
    return nn.Sequential(_Permute(0, 2, 3, 1), nn.LayerNorm(dim, eps=1e-6), _Permute(0, 3, 1, 2))


class _Stem(nn.Module):
    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, 2, 1)
        self.norm1 = _stem_norm(dim // 2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, 2, 1)
        self.norm2 = _stem_norm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


def _cos_map(n: int, device) -> torch.Tensor:
    x = (torch.arange(n, device=device, dtype=torch.float32)[None] + 0.5) / n
    k = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    w = torch.cos(k * x * math.pi) * math.sqrt(2 / n)
    w[0] = w[0] / math.sqrt(2)
    return w


def _decay_map(h: int, w: int, device) -> torch.Tensor:
    wn = torch.linspace(0, math.pi, h + 1, device=device)[:h].view(-1, 1)
    wm = torch.linspace(0, math.pi, w + 1, device=device)[:w].view(1, -1)
    return torch.exp(-(wn**2 + wm**2))


class _Heat2D(nn.Module):
    def __init__(self, dim: int, res: int, use_sce: bool) -> None:
        super().__init__()
        self.res = res
        if use_sce:
            self.norm1 = _LayerNorm2d(dim)
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.linear = nn.Linear(dim, 2 * dim)
        self.out_norm = nn.LayerNorm(dim)
        self.out_linear = nn.Linear(dim, dim)
        self.to_k = nn.Sequential(nn.Linear(dim, dim), nn.ReLU())
        self.k_exp: nn.Parameter | None = None

    def fold(self, freq: torch.Tensor) -> None:
        self.k_exp = nn.Parameter(
            _decay_map(self.res, self.res, freq.device)[:, :, None] ** self.to_k(freq), requires_grad=False
        )
        del self.to_k

    def forward(self, x: torch.Tensor, freq: torch.Tensor | None, sce: torch.Tensor | None) -> torch.Tensor:
        b, c, h, w = x.shape
        if sce is not None:
            x = self.norm1(F.relu(x + sce.permute(2, 0, 1)[None]))
        x = self.dwconv(x)
        x, z = self.linear(x.permute(0, 2, 3, 1).contiguous()).chunk(2, dim=-1)
        cos_h, cos_w = _cos_map(h, x.device), _cos_map(w, x.device)
        x = F.conv1d(x.contiguous().view(b, h, -1), cos_h.view(h, h, 1))
        x = F.conv1d(x.contiguous().view(-1, w, c), cos_w.view(w, w, 1)).contiguous().view(b, h, w, -1)
        filt = self.k_exp if self.k_exp is not None else _decay_map(h, w, x.device)[:, :, None] ** self.to_k(freq)
        x = torch.einsum("bnmc,nmc->bnmc", x, filt)
        x = F.conv1d(x.contiguous().view(b, h, -1), cos_h.t().contiguous().view(h, h, 1))
        x = F.conv1d(x.contiguous().view(-1, w, c), cos_w.t().contiguous().view(w, w, 1)).contiguous().view(b, h, w, -1)
        x = self.out_linear(self.out_norm(x) * F.silu(z))
        return x.permute(0, 3, 1, 2).contiguous()


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _HeatBlock(nn.Module):
    def __init__(self, dim: int, res: int, post_norm: bool, layer_scale: float | None, use_sce: bool) -> None:
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = _LayerNorm2d(dim)
        self.op = _Heat2D(dim, res, use_sce)
        self.norm2 = _LayerNorm2d(dim)
        self.mlp = _Mlp(dim, 4 * dim)
        self.gamma1 = nn.Parameter(torch.full((dim,), layer_scale)) if layer_scale else None
        self.gamma2 = nn.Parameter(torch.full((dim,), layer_scale)) if layer_scale else None

    def forward(self, x, freq, sce):
        g1 = 1.0 if self.gamma1 is None else self.gamma1[:, None, None]
        g2 = 1.0 if self.gamma2 is None else self.gamma2[:, None, None]
        if self.post_norm:
            x = x + g1 * self.norm1(self.op(x, freq, sce))
            return x + g2 * self.norm2(self.mlp(x))
        x = x + g1 * self.op(self.norm1(x), freq, sce)
        return x + g2 * self.mlp(self.norm2(x))


class OfficialStructureHeat(nn.Module):
    """vHeat (``use_sce=False``, stem ``patch_embed``) or RS-vHeat (``use_sce=True``, stems ``patch_embed_opt`` and
    ``patch_embed_sar``) with the official module names; input ``(B, C, img_size, img_size)``; returns logits."""

    def __init__(
        self,
        depths=(2, 2, 6, 2),
        dims=(96, 192, 384, 768),
        img_size: int = 224,
        post_norm: bool = False,
        layer_scale: float | None = None,
        use_sce: bool = False,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.use_sce = use_sce
        if use_sce:
            self.patch_embed_opt = _Stem(3, dims[0])
            self.patch_embed_sar = _Stem(1, dims[0])
        else:
            self.patch_embed = _Stem(3, dims[0])
        res = [img_size // 4 // 2**i for i in range(len(dims))]

        def embeddings() -> nn.ParameterList:
            return nn.ParameterList(nn.Parameter(torch.randn(r, r, d) * 0.02) for r, d in zip(res, dims, strict=True))

        self.freq_embed = embeddings()
        if use_sce:
            self.heat_capacity = embeddings()
        self.layers = nn.ModuleList()
        for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
            blocks: list[nn.Module] = [_HeatBlock(dim, res[i], post_norm, layer_scale, use_sce) for _ in range(depth)]
            last = i == len(dims) - 1
            blocks.append(
                nn.Identity()
                if last
                else nn.Sequential(nn.Conv2d(dim, dims[i + 1], 3, 2, 1, bias=False), _LayerNorm2d(dims[i + 1]))
            )
            self.layers.append(nn.ModuleList(blocks))
        fc = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.classifier = nn.Sequential(_LayerNorm2d(dims[-1]), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), fc)
        self.folded = False

    def _stages(self) -> Iterable[nn.ModuleList]:
        """Each stage's blocks then its downsampling (``nn.Identity`` after the last stage)."""
        return cast(Iterable[nn.ModuleList], self.layers)  # built as a ModuleList of ModuleLists

    @torch.no_grad()
    def fold(self) -> OfficialStructureHeat:
        """The official ``infer_init``: precompute ``k_exp`` per block, drop ``to_k`` and the FVE (SCE kept)."""
        for i, layer in enumerate(self._stages()):
            for block in layer[:-1]:  # the stage's _HeatBlocks
                cast(_HeatBlock, block).op.fold(self.freq_embed[i])
        self.folded = True
        return self.eval()

    def forward_features(self, x: torch.Tensor, modality: str = "optical") -> torch.Tensor:
        stem = (
            self.patch_embed
            if not self.use_sce
            else (self.patch_embed_opt if modality == "optical" else self.patch_embed_sar)
        )
        x = stem(x)
        for i, layer in enumerate(self._stages()):
            freq = None if self.folded else self.freq_embed[i]
            sce = self.heat_capacity[i] if self.use_sce else None
            for block in layer[:-1]:
                x = block(x, freq, sce)
            x = layer[-1](x)
        return x

    def forward(self, x: torch.Tensor, modality: str = "optical") -> torch.Tensor:
        return self.classifier(self.forward_features(x, modality))
