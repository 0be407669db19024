"""What a backbone checkpoint file is, and whether it is a complete ViT that fits the backbone.

One rule for every format (Google ``.npz``, PyTorch ``.pth``/``.pt``/``.bin``/``.ckpt``,
``.safetensors``, an in-memory state dict):

1. ``sniff`` reads the first bytes and tells what the file holds: a weights format (npz, PyTorch
   zip, legacy pickle, safetensors) -- checked to be complete -- or what it is instead (an HTML
   error page, a Git LFS pointer, an empty file, a cut-off download, JSON, an archive). A file
   that is not complete weights is refused with ``ModelError`` naming the file, what was found
   and what was expected, before anything is built or trained.
2. ``Geometry`` is read from the checkpoint's tensor shapes (patch size, input channels, width,
   depth, MLP width, class token, heads where the format records them) and compared with the
   backbone's; every difference is named in one refusal. Nothing but the position-embedding grid
   is ever adapted (timm resamples it), and that is logged once, with both grids.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synqt.errors import ConfigError, ModelError

PYTORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SUFFIXES = (".npz", *PYTORCH_SUFFIXES, ".safetensors")
# What each suffix should hold, for messages.
EXPECTED = {
    ".npz": "a Google ViT .npz (a zip of .npy arrays)",
    ".safetensors": "a safetensors file",
    **{s: "a PyTorch state dict (torch.save zip or pickle)" for s in PYTORCH_SUFFIXES},
}
WEIGHT_KINDS = ("npz", "torch_zip", "torch_pickle", "safetensors")


RANDOM = "random"  # checkpoint=random: a randomly initialised backbone, asked for on purpose


def is_random(checkpoint: Any) -> bool:
    """True for ``checkpoint=random`` (any case)."""
    return isinstance(checkpoint, str) and checkpoint.strip().lower() == RANDOM


def require_backbone_weights(checkpoint: Any, where: str) -> Any:
    """The rule for a trial's backbone weights: a path (or state dict), or ``random`` said explicitly.

    Returns ``checkpoint`` unchanged. A missing one (None or empty) raises ConfigError naming
    ``where``: a VTAB-1k/FGVC recipe on a random backbone gives numbers near chance, so it must
    never happen by omission.
    """
    if checkpoint is None or (isinstance(checkpoint, (str, Path)) and not str(checkpoint).strip()):
        raise ConfigError(
            f"{where}: no backbone weights: key 'checkpoint' is not set. Set checkpoint=/path/to/ViT-B_16.npz "
            "(the pre-trained weights the recipe expects; .npz, .pth, .bin or .safetensors), or checkpoint=random "
            "to train on a randomly initialised backbone on purpose (demos, tests)"
        )
    return checkpoint


def _preview(data: bytes, n: int = 60) -> str:
    text = data[:n].decode("utf-8", "replace")
    return json.dumps(text)[1:-1]  # escapes newlines and control characters


def sniff(path: Path) -> tuple[str, str]:
    """``(kind, description)`` of a file's content.

    ``kind`` is one of WEIGHT_KINDS for complete weight files, otherwise ``"bad"`` with a
    description of what the file holds instead (cut-off download, HTML page, LFS pointer ...).
    """
    size = path.stat().st_size
    if size == 0:
        return "bad", "an empty file (0 bytes)"
    with open(path, "rb") as fh:
        head = fh.read(4096)
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        if not zipfile.is_zipfile(path):
            return "bad", (f"a cut-off zip archive ({size} bytes, no end-of-central-directory record): "
                           "the download or copy is incomplete")
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
                bad = zf.testzip() if size < (64 << 20) else None  # CRC check where it is cheap
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            return "bad", f"a damaged zip archive ({size} bytes): {e}"
        if bad is not None:
            return "bad", f"a damaged zip archive ({size} bytes): member {bad!r} fails its CRC check"
        if any(n.endswith("data.pkl") for n in names):
            return "torch_zip", "a PyTorch zip (torch.save)"
        if names and all(n.endswith(".npy") for n in names):
            return "npz", "a numpy .npz"
        return "bad", f"a zip archive of other files ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''})"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "torch_pickle", "a pickle (legacy torch.save)"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 2 <= n < (100 << 20):
            if 8 + n > size:
                return "bad", (f"a cut-off safetensors file: its header is {n} bytes but the file has only {size}")
            with open(path, "rb") as fh:
                fh.seek(8)
                try:
                    header = json.loads(fh.read(n))
                except ValueError as e:
                    return "bad", f"a safetensors file with a damaged header ({e})"
            ends = [v["data_offsets"][1] for k, v in header.items()
                    if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
            need = 8 + n + max(ends, default=0)
            if need > size:
                return "bad", (f"a cut-off safetensors file: its header describes {need} bytes but the file "
                               f"has only {size} ({100 * size / need:.0f} %)")
            return "safetensors", "a safetensors file"
    if stripped.startswith(b"version https://git-lfs"):
        return "bad", (f"a Git LFS pointer file ({size} bytes), not the weights: fetch them with `git lfs pull` "
                       "or download the file itself")
    low = stripped[:200].lower()
    if low.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body", b"<")):
        return "bad", (f"an HTML/XML page ({size} bytes, starts with \"{_preview(stripped)}\"): a download "
                       "saved an error or login page instead of the weights")
    if stripped[:1] in (b"{", b"["):
        return "bad", f"a JSON/text document ({size} bytes, starts with \"{_preview(stripped)}\")"
    if head[:2] == b"\x1f\x8b":
        return "bad", "a gzip archive: unpack it first"
    if len(head) > 262 and head[257:262] == b"ustar":
        return "bad", "a tar archive: unpack it first"
    if head[:6] == b"\x93NUMPY":
        return "bad", "a single numpy .npy array, not an .npz of named arrays"
    try:
        head.decode("utf-8")
        return "bad", f"a text file ({size} bytes, starts with \"{_preview(stripped)}\")"
    except UnicodeDecodeError:
        return "bad", f"unrecognised binary content ({size} bytes, first bytes {head[:8].hex(' ')})"


def check_file(path: Path) -> str:
    """The weights kind of ``path``; ModelError naming the file, what it holds and what was expected."""
    if not path.is_file():
        raise ModelError(f"checkpoint file {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ModelError(
            f"checkpoint {path}: unknown format {suffix!r}; expected .npz, .pth, .pt, .bin, .ckpt or .safetensors"
        )
    try:
        kind, what = sniff(path)
    except OSError as e:
        raise ModelError(f"checkpoint {path} cannot be read: {e}") from e
    if kind == "bad":
        raise ModelError(f"checkpoint {path} is {what}; expected {EXPECTED[suffix]}")
    return kind


# ---------------------------------------------------------------------------------------------------------------
# geometry


@dataclass
class Geometry:
    """The shape-defining facts of a ViT; None where a source does not record one."""

    patch: tuple[int, int] | None = None
    in_chans: int | None = None
    width: int | None = None
    depth: int | None = None
    mlp: int | None = None
    heads: int | None = None
    cls_token: bool | None = None
    pos_tokens: int | None = None

    def describe(self) -> str:
        parts = []
        if self.patch is not None:
            parts.append(f"patch {self.patch[0]}x{self.patch[1]}")
        for name, value in (("input channels", self.in_chans), ("width", self.width), ("depth", self.depth),
                            ("MLP width", self.mlp), ("heads", self.heads)):
            if value is not None:
                parts.append(f"{name} {value}")
        if self.cls_token is not None:
            parts.append("class token" if self.cls_token else "no class token")
        return ", ".join(parts) or "no ViT tensors"


FIELDS = (("patch", "patch size"), ("in_chans", "input channels"), ("width", "width (embed_dim)"),
          ("depth", "depth (blocks)"), ("mlp", "MLP width"), ("heads", "heads"), ("cls_token", "class token"))


def model_geometry(model: Any) -> Geometry:
    proj = model.patch_embed.proj.weight  # [C, in, ph, pw]
    blk = model.blocks[0]
    return Geometry(
        patch=(int(proj.shape[2]), int(proj.shape[3])),
        in_chans=int(proj.shape[1]),
        width=int(model.embed_dim),
        depth=len(model.blocks),
        mlp=int(blk.mlp.fc1.out_features),
        heads=int(blk.attn.num_heads),
        cls_token=getattr(model, "cls_token", None) is not None,
        pos_tokens=int(model.pos_embed.shape[1]) if getattr(model, "pos_embed", None) is not None else None,
    )


_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def state_dict_geometry(shapes: Mapping[str, tuple[int, ...]]) -> Geometry:
    """Geometry of a timm-named ViT state dict (after timm's checkpoint conversion; ``module.`` removed)."""
    g = Geometry()
    proj = shapes.get("patch_embed.proj.weight")
    if proj is not None and len(proj) == 4:
        g.patch, g.in_chans, g.width = (proj[2], proj[3]), proj[1], proj[0]
    elif shapes.get("cls_token") is not None:
        g.width = shapes["cls_token"][-1]
    depths = {int(m.group(1)) for k in shapes if (m := _BLOCK.search(k))}
    g.depth = max(depths) + 1 if depths else 0
    fc1 = shapes.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        g.mlp = fc1[0]
    g.cls_token = "cls_token" in shapes
    pos = shapes.get("pos_embed")
    if pos is not None:
        g.pos_tokens = pos[1] if len(pos) == 3 else None
    return g


def npz_geometry(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> Geometry:
    """Geometry of a Google ViT npz (keys as in ``ViT-B_16.npz``, under ``prefix``)."""
    g = Geometry()
    emb = shapes.get(prefix + "embedding/kernel")  # [ph, pw, in, C]
    if emb is not None and len(emb) == 4:
        g.patch, g.in_chans, g.width = (emb[0], emb[1]), emb[2], emb[3]
    blocks = {k[len(prefix):].split("/")[1] for k in shapes if k.startswith(prefix + "Transformer/encoderblock_")}
    g.depth = len(blocks)
    stacked = shapes.get(prefix + "Transformer/encoderblock/LayerNorm_0/scale")  # big_vision: [depth, C]
    if stacked is not None and len(stacked) == 2:
        g.depth = stacked[0]
    q = shapes.get(prefix + "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel")  # [C, H, d]
    if q is not None and len(q) == 3:
        g.heads = q[1]
    mlp = shapes.get(prefix + "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel")  # [C, hidden]
    if mlp is not None:
        g.mlp = mlp[1]
    g.cls_token = (prefix + "cls") in shapes
    pos = shapes.get(prefix + "Transformer/posembed_input/pos_embedding", shapes.get(prefix + "pos_embedding"))
    if pos is not None and len(pos) == 3:
        g.pos_tokens = pos[1]
    return g


def npz_required_keys(model: Any, prefix: str) -> list[str]:
    """Every entry timm's npz loader reads for ``model`` (the classic ``ViT-B_16.npz`` naming)."""
    keys = ["embedding/kernel", "embedding/bias", "Transformer/posembed_input/pos_embedding",
            "Transformer/encoder_norm/scale", "Transformer/encoder_norm/bias"]
    if getattr(model, "cls_token", None) is not None:
        keys.append("cls")
    for i in range(len(model.blocks)):
        b = f"Transformer/encoderblock_{i}/"
        keys += [b + f"{ln}/{p}" for ln in ("LayerNorm_0", "LayerNorm_2") for p in ("scale", "bias")]
        keys += [b + f"MultiHeadDotProductAttention_1/{n}/{p}" for n in ("query", "key", "value", "out")
                 for p in ("kernel", "bias")]
        keys += [b + f"MlpBlock_3/Dense_{r}/{p}" for r in (0, 1) for p in ("kernel", "bias")]
    return [prefix + k for k in keys]


def check_fit(source: str, found: Geometry, expected: Geometry, missing: list[str] | None = None) -> None:
    """Refuse (ModelError) a checkpoint whose geometry differs from the backbone's, naming every difference."""
    diffs = []
    if found.patch is None and found.width is None or not found.depth:
        diffs.append(f"no patch embedding or no blocks: not a ViT checkpoint (found {found.describe()})")
        found = Geometry()  # nothing else to compare
    for attr, label in FIELDS:
        a, b = getattr(found, attr), getattr(expected, attr)
        if a is not None and b is not None and a != b:
            fmt = (lambda v: f"{v[0]}x{v[1]}") if attr == "patch" else (lambda v: ("yes" if v else "no")
                                                                         if isinstance(v, bool) else str(v))
            diffs.append(f"{label} {fmt(a)} in the checkpoint, {fmt(b)} in the backbone")
    if diffs:
        raise ModelError(
            f"checkpoint {source} does not fit the backbone: {'; '.join(diffs)} "
            f"(checkpoint: {found.describe()}; backbone: {expected.describe()}); only the position-embedding "
            "grid is ever adapted -- choose the backbone (backbone, backbone_kwargs) the checkpoint was trained as"
        )
    if missing:
        raise ModelError(
            f"checkpoint {source} is incomplete: {len(missing)} tensor(s) the backbone needs are missing: "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''} (checkpoint: {found.describe()})"
        )


def grid(tokens: int | None, prefix_tokens: int) -> str:
    """'4x4' for a square grid of ``tokens - prefix_tokens`` positions, else the token count."""
    if tokens is None:
        return "?"
    n = tokens - prefix_tokens
    side = math.isqrt(max(n, 0))
    return f"{side}x{side}" if side * side == n else f"{tokens} tokens"


def torch_file_problem(path: str | Path) -> str | None:
    """None when ``path`` is a complete ``torch.save`` zip; else what it is instead (the backbone-file rule,
    ``sniff``: empty, cut-off zip, CRC failure, text ...)."""
    kind, what = sniff(Path(path))
    return None if kind == "torch_zip" else f"{what}, expected a complete torch.save zip"
