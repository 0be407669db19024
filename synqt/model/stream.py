"""The frozen timm ViT stream and the models built on it (spec section 3): the backbone, the shared
K/V buffer both streams read, SynQT (one branch) and PackedSynQT (k branches over one forward pass).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from synqt.config import MEMORY_MODES  # declared once, with the memory_mode config key
from synqt.errors import ModelError
from synqt.model.branch import QueryBranch, QueryOnlyAttention, drop_path, dropout, image_attention

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# the frozen backbone


def _drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
    try:
        from timm.layers import calculate_drop_path_rates

        return [float(r) for r in calculate_drop_path_rates(drop_path_rate, depth)]
    except ImportError:  # older timm: the same linear rule
        return [float(r) for r in torch.linspace(0, drop_path_rate, depth)]


def check_backbone(backbone: nn.Module, name: str | None = None) -> None:
    """Raise ModelError, naming the model and the reason, if SynQT cannot serve ``backbone``."""
    from timm.models.vision_transformer import Block, VisionTransformer

    label = name or type(backbone).__name__
    if not isinstance(backbone, VisionTransformer):
        raise ModelError(
            f"backbone {label!r} ({type(backbone).__module__}.{type(backbone).__name__}) cannot be served by "
            "SynQT: it is not a timm VisionTransformer (SynQT reads the keys/values of ViT blocks)"
        )
    for i, blk in enumerate(backbone.blocks):
        if type(blk) is not Block:
            raise ModelError(
                f"backbone {label!r} cannot be served by SynQT: block {i} is {type(blk).__name__}, expected timm's "
                "pre-norm vision_transformer.Block (post-norm and parallel blocks are not supported)"
            )
        attn = blk.attn
        if not (hasattr(attn, "qkv") and isinstance(attn.qkv, nn.Linear) and hasattr(attn, "num_heads")):
            raise ModelError(
                f"backbone {label!r} cannot be served by SynQT: block {i}'s attention "
                f"({type(attn).__name__}) has no fused qkv projection"
            )
    if len(backbone.blocks) == 0:
        raise ModelError(f"backbone {label!r} has no blocks")


def build_backbone(backbone: str | nn.Module, *, drop_path_rate: float = 0.1,
                   checkpoint: Any = None, **backbone_kwargs: Any) -> nn.Module:
    """A frozen timm ViT, built by name (never downloaded) or taken as built, optionally loaded.

    ``checkpoint``: a file or state dict to load, ``"random"`` (keep the random init, recorded as such
    in ``synqt_identity``) or None (the same, for library callers; trials refuse None, see
    ``synqt.weights.checkpoint.require_backbone_weights``).
    """
    import timm

    from synqt.weights.checkpoint import backbone_identity, is_random, load_backbone_checkpoint

    if isinstance(backbone, str):
        name = backbone
        try:
            model = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate,
                                      **backbone_kwargs)
        except RuntimeError as err:  # unknown model name
            raise ModelError(f"backbone {name!r} cannot be built by timm: {err}") from err
        except TypeError as err:  # bad kwargs
            raise ModelError(f"backbone {name!r} rejected its keyword arguments {backbone_kwargs}: {err}") from err
    else:
        name = getattr(backbone, "synqt_identity", {}).get("name") or type(backbone).__name__
        model = backbone
    check_backbone(model, name)
    if checkpoint is not None and not is_random(checkpoint):  # "random": keep timm's (seeded) init
        load_backbone_checkpoint(model, checkpoint)
    model.requires_grad_(False)
    model.eval()
    if isinstance(backbone, str) or not hasattr(model, "synqt_identity"):
        model.synqt_identity = backbone_identity(model, name, backbone_kwargs, checkpoint)
    return model


def copy_final_norm(backbone: nn.Module, branch: QueryBranch) -> None:
    """LN_head starts as a copy (not a view) of the backbone's final norm weights (not its eps)."""
    final_norm = backbone.norm if isinstance(backbone.norm, nn.LayerNorm) else getattr(backbone, "fc_norm", None)
    if isinstance(final_norm, nn.LayerNorm) and final_norm.weight is not None:
        with torch.no_grad():
            branch.head.head_norm.weight.copy_(final_norm.weight)
            if final_norm.bias is not None:
                branch.head.head_norm.bias.copy_(final_norm.bias)


class _FrozenStream(nn.Module):
    """Runs a frozen ViT's image stream once and feeds its K/V to one or more query branches."""

    def __init__(self, backbone: nn.Module, *, drop_path_rate: float = 0.1, backbone_drop_path: bool = True,
                 memory_mode: str = "keep") -> None:
        super().__init__()
        if memory_mode not in MEMORY_MODES:
            raise ModelError(f"memory_mode {memory_mode!r} is not one of {', '.join(MEMORY_MODES)}")
        check_backbone(backbone)
        backbone.requires_grad_(False)
        self.backbone = backbone.eval()
        self.embed_dim = int(backbone.embed_dim)
        self.depth = len(backbone.blocks)
        self.num_heads = int(backbone.blocks[0].attn.num_heads)
        self.drop_path_rates = _drop_path_rates(drop_path_rate, self.depth)
        self.backbone_drop_path = backbone_drop_path
        self.memory_mode = memory_mode
        self.image_generator: torch.Generator | None = None
        # low-precision copies of the frozen weights under autocast: autocast only caches casts of
        # weights that require grad, so without this every frozen matrix is re-cast on every use
        self._cast_cache: dict[int, tuple[int, int, torch.dtype, torch.Tensor]] = {}

    def cast_cache_tensors(self) -> list[torch.Tensor]:
        """The cached low-precision weight copies (not activations: a memory counter should exclude them)."""
        return [entry[3] for entry in self._cast_cache.values()]

    def _cast(self, t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        if t is None or t.dtype == dtype:
            return t
        key = id(t)
        entry = self._cast_cache.get(key)
        if entry is None or entry[0] != t._version or entry[1] != t.data_ptr() or entry[2] != dtype:
            entry = (t._version, t.data_ptr(), dtype, t.detach().to(dtype))
            self._cast_cache[key] = entry
        return entry[3]

    def _linear(self, lin: nn.Module, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """``lin(x)`` (optionally only output rows ``rows``) with the frozen weight cast once per autocast dtype."""
        weight, bias = lin.weight, lin.bias
        device = x.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            weight, bias = self._cast(weight, dtype), self._cast(bias, dtype)
            if rows is not None:
                weight, bias = weight[rows], (bias[rows] if bias is not None else None)
            with torch.autocast(device, enabled=False):
                return F.linear(x.to(dtype), weight, bias)
        if rows is not None:
            weight, bias = weight[rows], (bias[rows] if bias is not None else None)
        return F.linear(x, weight, bias)

    def _mlp(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """timm's ``Mlp`` (fc1, act, drop1, norm, fc2, drop2) through ``_linear``; other MLPs as they are."""
        from timm.layers import Mlp

        if type(mlp) is not Mlp or not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
            return mlp(x)
        h = mlp.drop1(mlp.act(self._linear(mlp.fc1, x)))
        return mlp.drop2(self._linear(mlp.fc2, mlp.norm(h)))

    # the backbone's frozen state never changes: it stays in eval mode whatever train() is called with;
    # the configured stochastic depth is applied functionally from self.training instead
    def train(self, mode: bool = True) -> _FrozenStream:
        super().train(mode)
        self.backbone.eval()
        return self

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        x = bb.patch_embed(images)
        x = bb._pos_embed(x)
        x = bb.patch_drop(x)
        return bb.norm_pre(x)

    def _image_block(self, index: int, x: torch.Tensor,
                     kv_only: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One frozen block on the image tokens; returns the output and K/V ``[2, B, H, N, d]``.

        ``kv_only``: stop after K/V (output None). SynQT reads nothing of the image tokens after the
        last block's K/V, so its attention, projection and MLP there (3/4 of a block) are skipped.
        """
        blk = self.backbone.blocks[index]
        attn = blk.attn
        B, N, _ = x.shape
        heads = attn.num_heads
        head_dim = attn.qkv.out_features // (3 * heads)
        h = blk.norm1(x)
        parts = 2 if kv_only else 3  # kv_only: the K and V rows of qkv only
        qkv = self._linear(attn.qkv, h, slice((3 - parts) * heads * head_dim, None))
        qkv = qkv.reshape(B, N, parts, heads, head_dim).permute(2, 0, 3, 1, 4)
        # one contiguous copy of K and V: read by the image attention now and kept for the query stream
        kv = torch.stack((attn.k_norm(qkv[-2]), qkv[-1]))
        if kv_only:
            return None, kv
        q = attn.q_norm(qkv[0])
        drop_p = attn.attn_drop.p if (self.training and self.backbone_drop_path) else 0.0
        out = image_attention(q, kv[0], kv[1], attn.scale, drop_p)
        out = out.transpose(1, 2).reshape(B, N, heads * head_dim)
        out = attn.norm(out)
        gate = getattr(attn, "gate", None)
        if gate is not None:
            out = out * gate(h).sigmoid()
        out = attn.proj_drop(self._linear(attn.proj, out))
        stochastic = self.training and self.backbone_drop_path
        rate = self.drop_path_rates[index]
        x = x + drop_path(blk.ls1(out), rate, stochastic, self.image_generator)
        x = x + drop_path(blk.ls2(self._mlp(blk.mlp, blk.norm2(x))), rate, stochastic, self.image_generator)
        return x, kv

    def _query_block(self, index: int, p: torch.Tensor, kv: torch.Tensor, kv_saved: torch.Tensor,
                     generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Frozen block ``index`` on the query tokens, query-only: returns (p, f_att, f_ffn)."""
        blk = self.backbone.blocks[index]
        attn = blk.attn
        B, T, _ = p.shape
        heads = attn.num_heads
        attn_dim = attn.qkv.out_features // 3
        h = blk.norm1(p)
        # only the query third of qkv is applied to the query tokens
        q = self._linear(attn.qkv, h, slice(0, attn_dim)).reshape(B, T, heads, attn_dim // heads).transpose(1, 2)
        q = attn.q_norm(q)
        out = QueryOnlyAttention.apply(q, kv[0], kv[1], attn.scale, kv_saved[0], kv_saved[1])
        out = attn.norm(out.transpose(1, 2).reshape(B, T, attn_dim))
        gate = getattr(attn, "gate", None)
        if gate is not None:
            out = out * gate(h).sigmoid()
        out = dropout(self._linear(attn.proj, out), attn.proj_drop.p, self.training, generator)
        rate = self.drop_path_rates[index]
        f_att = drop_path(blk.ls1(out), rate, self.training, generator)
        p = p + f_att
        f_ffn = drop_path(blk.ls2(self._mlp(blk.mlp, blk.norm2(p))), rate, self.training, generator)
        p = p + f_ffn
        return p, f_att, f_ffn

    def _run(self, images: torch.Tensor | None, branches: Sequence[QueryBranch],
             kv: torch.Tensor | Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Logits of ``branches``: from ``images`` through the live image stream, or from cached ``kv``.

        ``kv``: per-block K/V of the image tokens, ``[L, 2, B, H, N, d]`` (or a sequence of L
        ``[2, B, H, N, d]``), as ``kv_block_stream`` yields them in eval mode; any float dtype (bf16
        storage is read as is: the query-only attention's matmuls then run in bf16). Both sources feed the one
        query-stream implementation, ``_query_stream``.
        """
        if kv is not None:
            if len(kv) != self.depth:
                raise ModelError(f"cached K/V hold {len(kv)} blocks, the backbone has {self.depth}")
            # recompute mode would only re-read the same cached tensors: nothing of the image stream to drop
            return self._query_stream(iter(kv), branches, int(kv[0].shape[1]))
        if self.memory_mode == "recompute" and torch.is_grad_enabled() and self.training:
            return self._run_recompute(images, branches)
        return self._run_streams(images, branches)

    def _run_recompute(self, images: torch.Tensor, branches: Sequence[QueryBranch]) -> list[torch.Tensor]:
        """Keep only the input batch; the backward pass recomputes both streams with the same random numbers."""
        generators = [self.image_generator] + [b.generator for b in branches]
        start_states = [g.get_state() if g is not None else None for g in generators]

        def body(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            for g, state in zip(generators, start_states, strict=True):
                if g is not None:
                    g.set_state(state)
            return tuple(self._run_streams(x, branches))

        return list(activation_checkpoint(body, images, use_reentrant=False, preserve_rng_state=True))

    def kv_block_stream(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        """The image stream, block by block: yields K/V ``[2, B, H, N, d]`` of block 0 .. L-1 (no grad).

        Lazy, so a consumer holds one block's K/V at a time unless it keeps them (autograd does in
        training). In eval mode (or with ``backbone_drop_path`` off) this is a pure function of the
        images and the frozen weights: what the K/V cache stores (``synqt.training.kv_cache``).
        """
        with torch.no_grad():
            x = self._embed(images)
        for i in range(self.depth):
            with torch.no_grad():
                x, kv = self._image_block(i, x, kv_only=i == self.depth - 1)
            yield kv
            del kv

    def _run_streams(self, images: torch.Tensor, branches: Sequence[QueryBranch]) -> list[torch.Tensor]:
        return self._query_stream(self.kv_block_stream(images), branches, images.shape[0])

    def _query_stream(self, kv_blocks: Iterator[torch.Tensor], branches: Sequence[QueryBranch],
                      batch: int) -> list[torch.Tensor]:
        """The query stream of every branch over per-block K/V ``[2, B, H, N, d]`` (live or cached)."""
        prev: list[torch.Tensor | None] = [None] * len(branches)
        hs: list[list[torch.Tensor]] = [[] for _ in branches]
        atts: list[list[torch.Tensor]] = [[] for _ in branches]
        ffns: list[list[torch.Tensor]] = [[] for _ in branches]
        for i in range(self.depth):
            stored = next(kv_blocks)
            with torch.no_grad():
                # live K/V already have the compute dtype (no-op); cached fp32 K/V under autocast are cast once
                # per block for every branch; cached bf16 K/V are read as stored (the attention runs in bf16)
                device = stored.device.type
                dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
                kv = stored if stored.dtype in (torch.bfloat16, torch.float16) else stored.to(dtype)
                kv_saved = stored.to(torch.bfloat16) if self.memory_mode == "kv_bf16" else kv
            for b, branch in enumerate(branches):
                p = branch.synthesize(i, prev[b], batch)
                p, f_att, f_ffn = self._query_block(i, p, kv, kv_saved, branch.generator)
                if p.shape[1] > 1:
                    p, f_att, f_ffn = p.mean(1, keepdim=True), f_att.mean(1, keepdim=True), f_ffn.mean(1, keepdim=True)
                prev[b] = p
                hs[b].append(p)
                atts[b].append(f_att)
                ffns[b].append(f_ffn)
            del kv, kv_saved, stored
        logits = []
        for b, branch in enumerate(branches):
            feats = torch.cat([hs[b][-1], *hs[b], *atts[b], *ffns[b]], dim=1)
            logits.append(branch.head(feats, branch.generator))
        return logits

    def forward_branches(self, branches: Sequence[QueryBranch], images: torch.Tensor | None = None, *,
                         kv: torch.Tensor | Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Logits of any query branches sized for this backbone (e.g. weight snapshots) over one frozen pass."""
        return self._run(images, branches, kv)

    @torch.no_grad()
    def image_stream(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The output of every frozen block on the image tokens (before timm's final norm)."""
        x = self._embed(images)
        outs = []
        for i in range(self.depth):
            x, _ = self._image_block(i, x)
            outs.append(x)
        return outs


class SynQT(_FrozenStream):
    """A frozen timm ViT plus one trainable ``QueryBranch``; ``forward(images) -> logits``."""

    def __init__(self, backbone: nn.Module, num_classes: int, *, token_nums: int = 1, feat_scale: float = 1.0,
                 attn_scale: float = 1.0, ffn_scale: float = 1.0, drop_path_rate: float = 0.1,
                 backbone_drop_path: bool = True, memory_mode: str = "keep", ffn_hidden: int = 48,
                 attn_hidden: int = 8) -> None:
        super().__init__(backbone, drop_path_rate=drop_path_rate, backbone_drop_path=backbone_drop_path,
                         memory_mode=memory_mode)
        self.branch = QueryBranch(embed_dim=self.embed_dim, depth=self.depth, num_classes=num_classes,
                                  token_nums=token_nums, feat_scale=feat_scale, attn_scale=attn_scale,
                                  ffn_scale=ffn_scale, ffn_hidden=ffn_hidden, attn_hidden=attn_hidden)
        copy_final_norm(self.backbone, self.branch)

    def forward(self, images: torch.Tensor | None = None, *,
                kv: torch.Tensor | Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        return self._run(images, [self.branch], kv)[0]

    def named_trainable_parameters(self):
        """The query branch, the head norm and the classifier: everything but the backbone."""
        for name, param in self.branch.named_parameters():
            yield f"branch.{name}", param

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    @property
    def backbone_identity(self) -> dict:
        return dict(getattr(self.backbone, "synqt_identity", {}))


class PackedSynQT(_FrozenStream):
    """k query branches trained in lockstep over one frozen image stream (one forward feeds them all).

    In ``keep`` mode every branch's query-only attention saves the same K/V tensors, so memory grows by
    the query path per branch, not by K/V. ``forward(images, active=None)`` returns one logits tensor
    per active branch index.
    """

    def __init__(self, backbone: nn.Module, branches: Sequence[QueryBranch], *, drop_path_rate: float = 0.1,
                 backbone_drop_path: bool = True, memory_mode: str = "keep") -> None:
        super().__init__(backbone, drop_path_rate=drop_path_rate, backbone_drop_path=backbone_drop_path,
                         memory_mode=memory_mode)
        for branch in branches:
            if (branch.embed_dim, branch.depth) != (self.embed_dim, self.depth):
                raise ModelError(
                    f"a branch built for embed_dim={branch.embed_dim}, depth={branch.depth} cannot read a backbone "
                    f"with embed_dim={self.embed_dim}, depth={self.depth}"
                )
        self.branches = nn.ModuleList(branches)

    def forward(self, images: torch.Tensor | None = None, active: Sequence[int] | None = None, *,
                kv: torch.Tensor | Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Logits per active branch, from ``images`` or from cached per-block ``kv`` (see ``_run``)."""
        chosen = [self.branches[i] for i in (range(len(self.branches)) if active is None else active)]
        return self._run(images, chosen, kv)


def new_branch(backbone: nn.Module, num_classes: int, *, token_nums: int = 1, feat_scale: float = 1.0,
               attn_scale: float = 1.0, ffn_scale: float = 1.0, drop: float = 0.1, attn_drop: float = 0.1,
               head_drop_path: float = 0.3) -> QueryBranch:
    """A fresh query branch sized from ``backbone`` with LN_head copied from its final norm.

    ``drop``: the branch's dropout (adapters, QSM output, synthesized query, head weights; official 0.1);
    ``attn_drop``: dropout on the QSM attention probabilities (official 0.1); ``head_drop_path``: the
    head's per-token drop path (official 0.3).
    """
    branch = QueryBranch(embed_dim=int(backbone.embed_dim), depth=len(backbone.blocks), num_classes=num_classes,
                         token_nums=token_nums, feat_scale=feat_scale, attn_scale=attn_scale, ffn_scale=ffn_scale,
                         drop=drop, attn_drop=attn_drop, head_drop_path=head_drop_path)
    copy_final_norm(backbone, branch)
    return branch


def build_model(backbone: str | nn.Module, num_classes: int, *, token_nums: int = 1, feat_scale: float = 1.0,
                attn_scale: float = 1.0, ffn_scale: float = 1.0, drop_path_rate: float = 0.1,
                backbone_drop_path: bool = True, checkpoint: Any = None, memory_mode: str = "keep",
                **backbone_kwargs: Any) -> SynQT:
    """Build SynQT on a timm ViT given by name or already built; ``checkpoint`` loads the backbone.

    ``checkpoint`` is a local file (Google ``.npz``, ``.pth``/``.bin``, ``.safetensors``) or a state dict;
    nothing is ever downloaded.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive int, got {num_classes!r}")
    frozen = build_backbone(backbone, drop_path_rate=drop_path_rate, checkpoint=checkpoint, **backbone_kwargs)
    return SynQT(frozen, num_classes, token_nums=token_nums, feat_scale=feat_scale, attn_scale=attn_scale,
                 ffn_scale=ffn_scale, drop_path_rate=drop_path_rate, backbone_drop_path=backbone_drop_path,
                 memory_mode=memory_mode)


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def expected_trainable(embed_dim: int, depth: int, token_nums: int, num_classes: int) -> int:
    """Closed form of the trainable-parameter count (spec section 3), for any backbone size."""
    c = embed_dim
    adapter = lambda h: c * h + h + h * c + c  # noqa: E731
    ln = 2 * c
    per_block = adapter(48) + (2 * ln + 2 * ln + 4 * adapter(8) + 2 + adapter(48))
    head = ln + adapter(48) + (c * 3 * depth + 3 * depth) + ln
    return depth * per_block + 1 + head + depth * token_nums * c + (c + 1) * num_classes


__all__ = [
    "SynQT", "PackedSynQT",
    "build_model", "build_backbone", "check_backbone", "new_branch", "count_trainable", "expected_trainable",
    "copy_final_norm", "MEMORY_MODES",
]
