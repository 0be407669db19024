"""The one place that builds a frozen backbone and a query branch from a TrialConfig.

Every trainer, the launcher's shared backbone and ``synqt bench`` come here, so a backbone is built,
seeded and loaded the same way whichever path runs the trial.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from synqt.config import TrialConfig, effective_seeds
from synqt.model.branch import QueryBranch
from synqt.model.stream import build_backbone, new_branch
from synqt.training.loop import derive_seed
from synqt.weights.identify import is_random, require_backbone_weights


def backbone_key(cfg: TrialConfig) -> str:
    """Trials with equal keys can share one frozen backbone (same name, kwargs and checkpoint)."""
    return json.dumps([cfg.backbone, cfg.backbone_kwargs, cfg.checkpoint], sort_keys=True, default=str)


def frozen_backbone(cfg: TrialConfig, *, state: Mapping[str, Any] | None = None,
                    identity: dict[str, Any] | None = None, checkpoint: Any = "config") -> nn.Module:
    """The frozen timm ViT of ``cfg`` (eval mode, no gradients).

    ``state``: its weights already read (a state dict in timm naming, tensors or numpy arrays, e.g. the
    launcher's copy from the Ray object store): the model is built on the meta device and the arrays are
    assigned without a copy; ``identity`` is what the weights record (computed from ``cfg.checkpoint`` if
    None). Otherwise the weights come from ``checkpoint`` (default: ``cfg.checkpoint``). The configured
    checkpoint must be set: a path, or ``random`` on purpose (``require_backbone_weights``: ConfigError
    otherwise). A random backbone (``random``, or ``checkpoint=None`` passed explicitly) has its init drawn
    from ``data_seed``, so a resumed run, every branch of a pack and ``evaluate_checkpoint`` get the same
    backbone whatever the global RNG state.
    """
    kwargs = dict(cfg.backbone_kwargs or {})
    if state is None:
        if checkpoint == "config":  # the rule for a trial's weights lives here, where every backbone is built
            ckpt = require_backbone_weights(cfg.checkpoint, f"dataset {cfg.dataset!r}")
        else:
            ckpt = checkpoint
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(effective_seeds(cfg)[0], 3))
            return build_backbone(cfg.backbone, drop_path_rate=cfg.drop_path_rate, checkpoint=ckpt, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # object-store arrays are read-only; the backbone is frozen
        tensors = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else torch.as_tensor(v)
                   for k, v in state.items()}
        try:
            with torch.device("meta"):
                model = build_backbone(cfg.backbone, drop_path_rate=cfg.drop_path_rate, checkpoint=None, **kwargs)
            model.load_state_dict(tensors, strict=True, assign=True)
            if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
                raise RuntimeError("meta tensors left")
        except Exception:  # noqa: BLE001 - a model with non-persistent buffers: build normally, still assign
            model = build_backbone(cfg.backbone, drop_path_rate=cfg.drop_path_rate, checkpoint=None, **kwargs)
            model.load_state_dict(tensors, strict=True, assign=True)
    model.requires_grad_(False)
    model.eval()
    if identity is None:
        from synqt.weights.checkpoint import backbone_identity

        identity = backbone_identity(model, cfg.backbone, cfg.backbone_kwargs, cfg.checkpoint)
    model.synqt_identity = identity
    return model


def shareable_state(cfg: TrialConfig) -> dict[str, Any] | None:
    """``{"state": numpy arrays, "identity": ...}`` of ``cfg``'s loaded backbone, to share between processes;
    None for a random backbone (each trainer seeds its own) or tensors numpy cannot hold (bf16)."""
    if not cfg.checkpoint or is_random(cfg.checkpoint):
        return None
    model = frozen_backbone(cfg)
    sd = model.state_dict()
    if any(v.dtype == torch.bfloat16 for v in sd.values()):
        return None
    return {"state": {k: v.detach().cpu().contiguous().numpy() for k, v in sd.items()},
            "identity": getattr(model, "synqt_identity", None)}


def branch_for(cfg: TrialConfig, backbone: nn.Module, num_classes: int) -> QueryBranch:
    """A query branch shaped for ``cfg`` (T, the three scales and the branch's dropout / drop-path rates),
    initialised from torch's global generator as it stands (e.g. to load a weight snapshot into)."""
    return new_branch(backbone, num_classes, token_nums=cfg.token_nums, feat_scale=cfg.feat_scale,
                      attn_scale=cfg.attn_scale, ffn_scale=cfg.ffn_scale, drop=cfg.branch_dropout,
                      attn_drop=cfg.branch_attn_dropout, head_drop_path=cfg.head_drop_path)


def seeded_branch(cfg: TrialConfig, backbone: nn.Module, num_classes: int) -> QueryBranch:
    """A fresh query branch for ``cfg`` (``branch_for``), its init drawn from ``init_seed``."""
    torch.manual_seed(effective_seeds(cfg)[1])
    return branch_for(cfg, backbone, num_classes)
