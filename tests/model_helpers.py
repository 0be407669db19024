"""Shared helpers for the model and checkpoint tests: tiny ViT settings and weight randomisation."""

from __future__ import annotations

import math

import torch
from torch import nn

TINY = "vit_tiny_patch16_224"
# tiny ViT on 32x32 images: 4x4 patches of 8 pixels
TINY_KW: dict = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)

# backbone variants the model must serve (each with K/V over every token the block sees)
VARIANTS: dict[str, dict] = {
    "plain": dict(TINY_KW),
    "reg_tokens": dict(TINY_KW, reg_tokens=2, depth=3, embed_dim=48, num_heads=3),
    "no_class_token": dict(TINY_KW, class_token=False, global_pool="avg"),
    "layer_scale": dict(TINY_KW, init_values=0.1),
    "no_qkv_bias": dict(TINY_KW, qkv_bias=False, embed_dim=64, num_heads=4),
    "qk_norm": dict(TINY_KW, qk_norm=True),
    "pre_norm_no_embed_class": dict(TINY_KW, pre_norm=True, no_embed_class=True, reg_tokens=1),
}


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> None:
    """Give every parameter a non-trivial value: LN weights not 1, biases not 0, weights O(1/sqrt(fan_in)).

    timm's own init (std 0.02, cls token 1e-6, LN 1/0) would make attention nearly uniform and
    LN affine parameters invisible, so a regression test built on it could miss real mistakes.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=gen)

    for name, param in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if param.ndim >= 2 and leaf == "weight":  # linear / conv
            fan_in = math.prod(param.shape[1:])
            param.copy_(randn(param.shape) * (1.5 / math.sqrt(fan_in)))
        elif leaf == "weight":  # a LayerNorm weight
            param.copy_(1.0 + 0.3 * randn(param.shape))
        elif leaf == "bias":
            param.copy_(0.2 * randn(param.shape))
        elif leaf == "gamma":  # layer scale
            param.copy_(0.5 + 0.2 * randn(param.shape))
        elif leaf in ("cls_token", "reg_token", "pos_embed"):
            param.copy_(0.5 * randn(param.shape))
        elif leaf == "queries":
            param.copy_(torch.rand(param.shape, generator=gen) * 2 - 1)
        elif param.numel() == 1:  # learnable scalars are set by the caller
            continue
        else:
            raise AssertionError(f"randomize_: unhandled parameter {name} {tuple(param.shape)}")


@torch.no_grad()
def set_scales_(model: nn.Module, feat: float, attn: list[float] | float, ffn: list[float] | float) -> None:
    """Set s_feat and each block's s_attn / s_ffn (lists: one value per block)."""
    branch = model.branch
    branch.feat_scale.fill_(feat)
    for i, blk in enumerate(branch.qsm_blocks):
        blk.attn_scale.fill_(attn[i] if isinstance(attn, list) else attn)
        blk.ffn_scale.fill_(ffn[i] if isinstance(ffn, list) else ffn)


def images(batch: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
