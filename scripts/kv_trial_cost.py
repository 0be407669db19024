"""One paper-protocol trial end to end from the K/V cache, as a multiple of one no-grad forward over its images.

    python scripts/kv_trial_cost.py --out /tmp/kv-trial --backbone vit_small_patch16_224 --n-train 250 --n-test 250

Synthetic 224-px images (synqt.data.synthetic, one task), random backbone weights, ``backbone_drop_path: false``,
``kv_cache: disk`` (bf16) in a fresh cache folder, deferred evaluation, 50 epochs, test every 10. Measured:
the decoded images are cached first (decoding is not part of either figure); then one no-grad
``forward_features`` over the trial's train + test images (batch 64); then the whole trial (cache build,
50 cached epochs, one deferred evaluation pass over 5 snapshots). Writes ``cost.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--backbone", default="vit_small_patch16_224")
    ap.add_argument("--n-train", type=int, default=250, help="train800val200 images (80/20 train/val lists)")
    ap.add_argument("--n-test", type=int, default=250)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from synqt.config import load_config
    from synqt.data.images import load_images, to_tensor_batch
    from synqt.data.splits import read_split
    from synqt.data.synthetic import write_benchmark
    from synqt.training import run_trial
    from synqt.training.build import frozen_backbone

    out = Path(args.out)
    n_val = args.n_train // 5
    data_root = write_benchmark(out / "data", image_size=224, tasks=["syn_count"], n_train=args.n_train - n_val,
                                n_val=n_val, n_test=args.n_test, seed=5)
    cache = out / "cache"
    cfg = load_config([], [f"backbone={args.backbone}", "checkpoint=random", "dataset=syn_count",
                           f"data_root={data_root}", f"cache_dir={cache}", "backbone_drop_path=false", "kv_cache=disk",
                           f"epochs={args.epochs}", "eval_every=10", "device=cpu", "eval_batch_size=64"])
    splits = [read_split(data_root, "syn_count", s) for s in ("train800val200", "test")]
    images = [load_images(s, 224, cache_dir=cache)[0] for s in splits]  # decode once, outside both figures
    backbone = frozen_backbone(cfg)
    t0 = time.perf_counter()
    with torch.no_grad():
        for arr in images:
            for i in range(0, len(arr), 64):
                backbone.forward_features(to_tensor_batch(arr[i:i + 64], cfg.mean, cfg.std))
    forward_s = time.perf_counter() - t0
    print(f"no-grad forward over {sum(map(len, images))} images: {forward_s:.1f} s", flush=True)
    t0 = time.perf_counter()
    metrics = run_trial(cfg, out / "run", resume=False)
    trial_s = time.perf_counter() - t0
    result = {"backbone": args.backbone, "n_train": len(images[0]), "n_test": len(images[1]), "epochs": args.epochs,
              "forward_s": forward_s, "trial_s": trial_s, "trial_x_forward": trial_s / forward_s,
              "status": metrics["status"], "eval_history": metrics["eval_history"],
              "threads": torch.get_num_threads(), "load_avg_end": list(np.round(__import__("os").getloadavg(), 1))}
    (out / "cost.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
