"""Issue 12 kind 3: checkpoint files that are not a complete, fitting ViT -- one rule for every format.

Each file is written here from a timm ViT whose geometry the test chooses (patch size, width,
depth), or is bytes the test writes (a cut-off download, an HTML page, an LFS pointer); the
expected refusal names the geometry the test chose.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from model_helpers import TINY, TINY_KW, randomize_
from safetensors.torch import save_file
from test_checkpoint import _assert_backbone_equals, _timm_vit, _to_google_npz

import synqt
from synqt.errors import ModelError

pytestmark = pytest.mark.usefixtures("one_thread")

FORMATS = ["npz", "pth", "bin", "safetensors", "state_dict"]


def _write(vit: torch.nn.Module, tmp_path: Path, fmt: str, name: str = "w"):
    """The same ViT weights in one format: a path, or the state dict itself."""
    if fmt == "npz":
        path = tmp_path / f"{name}.npz"
        np.savez(path, **_to_google_npz(vit))
        return path
    sd = {k: v.contiguous() for k, v in vit.state_dict().items()}
    if fmt == "state_dict":
        return sd
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def _build(checkpoint, **kw):
    return synqt.build_model(TINY, 3, checkpoint=checkpoint, **dict(TINY_KW, **kw))


def _our_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("synqt") and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("fmt", FORMATS)
def test_patch_size_mismatch_refused_in_every_format(tmp_path: Path, fmt: str) -> None:
    patch8 = _timm_vit(5, **dict(TINY_KW, patch_size=8))
    ckpt = _write(patch8, tmp_path, fmt)
    with pytest.raises(ModelError, match=r"does not fit the backbone: patch size 8x8 in the checkpoint, 4x4 in"):
        _build(ckpt, patch_size=4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_width_mismatch_refused_without_a_resample_log(tmp_path: Path, fmt: str, caplog) -> None:
    wide = _timm_vit(5, **dict(TINY_KW, embed_dim=64, num_heads=2))
    ckpt = _write(wide, tmp_path, fmt)
    refused = pytest.raises(ModelError, match=r"width \(embed_dim\) 64 in the checkpoint, 32")
    with caplog.at_level(logging.INFO), refused:
        _build(ckpt, img_size=48)  # another grid too: the resample must not be announced for a refused file
    assert not [m for m in _our_warnings(caplog) if "resampled" in m]


@pytest.mark.parametrize("fmt", FORMATS)
def test_wrong_depth_refused_in_every_format(tmp_path: Path, fmt: str) -> None:
    ckpt = _write(_timm_vit(5, **dict(TINY_KW, depth=3)), tmp_path, fmt)
    with pytest.raises(ModelError, match=r"depth \(blocks\) 3 in the checkpoint, 2 in the backbone"):
        _build(ckpt)


@pytest.mark.parametrize("fmt", ["npz", "pth"])
def test_input_channel_mismatch_refused(tmp_path: Path, fmt: str) -> None:
    # timm's npz loader would silently sum the kernel over input channels; a 1-channel ViT is another model
    ckpt = _write(_timm_vit(5, **dict(TINY_KW, in_chans=1)), tmp_path, fmt)
    with pytest.raises(ModelError, match=r"input channels 1 in the checkpoint, 3 in the backbone"):
        _build(ckpt)


def test_heads_mismatch_refused_where_the_format_records_heads(tmp_path: Path) -> None:
    ckpt = _write(_timm_vit(5, **dict(TINY_KW, num_heads=4)), tmp_path, "npz")
    with pytest.raises(ModelError, match=r"heads 4 in the checkpoint, 2 in the backbone"):
        _build(ckpt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_position_grid_is_the_only_adaptation_logged_once(tmp_path: Path, fmt: str, caplog) -> None:
    vit = _timm_vit(6)
    ckpt = _write(vit, tmp_path, fmt)
    with caplog.at_level(logging.INFO):
        model = _build(ckpt, img_size=48)
    warnings = _our_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "grid 4x4 -> 6x6" in warnings[0] and "(1, 17, 32)" in warnings[0] and "(1, 37, 32)" in warnings[0]
    assert model.backbone.pos_embed.shape == (1, 37, 32)
    assert torch.equal(model.backbone.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    assert torch.equal(model.backbone.patch_embed.proj.weight, vit.patch_embed.proj.weight)


def test_cut_off_npz_and_pth_name_the_incomplete_download(tmp_path: Path) -> None:
    whole = _write(_timm_vit(5), tmp_path, "npz")
    data = whole.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ModelError, match=r"cut\.npz is a cut-off zip archive .*incomplete; expected a Google ViT"):
        _build(cut)
    pth = _write(_timm_vit(5), tmp_path, "pth")
    data = pth.read_bytes()
    pth.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"w\.pth is a cut-off zip archive"):
        _build(pth)


def test_truncated_safetensors_is_refused(tmp_path: Path) -> None:
    path = _write(_timm_vit(5), tmp_path, "safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelError, match=r"w\.safetensors is a cut-off safetensors file: .*\(\d+ %\)"):
        _build(path)
    path.write_bytes(data[:20])  # cut inside the header
    with pytest.raises(ModelError, match=r"cut-off safetensors file: its header is \d+ bytes"):
        _build(path)


HTML = b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head><body>Access denied</body></html>\n"


@pytest.mark.parametrize("suffix", [".npz", ".pth", ".bin", ".safetensors"])
def test_html_error_page_is_named(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"ViT-B_16{suffix}"
    path.write_bytes(HTML)
    with pytest.raises(ModelError, match=r"is an HTML/XML page .*<!DOCTYPE html>.*error or login page"):
        _build(path)


def test_lfs_pointer_empty_file_and_json_body(tmp_path: Path) -> None:
    ptr = tmp_path / "model.safetensors"
    ptr.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "a" * 64 + "\nsize 346293852\n")
    with pytest.raises(ModelError, match=r"Git LFS pointer file .*git lfs pull"):
        _build(ptr)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match=r"empty\.pth is an empty file \(0 bytes\)"):
        _build(empty)
    body = tmp_path / "pytorch_model.bin"
    body.write_text('{"error": "Repository not found"}')
    with pytest.raises(ModelError, match=r"JSON/text document .*Repository not found"):
        _build(body)


def test_missing_tensors_refused_in_npz_and_state_dict(tmp_path: Path) -> None:
    entries = _to_google_npz(_timm_vit(5))
    del entries["Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"]
    path = tmp_path / "partial.npz"
    np.savez(path, **entries)
    with pytest.raises(ModelError, match=r"partial\.npz is incomplete: 1 tensor.*encoderblock_1/MlpBlock_3/Dense_1/b"):
        _build(path)
    sd = _timm_vit(5).state_dict()
    del sd["blocks.0.attn.qkv.bias"]
    with pytest.raises(ModelError, match=r"missing \['blocks\.0\.attn\.qkv\.bias'\]"):
        _build(sd)


@pytest.mark.parametrize("fmt", ["npz", "pth", "safetensors"])
def test_nan_weights_are_refused(tmp_path: Path, fmt: str) -> None:
    vit = _timm_vit(5)
    with torch.no_grad():
        vit.blocks[1].mlp.fc2.weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match=r"blocks\.1\.mlp\.fc2\.weight' holds 1 NaN/inf"):
        _build(_write(vit, tmp_path, fmt))


def test_not_a_vit_state_dict(tmp_path: Path) -> None:
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=0)
    path = tmp_path / "resnet.pth"
    torch.save(resnet.state_dict(), path)
    with pytest.raises(ModelError, match=r"resnet\.pth does not fit the backbone: no patch embedding or no blocks"):
        _build(path)


def test_content_decides_the_reader(tmp_path: Path) -> None:
    vit = _timm_vit(7)
    st = _write(vit, tmp_path, "safetensors")
    renamed = tmp_path / "pytorch_model.bin"  # safetensors bytes under a PyTorch name
    renamed.write_bytes(st.read_bytes())
    _assert_backbone_equals(_build(renamed), vit)


# ---------------------------------------------------------------------------------------------- handled before


def test_model_and_module_prefixes_load(tmp_path: Path) -> None:
    vit = _timm_vit(8)
    for prefix in ("module.", "model."):
        sd = {prefix + k: v for k, v in vit.state_dict().items()}
        path = tmp_path / f"{prefix}pth"
        torch.save({"state_dict": sd, "epoch": 9}, path)
        _assert_backbone_equals(_build(path), vit)


def test_mae_checkpoint_with_fc_norm_loads_into_an_avg_pool_backbone(tmp_path: Path) -> None:
    kw = dict(TINY_KW, global_pool="avg")
    torch.manual_seed(0)
    mae = timm.create_model(TINY, pretrained=False, num_classes=0, **kw)  # norm -> Identity, fc_norm LayerNorm
    randomize_(mae, 3)
    assert "fc_norm.weight" in mae.state_dict() and "norm.weight" not in mae.state_dict()
    path = tmp_path / "mae_finetuned.pth"
    torch.save({"model": mae.state_dict()}, path)  # MAE's own wrapping
    model = synqt.build_model(TINY, 3, checkpoint=path, **kw)
    _assert_backbone_equals(model, mae)
    assert torch.equal(model.branch.head.head_norm.weight, mae.fc_norm.weight)


def test_cli_refuses_a_broken_checkpoint_without_a_traceback(tmp_path: Path) -> None:
    from engine_helpers import TASK, env_one_thread, write_tiny_assets

    data_root, _ = write_tiny_assets(tmp_path / "assets")
    page = tmp_path / "ViT-B_16.npz"
    page.write_bytes(HTML)
    cmd = [sys.executable, "-m", "launcher.cli", "train", "--dataset", TASK, "--data-root", str(data_root),
           "--checkpoint", str(page), "--out", str(tmp_path / "run"), "backbone=vit_tiny_patch16_224",
           *[f"backbone_kwargs.{k}={v}" for k, v in TINY_KW.items()], "device=cpu", "epochs=1",
           "warmup_epochs=0", f"cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env_one_thread(), timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "HTML/XML page" in proc.stderr and str(page) in proc.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_big_vision_npz_with_stacked_blocks_loads(tmp_path: Path) -> None:
    """big_vision's layout: `params/` prefix, blocks stacked on a leading axis, sub-module indices 0/1/0."""
    vit = _timm_vit(9)
    classic = _to_google_npz(vit)
    depth = TINY_KW["depth"]
    rename = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0", "LayerNorm_2": "LayerNorm_1",
              "MlpBlock_3": "MlpBlock_0", "LayerNorm_0": "LayerNorm_0"}
    out: dict[str, np.ndarray] = {}
    for key, value in classic.items():
        if key.startswith("Transformer/encoderblock_"):
            continue
        if key == "Transformer/posembed_input/pos_embedding":
            key = "pos_embedding"
        out["params/" + key] = value
    per_block = [k.split("/", 2)[2] for k in classic if k.startswith("Transformer/encoderblock_0/")]
    for sub in per_block:
        first, rest = sub.split("/", 1)
        stacked = np.stack([classic[f"Transformer/encoderblock_{i}/{sub}"] for i in range(depth)])
        out[f"params/Transformer/encoderblock/{rename[first]}/{rest}"] = stacked
    path = tmp_path / "big_vision.npz"
    np.savez(path, **out)
    _assert_backbone_equals(_build(path), vit)
    deeper = tmp_path / "big_vision_deep.npz"
    np.savez(deeper, **{k: (np.concatenate([v, v[:1]]) if "/encoderblock/" in k else v) for k, v in out.items()})
    with pytest.raises(ModelError, match=r"depth \(blocks\) 3 in the checkpoint, 2 in the backbone"):
        _build(deeper)
