"""What the split-leak check costs on a VTAB-1k-sized task (docs/data.md quotes this script's output).

Writes one synthetic task in the vtab_json layout (``train800val200.json`` with 1,000 entries, train800 / val200
derived; ``test.json`` with 10,000), PNGs of ``--size`` px whose content compresses like a photo (a smooth random
field plus sensor-like noise, about 100 KB each at 224 px), then times ``synqt.data.check.check_datasets`` on it:

- ``--paths-only``: lists, files and leaks by file (no image decoded);
- pixel hash, cold: every image decoded and hashed (the default of ``synqt data check`` and the sweep pre-flight),
  with an empty pixel-hash cache;
- pixel hash, warm: the same again, hashes read from the cache (a second check, a resumed sweep);
- the cold pixel hash with 1 thread, to show what the thread pool buys.

Each line gives wall time and the process's CPU time (all threads): CPU time / cores is what an idle machine needs.

The image files are in the OS page cache after being written (a first read from a network filesystem is slower).

    python scripts/split_leak_cost.py --root /tmp/synqt-leak-bench [--train 1000 --test 10000 --size 224]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def _photo_like(i: int, size: int) -> Image.Image:
    rng = np.random.default_rng(i)
    low = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    noise = rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(low, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def write_task(root: Path, name: str, n_train: int, n_test: int, size: int) -> Path:
    ds = root / name
    if (ds / "test.json").is_file() and len(json.loads((ds / "test.json").read_text())) == n_test:
        return ds
    shutil.rmtree(ds, ignore_errors=True)
    (ds / "images" / "train").mkdir(parents=True)
    (ds / "images" / "test").mkdir(parents=True)
    jobs = [(f"train/{i:05d}.png", i) for i in range(n_train)] + [(f"test/{i:05d}.png", n_train + i)
                                                                   for i in range(n_test)]

    def one(job: tuple[str, int]) -> None:
        _photo_like(job[1], size).save(ds / "images" / job[0])

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(one, jobs))
    (ds / "train800val200.json").write_text(json.dumps([{p: i % 10} for p, i in jobs[:n_train]]))
    (ds / "test.json").write_text(json.dumps([{p: i % 10} for p, i in jobs[n_train:]]))
    return ds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "synqt-leak-bench"))
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--test", type=int, default=10000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    root = Path(args.root)
    t0 = time.perf_counter()
    ds = write_task(root / "data", "vtabsize", args.train, args.test, args.size)
    files = list((ds / "images").rglob("*.png"))
    mb = sum(f.stat().st_size for f in files) / 1e6
    print(f"task: {len(files)} PNGs of {args.size} px, {mb:.0f} MB ({mb * 1e3 / len(files):.0f} KB each), "
          f"ready in {time.perf_counter() - t0:.0f} s; {len(os.sched_getaffinity(0))} cores")

    from synqt.data import check, images, leaks, splits

    cache = root / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["SYNQT_CACHE_DIR"] = str(cache)
    out: dict[str, float] = {"images": len(files), "size_px": args.size, "megabytes": round(mb),
                             "cores": len(os.sched_getaffinity(0)), "threads": images.workers()}

    def timed(label: str, **kw) -> None:
        t, cpu = time.perf_counter(), time.process_time()
        rep = check.check_datasets(root / "data", ["vtabsize"], **kw)
        out[label] = round(time.perf_counter() - t, 2)
        out[label.replace("_s", "_cpu_s")] = round(time.process_time() - cpu, 2)
        assert rep.ok and rep.leaks == 0, rep.text
        print(f"{label:<28} {out[label]:7.2f} s wall, {out[label.replace('_s', '_cpu_s')]:7.2f} s CPU "
              f"({len(files) / out[label]:.0f} images/s)")

    timed("paths_only_s", content=False)
    timed("pixel_hash_cold_s")
    timed("pixel_hash_warm_s")
    # one thread, no cache: the same decode + hash work without the pool
    sl = {s: splits.read_split(root / "data", "vtabsize", s) for s in ("train800", "val200", "train800val200", "test")}
    t = time.perf_counter()
    leaks.find_leaks("vtabsize", {s: list(zip(x.sources, x.paths, strict=True)) for s, x in sl.items()},
                          workers=1, cache_dir=None)
    out["pixel_hash_cold_1_thread_s"] = round(time.perf_counter() - t, 2)
    print(f"{'pixel_hash_cold_1_thread_s':<28} {out['pixel_hash_cold_1_thread_s']:7.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
