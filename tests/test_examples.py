"""The README is a contract (issue 21): every command README.md, docs/*.md and the `synqt ... --help` epilogs
show is run here on tiny inputs, substituting only paths, and must exit as the text implies.

Extraction (`all_examples`): fenced and indented code blocks (a line whose program is one of `PROGRAMS`,
`\\` continuations joined, the `# comment` dropped), inline code spans of three or more words that run a
program with an argument, and every epilog line of the real argparse parsers (`launcher.cli.build_parser`).

Each example is in exactly one of three tables below, keyed by its text:
- `RUN`: run as written, paths replaced by `PATHS` (tiny synthetic VTAB-layout data, the demo backbone, one
  finished demo sweep reused by every aggregate / status / compare / TensorBoard example); expected exit code.
- `DRY`: the text would start real training on big data (ViT-B/16 on VTAB-1k) or submit to SLURM; it is run
  with `--dry-run` (sweeps) or `--print` (SLURM arrays) appended, and the entry says why.
- `NOT_RUN`: cannot run here, each with the reason and, where one exists, the test that runs its kind.
Every `synqt` example of any table is also parsed by the real parser (`test_every_synqt_example_parses`).
A new command in the docs fails `test_every_example_is_classified` until it is put in one table.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PROGRAMS = {"synqt", "sbatch", "ray", "tensorboard", "python", "pip", "ruff", "squeue", "scancel", "srun",
            "scontrol", "scripts/gpu_check.sh"}
_ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")
_DIAGRAM = set("─│►◄▼")
TEMPLATE = ("...", "<", "[--", "[key", "[DIR]")  # a synopsis: elided or optional parts, not a command line


@dataclass(frozen=True)
class Example:
    where: str  # file:line or `synqt <sub> --help`
    text: str  # the command as shown: comment dropped, whitespace collapsed


def _words(text: str) -> list[str]:
    words = text.split()
    i = 0
    while i < len(words) and (_ENV.match(words[i]) or words[i] == "time"):
        i += 1
    return words[i:]


def _is_command(text: str) -> bool:
    words = _words(text)
    if not words or words[0] not in PROGRAMS or any(c in _DIAGRAM for c in text):
        return False
    return not (len(words) > 1 and words[1].endswith(":"))  # `synqt sweep: interrupted ...` is output


def _strip_comment(line: str) -> str:
    return re.split(r"\s+#\s", " " + line, maxsplit=1)[0].strip()


def _code_lines(md: str) -> tuple[list[tuple[int, str]], str]:
    """(code lines with their line numbers, the prose with code blocks blanked)."""
    code, prose = [], []
    fence, indented, prev_blank = False, False, True
    for n, line in enumerate(md.splitlines(), 1):
        if line.startswith("```"):
            fence = not fence
            prose.append("")
            continue
        if fence or (line.startswith("    ") and (prev_blank or indented)):
            indented = not fence
            code.append((n, line[4:] if not fence else line))
            prose.append("")
            continue
        indented = False
        prose.append(line)
        prev_blank = not line.strip()
    return code, "\n".join(prose)


def _inline_is_example(text: str) -> bool:
    """A code span is an example when it runs a program with an argument (not just names a subcommand)."""
    words = _words(text)
    if len(words) < 3 or not _is_command(text):
        return False
    if words[0] != "synqt":
        return True
    rest = words[1:]
    subs = {"train", "eval", "sweep", "aggregate", "compare", "status", "demo", "bench", "data", "slurm", "check",
            "synthetic", "array", "task", "script"}
    return any(w not in subs for w in rest)


def doc_examples() -> list[Example]:
    out = []
    for path in DOCS:
        name = str(path.relative_to(REPO))
        code, prose = _code_lines(path.read_text(encoding="utf-8"))
        pending: tuple[int, str] | None = None
        for n, line in code:
            text = _strip_comment(line)
            if pending is not None:
                pending = (pending[0], pending[1] + " " + text)
            elif _is_command(text):
                pending = (n, text)
            if pending is not None and not pending[1].endswith("\\"):
                out.append(Example(f"{name}:{pending[0]}", " ".join(pending[1].replace("\\ ", " ").split())))
                pending = None
            elif pending is not None:
                pending = (pending[0], pending[1][:-1])
        for m in re.finditer(r"`([^`]+)`", prose):
            text = " ".join(m.group(1).split())
            if _inline_is_example(text):
                out.append(Example(f"{name}:{prose[:m.start()].count(chr(10)) + 1}", text))
    return out


def _parsers():
    """(`synqt <words>`, parser) for the top parser and every subparser, from launcher.cli.build_parser."""
    import argparse

    from launcher.cli import build_parser

    todo = [("synqt", build_parser())]
    while todo:
        name, parser = todo.pop(0)
        yield name, parser
        for action in parser._actions:  # argparse keeps subparsers only here
            if isinstance(action, argparse._SubParsersAction):
                todo.extend((f"{name} {sub}", p) for sub, p in action.choices.items())


def help_examples() -> list[Example]:
    out = []
    for name, parser in _parsers():
        pending = ""
        for line in (parser.epilog or "").splitlines():
            text = _strip_comment(line)
            if pending:
                pending += " " + text
            elif line.startswith("  ") and _is_command(text):
                pending = text
            if pending and not pending.endswith("\\"):
                out.append(Example(f"`{name} --help`", " ".join(pending.split())))
                pending = ""
            elif pending:
                pending = pending[:-1]
    return out


def all_examples() -> list[Example]:
    return doc_examples() + help_examples()


# ---------------------------------------------------------------------------------------------------------------
# the three tables

ALL_DONE = "the finished demo sweep: every run is done, so it must say so and exit 0 without starting Ray"

RUN: dict[str, int] = {
    # the first: a real demo (Ray on CPU, a minute); every sweep folder example below reads its result
    "synqt demo --out /tmp/synqt-demo": 0,
    "synqt demo": 0,  # ./synqt-demo is the finished demo: it must continue it (nothing left) without Ray
    "synqt --version": 0,
    "synqt sweep vtab1k --dry-run": 0,
    "synqt sweep configs/sweeps/vtab1k.yaml --dry-run": 0,
    "synqt sweep configs/sweeps/vtab1k_search.yaml --dry-run": 0,
    "synqt sweep FILE --dry-run seeds=[42] --json": 0,
    "synqt sweep FILE --dry-run": 0,
    "synqt sweep FILE --resume storage_path=/shared/runs": 0,
    "synqt slurm script my_job.sh": 0,
    "synqt slurm script my_vtab.sh": 0,
    "synqt slurm script jobs/ --name vtab_array": 0,
    "synqt slurm array configs/sweeps/vtab1k.yaml --print --concurrency 16 --sbatch-args '--gpus=1'": 0,
    "synqt slurm array configs/sweeps/vtab1k.yaml --print": 0,
    "synqt slurm array vtab1k storage_path=/shared/runs --concurrency 16 --sbatch-args \"--gpus=1\" --print": 0,
    "synqt slurm array configs/sweeps/vtab1k.yaml storage_path=/shared/runs --print": 0,
    "synqt status /shared/runs/vtab1k": 0,
    "synqt status /shared/runs/vtab1k --json | jq .counts": 0,
    "synqt status /shared/runs/vtab1k --watch": 0,
    "synqt status DIR": 0,
    "synqt status DIR --json": 0,
    "synqt status DIR --watch": 0,
    "synqt status DIR --watch -q >/dev/null; echo $?": 0,
    "synqt status RUN_DIR": 0,
    "synqt aggregate /shared/runs/vtab1k": 0,
    "synqt aggregate runs/ --out report/": 0,
    "synqt compare /shared/runs/vtab1k /shared/runs/vtab1k_T4": 0,
    "synqt compare published.csv mine=/shared/runs/vtab1k": 0,
    "synqt compare paper=published_synqt.csv mine=/shared/runs/vtab1k --metric best_of_test": 0,
    "synqt compare A B C --out report/compare": 0,
    "tensorboard --logdir /shared/runs/vtab1k": 0,
    "synqt data check /data/vtab-1k": 0,
    "synqt data check /data/vtab-1k cifar": 0,
    "synqt data check /data/vtab-1k cifar dtd": 0,
    "synqt data check /data/vtab-1k cifar --decode": 0,
    "synqt data check /data/vtab-1k cifar dtd --decode": 0,
    "synqt data check /data/fgvc --layout fgvc_json": 0,
    "synqt data check /data/vtab-1k cifar --strict": 0,
    "synqt data check /data/vtab-1k --paths-only": 0,
    "synqt data synthetic /tmp/synthetic-vtab": 0,
    "synqt data synthetic DIR": 0,
    # a real small trial (random tiny ViT, 5 epochs on the tiny task NAME), then its resume / eval examples
    "synqt train --dataset NAME --data-root D --out RUN checkpoint=random backbone=vit_tiny_patch16_224 "
    "backbone_kwargs.img_size=32 backbone_kwargs.patch_size=4 epochs=5 warmup_epochs=1": 0,
    "synqt train --config RUN/config.yaml --out RUN --resume": 0,
    "synqt train --config my.yaml --out RUN --resume": 0,
    "synqt eval --weights RUN/trainable.safetensors": 0,
    "synqt eval --weights runs/cifar/trainable.safetensors": 0,
    "synqt eval --weights runs/cifar/trainable.safetensors --split val200 data_root=/other/vtab-1k": 0,
    "synqt bench --loader --data-root D --dataset cifar": 0,
    "ruff check synqt launcher tests": 0,
}

_VITB_SWEEP = ("would train ViT-B/16 on the 19 VTAB-1k tasks (resources.gpus=1); run with --dry-run, which checks "
               "the sweep file, overrides, data folders and list files of the tiny data and the checkpoint file")
_SBATCH = ("submits to SLURM (needs slurmctld/slurmd); run with --print, which plans and checks the same; "
           "tests/test_slurm.py::test_vtab_array_runs_ci_sweep submits an array for real")
_DEMO_SWEEP = ("the demo sweep: the same plan `synqt demo` runs for real above (a minute of Ray on CPU); run "
               "with --dry-run to keep the harness cheap")
DRY: dict[str, str] = {
    "synqt sweep configs/sweeps/vtab1k.yaml data_root=/data/vtab-1k checkpoint=/w/ViT-B_16.npz storage_path=runs":
        _VITB_SWEEP,
    "synqt sweep configs/sweeps/vtab1k.yaml data_root=/data/vtab-1k checkpoint=/w/ViT-B_16.npz "
    "storage_path=/shared/runs": _VITB_SWEEP,
    "synqt sweep configs/sweeps/vtab1k.yaml storage_path=/shared/runs data_root=/data/vtab-1k grid.lr=[1e-3,5e-4] "
    "seeds=[42] resources.gpus=0.5 max_concurrent=8 pack=auto epochs=5 warmup_epochs=1 "
    "backbone_kwargs.img_size=32 per_dataset.dtd.lr=5e-4": _VITB_SWEEP,
    "synqt sweep configs/sweeps/demo.yaml storage_path=/tmp/runs": _DEMO_SWEEP,
    "synqt sweep configs/sweeps/demo.yaml": _DEMO_SWEEP,
    "synqt sweep configs/sweeps/demo.yaml storage_path=/tmp/seq --sequential": _DEMO_SWEEP,
    "time synqt sweep configs/sweeps/demo.yaml storage_path=/tmp/cmpS --sequential": _DEMO_SWEEP,
    "time synqt sweep configs/sweeps/demo.yaml storage_path=/tmp/cmpR": _DEMO_SWEEP,
    "synqt sweep configs/sweeps/vtab1k.yaml data_root=/data/vtab-1k checkpoint=/w/ViT-B_16.npz "
    "storage_path=/shared/runs --resume": _VITB_SWEEP,
    "synqt slurm array configs/sweeps/vtab1k.yaml storage_path=/shared/runs data_root=/data/vtab-1k "
    "checkpoint=/w/ViT-B_16.npz": _SBATCH,
    "synqt slurm array configs/sweeps/vtab1k.yaml storage_path=/shared/runs data_root=/data/vtab-1k "
    "checkpoint=/w/ViT-B_16.npz --concurrency 16 --sbatch-args \"--gpus=1\"": _SBATCH,
    "synqt slurm array configs/sweeps/vtab1k.yaml data_root=/data/vtab-1k checkpoint=/weights/ViT-B_16.npz "
    "storage_path=/shared/runs --concurrency 16 --sbatch-args \"--partition=gpu --gpus=1 --cpus-per-task=8\"": _SBATCH,
    "synqt slurm array configs/sweeps/vtab1k.yaml storage_path=/shared/runs data_root=/shared/vtab-1k "
    "checkpoint=/shared/weights/ViT-B_16.npz --concurrency 16 --sbatch-args \"--gpus=1\"": _SBATCH,
}

_VITB = "trains or evaluates ViT-B/16 at 224 px (the official recipe: hours on 2 CPU cores, a GPU's job)"
_VITB_BENCH = ("times ViT-B/16 at 224 px (minutes and several GiB on CPU); tests/test_bench.py runs the same "
               "code at tiny sizes")
_SLURM = ("needs the SLURM daemons; tests/test_slurm.py runs slurm/vtab.sh and vtab_array.sh under real ones (the "
          "`synqt sweep` of each vtab.sh job gets its pre-flight: test_every_submitted_sweep_passes_its_preflight)")
_RAYJOB = ("needs a running Ray head at HEAD:8265; tests/test_ray.py::test_ray_job_submit_to_a_started_cluster "
           "starts one (`ray start --head`) and submits `synqt sweep` with `ray job submit --working-dir`; the "
           "submitted sweep gets its pre-flight here (test_every_submitted_sweep_passes_its_preflight)")
_SYNOPSIS = "a synopsis (placeholders, elided `...` or optional `[...]` parts); its concrete forms are in RUN/DRY"
_INSTALL = "installs into the environment; .ci/run runs it, tests/test_install.py builds the wheel and runs the demo"
_GPU = "needs a CUDA device (docs/gpu.md: the GPU node's check)"
_GPU_CPU = ("the GPU check's CPU variant (about 1.5 min of 2 cores): tests/test_gpu_check.py::"
            "test_gpu_check_script_cpu_mode_passes_every_check runs `scripts/gpu_check.sh --cpu --no-install`")
_GPU_OFFLINE = ("the offline GPU install (docs/gpu.md): downloads or builds wheels on a connected machine, or "
                "installs them")
_SUITE = "the test suite itself (or a part of it)"
_MENTION = "names a flag in prose (no required argument)"
NOT_RUN: dict[str, str] = {
    "pip install -e \".[dev]\"": _INSTALL,
    "pip install .": _INSTALL,
    "DS_BUILD_SHM_COMM=1 pip install deepspeed": "builds DeepSpeed's C++ ops (a download and a compiler); optional",
    "pip download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp --abi cp312 --abi abi3 "
    "--abi none --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 "
    "--platform any -d wheels/ -r scripts/gpu_wheels.txt": _GPU_OFFLINE,
    "pip wheel --no-deps --no-build-isolation \"deepspeed==0.19.8\" -w wheels/": _GPU_OFFLINE,
    "pip install --no-index --find-links wheels/ wheels/*.whl": _GPU_OFFLINE,
    "pip install --no-deps --no-index --find-links wheels/ -e .": _GPU_OFFLINE,
    "SYNQT_CHECK_DEVICE=cuda python -m pytest -m gpu tests/test_gpu.py": _GPU,
    "SYNQT_CHECK_DEVICE=cpu python -m pytest -m \"gpu and not cuda_only\" tests/test_gpu.py": _SUITE + "; " + _GPU_CPU,
    "synqt gpu-check --out gpu-check": _GPU,
    "synqt gpu-check --only pytest,bench": _GPU,
    "synqt gpu-check --cpu --out /tmp/gpu-check": _GPU_CPU,
    "scripts/gpu_check.sh": _GPU + "; installs offline into .gpu-venv first",
    "scripts/gpu_check.sh --cpu --no-install --out /tmp/gpu-check": _GPU_CPU,
    "python -m pytest -q": _SUITE,
    "python -m pytest -q -m \"not slow\"": _SUITE,
    "python -m pytest -q -m multinode": _SUITE + "; needs root and network namespaces",
    "python -m pytest -q tests/test_multinode.py": _SUITE + "; needs root and network namespaces",
    "python tests/slurm_harness.py --nodes 3": "starts SLURM daemons in network namespaces (root); what "
                                               "tests/test_multinode.py does",
    "python -m synqt.tools.pretrain [DIR]": "pre-trains the demo backbone (a minute); tests/conftest.py::demo_assets "
                                      "runs the same ensure_demo_assets",
    "OMP_NUM_THREADS=1 python scripts/kv_trial_cost.py --out /tmp/kv-trial --backbone vit_small_patch16_224 "
    "--n-train 1000 --n-test 1000": "a 50-epoch ViT-S/16 trial on 1,000 images: the measurement itself (minutes)",
    "python scripts/kv_accuracy_table.py --out /tmp/kv-table --seeds 42 43 44":
        "the issue-15 accuracy table: 108 trials (an hour of CPU)",
    "synqt train --dataset cifar --data-root /data/vtab-1k --checkpoint ViT-B_16.npz --out runs/cifar": _VITB,
    "synqt train --dataset dtd --data-root D --checkpoint ViT-B_16.npz --out RUN protocol=vtab stage=search "
    "lr=5e-4 token_nums=4": _VITB,
    "synqt train --dataset dtd --data-root D --checkpoint ViT-B_16.npz --out RUN protocol=vtab stage=search "
    "lr=5e-4": _VITB,
    "synqt eval --weights W.safetensors --dataset cifar --data-root D --checkpoint ViT-B_16.npz": _VITB,
    "synqt eval --weights official_cifar.pth --official --dataset cifar --data-root D --checkpoint ViT-B_16.npz":
        _VITB + "; needs the official implementation's cifar state dict",
    "synqt slurm task configs/sweeps/vtab1k.yaml 17 storage_path=/shared/runs data_root=/data/vtab-1k "
    "checkpoint=/w/ViT-B_16.npz": _VITB + "; tests/test_slurm.py::test_vtab_array_runs_ci_sweep runs array tasks",
    "synqt slurm task configs/sweeps/vtab1k.yaml 17 storage_path=/shared/runs data_root=/data/vtab-1k "
    "checkpoint=/weights/ViT-B_16.npz": _VITB + "; tests/test_slurm.py::test_vtab_array_runs_ci_sweep runs array tasks",
    "ray start --head": "starts a Ray head and leaves it running; tests/test_ray.py starts one (`ray start --head`)",
    "ray job submit": _RAYJOB,
    "python -m pytest": _SUITE,
    "scancel --batch --signal=USR1": _SLURM,
    "synqt bench": _VITB_BENCH,
    "synqt slurm task configs/sweeps/vtab1k.yaml 17 storage_path=...": _SYNOPSIS,
    "synqt bench --steps 1 --json vitb_b64.json": _VITB_BENCH,
    "TIMM_FUSED_ATTN=0 synqt bench --steps 1 --modes keep": _VITB_BENCH,
    "synqt bench batch_size=8 --steps 5 --modes keep": _VITB_BENCH,
    "synqt bench batch_size=8 precision=bf16 --steps 5 --modes keep": _VITB_BENCH,
    "synqt bench batch_size=8 precision=bf16 --steps 3": _VITB_BENCH,
    "synqt bench --pack 8 batch_size=8 --steps 2 --no-baselines --modes keep": _VITB_BENCH,
    "synqt bench --pack 8 batch_size=8 --steps 2 --no-baselines": _VITB_BENCH,
    "synqt bench --pack 8 batch_size=8": _VITB_BENCH,
    "synqt bench --kv-cache batch_size=32": _VITB_BENCH,
    "synqt bench backbone=vit_base_patch16_224 batch_size=64": _VITB_BENCH,
    "OMP_NUM_THREADS=1 synqt bench --kv-cache batch_size=64 --steps 2 --json kv-bench-vitb-64.json": _VITB_BENCH,
    "OMP_NUM_THREADS=1 synqt bench --kv-cache batch_size=32 --steps 2 --json kv-bench-vitb-32.json": _VITB_BENCH,
    "synqt bench --kv-cache backbone=vit_small_patch16_224 batch_size=64 --steps 2":
        "times ViT-S/16 at 224 px (minutes on CPU); tests/test_bench.py runs the same code at tiny sizes",
    "synqt bench --loader --data-root ~/.cache/synqt/demo/synthetic-vtab --dataset syn_colour_shape --modes keep "
    "--no-baselines --steps 1 batch_size=8": _VITB_BENCH + " (besides the loader)",
    "ray job submit --address http://HEAD:8265 --working-dir . -- synqt sweep configs/sweeps/vtab1k.yaml "
    "data_root=/shared/vtab-1k checkpoint=/shared/weights/ViT-B_16.npz storage_path=/shared/runs": _RAYJOB,
    "ray job submit --address http://HEAD:8265 --working-dir . -- synqt sweep configs/sweeps/vtab1k.yaml": _RAYJOB,
    "ray job submit --address http://HEAD:8265 --working-dir . -- synqt sweep configs/sweeps/vtab1k.yaml "
    "storage_path=/shared/runs data_root=/shared/data/vtab-1k checkpoint=/shared/weights/ViT-B_16.npz": _RAYJOB,
    "ray start --head --dashboard-host=0.0.0.0": "starts a Ray head on all interfaces, left running; "
                                                 "tests/test_ray.py starts one bound to 127.0.0.1",
    "sbatch slurm/vtab.sh configs/sweeps/vtab1k.yaml data_root=/shared/vtab-1k checkpoint=/shared/weights/ViT-B_16.npz "
    "storage_path=/shared/runs": _SLURM,
    "sbatch --nodes=4 --gpus-per-node=4 --cpus-per-task=32 slurm/vtab.sh configs/sweeps/vtab1k.yaml data_root=... "
    "checkpoint=... storage_path=...": _SLURM,
    "sbatch --gpus-per-node=4 --cpus-per-task=32 slurm/vtab.sh configs/sweeps/vtab1k.yaml data_root=/data/vtab-1k "
    "checkpoint=/weights/ViT-B_16.npz storage_path=/shared/runs": _SLURM,
    "sbatch --nodes=4 --gpus-per-node=4 --cpus-per-task=32 --time=48:00:00 slurm/vtab.sh configs/sweeps/vtab1k.yaml "
    "data_root=/data/vtab-1k checkpoint=/weights/ViT-B_16.npz storage_path=/shared/runs": _SLURM,
    "sbatch --cpus-per-task=16 slurm/vtab.sh configs/sweeps/vtab1k.yaml resources.gpus=0 data_root=... "
    "checkpoint=... storage_path=...": _SLURM,
    "synqt slurm script vtab.sh && sbatch vtab.sh vtab1k ...": _SLURM + "; `synqt slurm script` runs in RUN",
    "squeue -u $USER": _SLURM,
    "scancel --batch --signal=USR1 JOBID": _SLURM,
    "scontrol requeue $SLURM_JOB_ID": _SLURM,
    "scontrol requeue <array>_<index>": _SLURM,
    "sbatch --array=3,7 slurm/vtab_array.sh ...": _SLURM,
    "sbatch --nodes=3 --cpus-per-task=1 slurm/vtab.sh configs/sweeps/ci.yaml ... max_concurrent=3": _SLURM,
    "scontrol update StartTime=now": _SLURM,
    "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/tmp/ray-<jobid>/auth_token ray status --address <HEAD:PORT>":
        _SLURM + " (a running vtab.sh job's Ray cluster)",
    "ray start --head --node-ip-address=<sqn1> --dashboard-host=<sqn1>": _SYNOPSIS,
    "ray start --address=<sqn1>:6379": _SYNOPSIS,
    "ray job submit --address http://<sqn1>:8265 -- synqt sweep ...": _SYNOPSIS,
    "synqt sweep FILE ... --resume": _SYNOPSIS,
    "synqt sweep FILE ... --sequential": _SYNOPSIS,
    "synqt sweep FILE <overrides> --resume": _SYNOPSIS,
    "synqt sweep FILE [key=value ...] [--dry-run [--json]] [--resume] [--address ADDR] [--strict]": _SYNOPSIS,
    "synqt sweep ... --strict": _SYNOPSIS,
    "python scripts/split_leak_cost.py --root /tmp/leaks-bench --json docs/bench_results/split-leak-cost-2core.json":
        "the split-leak cost measurement itself: writes a VTAB-1k-sized task (11,000 images) and the committed "
        "result file",
    "synqt data check /tmp/leaks-bench/data vtabsize": "reads the 11,000-image task the line above writes (its "
                                                      "measurement); tests/test_split_leaks.py checks small ones",
    "synqt sweep configs/sweeps/demo.yaml storage_path=... --sequential": _SYNOPSIS,
    "synqt sweep ... resources.devices=2": _SYNOPSIS,
    "synqt sweep ... --dry-run --json": _SYNOPSIS,
    "synqt train ... trainer=deepspeed num_devices=2": _SYNOPSIS,
    "synqt train --config RUN/config.yaml ...": _SYNOPSIS,
    "synqt train --out RUN --resume key=value": _SYNOPSIS,
    "synqt aggregate RUN_DIR [--out DIR]": _SYNOPSIS,
    "synqt aggregate <storage_path>/<name>": _SYNOPSIS,
    "synqt status <storage_path>/<name>": _SYNOPSIS,
    "tensorboard --logdir <storage_path>/<name>": _SYNOPSIS,
    "tensorboard --logdir <sweep>": _SYNOPSIS,
    "synqt compare A B ... [--metric best_of_test] [--out OUT]": _SYNOPSIS,
    "synqt compare A B ...": _SYNOPSIS,
    "synqt ... --help": _SYNOPSIS,
    "synqt train --out": _MENTION,
    "synqt sweep --resume": _MENTION,
    "synqt compare --out": _MENTION,
    "synqt bench --json": _MENTION,
    "synqt train --out same": _SYNOPSIS,
    "synqt train --out <sweep>/runs/<run>": _SYNOPSIS,
    "synqt data synthetic ROOT": _SYNOPSIS,
    "synqt slurm script DEST": _SYNOPSIS,
    "synqt sweep --dry-run": _MENTION,
    "synqt sweep --sequential": _MENTION,
    "synqt data check --decode": _MENTION,
    "synqt bench --kv-cache": _VITB_BENCH,
}


# a placeholder that means another path in one example: placeholder -> the path (of PATHS) it stands for there
CONTEXT = {"synqt data synthetic DIR": {"DIR": "/tmp/synthetic-vtab"}}


def test_every_example_is_classified():
    shown = {e.text: e for e in all_examples()}
    tables = {**RUN, **DRY, **NOT_RUN}
    unclassified = [f"{e.where}: {t}" for t, e in shown.items() if t not in tables]
    stale = [t for t in tables if t not in shown]
    assert not unclassified, "commands in the docs that the harness neither runs nor lists:\n" + "\n".join(unclassified)
    assert not stale, "entries for commands the docs no longer show:\n" + "\n".join(stale)
    assert not (set(RUN) & set(DRY)) and not (set(RUN) & set(NOT_RUN)) and not (set(DRY) & set(NOT_RUN))


def test_the_extractor_finds_each_kind_of_example():
    """The extractor itself: code blocks, continuations, inline spans and epilogs (counts from the files)."""
    texts = {e.text for e in all_examples()}
    assert "synqt demo" in texts  # an indented block
    assert any(t.startswith("sbatch --gpus-per-node=4") and t.endswith("storage_path=/shared/runs")
               for t in texts)  # a fenced block with a continuation
    assert "synqt sweep FILE --resume storage_path=/shared/runs" in texts  # inline
    assert "synqt slurm array configs/sweeps/vtab1k.yaml --print" in texts  # an epilog
    assert not any(t.startswith("synqt sweep:") for t in texts)  # printed output is not a command
    assert len(help_examples()) >= 20


def _first_command(text: str) -> str:
    """The first command of a shell line (`A | jq`, `A; echo $?`, `A && B`, `A >/dev/null`): A."""
    return re.split(r" \| |; | && | >", text)[0]


def _synqt_argv(text: str) -> list[str] | None:
    words = shlex.split(_first_command(text))
    while words and (_ENV.match(words[0]) or words[0] == "time"):
        words = words[1:]
    return words[1:] if words and words[0] == "synqt" else None


def _concrete_synqt_examples() -> list[str]:
    """Every `synqt` example but synopses and mentions of a flag (which name no required argument)."""
    table = {**RUN, **DRY, **NOT_RUN}
    return sorted(t for t, why in table.items() if _words(t)[0] == "synqt" and not any(m in t for m in TEMPLATE)
                  and not (isinstance(why, str) and why.startswith(_MENTION)))


@pytest.mark.parametrize("text", _concrete_synqt_examples())
def test_every_synqt_example_parses(text):
    """The real parser accepts every concrete `synqt` example (also those not run: ViT-B, SLURM)."""
    from launcher.cli import build_parser, parse_args

    argv = _synqt_argv(text)
    assert argv is not None
    try:
        parse_args(build_parser(), argv)
    except SystemExit as e:
        assert e.code == 0 and argv[-1] in ("--help", "--version"), f"`{text}` is refused by the parser"


# ---------------------------------------------------------------------------------------------------------------
# tiny inputs


def _png(path: Path, rng: np.random.Generator) -> None:
    """An 8x8 image of random pixels: no two images of a tiny dataset are alike (no split leaks)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


def _tiny_lists(folder: Path, k: int, splits: dict[str, int], rng: np.random.Generator,
                prefix: str = "") -> dict[str, dict[str, int]]:
    """{split: {relative path: label}}: ``splits[s]`` distinct images each (train: one per class 0..k-1)."""
    out = {}
    for split, n in splits.items():
        out[split] = {f"{prefix}{split}/{i}.png": i % k for i in range(n)}
        for rel in out[split]:
            _png(folder / rel, rng)
    return out


def write_tiny_vtab(root: Path) -> Path:
    """Every VTAB-1k task of the registry in the vtab_json layout with its real class count: train800 holds one
    image per class, val200 and test four, all distinct (a dry run, `data check` and its split-leak check see the
    true geometry of a clean copy)."""
    from synqt.data import registry

    rng = np.random.default_rng(0)
    for info in registry.datasets(benchmark="vtab1k"):
        folder = root / info.name
        k = info.num_classes or 2
        lists = _tiny_lists(folder / "images", k, {"train800": k, "val200": 4, "test": 4}, rng)
        lists["train800val200"] = {**lists["train800"], **lists["val200"]}
        for split, entries in lists.items():
            (folder / f"{split}.json").write_text(json.dumps([{p: lab} for p, lab in entries.items()]))
    return root


def write_tiny_fgvc(root: Path) -> Path:
    """Every FGVC task in the fgvc_json layout (class ids: one train image each), four val and test images."""
    from synqt.data import registry

    rng = np.random.default_rng(1)
    for info in registry.datasets(benchmark="fgvc"):
        folder = root / info.name
        k = info.num_classes or 2
        lists = _tiny_lists(folder / "images", k, {"train": k, "val": 4, "test": 4}, rng)
        for split, entries in lists.items():
            (folder / f"{split}.json").write_text(json.dumps(entries))
    return root


def write_published_csv(path: Path, tasks: list[str]) -> Path:
    """A published table over the demo's tasks as `method,dataset,accuracy,best_of_test` rows (`synqt compare
    --help`). The paper layout (one column per task) takes VTAB-1k / FGVC task names only, which the demo sweep
    does not have: tests/test_report.py::test_compare_reads_a_paper_layout_table_one_source_per_method reads one."""
    path.write_text("method,dataset,accuracy,best_of_test\n" + "".join(f"SynQT (paper),{t},50.0,51.0\n" for t in tasks))
    return path


@dataclass
class World:
    tmp: Path
    cwd: Path
    paths: dict[str, str]  # a path (or path placeholder) as the docs write it -> the tiny stand-in
    env: dict[str, str]


@pytest.fixture(scope="module")
def world(demo_assets, tmp_path_factory) -> World:
    data_root, ckpt = demo_assets
    tmp = tmp_path_factory.mktemp("examples")
    vtab = write_tiny_vtab(tmp / "vtab-1k")
    from synqt.data.synthetic import write_benchmark

    small = write_benchmark(tmp / "small", tasks=["syn_blobs"], n_train=16, n_val=8, n_test=16)
    (vtab / "mytask").symlink_to(small / "syn_blobs")  # NAME: a dataset folder without a shipped config
    fgvc = write_tiny_fgvc(tmp / "fgvc")
    npz = tmp / "weights" / "ViT-B_16.npz"
    npz.parent.mkdir()
    np.savez(npz, **{"Transformer/encoder_norm/scale": np.ones(4, np.float32)})  # a real npz (dry runs sniff it)
    cwd = tmp / "cwd"
    cwd.mkdir()
    for name in ("configs", "slurm", "scripts"):
        (cwd / name).symlink_to(REPO / name)
    demo_out = cwd / "synqt-demo"  # `synqt demo`'s default --out: the second demo continues the first one's sweep
    sweep = demo_out / "demo"
    (tmp / "report").mkdir()
    run = tmp / "run"
    csv = write_published_csv(tmp / "published.csv", ["syn_colour_shape", "syn_texture", "syn_blobs", "syn_lesion",
                                                      "syn_count", "syn_orientation"])
    paths = {
        "/tmp/synqt-demo": demo_out, "/shared/runs": demo_out, "/shared/runs/vtab1k": sweep,
        "/shared/runs/vtab1k_T4": tmp / "T4", "DIR": sweep, "RUN_DIR": sweep, "runs/": sweep / "runs",
        "FILE": "configs/sweeps/demo.yaml", "A": sweep, "B": tmp / "T4", "C": csv, "published.csv": csv,
        "published_synqt.csv": csv, "report/": tmp / "report/",
        "/data/vtab-1k": vtab, "/other/vtab-1k": vtab, "D": vtab, "/data/fgvc": fgvc,
        "/tmp/synthetic-vtab": tmp / "synthetic",
        "NAME": "mytask", "RUN": run, "runs/cifar": run, "my.yaml": run / "config.yaml",
        "/w/ViT-B_16.npz": npz, "/weights/ViT-B_16.npz": npz, "/shared/weights/ViT-B_16.npz": npz,
        "ViT-B_16.npz": npz,
        "/shared/vtab-1k": vtab, "/shared/data/vtab-1k": vtab, "runs": tmp / "runs", "/tmp/runs": tmp / "tmp-runs",
        "/tmp/seq": tmp / "seq",
        "/tmp/cmpS": tmp / "cmpS", "/tmp/cmpR": tmp / "cmpR",
    }
    env = {"SYNQT_DEMO_DIR": str(ckpt.parent), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")]), "SYNQT_CACHE_DIR": str(tmp / "cache")}
    return World(tmp, cwd, {k: str(v) for k, v in paths.items()}, env)


# `key=...` in a line that elides a path: the path a reader would put there (a key of PATHS)
ELIDED = {"data_root": "/data/vtab-1k", "checkpoint": "/w/ViT-B_16.npz", "storage_path": "/shared/runs"}


def substitute(text: str, paths: dict[str, str]) -> list[str]:
    """The example's words with every path replaced: a whole word, a `key=PATH` value or a `PATH/...` prefix
    (`key=...` too, for the keys of ELIDED)."""
    out = []
    for word in shlex.split(text):
        key, eq, value = word.partition("=") if "=" in word and not word.startswith("-") else ("", "", word)
        if value == "..." and key in ELIDED:
            value = ELIDED[key]
        for path in sorted(paths, key=len, reverse=True):
            if value == path:
                value = paths[path]
                break
            if path.endswith("/") and value.startswith(path) or value.startswith(path + "/"):
                value = paths[path].rstrip("/") + "/" + value[len(path):].lstrip("/")
                break
        out.append(f"{key}{eq}{value}")
    return out


def _subprocess(argv: list[str], world: World, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, **world.env}
    return subprocess.run(argv, cwd=world.cwd, env=env, capture_output=True, text=True, timeout=600, **kw)


def _synqt_in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    from launcher.cli import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # --help / --version
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _tensorboard_serves(argv: list[str], world: World) -> tuple[int, str, str]:
    """Start `tensorboard --logdir X` on a free port, wait for its URL line, read its run list over HTTP."""
    proc = subprocess.Popen([*argv, "--port", "0", "--bind_all"] if "--port" not in argv else argv,
                            cwd=world.cwd, env={**os.environ, **world.env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:  # the state we wait for: the line naming its URL
            lines.append(line)
            m = re.search(r"(http://[^\s/]+:\d+)/", line)
            if m:
                url = m.group(1).replace("0.0.0.0", "127.0.0.1")
                with urllib.request.urlopen(url + "/data/runs", timeout=60) as resp:
                    runs = json.loads(resp.read())
                return (0 if runs else 1), json.dumps(runs), "".join(lines)
        return 1, "", "".join(lines)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait()


def run_example(text: str, world: World, capsys, *, append: str = "") -> tuple[int, str, str]:
    """Run one example (paths substituted, ``append`` added: `--dry-run` / `--print`); (exit code, out, err)."""
    paths = {**world.paths, **{k: world.paths[v] for k, v in CONTEXT.get(text, {}).items()}}
    words = substitute(_first_command(text), paths)
    env = {}
    while words and (_ENV.match(words[0]) or words[0] == "time"):
        if words[0] != "time":
            env[words[0].split("=")[0]] = words[0].split("=", 1)[1]
        words = words[1:]
    words += append.split()
    if words[0] == "tensorboard":
        return _tensorboard_serves(words, world)
    if words[0] == "ruff":
        out = subprocess.run([sys.executable, "-m", *words], cwd=REPO, capture_output=True, text=True)
        return out.returncode, out.stdout, out.stderr
    assert words[0] == "synqt" and not env, text
    if words[1:2] == ["demo"] or words[1:2] == ["sweep"] and "--resume" in words and not append:
        # a sweep that may start Ray: a process of its own, which says whether it imported Ray
        probe = ("import sys; from launcher.cli import main; code = main(sys.argv[1:]); "
                 "print('RAY_IMPORTED', 'ray' in sys.modules); sys.exit(code)")
        out = _subprocess([sys.executable, "-c", probe, *words[1:]], world)
        return out.returncode, out.stdout, out.stderr
    old = Path.cwd()
    os.chdir(world.cwd)
    try:
        return _synqt_in_process(words[1:], capsys)
    finally:
        os.chdir(old)


def test_every_runnable_example_exits_as_documented(world, capsys):
    """RUN as written and DRY with --dry-run / --print, on the tiny inputs; one finished demo sweep for all."""
    failures, outputs = [], {}
    for text, expected in [*RUN.items(), *((t, 0) for t in DRY)]:
        append = "" if text in RUN else ("--print" if " slurm array " in text else "--dry-run")
        code, out, err = run_example(text, world, capsys, append=append)
        outputs[text] = (code, out, err)
        if code != expected:
            failures.append(f"`{text}`{' + ' + append if append else ''}: exit {code}, expected {expected}\n"
                            f"  stdout: {out[-1500:]}\n  stderr: {err[-1500:]}")
        if text == "synqt demo --out /tmp/synqt-demo" and code == 0:
            shutil.copytree(world.paths["/shared/runs/vtab1k"], world.paths["/shared/runs/vtab1k_T4"])
    assert not failures, "\n".join(failures)
    # issue 21 item 6, on the same runs: Ray's token notice is not printed without -v (Ray >= 2.60 logs it on every
    # local ray.init()), but the run did use Ray
    code, out, err = outputs["synqt demo --out /tmp/synqt-demo"]
    assert "RAY_IMPORTED True" in out and "Token authentication" not in err, err[-3000:]
    # a second demo and a --resume of the finished sweep see every run done: no Ray, the table again
    for text in ("synqt demo", "synqt sweep FILE --resume storage_path=/shared/runs"):
        code, out, err = outputs[text]
        assert "RAY_IMPORTED False" in out and "nothing to run" in out and "Mean" in out, text + out + err
    st = json.loads(outputs["synqt status /shared/runs/vtab1k --json | jq .counts"][1])
    assert st["counts"]["done"] == 12 and st["total"] == 12
    assert "nothing running or pending" in outputs["synqt status /shared/runs/vtab1k"][1]
    # eval on val200 of a paper-protocol run (it trained on train800val200): said to be training images
    code, out, err = outputs["synqt eval --weights runs/cifar/trainable.safetensors --split val200 "
                             "data_root=/other/vtab-1k"]
    assert "holds images this run trained on" in err and "val200" in out
    code, out, err = outputs["synqt eval --weights RUN/trainable.safetensors"]  # test: held out, no warning
    assert "trained on" not in err
    # the preview of the array command: no data or weights needed; the aggregate job asks for no GPU
    out = outputs["synqt slurm array vtab1k storage_path=/shared/runs --concurrency 16 --sbatch-args \"--gpus=1\" "
                  "--print"][1]
    array, aggregate = [line for line in out.splitlines() if line.startswith("sbatch")]
    assert "--array=0-18%16" in array and "--gpus=1" in array
    assert "--gpus" not in aggregate and "--dependency=afterany:" in aggregate and "not set yet" in out


@pytest.mark.parametrize("sbatch_args, kept", [
    ("--gpus=1", []),
    ("--partition=gpu --gpus 2 -c 8 --account=lab --time=1:00:00", ["--partition=gpu", "--account=lab",
                                                                   "--time=1:00:00"]),
    ("--gres=gpu:a100:1 --mem=64G --qos=high -G 1 --exclusive -p gpu", ["--qos=high", "-p", "gpu"]),
    ("--cpus-per-task=8 --constraint=a100 --mail-type=END", ["--constraint=a100", "--mail-type=END"]),
])
def test_the_aggregate_job_gets_the_sbatch_args_without_resource_requests(sbatch_args, kept):
    """Issue 21: `--sbatch-args "--gpus=1"` gave the one-CPU aggregate job a GPU too."""
    from launcher.run.slurm import array_commands

    array, aggregate = array_commands("vtab1k", [], n_trials=3, sweep_dir="/s/vtab1k", concurrency=2,
                                      sbatch_args=sbatch_args)
    assert array[3:3 + len(shlex.split(sbatch_args))] == shlex.split(sbatch_args)  # the array job: all of them
    start = aggregate.index("--output=%x-%j.out") + 1
    assert aggregate[start:-1] == kept and aggregate[-1].startswith("--wrap=")
    assert "--cpus-per-task=1" in aggregate and "--ntasks=1" in aggregate


def _submitted_sweep(text: str) -> list[str] | None:
    """The `synqt sweep` argv an `sbatch slurm/vtab.sh SWEEP ...` job or a `ray job submit ... -- synqt sweep ...`
    runs (vtab.sh passes its arguments to `synqt sweep`), or None."""
    words = shlex.split(text)
    if words[:3] == ["ray", "job", "submit"] and "--" in words:
        rest = words[words.index("--") + 1:]
        return rest[2:] if rest[:2] == ["synqt", "sweep"] else None
    if words[0] == "sbatch":
        scripts = [i for i, w in enumerate(words) if w.endswith("vtab.sh")]
        return words[scripts[0] + 1:] if scripts else None
    return None


# the README's "with data_root, checkpoint and storage_path set in the sweep file": the user's file, not the shipped
SWEEP_FILE_HAS_PATHS = {"ray job submit --address http://HEAD:8265 --working-dir . -- synqt sweep "
                        "configs/sweeps/vtab1k.yaml"}
SUBMITTED = sorted(t for t in NOT_RUN if _submitted_sweep(t) and "..." not in t.split()  # `key=...` is a path
                   and not any(m in t for m in TEMPLATE if m != "...") and t not in SWEEP_FILE_HAS_PATHS)


@pytest.mark.parametrize("text", SUBMITTED)
def test_every_submitted_sweep_passes_its_preflight(text, world):
    """The sweep an sbatch / `ray job submit` example starts, planned and checked as the job would before any
    resource (`launcher.plan.checks.validate`: data folders and lists, checkpoint file, split leaks), on the tiny
    data."""
    from launcher.plan.checks import validate
    from launcher.plan.schema import load_sweep
    from launcher.plan.trials import plan_trials

    argv = substitute(shlex.join(_submitted_sweep(text)), world.paths)
    old = Path.cwd()
    os.chdir(world.cwd)
    try:
        sweep = load_sweep(argv[0], argv[1:])
        validate(sweep, plan_trials(sweep))
    finally:
        os.chdir(old)
    assert sweep.resources["gpus"] == 0 or "cpus-per-task=16" not in text  # the CPU-cluster line asks for no GPU


VITB_TRAIN = sorted(t for t, why in NOT_RUN.items() if why == _VITB and t.startswith("synqt train "))


@pytest.mark.parametrize("text", VITB_TRAIN)
def test_every_vitb_train_example_passes_its_preflight(text, world):
    """A ViT-B `synqt train` example (hours on CPU) gets the checks its trial makes before training: the
    resolved config, backbone weights given and a weights file (synqt.training.run_pack), the data folder and the
    lists of its splits (the trainer's setup)."""
    from launcher.cli import _trial_overrides, build_parser, parse_args
    from synqt.config import load_config, splits_for
    from synqt.data.splits import validate_dataset
    from synqt.weights.identify import check_file, require_backbone_weights

    args = parse_args(build_parser(), substitute(text, world.paths)[1:])
    cfg = load_config(args.config, _trial_overrides(args))
    require_backbone_weights(cfg.checkpoint, f"dataset {cfg.dataset!r}")
    check_file(Path(cfg.checkpoint))
    validate_dataset(cfg.data_root, cfg.dataset, list(splits_for(cfg)), cfg.num_classes, cfg.layout)
