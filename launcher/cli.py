"""The `synqt` console script: one entry point, one subcommand per job.

Heavy imports (torch, ray) happen inside each subcommand so that `synqt --help` is instant and
`synqt sweep --dry-run` never starts Ray.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from launcher.console import Exit
from synqt.data.splits import LAYOUTS

EPILOG = """examples:
  synqt demo                                   # synthetic benchmark + tiny ViT, whole pipeline on CPU
  synqt train --dataset cifar --data-root /data/vtab-1k --checkpoint ViT-B_16.npz --out runs/cifar
  synqt train --dataset NAME --data-root D --out RUN checkpoint=random backbone=vit_tiny_patch16_224 \\
      backbone_kwargs.img_size=32 backbone_kwargs.patch_size=4 epochs=5 warmup_epochs=1
  synqt sweep configs/sweeps/vtab1k.yaml data_root=/data/vtab-1k checkpoint=/w/ViT-B_16.npz storage_path=/shared/runs
  synqt sweep configs/sweeps/vtab1k.yaml --dry-run
  synqt aggregate /shared/runs/vtab1k
  synqt compare /shared/runs/vtab1k /shared/runs/vtab1k_T4
  synqt status /shared/runs/vtab1k
  synqt data check /data/vtab-1k cifar dtd
  synqt bench backbone=vit_base_patch16_224 batch_size=64
"""


EXIT_CODES = """exit codes (every subcommand):
  0    everything asked for finished and is ok
  1    an unexpected error (a bug; the traceback is shown)
  2    bad input: command line, config, data or file, or an output folder that takes no file
       (read-only, full, no permission): nothing was started
  3    finished, but with failed or missing runs (train, sweep, aggregate; status: some trial failed)
       or a write failed mid-run (the file, free space and key are named; the run is marked failed)
  4    status only: trials still running or pending, none failed
  130  interrupted (Ctrl-C, SIGTERM from kill/scancel/preemption, SLURM's USR1): last epoch checkpoints kept
  141  the reader of the output went away (e.g. `| head`); ended quietly"""


def _common() -> argparse.ArgumentParser:
    """-v / -q of every subcommand (a parent parser; they count: -vv, -qq)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output")
    g.add_argument("-v", "--verbose", action="count", default=0,
                   help="more: debug messages, Ray's own output and trial table (-vv: everything)")
    g.add_argument("-q", "--quiet", action="count", default=0,
                   help="less: warnings and the final result only (-qq: errors only)")
    return p


def _strict() -> argparse.ArgumentParser:
    """--strict of `data check`, `sweep` and `slurm array` (a parent parser: declared once). For a sweep it sets
    the sweep key ``strict`` (launcher.plan.schema.Sweep), so ``strict=true`` in the file or on the line is the same."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--strict", action="store_true",
                   help="split leaks (an image twice in a split, test images in a training split, val200 images in "
                        "train800; by file and by decoded pixels) are errors (exit 2), not warnings")
    return p


def _sweep_overrides(args: argparse.Namespace) -> list[str]:
    """The sweep's key=value overrides, with ``strict=true`` for --strict."""
    return [*args.overrides, "strict=true"] if args.strict else list(args.overrides)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        parents=[_common()],
        help="run one trial (no Ray)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  synqt train --dataset cifar --data-root /data/vtab-1k --checkpoint ViT-B_16.npz --out runs/cifar
  synqt train --dataset dtd --data-root D --checkpoint ViT-B_16.npz --out RUN protocol=vtab stage=search lr=5e-4
  synqt train --config my.yaml --out RUN --resume
keys: every TrialConfig key (see README, "Configuration keys") as key=value; nested dict keys with dots
(backbone_kwargs.img_size=32).""",
    )
    p.add_argument("--dataset", help="dataset folder under the data root (loads its shipped config if any)")
    p.add_argument("--data-root", help="root folder holding the dataset folders")
    p.add_argument("--checkpoint", help="backbone weights (.npz, .pth, .bin, .safetensors)")
    p.add_argument("--config", action="append", default=[], help="extra YAML config file(s), in order")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(func=_cmd_train)


def _trial_overrides(args: argparse.Namespace) -> list[str]:
    extra = []
    if args.dataset:
        extra.append(f"dataset={args.dataset}")
    if getattr(args, "data_root", None):
        extra.append(f"data_root={args.data_root}")
    if getattr(args, "checkpoint", None):
        extra.append(f"checkpoint={args.checkpoint}")
    return extra + list(args.overrides)


def _require_files(given: Sequence[tuple[str, str | None]]) -> None:
    """Each file a command was given exists, checked before it reads data or builds a model, so a missing file
    is named first (not the data it would have found: `eval --weights missing` said "data_root is empty").
    ``given``: (option or key, path); ``random`` (a random backbone on purpose) and unset values pass."""
    from pathlib import Path

    from synqt.errors import ConfigError
    from synqt.weights.identify import is_random

    for option, value in given:
        if value and not is_random(value) and not Path(value).is_file():
            what = "is a folder, not a file" if Path(value).is_dir() else "file not found"
            raise ConfigError(f"{option} {value}: {what}")


def _cmd_train(args: argparse.Namespace) -> int:
    from launcher.console import TrainPrinter, final_line
    from synqt.config import load_config
    from synqt.run import progress
    from synqt.training import run_trial

    _require_files([("--checkpoint", args.checkpoint), *(("--config", c) for c in args.config)])
    cfg = load_config(args.config, _trial_overrides(args))
    _require_files([("checkpoint", cfg.checkpoint)])  # also when set in a config file or as checkpoint=...
    from synqt.run import ownership
    from synqt.run.rundir import read_metrics
    from synqt.training import check_outputs
    from synqt.weights.compat import check_same_run

    ownership.check_free(args.out, "run")  # another process training this run directory: refuse before reading it
    previous = read_metrics(args.out)
    if args.resume or (previous and previous.get("status") == "ok"):
        check_same_run(cfg, args.out)  # a resume continues exactly the same run, or stops naming each change
    if previous and previous.get("status") == "ok":
        acc = {k: previous[k] for k in ("val_acc", "test_acc") if previous.get(k) is not None}
        print(f"synqt train: {args.out} already finished ({', '.join(f'{k}={v:.2f}' for k, v in acc.items())}); "
              "nothing to train", file=sys.stderr)
        return Exit.OK
    check_outputs([cfg], [args.out], "--out")  # before data, backbone or device: --out must take files
    printer = TrainPrinter(quiet=args.quiet > 0)
    try:
        # one live owner per run directory (synqt/run/ownership.py), held until this process ends, also on SIGTERM
        with ownership.Claim(args.out, "run"), progress.listening(printer):
            metrics = run_trial(cfg, args.out, resume=args.resume)
    finally:
        printer.close()
    if args.quiet < 2:
        print(final_line(metrics, args.out), flush=True)
    return Exit.OK if metrics["status"] == "ok" else Exit.FAILED_RUNS


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        parents=[_common()],
        help="score a trainable-only (or official-format) checkpoint on a split",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  synqt eval --weights runs/cifar/trainable.safetensors                 # the run's config.yaml, its test split
  synqt eval --weights runs/cifar/trainable.safetensors --split val200 data_root=/other/vtab-1k
  synqt eval --weights official_cifar.pth --official --dataset cifar --data-root D --checkpoint ViT-B_16.npz
Without --config, the config.yaml of the run the weights sit in (if any) is the base; --dataset,
--data-root, --checkpoint and key=value override it.""",
    )
    p.add_argument("--weights", required=True, help="trainable.safetensors, or an official state dict (--official)")
    p.add_argument("--official", action="store_true", help="weights are a full official-format state dict")
    p.add_argument("--dataset")
    p.add_argument("--data-root")
    p.add_argument("--checkpoint", help="backbone weights")
    p.add_argument("--config", action="append", default=[])
    p.add_argument("--split", default="test", choices=["train800", "val200", "train800val200", "test"])
    p.add_argument("--out", help="write eval_metrics.json here (default: beside the weights)")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from synqt.config import load_config
    from synqt.run import rundir
    from synqt.training import evaluate_checkpoint

    _require_files([("--weights", args.weights), *(("--config", c) for c in args.config),
                    ("--checkpoint", args.checkpoint)])
    configs = list(args.config)
    run_config = Path(args.weights).parent / rundir.CONFIG
    if not configs and not args.official and run_config.is_file():
        configs = [str(run_config)]  # the resolved config the run trained with: backbone, weights, data, recipe
        print(f"synqt eval: config from the run: {run_config}", flush=True)
    cfg = load_config(configs, _trial_overrides(args))
    if not args.official:  # an official state dict holds the backbone too
        _require_files([("checkpoint", cfg.checkpoint)])
    from synqt.storage import check_writable

    if args.out:  # a folder, or a .json file name in one
        check_writable(Path(args.out).parent if args.out.endswith(".json") else args.out, "--out")
    else:
        check_writable(Path(args.weights).parent, "--out (default: the folder of --weights)")
    result = evaluate_checkpoint(cfg, args.weights, split=args.split, official=args.official, out=args.out)
    from synqt.training.threads import ThreadChoice

    print(f"synqt eval: {ThreadChoice(**result['threads']).line()}")
    print(f"{cfg.dataset} {args.split}: {result['acc']:.2f}% ({result['images']} images)")
    return Exit.OK


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        parents=[_common(), _strict()],
        help="run a sweep on a Ray cluster (or print its plan)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  synqt sweep configs/sweeps/demo.yaml
  synqt sweep configs/sweeps/vtab1k.yaml data_root=/data/vtab-1k checkpoint=/w/ViT-B_16.npz storage_path=/shared/runs
  synqt sweep configs/sweeps/vtab1k_search.yaml --dry-run
  synqt sweep configs/sweeps/vtab1k.yaml data_root=/data/vtab-1k checkpoint=/w/ViT-B_16.npz storage_path=/shared/runs \\
      --resume                                  # the same overrides as the first run, plus --resume
  synqt sweep configs/sweeps/demo.yaml storage_path=/tmp/seq --sequential     # no Ray: one pack after another
  ray job submit --address http://HEAD:8265 --working-dir . -- synqt sweep configs/sweeps/vtab1k.yaml
overrides: sweep keys (datasets, grid.lr, seeds, resources.gpus, max_concurrent, pack, storage_path,
data_root, name, protocol, ...) and trial config keys (epochs=5 warmup_epochs=1, backbone_kwargs.img_size=32) alike.""",
    )
    p.add_argument("sweep_file")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--dry-run", action="store_true", help="print the trial plan and exit (Ray is not started)")
    p.add_argument("--resume", action="store_true", help="continue a sweep already at the storage path")
    p.add_argument("--address", help="Ray address (auto, ray://..., HOST:PORT); default: RAY_ADDRESS or local")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    p.add_argument("--sequential", action="store_true",
                   help="run the packs one after another in this process, without Ray (debugging; or time it "
                        "against the Ray run to see what Ray's concurrency buys)")
    p.set_defaults(func=_cmd_sweep)


def _sweep_console(args: argparse.Namespace):
    """(progress listener, watch) of a running sweep: finished-trial lines and counts; epoch lines with -v."""
    from launcher.console import SweepWatcher, TrainPrinter

    # in-process packs (--sequential) show their epochs only with -v; Ray's workers never print them
    listener = TrainPrinter(prefix=True, bar=False) if args.verbose else (lambda event: None)
    watch = None if args.quiet else SweepWatcher
    return listener, watch


def _cmd_sweep(args: argparse.Namespace) -> int:
    from launcher.run.commands import run_sweep_command
    from synqt.run import progress

    listener, watch = _sweep_console(args)
    with progress.listening(listener):
        return run_sweep_command(
            args.sweep_file, _sweep_overrides(args), dry_run=args.dry_run, resume=args.resume,
            address=args.address, as_json=args.json, sequential=args.sequential, watch=watch,
        )


def _add_aggregate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "aggregate",
        parents=[_common()],
        help="turn a run directory's metrics.json files into the VTAB-1k table",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  synqt aggregate /shared/runs/vtab1k        # writes results.{json,csv,md,png} + _sweep_summary/ there
  synqt aggregate runs/ --out report/""",
    )
    p.add_argument("run_dir")
    p.add_argument("--out", help="where to write the results (default: run_dir)")
    p.set_defaults(func=_cmd_aggregate)


def _cmd_aggregate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from launcher.results.aggregate import aggregate
    from launcher.results.report import summary_text
    from synqt.storage import check_writable

    check_writable(args.out or args.run_dir, "--out" if args.out else "--out (default: the run directory)")
    results = aggregate(args.run_dir, out_dir=args.out)
    if args.quiet < 2:
        print(summary_text(results))
        out = Path(args.out or args.run_dir)
        print(f"report: {out / 'results.md'}  tables: {out / 'table.md'}, {out / 'table.tex'}, "
              f"{out / 'results.csv'}, {out / 'runs.csv'}  plots: {out / 'results.png'}, {out / 'curves.png'}, "
              f"{out / 'cost.png'} (+ .pdf)")
    failed = (results["incomplete"] or any(d.get("n_failed") for d in results["datasets"].values())
              or (results.get("runs") or {}).get("broken"))  # a broken metrics.json: a run without a result
    return Exit.FAILED_RUNS if failed else Exit.OK


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="two or more sweeps (or published tables as CSV) side by side per task, with differences",
        parents=[_common()],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  synqt compare /shared/runs/vtab1k /shared/runs/vtab1k_T4            # first = baseline
  synqt compare paper=published_synqt.csv mine=/shared/runs/vtab1k --metric best_of_test
  synqt compare A B C --out report/compare                            # also report/compare.{md,csv}
a source: a sweep folder (its results.json, or aggregated on the fly), a results.json, or a CSV with
columns dataset,accuracy (optional method, group), or a paper-layout CSV (method + one column per task,
e.g. CIFAR-100,Caltech101,...); NAME=SOURCE names its column.""",
    )
    p.add_argument("sources", nargs="+", help="two or more: sweep folders, results.json files or CSV tables")
    p.add_argument("--metric", default="accuracy", choices=["accuracy", "best_of_test"],
                   help="accuracy: final test accuracy (default); best_of_test: selected on test")
    p.add_argument("--out", help="write OUT.md and OUT.csv too")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    from launcher.results.compare import compare_main

    if args.out:
        from pathlib import Path

        from synqt.storage import check_writable

        check_writable(Path(args.out).absolute().parent, "--out")
    return compare_main(args.sources, metric=args.metric, out=args.out)


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        parents=[_common()],
        help="done / running / failed trials of a sweep and the time left",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  synqt status /shared/runs/vtab1k
  synqt status /shared/runs/vtab1k --json | jq .counts
  synqt status /shared/runs/vtab1k --watch              # refresh every 10 s until nothing runs or is pending
exit status: 0 all done and ok, 3 some trial failed, 4 still running or pending (none failed).""",
    )
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print the status as JSON (with --watch: one object a line)")
    p.add_argument("--watch", action="store_true", help="refresh until no trial is running or pending")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between refreshes with --watch")
    p.set_defaults(func=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    import json
    import time

    from launcher.console import status_exit
    from launcher.results.status import collect_status, status_text
    from synqt.errors import SynQTError

    while True:
        st = collect_status(args.run_dir)
        if not st["plan"] and not st["trials"] and not st["superseded"]:
            # nothing to report is not "all done": a script reading exit 0 would take a wrong folder for a finished one
            raise SynQTError(f"{args.run_dir}: no sweep (plan.json) and no run directories (metrics.json, "
                             "progress.json, config.yaml) here; expected a sweep folder or a folder of runs")
        if args.json:
            print(json.dumps(st, default=str, indent=None if args.watch else 2), flush=True)
        else:
            if args.watch and sys.stdout.isatty():
                print("\033[H\033[J", end="")  # clear the terminal: one snapshot on screen
            elif args.watch:
                print(time.strftime("-- %Y-%m-%d %H:%M:%S"))
            print(status_text(args.run_dir, st), flush=True)
        code = status_exit(st)
        if not args.watch or code != Exit.NOT_FINISHED:
            return code
        time.sleep(max(0.5, args.interval))


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        parents=[_common()],
        help="synthetic benchmark + tiny ViT: the whole pipeline on CPU in minutes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  synqt demo\n  synqt demo --out /tmp/synqt-demo",
    )
    p.add_argument("--out", default="synqt-demo", help="output folder (default: ./synqt-demo)")
    p.add_argument("overrides", nargs="*", help="sweep overrides, e.g. pack=off")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from launcher.run.commands import run_demo
    from synqt.run import progress

    listener, watch = _sweep_console(args)
    with progress.listening(listener):
        return run_demo(args.out, args.overrides, watch=watch)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        parents=[_common()],
        help="saved-activation memory, peak memory and images/s against full fine-tuning and a linear probe",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  synqt bench                                             # ViT-B/16, batch 64, every memory mode
  synqt bench batch_size=8 precision=bf16 --steps 3
  synqt bench --pack 8 batch_size=8                       # a pack of 8 against 8 separate trials
  synqt bench --loader --data-root D --dataset cifar       # loader images/s with and without the cache
  synqt bench --kv-cache batch_size=32                      # cached vs full step, build rate, trial cost""",
    )
    p.add_argument("--steps", type=int, default=3, help="timed training steps per configuration")
    p.add_argument("--modes", default=None, help="comma list of memory modes (default: all)")
    p.add_argument("--pack", type=int, default=0, help="also time a pack of N against N separate trials")
    p.add_argument("--loader", action="store_true",
                   help="time the data loader with and without the cache (alone unless --modes is given)")
    p.add_argument("--data-root")
    p.add_argument("--dataset")
    p.add_argument("--kv-cache", action="store_true",
                   help="time the K/V cache: cached vs full train step, cache build rate, a paper trial's cost "
                        "(alone unless --modes is given)")
    p.add_argument("--no-baselines", action="store_true", help="skip full fine-tuning and linear probe")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("overrides", nargs="*", help="TrialConfig keys: backbone, batch_size, token_nums, precision, ...")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    from synqt.storage import atomic_write_json
    from synqt.tools.bench import format_table, run_bench

    if args.json:  # before minutes of timing: the figures must have somewhere to go
        from pathlib import Path

        from synqt.storage import check_writable

        check_writable(Path(args.json).absolute().parent, "--json")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()] if args.modes else None
    result = run_bench(args.overrides, steps=args.steps, modes=modes, pack=args.pack, loader=args.loader,
                       data_root=args.data_root, dataset=args.dataset, baselines=not args.no_baselines,
                       kv_cache=args.kv_cache)
    print(format_table(result))
    if args.json:
        atomic_write_json(args.json, json.loads(json.dumps(result, default=str)))
        print(f"bench: figures written to {args.json}")
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="dataset tools",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  synqt data check /data/vtab-1k cifar\n  synqt data synthetic /tmp/synthetic-vtab",
    )
    data_sub = p.add_subparsers(dest="data_cmd", required=True)
    c = data_sub.add_parser(
        "check",
        parents=[_common(), _strict()],
        help="count images and classes per split; report missing/unreadable files, bad labels and split leaks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  synqt data check /data/vtab-1k\n  synqt data check /data/vtab-1k cifar dtd --decode\n"
               "  synqt data check /data/vtab-1k cifar --strict        # split leaks are errors (exit 2)\n"
               "  synqt data check /data/vtab-1k --paths-only         # leaks by file only: no image decoded",
    )
    c.add_argument("root")
    c.add_argument("names", nargs="*", help="dataset folders (default: all under root)")
    c.add_argument("--layout", default="auto", choices=["auto", *LAYOUTS])
    c.add_argument("--decode", action="store_true",
                   help="also report each split's image modes and the images converted by value range")
    c.add_argument("--paths-only", action="store_true",
                   help="find split leaks by file only (no image decoded; renamed copies are not found)")
    c.set_defaults(func=_cmd_data_check, _rest="names")  # names are accepted after flags too
    s = data_sub.add_parser(
        "synthetic",
        parents=[_common()],
        help="write the synthetic demo benchmark (VTAB-1k JSON layout)",
        epilog="examples:\n  synqt data synthetic /tmp/synthetic-vtab",
    )
    s.add_argument("root")
    s.add_argument("--image-size", type=int, default=32)
    s.set_defaults(func=_cmd_data_synthetic)


def _cmd_data_check(args: argparse.Namespace) -> int:
    from synqt.data.check import check_datasets

    report = check_datasets(args.root, args.names, layout=args.layout, decode=args.decode,
                            content=not args.paths_only, strict=args.strict)
    print(report.text)
    return Exit.OK if report.ok else Exit.BAD_INPUT  # a problem in the data is bad input (the exit-code rule)


def _cmd_data_synthetic(args: argparse.Namespace) -> int:
    from synqt.data.synthetic import write_benchmark
    from synqt.storage import check_writable

    check_writable(args.root, "root")
    root = write_benchmark(args.root, image_size=args.image_size)
    print(f"synthetic benchmark written to {root}")
    return 0


def _add_gpu_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gpu-check",
        parents=[_common()],
        help="prove every CUDA path on one GPU in minutes: tests, K/V bench, a timed trial, a sweep (docs/gpu.md)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  synqt gpu-check --out gpu-check             # on a GPU node, from a checkout (scripts/gpu_check.sh installs first)
  synqt gpu-check --cpu --out /tmp/gpu-check  # the same checks on the CPU at small sizes (about a minute)
  synqt gpu-check --only pytest,bench         # a subset: pytest, bench, train, sweep
prints one table (pass/fail per check, the figures) and writes it to <out>/gpu_check.json; exit 0 when every
check passed, 3 when one failed.""",
    )
    p.add_argument("--out", default="gpu-check", help="folder for the logs, runs and gpu_check.json (emptied first)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU at small sizes, without the CUDA-only checks")
    p.add_argument("--only", default="", help="comma list of checks to run: pytest, bench, train, sweep")
    p.add_argument("--demo-assets", help="folder holding the built demo data and backbone for the sweep check")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all checks; a step still running then is stopped and fails (default: 450 on a "
                        "GPU, leaving the install its share of 8 minutes; 900 with --cpu)")
    p.set_defaults(func=_cmd_gpu_check)


def _cmd_gpu_check(args: argparse.Namespace) -> int:
    from launcher.run.gpu_check import format_summary, run_checks

    only = [c.strip() for c in args.only.split(",") if c.strip()]
    result = run_checks(args.out, cpu=args.cpu, only=only, demo_assets=args.demo_assets,
                        budget=args.budget)
    print(format_summary(result), flush=True)
    return Exit.OK if result["passed"] else Exit.FAILED_RUNS


def _add_slurm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "slurm",
        help="SLURM helpers (the scripts in slurm/ stay the source of truth)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  synqt slurm array configs/sweeps/vtab1k.yaml storage_path=/shared/runs data_root=/data/vtab-1k \\
      checkpoint=/w/ViT-B_16.npz
  synqt slurm array configs/sweeps/vtab1k.yaml --print     # show the sbatch lines only (no data or weights needed)
  synqt slurm task configs/sweeps/vtab1k.yaml 17 storage_path=...  # what array index 17 runs""",
    )
    slurm_sub = p.add_subparsers(dest="slurm_cmd", required=True)
    a = slurm_sub.add_parser(
        "array",
        parents=[_common(), _strict()],
        help="submit slurm/vtab_array.sh over a sweep's plan + a dependent aggregate job",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  synqt slurm array configs/sweeps/vtab1k.yaml storage_path=/shared/runs data_root=/data/vtab-1k \\
      checkpoint=/w/ViT-B_16.npz --concurrency 16 --sbatch-args "--gpus=1"
  synqt slurm array configs/sweeps/vtab1k.yaml --print --concurrency 16 --sbatch-args '--gpus=1'
the aggregate job after the array gets --sbatch-args without resource requests (--gpus*, --gres, -c, --mem, ...).""",
    )
    a.add_argument("sweep_file")
    a.add_argument("overrides", nargs="*")
    a.add_argument("--print", action="store_true", help="print the sbatch commands instead of running them")
    a.add_argument("--concurrency", type=int, default=None, help="array %% limit (default: sweep max_concurrent)")
    a.add_argument("--sbatch-args", default="",
                   help="extra sbatch arguments of the array job, e.g. '--partition=gpu --gpus=1' (the aggregate "
                        "job gets them without resource requests)")
    a.set_defaults(func=_cmd_slurm_array)
    t = slurm_sub.add_parser(
        "task",
        parents=[_common()],
        help="run trial INDEX of a sweep's plan (used by slurm/vtab_array.sh)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  synqt slurm task configs/sweeps/vtab1k.yaml 17 storage_path=/shared/runs "
               "data_root=/data/vtab-1k checkpoint=/w/ViT-B_16.npz",
    )
    t.add_argument("sweep_file")
    t.add_argument("index", type=int)
    t.add_argument("overrides", nargs="*")
    t.set_defaults(func=_cmd_slurm_task)
    w = slurm_sub.add_parser(
        "script",
        help="write the shipped sbatch script to a path of your choice (to edit its #SBATCH lines)",
        parents=[_common()],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  synqt slurm script my_vtab.sh                 # then: sbatch my_vtab.sh vtab1k storage_path=/shared/runs
  synqt slurm script jobs/ --name vtab_array    # jobs/vtab_array.sh""",
    )
    w.add_argument("dest", help="file or existing folder to write to")
    w.add_argument("--name", default="vtab", choices=["vtab", "vtab_array"],
                   help="vtab: Ray cluster on the allocation (default); vtab_array: one array task per trial")
    w.add_argument("--force", action="store_true", help="overwrite an existing file")
    w.set_defaults(func=_cmd_slurm_script)


def _cmd_slurm_array(args: argparse.Namespace) -> int:
    from launcher.run.slurm import submit_array

    return submit_array(args.sweep_file, _sweep_overrides(args), print_only=args.print,
                        concurrency=args.concurrency, sbatch_args=args.sbatch_args)


def _cmd_slurm_script(args: argparse.Namespace) -> int:
    from launcher.run.slurm import write_script

    path = write_script(args.dest, args.name, force=args.force)
    print(f"wrote {path}")
    return 0


def _cmd_slurm_task(args: argparse.Namespace) -> int:
    from launcher.console import TrainPrinter
    from launcher.run.slurm import run_array_task
    from synqt.run import progress

    printer = TrainPrinter(quiet=args.quiet > 0)  # the array task's log gets the lines of `synqt train`
    try:
        with progress.listening(printer):
            return run_array_task(args.sweep_file, args.index, args.overrides)
    finally:
        printer.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synqt",
        description="SynQT: memory-efficient tuning of frozen ViTs, from one trial to a VTAB-1k sweep on a cluster.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG + "\n" + EXIT_CODES,
    )
    from synqt.version import version_string

    parser.add_argument("--version", action="version", version=f"synqt {version_string()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_eval, _add_sweep, _add_aggregate, _add_compare, _add_status, _add_demo, _add_bench,
                _add_data, _add_slurm, _add_gpu_check):
        add(sub)
    return parser


# Options whose value is itself a command line (`--sbatch-args "--gpus=1"`): argparse takes a lone value that starts
# with '-' for an option and stops with "expected one argument", so such a value is attached as `--opt=value`.
RAW_VALUE_OPTIONS = ("--sbatch-args",)


def _join_raw_values(argv: Sequence[str]) -> list[str]:
    out, words = [], list(argv)
    i = 0
    while i < len(words):
        if words[i] in RAW_VALUE_OPTIONS and i + 1 < len(words):
            out.append(f"{words[i]}={words[i + 1]}")
            i += 2
            continue
        out.append(words[i])
        i += 1
    return out


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse with ``key=value`` overrides accepted anywhere, also after flags.

    argparse fills a ``nargs="*"`` positional from its first run of positionals only, so
    ``synqt sweep FILE --resume lr=1`` leaves ``lr=1`` unrecognised; such leftovers that look like
    ``key=value`` are appended, in order, to the subcommand's overrides. Anything else is an error.
    (``parse_intermixed_args`` would do this too, but argparse refuses it on a parser with subcommands.)
    """
    args, extra = parser.parse_known_args(_join_raw_values(sys.argv[1:] if argv is None else argv))
    if extra:
        rest = getattr(args, "_rest", "overrides" if hasattr(args, "overrides") else None)
        # overrides must look like key=value; a list of names (`data check ROOT NAME ...`) takes any word
        bad = [e for e in extra if rest is None or e.startswith("-") or (rest == "overrides" and "=" not in e)]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}"
                         + ("" if rest else f" (`synqt {args.command}` takes no key=value overrides)"))
        setattr(args, rest, [*getattr(args, rest), *extra])
    return args


def _stdout_gone() -> int:
    """The reader of stdout went away (`synqt ... | head`): end quietly, without a traceback.

    Python's documented recipe: point stdout at /dev/null so the interpreter's final flush cannot
    raise again.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return Exit.BROKEN_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    from launcher.console import configure_logging

    parser = build_parser()
    args = parse_args(parser, argv)
    restore_logging = configure_logging(args.verbose - args.quiet)
    from launcher.console import resume_command, sigterm_as_interrupt
    from synqt.errors import SynQTError
    from synqt.storage import WriteFailed

    try:
        with sigterm_as_interrupt():  # scancel / preemption / kill: as Ctrl-C (exit 130, resume line)
            code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except WriteFailed as err:  # storage failed mid-run: the file, free space, key; the run is marked failed
        print(f"synqt {args.command}: error: {err}", file=sys.stderr)
        return Exit.FAILED_RUNS
    except SynQTError as err:
        print(f"synqt {args.command}: error: {err}", file=sys.stderr)
        return Exit.BAD_INPUT
    except BrokenPipeError:
        return _stdout_gone()
    except KeyboardInterrupt as err:  # Ctrl+C, SIGTERM (console.Terminated), launcher.run.stages.SweepInterrupted
        command = args.command + (f" {args.slurm_cmd}" if args.command == "slurm" else "")
        print(f"\nsynqt {command}: {str(err) or 'interrupted'}", file=sys.stderr)
        again = resume_command(command, list(sys.argv[1:] if argv is None else argv))
        if again:  # demo and slurm task continue by themselves; sweep and train need --resume
            print(f"interrupted: resume with: {again}", file=sys.stderr, flush=True)
        return Exit.INTERRUPTED
    finally:
        restore_logging()


if __name__ == "__main__":
    sys.exit(main())
