"""`synqt bench` on a tiny backbone: a table on stdout and a JSON file with positive figures."""

from __future__ import annotations

import json

import pytest

from launcher.cli import main
from synqt.config import load_config
from synqt.model.memory import estimate_trial_memory

TINY = ["backbone=vit_tiny_patch16_224", "backbone_kwargs.img_size=32", "backbone_kwargs.depth=2", "batch_size=4"]


def test_bench_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--steps", "1", "--pack", "2", "--json", str(out), *TINY])
    assert code == 0
    text = capsys.readouterr().out
    for name in ("synqt keep", "synqt kv_bf16", "synqt recompute", "naive synqt", "linear probe", "full fine-tuning"):
        assert f"| {name}" in text
    assert "cpu flags:" in text and "avx512_bf16=" in text
    assert "pack of 2:" in text
    data = json.loads(out.read_text())
    assert {"hardware", "config", "rows", "geometry", "pack", "estimate_bytes"} <= set(data)
    rows = {r["name"]: r for r in data["rows"]}
    for r in rows.values():
        for key in ("train_images_per_s", "eval_images_per_s", "trainable_params", "total_params"):
            assert r[key] > 0, (r["name"], key)
        assert r["peak_kind"].startswith("cpu")
    for mode in ("keep", "kv_bf16", "recompute"):
        assert rows[f"synqt {mode}"]["saved_bytes"] > 0
    saved = {m: rows[f"synqt {m}"]["saved_bytes"] for m in ("keep", "kv_bf16", "recompute")}
    assert saved["recompute"] < saved["kv_bf16"] < saved["keep"]
    assert rows["synqt keep"]["saved_bytes"] < rows["full fine-tuning"]["saved_bytes"]
    assert rows["linear probe"]["trainable_params"] < rows["synqt keep"]["trainable_params"] < rows["full fine-tuning"][
        "trainable_params"]
    assert data["pack"]["n"] == 2 and data["pack"]["pack_step_s"] > 0
    # every row's speed is compared with the naive implementation in fp32
    naive = rows["naive synqt"]
    assert naive["precision"] == "fp32" and naive["vs_naive_fp32"] == 1.0
    for r in rows.values():
        assert r["vs_naive_fp32"] == r["train_images_per_s"] / naive["train_images_per_s"]


def test_bench_in_bf16_keeps_the_naive_baseline_in_fp32(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SYNQT_ALLOW_SLOW_BF16", "1")  # also on CPUs without native bf16 (tiny model)
    out = tmp_path / "bench.json"
    assert main(["bench", "--steps", "1", "--modes", "keep", "--json", str(out), "precision=bf16", *TINY]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["synqt keep"]["precision"] == "bf16" and rows["full fine-tuning"]["precision"] == "bf16"
    assert rows["naive synqt"]["precision"] == "fp32"
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| synqt keep"))
    assert f"{rows['synqt keep']['vs_naive_fp32']:.2f}x" in line and "bf16" in line


def test_bench_rejects_unknown_mode(capsys):
    assert main(["bench", "--modes", "keep,fast", *TINY]) == 2
    assert "fast" in capsys.readouterr().err


def test_estimate_grows_with_branches_and_shrinks_with_modes():
    cfg = load_config([], ["token_nums=1"], base=True)  # ViT-B/16 batch 64, geometry only
    keep = estimate_trial_memory(cfg, 1)
    kv_term = 2 * 12 * 64 * 197 * 768 * 4
    assert kv_term < keep < kv_term + 1.5 * 2**30  # + frozen weights (0.32 GiB) and the small rest
    assert estimate_trial_memory(cfg, 8) < 2 * keep
    rec = estimate_trial_memory(load_config([], ["memory_mode=recompute"], base=True), 1)
    bf = estimate_trial_memory(load_config([], ["memory_mode=kv_bf16"], base=True), 1)
    assert rec < bf < keep


def test_bench_kv_cache_reports_the_cache_size_and_trial_cost(tmp_path, capsys):
    """`synqt bench --kv-cache`: the cache size follows from the geometry, computed here by hand; every time is > 0."""
    out = tmp_path / "kv.json"
    assert main(["bench", "--kv-cache", "--steps", "1", "--json", str(out), *TINY]) == 0
    text = capsys.readouterr().out
    assert "K/V cache (vit_tiny_patch16_224 at 32 px" in text and "paper trial" in text
    kv = json.loads(out.read_text())["kv_cache"]
    # K and V of every block: 2 blocks x (4 patches of 16 px + the class token) x 192 channels x 2 bytes (bf16)
    assert kv["bytes_per_image"] == 2 * 2 * (4 + 1) * 192 * 2
    assert kv["trial"]["cache_bytes"] == 1000 * kv["bytes_per_image"]
    for key in ("forward_s_per_image", "build_s_per_image", "full_step_s_per_image", "cached_step_s_per_image",
                "eval_x1_s_per_image", "eval_x5_s_per_image"):
        assert kv[key] > 0, key
    trial = kv["trial"]
    assert trial["epochs"] == 50 and trial["evaluations"] == 5 and trial["n_train"] == trial["n_test"] == 1000
    # the trial's cost recomputed from the measured parts with the formula (per image times x image counts)
    unit = 2000 * kv["forward_s_per_image"]
    today = 50 * 1000 * kv["full_step_s_per_image"] + 5 * 1000 * kv["eval_x1_s_per_image"]
    cached = (1000 * kv["build_s_per_image"] + 50 * 1000 * kv["cached_step_s_per_image"]
              + 1000 * kv["eval_x5_s_per_image"])
    assert trial["today_x_forward"] == pytest.approx(today / unit)
    assert trial["cached_x_forward"] == pytest.approx(cached / unit)
    assert kv["cached_vs_full_step"] == pytest.approx(kv["full_step_s_per_image"] / kv["cached_step_s_per_image"])
