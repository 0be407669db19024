"""The SynQT query branch (spec sections 1-2): QSM blocks reading the frozen stream's K/V, the
instance-aware head, and the random ops it draws from its own generator.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from synqt.errors import ModelError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# random ops with an optional explicit generator


def dropout(x: torch.Tensor, p: float, training: bool, generator: torch.Generator | None) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if generator is None:
        return F.dropout(x, p, True)
    keep = 1.0 - p
    mask = torch.empty_like(x).bernoulli_(keep, generator=generator)
    return x * mask.div_(keep)


def drop_path(x: torch.Tensor, p: float, training: bool, generator: torch.Generator | None,
               mask_shape: Sequence[int] | None = None) -> torch.Tensor:
    """timm's per-sample stochastic depth (scale_by_keep), with an explicit generator."""
    if not training or p == 0.0:
        return x
    keep = 1.0 - p
    shape = tuple(mask_shape) if mask_shape is not None else (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep, generator=generator)
    if keep > 0.0:
        mask.div_(keep)
    return x * mask


class QueryOnlyAttention(torch.autograd.Function):
    """softmax(q K^T * scale) V for a few query tokens against frozen K, V (no gradient for K, V).

    The two matmuls run in K/V's dtype: the compute dtype for live K/V, bf16 for a bf16 K/V cache
    read as stored (promoting 6.9 MiB of K/V per ViT-B/16 image to fp32 on every step cost half of a
    cached step; the softmax stays fp32). Saves the attention probabilities ``[B, H, T, N]`` (tiny
    for T query tokens) and the K/V tensors given as ``k_save``/``v_save``: the K/V themselves in
    ``keep`` mode (shared, not copied, by every branch of a pack) or bf16 copies in ``kv_bf16`` mode.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                k_save: torch.Tensor, v_save: torch.Tensor) -> torch.Tensor:
        compute = k.dtype
        scores = torch.matmul(q.to(compute), k.transpose(-2, -1)).mul_(scale)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs.to(compute), v).to(q.dtype)
        ctx.save_for_backward(probs, k_save, v_save)
        ctx.scale = scale
        ctx.compute = compute
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        probs, k, v = ctx.saved_tensors
        dtype, compute = grad_out.dtype, ctx.compute
        grad_probs = torch.matmul(grad_out.to(compute), v.to(compute).transpose(-2, -1)).to(dtype)
        probs = probs.to(dtype)
        grad_scores = probs * (grad_probs - (grad_probs * probs).sum(dim=-1, keepdim=True))
        grad_q = torch.matmul(grad_scores.to(compute), k.to(compute)).to(dtype).mul_(ctx.scale)
        return grad_q, None, None, None, None, None


def image_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, drop_p: float) -> torch.Tensor:
    """The image tokens' attention: ``scaled_dot_product_attention``, except bf16/fp16 autocast on a CPU.

    There PyTorch's fused CPU kernel runs no faster in bf16 than in fp32 (6.3 ms against 6.4 ms for
    ViT-B/16 at batch 8 on a 2-core avx512_bf16 CPU), while two low-precision matmuls around an fp32
    softmax take 3.3 ms: half the attention time of a bf16 training step. fp32 (and every GPU) keeps
    the fused kernel, so the fp32 image stream stays bit-identical to timm's.
    """
    device = q.device.type
    if device != "cpu" or drop_p > 0.0 or not torch.is_autocast_enabled(device):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=drop_p, scale=scale)
    dtype = torch.get_autocast_dtype(device)
    with torch.autocast(device, enabled=False):
        scores = torch.matmul(q.to(dtype) * scale, k.to(dtype).transpose(-2, -1))
        return torch.matmul(torch.softmax(scores, dim=-1), v.to(dtype))  # the CPU softmax accumulates in fp32


# ---------------------------------------------------------------------------------------------------------------
# trainable pieces (spec section 1)


class Adapter(nn.Module):
    """Residual bottleneck: ``x + drop(fc2(drop(gelu(fc1(x)))))`` (PyTorch default init)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = drop

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        h = dropout(F.gelu(self.fc1(x)), self.drop, self.training, generator)
        return x + dropout(self.fc2(h), self.drop, self.training, generator)


class QSMAttention(nn.Module):
    """Single-head attention among the T query tokens, every projection an Adapter(8)."""

    def __init__(self, dim: int, *, hidden: int = 8, attn_drop: float = 0.1, out_drop: float = 0.1) -> None:
        super().__init__()
        self.q_norm = nn.LayerNorm(dim)
        self.kv_norm = nn.LayerNorm(dim)
        self.q_adapter = Adapter(dim, hidden)
        self.k_adapter = Adapter(dim, hidden)
        self.v_adapter = Adapter(dim, hidden)
        self.out_adapter = Adapter(dim, hidden)
        self.scale = dim ** -0.5
        self.attn_drop = attn_drop
        self.out_drop = out_drop

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        u = self.q_norm(z)
        w = self.kv_norm(z)
        q, k, v = self.q_adapter(u), self.k_adapter(w), self.v_adapter(w)
        probs = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        probs = dropout(probs, self.attn_drop, self.training, generator)
        out = self.out_adapter(torch.matmul(probs, v))
        return dropout(out, self.out_drop, self.training, generator)


class QSMBlock(nn.Module):
    """``z + s_attn * QSMAttn(LN1(z))`` then ``z + s_ffn * Adapter(48)(LN2(z))``."""

    def __init__(self, dim: int, *, attn_scale: float, ffn_scale: float, attn_hidden: int = 8,
                 ffn_hidden: int = 48, drop: float = 0.1, attn_drop: float | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = QSMAttention(dim, hidden=attn_hidden, attn_drop=drop if attn_drop is None else attn_drop,
                                 out_drop=drop)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = Adapter(dim, ffn_hidden, drop)
        self.attn_scale = nn.Parameter(torch.tensor([float(attn_scale)]))
        self.ffn_scale = nn.Parameter(torch.tensor([float(ffn_scale)]))

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        z = z + self.attn_scale * self.attn(self.norm1(z), generator)
        return z + self.ffn_scale * self.ffn(self.norm2(z), generator)


class InstanceAwareHead(nn.Module):
    """Per-sample weighted mean of the ``1 + 3L`` block features, then LN_head and the classifier."""

    def __init__(self, dim: int, depth: int, num_classes: int, *, hidden: int = 48, drop: float = 0.1,
                 token_drop_path: float = 0.3) -> None:
        super().__init__()
        self.out_norm = nn.LayerNorm(dim)
        self.adapter = Adapter(dim, hidden, drop)
        self.weight_gen = nn.Linear(dim, 3 * depth)
        self.head_norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)
        self.drop = drop
        self.token_drop_path = token_drop_path

    def forward(self, feats: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``feats``: ``[B, 1 + 3L, C]`` = ``[h_{L-1}, h_0..h_{L-1}, a_0..a_{L-1}, m_0..m_{L-1}]``."""
        g = feats + self.adapter(self.out_norm(feats), generator)
        if self.training and self.token_drop_path > 0.0:
            rest = g[:, 1:]
            # one per-sample mask for each token j >= 1, drawn independently
            rest = drop_path(rest, self.token_drop_path, True, generator, (rest.shape[0], rest.shape[1], 1))
            g = torch.cat((g[:, :1], rest), dim=1)
        w = torch.tanh(dropout(F.gelu(self.weight_gen(g[:, 0])), self.drop, self.training, generator))
        w = torch.cat((w.new_ones(w.shape[0], 1), w), dim=1)
        y = (w.unsqueeze(-1) * g).mean(dim=1)
        return self.classifier(self.head_norm(y))


class QueryBranch(nn.Module):
    """All trainable state of one SynQT model: queries, prompt FFNs, QSM blocks and the head.

    Several branches can share one frozen image stream (``PackedSynQT``).
    """

    def __init__(self, *, embed_dim: int, depth: int, num_classes: int, token_nums: int = 1,
                 feat_scale: float = 1.0, attn_scale: float = 1.0, ffn_scale: float = 1.0,
                 ffn_hidden: int = 48, attn_hidden: int = 8, drop: float = 0.1, attn_drop: float = 0.1,
                 head_drop_path: float = 0.3) -> None:
        super().__init__()
        if token_nums < 1:
            raise ModelError(f"token_nums must be >= 1, got {token_nums}")
        self.embed_dim, self.depth, self.num_classes, self.token_nums = embed_dim, depth, num_classes, token_nums
        self.queries = nn.Parameter(torch.empty(depth, token_nums, embed_dim).uniform_(-1.0, 1.0))
        self.feat_scale = nn.Parameter(torch.tensor([float(feat_scale)]))
        self.prompt_ffns = nn.ModuleList(Adapter(embed_dim, ffn_hidden, drop) for _ in range(depth))
        self.qsm_blocks = nn.ModuleList(
            QSMBlock(embed_dim, attn_scale=attn_scale, ffn_scale=ffn_scale, attn_hidden=attn_hidden,
                     ffn_hidden=ffn_hidden, drop=drop, attn_drop=attn_drop)
            for _ in range(depth)
        )
        self.query_drop = drop
        self.head = InstanceAwareHead(embed_dim, depth, num_classes, hidden=ffn_hidden, drop=drop,
                                      token_drop_path=head_drop_path)
        self.generator: torch.Generator | None = None

    def synthesize(self, index: int, prev: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Step 1 of spec section 2: the query tokens ``[B, T, C]`` entering frozen block ``index``."""
        p = self.queries[index].unsqueeze(0).expand(batch, -1, -1)
        if prev is not None:
            p = p + self.feat_scale * prev
        p = self.prompt_ffns[index](p, self.generator)
        p = self.qsm_blocks[index](p, self.generator)
        return dropout(p, self.query_drop, self.training, self.generator)

    # RNG helpers used by the engine so that packed and solo runs draw the same numbers
    def seed_generator(self, seed: int, device: torch.device | str = "cpu") -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int(seed))


__all__ = ["Adapter", "QSMAttention", "QSMBlock", "InstanceAwareHead", "QueryBranch"]
