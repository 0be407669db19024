"""Checkpoints: backbone weights in, official SynQT state dicts in and out, trainable-only files.

Conversions are explicit key maps, never patches: the official implementation's names (spec
section 4) map one to one onto this package's modules, both ways.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from synqt.errors import ModelError
from synqt.storage import atomic_write_safetensors, sha256_file
from synqt.weights.identify import (  # noqa: F401 - RANDOM, is_random, require_backbone_weights: re-exported
    RANDOM,
    check_file,
    check_fit,
    grid,
    is_random,
    model_geometry,
    npz_geometry,
    npz_required_keys,
    require_backbone_weights,
    sniff,
    state_dict_geometry,
)

log = logging.getLogger(__name__)

TRAINABLE_FORMAT = "synqt-trainable"
TRAINABLE_VERSION = "1"

# ---------------------------------------------------------------------------------------------------------------
# backbone checkpoints


def _unwrap_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ModelError(f"checkpoint {source}: expected a state dict (a mapping of tensors), got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor):
            raise ModelError(f"checkpoint {source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[str(key).removeprefix("module.")] = value
    # a wrapper module's name on every key (Lightning, EMA helpers): "model.blocks.0..." -> "blocks.0..."
    if out and all(k.startswith("model.") for k in out):
        out = {k.removeprefix("model."): v for k, v in out.items()}
    return out


def read_state_dict(path: str | Path, kind: str | None = None) -> dict[str, torch.Tensor]:
    """Read a PyTorch (``weights_only=True``: a checkpoint never runs code) or safetensors file.

    The content decides the reader (``synqt.weights.identify.sniff``); a file that is not complete weights
    (cut off, an HTML page, an LFS pointer ...) is refused naming what it holds.
    """
    path = Path(path)
    kind = kind or check_file(path)
    if kind == "npz":
        raise ModelError(f"checkpoint {path} holds a Google ViT .npz; expected a PyTorch or safetensors state dict "
                         "(load it as a backbone checkpoint, or rename it to .npz)")
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return _unwrap_state_dict(load_file(str(path)), str(path))
        except SafetensorError as err:
            raise ModelError(f"checkpoint {path}: damaged safetensors file: {err}") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # an object that is not a tensor: unpickling it would run code
        raise ModelError(f"checkpoint {path} holds objects other than tensors and cannot be read with "
                         f"weights_only=True (loading it would run code): {str(err).splitlines()[0]}") from err
    except Exception as err:  # a damaged archive or pickle
        raise ModelError(f"checkpoint {path} could not be read with weights_only=True: "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    return _unwrap_state_dict(obj, str(path))


def _npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Entry name -> shape of every array in an npz, read from the .npy headers only (no data)."""
    shapes = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                with zf.open(name) as fh:
                    version = np.lib.format.read_magic(fh)
                    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, _ = reader(fh)
                shapes[name.removesuffix(".npy")] = tuple(int(d) for d in shape)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise ModelError(f"checkpoint {path}: damaged .npz: {err}") from err
    return shapes


def _log_pos_grid(source: str, model: nn.Module, old_tokens: int | None) -> None:
    """The one adaptation ever made: log it once, with both grids."""
    new_tokens = int(model.pos_embed.shape[1]) if getattr(model, "pos_embed", None) is not None else None
    if old_tokens is None or new_tokens is None or old_tokens == new_tokens:
        return
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    log.warning("checkpoint %s: position embedding %s resampled to %s (grid %s -> %s, timm's resampling); "
                "every other tensor is loaded unchanged", source, (1, old_tokens, model.embed_dim),
                tuple(model.pos_embed.shape), grid(old_tokens, prefix), grid(new_tokens, prefix))


def _check_finite(source: str, named: Iterable[tuple[str, torch.Tensor]]) -> None:
    for key, value in named:
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ModelError(f"checkpoint {source}: tensor {key!r} holds {bad} NaN/inf value(s); expected finite "
                             "weights (a damaged or diverged checkpoint)")


def _load_npz(model: nn.Module, path: Path) -> None:
    from timm.models.vision_transformer import _load_weights

    shapes = _npz_shapes(path)
    prefix = next((p for p in ("", "opt/target/", "params/") if f"{p}embedding/kernel" in shapes), None)
    if prefix is None:
        raise ModelError(f"checkpoint {path}: not a Google ViT npz (no 'embedding/kernel' entry); it holds "
                         f"{sorted(shapes)[:5]}")
    found = npz_geometry(shapes, prefix)
    stacked = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in shapes  # big_vision: blocks stacked
    missing = [] if stacked else [k for k in npz_required_keys(model, prefix) if k not in shapes]
    check_fit(str(path), found, model_geometry(model), missing)
    _log_pos_grid(str(path), model, found.pos_tokens)
    try:
        _load_weights(model, str(path))
    except Exception as err:
        raise ModelError(f"checkpoint {path}: timm's npz loader failed: {err}") from err
    _check_finite(str(path), model.state_dict().items())


def _patch_of_raw(raw: Mapping[str, torch.Tensor]) -> tuple[int, int] | None:
    """Patch size of a state dict before timm's conversion (which would resample a different one)."""
    for key, value in raw.items():
        if value.ndim == 4 and (key.endswith("patch_embed.proj.weight") or key.endswith("visual.conv1.weight")
                                or "patchifier" in key or "patch_generator" in key):
            return int(value.shape[-2]), int(value.shape[-1])
    return None


def load_backbone_checkpoint(model: nn.Module, checkpoint: str | Path | Mapping[str, Any]) -> None:
    """Load backbone weights; the checkpoint's own classifier (``head.*``, ``pre_logits``) is dropped.

    Every format follows one rule (``synqt.weights.identify``): a file that is not complete weights, or
    weights of another geometry (patch size, width, depth, MLP width, class token, heads), is
    refused naming the file, what was found and what was expected; only the position-embedding
    grid is adapted, logged once.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint)
        kind = check_file(path)
        if kind == "npz":
            _load_npz(model, path)
            return
        raw = read_state_dict(path, kind)
        source = str(path)
    else:
        source = "state dict"
        raw = _unwrap_state_dict(checkpoint, source)
    dropped = [k for k in raw if k.startswith(("head.", "pre_logits.", "synqt."))]
    state = {k: v for k, v in raw.items() if k not in set(dropped)}
    if dropped:
        log.info("checkpoint %s: not loading %d classifier/SynQT entries (%s...)", source, len(dropped), dropped[0])
    expected = model_geometry(model)
    raw_patch = _patch_of_raw(state)
    before = state_dict_geometry({k: tuple(v.shape) for k, v in state.items()})
    if before.patch is not None:  # timm-named: refuse before timm's conversion resamples anything
        check_fit(source, before, expected)
    own = model.state_dict()
    state = checkpoint_filter_fn(state, model)
    after = state_dict_geometry({k: tuple(v.shape) for k, v in state.items()})
    after.patch = raw_patch or after.patch  # the patch size as stored, not as timm resampled it
    check_fit(source, after, expected)
    for key, value in state.items():
        if key in own and tuple(value.shape) != tuple(own[key].shape):
            raise ModelError(
                f"checkpoint {source}: {key!r} has shape {tuple(value.shape)} but the backbone expects "
                f"{tuple(own[key].shape)}"
            )
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ModelError(
            f"checkpoint {source} does not fit the backbone: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    _check_finite(source, state.items())
    _log_pos_grid(source, model, before.pos_tokens)
    model.load_state_dict(state, strict=True)


def weights_text(identity: Mapping[str, Any] | None) -> str:
    """One line saying which backbone weights a model holds, from its ``backbone_identity``."""
    identity = identity or {}
    ckpt = identity.get("checkpoint")
    if ckpt == RANDOM:
        return "random initialisation (checkpoint=random)"
    if ckpt is None:
        return "random initialisation (no checkpoint)"
    where = identity.get("checkpoint_path") or ckpt
    sha = identity.get("checkpoint_sha256")
    return f"{where} (sha256 {sha})" if sha else str(where)


def backbone_identity(model: nn.Module, name: str, kwargs: Mapping[str, Any] | None,
                      checkpoint: Any) -> dict[str, Any]:
    """What a trainable-only checkpoint records so it is never loaded onto another backbone."""
    ckpt_path = None
    if is_random(checkpoint):
        ckpt_name, ckpt_hash = RANDOM, None
    elif isinstance(checkpoint, (str, Path)):
        ckpt_name, ckpt_hash = Path(checkpoint).name, sha256_file(checkpoint)
        ckpt_path = str(Path(checkpoint).absolute())
    elif checkpoint is None:
        ckpt_name, ckpt_hash = None, None
    else:
        ckpt_name, ckpt_hash = "state dict", None
    return {
        "name": name,
        "kwargs": json.loads(json.dumps(dict(kwargs or {}), default=str)),
        "embed_dim": int(model.embed_dim),
        "depth": len(model.blocks),
        "num_heads": int(model.blocks[0].attn.num_heads),
        "checkpoint": ckpt_name,
        "checkpoint_sha256": ckpt_hash,
        "checkpoint_path": ckpt_path,
    }


# ---------------------------------------------------------------------------------------------------------------
# the official SynQT state dict (spec section 4)

_PLACEHOLDERS = {"i": r"\d+", "wb": r"weight|bias", "fc": r"fc[12]\.(?:weight|bias)"}

# (official template, template relative to QueryBranch)
OFFICIAL_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("synqt.q", "queries"),
    ("synqt.feat_scale", "feat_scale"),
    ("synqt.prompt_ffn.{i}.mlp.{fc}", "prompt_ffns.{i}.{fc}"),
    ("synqt.qsm_block.{i}.attn_scale", "qsm_blocks.{i}.attn_scale"),
    ("synqt.qsm_block.{i}.ffn_scale", "qsm_blocks.{i}.ffn_scale"),
    ("synqt.qsm_block.{i}.norm1.{wb}", "qsm_blocks.{i}.norm1.{wb}"),
    ("synqt.qsm_block.{i}.norm2.{wb}", "qsm_blocks.{i}.norm2.{wb}"),
    ("synqt.qsm_block.{i}.attn.q_proj.mlp.{fc}", "qsm_blocks.{i}.attn.q_adapter.{fc}"),
    ("synqt.qsm_block.{i}.attn.k_proj.mlp.{fc}", "qsm_blocks.{i}.attn.k_adapter.{fc}"),
    ("synqt.qsm_block.{i}.attn.v_proj.mlp.{fc}", "qsm_blocks.{i}.attn.v_adapter.{fc}"),
    ("synqt.qsm_block.{i}.attn.proj.mlp.{fc}", "qsm_blocks.{i}.attn.out_adapter.{fc}"),
    ("synqt.qsm_block.{i}.attn.q_norm.{wb}", "qsm_blocks.{i}.attn.q_norm.{wb}"),
    ("synqt.qsm_block.{i}.attn.kv_norm.{wb}", "qsm_blocks.{i}.attn.kv_norm.{wb}"),
    ("synqt.qsm_block.{i}.mlp.mlp.{fc}", "qsm_blocks.{i}.ffn.{fc}"),
    ("synqt.out_norm.{wb}", "head.out_norm.{wb}"),
    ("synqt.mlp.mlp.{fc}", "head.adapter.{fc}"),
    ("synqt.out_combine.get_weight.fc1.{wb}", "head.weight_gen.{wb}"),
    ("synqt.head_norm.{wb}", "head.head_norm.{wb}"),
    ("head.{wb}", "head.classifier.{wb}"),
)
# created but never used by the official code: accepted and dropped on load, zero-filled on export
OFFICIAL_UNUSED = ("synqt.pre_norm.{i}.{wb}", "synqt.out_combine.weight")


def _compile(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for name, sub in _PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{sub})")
    return re.compile(pattern + r"\Z")


_TO_OURS = [(_compile(off), ours) for off, ours in OFFICIAL_KEY_MAP]
_TO_OFFICIAL = [(_compile(ours), off) for off, ours in OFFICIAL_KEY_MAP]
_UNUSED = [_compile(t) for t in OFFICIAL_UNUSED]


def _translate(key: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in table:
        match = pattern.match(key)
        if match:
            return template.format(**match.groupdict())
    return None


def _branch_and_backbone(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    if not (hasattr(model, "branch") and hasattr(model, "backbone")):
        raise ModelError(f"expected a SynQT model, got {type(model).__name__}")
    return model.branch, model.backbone


def load_official_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a state dict saved from the official implementation (spec section 4) into ``model``.

    The two tensors the official code creates but never uses are dropped; any other key that is
    missing or unexpected, and any shape mismatch, raises ``ModelError`` naming the key.
    """
    branch, backbone = _branch_and_backbone(model)
    branch_state, backbone_state, unexpected = {}, {}, []
    backbone_keys = set(backbone.state_dict())
    for key, value in _unwrap_state_dict(state_dict, "official state dict").items():
        ours = _translate(key, _TO_OURS)
        if ours is not None:
            branch_state[ours] = value
        elif any(p.match(key) for p in _UNUSED):
            continue
        elif key in backbone_keys:
            backbone_state[key] = value
        else:
            unexpected.append(key)
    def official_name(key: str) -> str:
        return _translate(key, _TO_OFFICIAL) or key

    # check both parts before loading either, so a bad key never leaves the model half-loaded
    branch_state = _checked(branch, branch_state, "official state dict", unexpected, official_name)
    backbone_state = _checked(backbone, backbone_state, "official state dict", [])
    branch.load_state_dict(branch_state, strict=True)
    backbone.load_state_dict(backbone_state, strict=True)


def _checked(module: nn.Module, state: dict[str, torch.Tensor], source: str, unexpected: list[str],
             display: Callable[[str], str] = str) -> dict[str, torch.Tensor]:
    """``state`` restricted to ``module``'s keys; raises naming (as ``display`` shows them) any bad key."""
    own = module.state_dict()
    unexpected = list(unexpected) + [display(k) for k in state if k not in own]
    state = {k: v for k, v in state.items() if k in own}
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ModelError(
                f"{source}: {display(key)!r} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
    missing = [display(k) for k in own if k not in state]
    if missing or unexpected:
        raise ModelError(f"{source}: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    return state


def to_official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The official implementation's state dict for ``model``: backbone keys, ``synqt.*`` and ``head.*``.

    Includes zero-filled versions of the official code's two unused tensors so that its strict
    ``load_state_dict`` accepts the result.
    """
    branch, backbone = _branch_and_backbone(model)
    out: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    for key, value in branch.state_dict().items():
        official = _translate(key, _TO_OFFICIAL)
        if official is None:
            raise ModelError(f"no official name for parameter {key!r}")
        out[official] = value.detach().clone()
    dim, depth = branch.embed_dim, branch.depth
    ref = branch.queries
    for i in range(depth):
        out[f"synqt.pre_norm.{i}.weight"] = ref.new_zeros(dim)
        out[f"synqt.pre_norm.{i}.bias"] = ref.new_zeros(dim)
    out["synqt.out_combine.weight"] = ref.new_zeros(1 + 3 * depth)
    return out


# ---------------------------------------------------------------------------------------------------------------
# trainable-only checkpoints: safetensors with a small JSON header


def _branch_of(model_or_branch: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    if hasattr(model_or_branch, "branch"):
        return model_or_branch.branch, dict(getattr(model_or_branch.backbone, "synqt_identity", {}))
    return model_or_branch, {}


def save_trainable(model: nn.Module, path: str | Path, *, backbone_identity: Mapping[str, Any] | None = None,
                   extra: Mapping[str, Any] | None = None) -> Path:
    """Write the query branch, head norm and classifier (~10 MB for ViT-B in fp32), atomically."""
    branch, identity = _branch_of(model)
    identity = dict(backbone_identity or identity)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in branch.state_dict().items()}
    header = {
        "format": TRAINABLE_FORMAT,
        "version": TRAINABLE_VERSION,
        "backbone": json.dumps(identity, sort_keys=True, default=str),
        "branch": json.dumps({"embed_dim": branch.embed_dim, "depth": branch.depth,
                              "num_classes": branch.num_classes, "token_nums": branch.token_nums}),
        "extra": json.dumps(dict(extra or {}), default=str),
    }
    return atomic_write_safetensors(path, tensors, header)


def read_trainable(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and decoded header of a trainable-only file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"trainable checkpoint {path} does not exist")
    # the same content rule as backbone files: a text, HTML or cut-off file is named, never a parser traceback
    kind, what = sniff(path)
    if kind != "safetensors":
        raise ModelError(f"trainable checkpoint {path} is {what}; "
                         "expected the trainable.safetensors a synqt run writes")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if meta.get("format") != TRAINABLE_FORMAT:
        raise ModelError(f"{path} is not a synqt trainable checkpoint (header format {meta.get('format')!r})")
    header = {k: json.loads(meta[k]) for k in ("backbone", "branch", "extra") if k in meta}
    header["version"] = meta.get("version")
    return tensors, header


def load_trainable(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a trainable-only file; refuse one saved on a different backbone. Returns its header."""
    branch, identity = _branch_of(model)
    tensors, header = read_trainable(path)
    saved = header.get("backbone", {})
    for key in ("name", "embed_dim", "depth", "num_heads", "checkpoint_sha256"):
        ours, theirs = identity.get(key), saved.get(key)
        # a branch is meaningless on any other weights: trained on loaded weights, on random ones or another
        # file; trained on a random backbone (no sha256 recorded), on loaded ones
        if key == "checkpoint_sha256":
            differs = ours != theirs
        else:
            differs = theirs is not None and ours is not None and ours != theirs
        if differs:
            raise ModelError(
                f"trainable checkpoint {path} was trained on backbone {saved.get('name')!r} "
                f"(checkpoint {saved.get('checkpoint')!r}, {key}={theirs!r}) and cannot be loaded onto backbone "
                f"{identity.get('name')!r} (checkpoint {identity.get('checkpoint')!r}, {key}={ours!r})"
            )
    branch.load_state_dict(_checked(branch, tensors, f"trainable checkpoint {path}", []), strict=True)
    return header
