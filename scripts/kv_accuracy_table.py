"""Accuracy of the deterministic image stream (issue 15): the six demo tasks, live vs cached, branch dropout on/off.

For every task and seed three packs run (configs/demo.yaml, lr 3e-3, paper protocol):
- ``backbone_drop_path: true``, live image stream (the official recipe),
- ``backbone_drop_path: false``, live image stream (separates the drop path from the bf16 cache), and
- ``backbone_drop_path: false``, the bf16 K/V cache (``kv_cache: disk``),
each a pack of two branches: the official branch dropout (0.1 / attention 0.1 / head drop path 0.3) and
all three off. A pack shares one frozen pass, so the dropout-off branch costs no extra image stream.

    python scripts/kv_accuracy_table.py --out /tmp/kv-table --seeds 42 43 44

Writes ``results.json`` (every trial's test_acc / best_of_test / wall time) and ``table.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from synqt.config import config_dir, load_config
from synqt.data.synthetic import DEMO_TASKS
from synqt.tools.pretrain import ensure_demo_assets
from synqt.training import run_pack

ROWS = {  # name -> (backbone_drop_path, kv_cache, branch dropout keys)
    "live, official branch dropout": (True, "off", (0.1, 0.1, 0.3)),
    "live, branch dropout off": (True, "off", (0.0, 0.0, 0.0)),
    "live without image drop path, official branch dropout": (False, "off", (0.1, 0.1, 0.3)),
    "live without image drop path, branch dropout off": (False, "off", (0.0, 0.0, 0.0)),
    "cached, official branch dropout": (False, "disk", (0.1, 0.1, 0.3)),
    "cached, branch dropout off": (False, "disk", (0.0, 0.0, 0.0)),
}
# one pack per stream (its two rows are two branches sharing one image stream)
STREAMS = {"live": ("live, official branch dropout", "live, branch dropout off"),
           "live without image drop path": ("live without image drop path, official branch dropout",
                                            "live without image drop path, branch dropout off"),
           "cached": ("cached, official branch dropout", "cached, branch dropout off")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--tasks", nargs="+", default=list(DEMO_TASKS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="extra key=value for every trial")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_root, ckpt = ensure_demo_assets()
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else []
    done = {(r["task"], r["seed"], r["row"]) for r in results}
    for task in args.tasks:
        for seed in args.seeds:
            for stream, rows in STREAMS.items():
                if all((task, seed, r) in done for r in rows):
                    continue
                cfgs = []
                for r in rows:
                    bdp, kv, (drop, attn_drop, head_dp) = ROWS[r]
                    cfgs.append(load_config([config_dir() / "demo.yaml"], [
                        f"dataset={task}", f"data_root={data_root}", f"checkpoint={ckpt}", f"seed={seed}",
                        f"backbone_drop_path={str(bdp).lower()}", f"kv_cache={kv}", f"branch_dropout={drop}",
                        f"branch_attn_dropout={attn_drop}", f"head_drop_path={head_dp}", "device=cpu",
                        *args.overrides]))
                dirs = [out / "runs" / f"{task}-s{seed}-{r.replace(', ', '-').replace(' ', '_')}" for r in rows]
                t0 = time.time()
                metrics = run_pack(cfgs, dirs, resume=True)
                wall = time.time() - t0
                for r, m in zip(rows, metrics, strict=True):
                    results.append({"task": task, "seed": seed, "row": r, "test_acc": m["test_acc"],
                                    "best_of_test": m["best_of_test"], "pack_wall_s": wall, "status": m["status"]})
                results_file.write_text(json.dumps(results, indent=1))
                print(f"{task} seed {seed} {stream}: {[m['test_acc'] for m in metrics]} in {wall:.0f} s", flush=True)
    (out / "table.md").write_text(table(results, args.tasks))
    print(table(results, args.tasks))


def table(results: list[dict], tasks: list[str]) -> str:
    """Mean ± std over seeds per task and row; the mean column averages only tasks that every row has; two
    paired rows give the per-seed difference (same task, seed and branch settings) cached - live."""
    by = {(r["task"], r["seed"], r["row"]): r["test_acc"] for r in results}
    complete = [t for t in tasks if all(any(k[0] == t and k[2] == row for k in by) for row in ROWS)]

    def fmt(vals: list[float], signed: bool = False) -> str:
        if not vals:
            return "-"
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):{'+' if signed else ''}.1f} ± {sd:.1f} (n={len(vals)})"

    def cell(task: str, row: str) -> str:
        return fmt([v for (t, _, r), v in by.items() if t == task and r == row])

    def mean_cell(row: str) -> str:
        per = [statistics.mean([v for (t, _, r), v in by.items() if t == task and r == row]) for task in complete]
        return f"{statistics.mean(per):.1f}" if per else "-"

    def paired(task: str | None, live: str, cached: str) -> list[float]:
        return [by[(t, s, cached)] - v for (t, s, r), v in by.items()
                if r == live and (task is None or t == task) and (t, s, cached) in by]

    head = "| row | " + " | ".join(tasks) + f" | mean of {len(complete)} complete task(s) |\n|---|" + "---|" * (
        len(tasks) + 1) + "\n"
    body = "".join(f"| {row} | " + " | ".join(cell(t, row) for t in tasks) + f" | {mean_cell(row)} |\n" for row in ROWS)
    for label, live, cached in (("cached - live, official dropout (paired)", "live, official branch dropout",
                                 "cached, official branch dropout"),
                                ("cached - live, dropout off (paired)", "live, branch dropout off",
                                 "cached, branch dropout off"),
                                ("drop path off - on, live, official dropout (paired)",
                                 "live, official branch dropout",
                                 "live without image drop path, official branch dropout"),
                                ("drop path off - on, live, dropout off (paired)", "live, branch dropout off",
                                 "live without image drop path, branch dropout off"),
                                ("bf16 cache - live, no drop path, official dropout (paired)",
                                 "live without image drop path, official branch dropout",
                                 "cached, official branch dropout"),
                                ("bf16 cache - live, no drop path, dropout off (paired)",
                                 "live without image drop path, branch dropout off", "cached, branch dropout off"),
                                ("dropout off - official, cached (paired)", "cached, official branch dropout",
                                 "cached, branch dropout off")):
        body += (f"| {label} | " + " | ".join(fmt(paired(t, live, cached), True) for t in tasks)
                 + f" | {fmt(paired(None, live, cached), True)} |\n")
    return head + body


if __name__ == "__main__":
    main()
