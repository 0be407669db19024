"""An independent re-computation of SynQT's eval-mode logits, from the spec's equations only.

Written from ``SYNQT_SPEC.md`` sections 1-4 and timm's ViT block equations with plain torch
primitives (``F.conv2d`` for the patch embedding, ``F.linear``, ``F.layer_norm``, ``F.gelu``,
``softmax``, ``matmul``) and explicit attention (no SDPA). It reads weights only by their
official names (``synqt.to_official_state_dict(model)``) and never imports ``synqt.model``, so a
mistake in the implementation cannot be copied into the reference. Everything runs in float64.

Backbone features are read from the keys present: class token, register tokens, position
embedding with or without class-token entries, ``norm_pre``, ``qkv`` bias, ``q_norm``/``k_norm``,
``attn.norm``, layer scale. What a state dict cannot say (number of heads, the backbone's LN eps)
is passed in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F

SYNQT_EPS = 1e-5  # every LayerNorm of the query branch and head (spec section 3)


def _ln(x: torch.Tensor, sd: Mapping[str, torch.Tensor], prefix: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[f"{prefix}.weight"], sd.get(f"{prefix}.bias"), eps)


def _lin(x: torch.Tensor, sd: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return F.linear(x, sd[f"{prefix}.weight"], sd.get(f"{prefix}.bias"))


def _adapter(x: torch.Tensor, sd: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """Adapter(x) = x + fc2(gelu(fc1(x))) (dropout is the identity in eval mode)."""
    return x + _lin(F.gelu(_lin(x, sd, f"{prefix}.fc1")), sd, f"{prefix}.fc2")


def _depth(sd: Mapping[str, torch.Tensor]) -> int:
    return 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))


def _maybe_ln(x: torch.Tensor, sd: Mapping[str, torch.Tensor], prefix: str, eps: float) -> torch.Tensor:
    return _ln(x, sd, prefix, eps) if f"{prefix}.weight" in sd else x


def _layer_scale(x: torch.Tensor, sd: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return x * sd[f"{prefix}.gamma"] if f"{prefix}.gamma" in sd else x


def embed(sd: Mapping[str, torch.Tensor], images: torch.Tensor, *, eps: float) -> torch.Tensor:
    """Patch embedding, class/register tokens, position embedding, ``norm_pre`` (timm's layout)."""
    w = sd["patch_embed.proj.weight"]  # [C, in, ph, pw]
    x = F.conv2d(images, w, sd.get("patch_embed.proj.bias"), stride=tuple(w.shape[2:]))
    x = x.flatten(2).transpose(1, 2)  # [B, grid, C]
    batch, patches, _ = x.shape
    prefix = [sd[k].expand(batch, -1, -1) for k in ("cls_token", "reg_token") if k in sd]
    pos = sd.get("pos_embed")
    if pos is not None and pos.shape[1] == patches:  # no_embed_class: add, then prepend
        x = torch.cat([*prefix, x + pos], dim=1)
    else:
        x = torch.cat([*prefix, x], dim=1)
        if pos is not None:
            x = x + pos
    return _maybe_ln(x, sd, "norm_pre", eps)


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, d = t.shape
    return t.reshape(b, n, num_heads, d // num_heads).transpose(1, 2)  # [B, H, n, d]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Explicit multi-head attention: softmax(q k^T * d^-0.5) v, heads merged back."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def _qkv(sd: Mapping[str, torch.Tensor], prefix: str, h: torch.Tensor, num_heads: int, eps: float):
    qkv = _lin(h, sd, f"{prefix}.attn.qkv")
    q, k, v = (_heads(t, num_heads) for t in qkv.chunk(3, dim=-1))
    q = _maybe_ln(q, sd, f"{prefix}.attn.q_norm", eps)
    k = _maybe_ln(k, sd, f"{prefix}.attn.k_norm", eps)
    return q, k, v


def _attn_out(sd: Mapping[str, torch.Tensor], prefix: str, o: torch.Tensor, eps: float) -> torch.Tensor:
    o = _maybe_ln(o, sd, f"{prefix}.attn.norm", eps)
    return _layer_scale(_lin(o, sd, f"{prefix}.attn.proj"), sd, f"{prefix}.ls1")


def _mlp(sd: Mapping[str, torch.Tensor], prefix: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    h = _ln(x, sd, f"{prefix}.norm2", eps)
    h = _lin(F.gelu(_lin(h, sd, f"{prefix}.mlp.fc1")), sd, f"{prefix}.mlp.fc2")
    return _layer_scale(h, sd, f"{prefix}.ls2")


def image_block(sd: Mapping[str, torch.Tensor], i: int, x: torch.Tensor, *, num_heads: int, eps: float):
    """timm's pre-norm block on the image tokens; returns (output, K, V) with K, V over all tokens."""
    prefix = f"blocks.{i}"
    q, k, v = _qkv(sd, prefix, _ln(x, sd, f"{prefix}.norm1", eps), num_heads, eps)
    x = x + _attn_out(sd, prefix, _attend(q, k, v), eps)
    return x + _mlp(sd, prefix, x, eps), k, v


def query_block(sd: Mapping[str, torch.Tensor], i: int, p: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                num_heads: int, eps: float):
    """Spec section 2, step 2: query-only attention of the queries against the image K, V."""
    prefix = f"blocks.{i}"
    q, _, _ = _qkv(sd, prefix, _ln(p, sd, f"{prefix}.norm1", eps), num_heads, eps)  # K, V of p discarded
    f_att = _attn_out(sd, prefix, _attend(q, k, v), eps)
    p = p + f_att
    f_ffn = _mlp(sd, prefix, p, eps)
    return p + f_ffn, f_att, f_ffn


def image_stream(sd: Mapping[str, torch.Tensor], images: torch.Tensor, *, num_heads: int,
                 eps: float = 1e-6) -> list[torch.Tensor]:
    """Every frozen block's output on the image tokens (before the final norm), in float64."""
    sd = {k: v.detach().double() for k, v in sd.items()}
    x = embed(sd, images.double(), eps=eps)
    outs = []
    for i in range(_depth(sd)):
        x, _, _ = image_block(sd, i, x, num_heads=num_heads, eps=eps)
        outs.append(x)
    return outs


def _qsm_block(sd: Mapping[str, torch.Tensor], i: int, z: torch.Tensor) -> torch.Tensor:
    """z + s_attn * QSMAttn(LN1(z)); z + s_ffn * Adapter48(LN2(z)) (spec section 1)."""
    prefix = f"synqt.qsm_block.{i}"
    a = _ln(z, sd, f"{prefix}.norm1", SYNQT_EPS)
    u = _ln(a, sd, f"{prefix}.attn.q_norm", SYNQT_EPS)
    w = _ln(a, sd, f"{prefix}.attn.kv_norm", SYNQT_EPS)
    q = _adapter(u, sd, f"{prefix}.attn.q_proj.mlp")
    k = _adapter(w, sd, f"{prefix}.attn.k_proj.mlp")
    v = _adapter(w, sd, f"{prefix}.attn.v_proj.mlp")
    probs = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * z.shape[-1] ** -0.5, dim=-1)  # over T tokens
    attn = _adapter(torch.matmul(probs, v), sd, f"{prefix}.attn.proj.mlp")
    z = z + sd[f"{prefix}.attn_scale"] * attn
    return z + sd[f"{prefix}.ffn_scale"] * _adapter(_ln(z, sd, f"{prefix}.norm2", SYNQT_EPS), sd,
                                                    f"{prefix}.mlp.mlp")


def reference_logits(state_dict: Mapping[str, torch.Tensor], images: torch.Tensor, *, num_heads: int,
                     eps: float = 1e-6) -> torch.Tensor:
    """SynQT eval-mode logits (float64) from an official-named state dict (spec sections 1-4).

    ``eps`` is the backbone's LayerNorm eps (1e-6 in timm's ViT); SynQT's own LNs use 1e-5.
    """
    sd = {k: v.detach().double() for k, v in state_dict.items()}
    x = embed(sd, images.double(), eps=eps)
    queries = sd["synqt.q"]  # [L, T, C]
    depth, _, dim = queries.shape
    assert depth == _depth(sd), "synqt.q has one row of queries per backbone block"
    batch = x.shape[0]
    hs, atts, ffns = [], [], []
    for i in range(depth):
        # 1. synthesize the query tokens
        p = queries[i].unsqueeze(0).expand(batch, -1, -1)
        if i > 0:
            p = p + sd["synqt.feat_scale"] * hs[-1]
        p = _adapter(p, sd, f"synqt.prompt_ffn.{i}.mlp")
        p = _qsm_block(sd, i, p)
        # 2. frozen block i on both streams; the queries read K, V of the image tokens of the same input
        x_next, k, v = image_block(sd, i, x, num_heads=num_heads, eps=eps)
        p, f_att, f_ffn = query_block(sd, i, p, k, v, num_heads=num_heads, eps=eps)
        x = x_next
        # 3. average over the T query tokens
        hs.append(p.mean(1, keepdim=True))
        atts.append(f_att.mean(1, keepdim=True))
        ffns.append(f_ffn.mean(1, keepdim=True))
    feats = torch.cat([hs[-1], *hs, *atts, *ffns], dim=1)  # [B, 1 + 3L, C]
    assert feats.shape[1] == 1 + 3 * depth and feats.shape[2] == dim
    g = feats + _adapter(_ln(feats, sd, "synqt.out_norm", SYNQT_EPS), sd, "synqt.mlp.mlp")
    w = torch.tanh(F.gelu(_lin(g[:, 0], sd, "synqt.out_combine.get_weight.fc1")))  # [B, 3L]
    w = torch.cat([torch.ones_like(w[:, :1]), w], dim=1)
    y = (w.unsqueeze(-1) * g).sum(dim=1) / g.shape[1]
    return _lin(_ln(y, sd, "synqt.head_norm", SYNQT_EPS), sd, "head")
