"""`synqt slurm ...`: the job-array path (one SLURM array task per trial, no Ray).

The scripts in slurm/ stay the source of truth; this module only plans, submits and runs one
array index. Array task i runs trial i of the same plan `synqt sweep FILE --dry-run` prints, with
the single-trial engine, resuming from the run directory's checkpoint (so a requeued or
resubmitted task continues, and a finished one is skipped).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from synqt.errors import ConfigError, SynQTError
from synqt.run import ownership, rundir
from synqt.shipped import package_path

# The sbatch scripts ship inside the package (launcher/sbatch; the repository root links slurm -> launcher/sbatch).
SBATCH_DIR = package_path("launcher", "sbatch")
ARRAY_SCRIPT = SBATCH_DIR / "vtab_array.sh"
SWEEP_SCRIPT = SBATCH_DIR / "vtab.sh"
SCRIPTS = {"vtab": SWEEP_SCRIPT, "vtab_array": ARRAY_SCRIPT}


def _plan(sweep_file: str, overrides: list[str], *, prepare: bool, preview: bool = False) -> tuple[Any, list[Any]]:
    """The sweep and its stage-1 plan, exactly as `synqt sweep FILE --dry-run` computes it (``preview``: a
    missing checkpoint is not an error, as in the dry run)."""
    from launcher.plan.checks import check_storage
    from launcher.plan.schema import load_sweep
    from launcher.plan.trials import plan_trials
    from launcher.run.commands import prepare_demo_assets

    sweep = load_sweep(sweep_file, overrides)
    if sweep.protocol != "paper":
        raise ConfigError(
            f"{sweep_file}: protocol={sweep.protocol!r}; the SLURM array runs the paper protocol only "
            f"(its stage 2 depends on stage-1 results): use `sbatch slurm/vtab.sh {sweep_file} ...`"
        )
    if prepare:  # an array task: its run directory must take files before demo assets, data or backbone
        check_storage(sweep)
        prepare_demo_assets(sweep)
    trials = plan_trials(sweep)
    # before sbatch (and in each task): a missing checkpoint would fail every array task; a demo_assets
    # sweep gets its checkpoint when a task prepares the assets
    if not preview and (prepare or not sweep.demo_assets):
        from synqt.weights.identify import require_backbone_weights

        for t in trials:
            require_backbone_weights(t.config.checkpoint, f"{sweep_file}: dataset {t.dataset!r}")
    return sweep, trials


def _synqt_command() -> list[str]:
    """How a job calls synqt: the console script on PATH, else this interpreter's module."""
    exe = shutil.which("synqt")
    return [exe] if exe else [sys.executable, "-m", "launcher.cli"]


def array_commands(
    sweep_file: str,
    overrides: list[str],
    *,
    n_trials: int,
    sweep_dir: str | Path,
    concurrency: int | None,
    sbatch_args: str = "",
    array_job_id: str = "<ARRAY_JOB_ID>",
) -> tuple[list[str], list[str]]:
    """The two sbatch command lines: the array over the plan, and the aggregate job after it."""
    if n_trials < 1:
        raise ConfigError(f"{sweep_file}: the plan has no trials; nothing to submit")
    if concurrency is not None and concurrency < 1:
        raise ConfigError(f"--concurrency {concurrency}: expected a positive integer")
    extra = shlex.split(sbatch_args)
    array = f"0-{n_trials - 1}" + (f"%{concurrency}" if concurrency else "")
    placement = _without_resources(extra)  # the aggregate job: one CPU, no GPU, whatever the trials ask for
    script = Path(os.environ.get("SYNQT_ARRAY_SCRIPT", ARRAY_SCRIPT))
    first = ["sbatch", "--parsable", f"--array={array}", *extra, str(script), sweep_file, *overrides]
    wrap = shlex.join([*_synqt_command(), "aggregate", str(sweep_dir)])
    second = [
        "sbatch", "--parsable", f"--dependency=afterany:{array_job_id}", "--job-name=synqt-aggregate",
        "--ntasks=1", "--cpus-per-task=1", "--output=%x-%j.out", *placement, f"--wrap={wrap}",
    ]
    return first, second


# sbatch options that size a job (its resources or array); the aggregate job keeps only the others (partition,
# account, qos, time, mail, ...). Long forms as `--opt=v` or `--opt v`; short forms as `-Xv` or `-X v`.
_RESOURCE_LONG = ("--gpus", "--gpus-per-node", "--gpus-per-task", "--gpus-per-socket", "--gres", "--gpu-bind",
                  "--gpu-freq", "--cpus-per-gpu", "--mem-per-gpu", "--cpus-per-task", "--ntasks", "--ntasks-per-node",
                  "--nodes", "--mem", "--mem-per-cpu", "--array", "--job-name", "--output", "--error", "--dependency",
                  "--exclusive")
_RESOURCE_SHORT = ("-G", "-c", "-n", "-N", "-a", "-J", "-o", "-e", "-d")
_FLAG_ONLY = ("--exclusive",)


def _without_resources(args: list[str]) -> list[str]:
    """``args`` (sbatch options) without those that size the job or name its output (_RESOURCE_LONG/_SHORT)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        name = word.split("=", 1)[0]
        if name in _RESOURCE_LONG:
            takes_next = "=" not in word and name not in _FLAG_ONLY and i + 1 < len(args)
            i += 2 if takes_next and not args[i + 1].startswith("-") else 1
            continue
        if word[:2] in _RESOURCE_SHORT:
            i += 2 if len(word) == 2 and i + 1 < len(args) else 1
            continue
        out.append(word)
        i += 1
    return out


def _sbatch(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise SynQTError("sbatch not found on PATH: run this on a SLURM login node (or use --print)") from err
    if out.returncode != 0:
        raise SynQTError(f"{shlex.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
    job_id = out.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SynQTError(f"{shlex.join(cmd)}: expected a job id from sbatch --parsable, got {out.stdout!r}")
    return job_id


def submit_array(
    sweep_file: str,
    overrides: list[str],
    *,
    print_only: bool = False,
    concurrency: int | None = None,
    sbatch_args: str = "",
) -> int:
    """Submit slurm/vtab_array.sh over the plan (0..n-1 % concurrency) + a dependent aggregate job."""
    from launcher.plan.checks import validate

    sweep, trials = _plan(sweep_file, overrides, prepare=False, preview=print_only)
    ownership.check_free(sweep.sweep_dir, "sweep")  # a sweep or array tasks still running there: refuse (exit 2)
    if not print_only:  # the tasks and the aggregate job write under storage_path: refused before sbatch
        from launcher.plan.checks import check_storage

        check_storage(sweep)
    missing = [k for k in ("data_root", "checkpoint") if not all(getattr(t.config, k) for t in trials)]
    # a preview needs neither data nor weights (it names what is unset); given ones are checked as a submission does.
    # A demo sweep's data and weights are made by its first task.
    if not sweep.demo_assets and not (print_only and missing):
        # the same pre-flight as `synqt sweep`: a missing data folder or a checkpoint that is no weights file
        # would otherwise queue an array whose every task fails
        validate(sweep, trials, check_gpus=False)  # the array's GPUs come from its sbatch arguments
    if concurrency is None:
        concurrency = sweep.max_concurrent
    first, second = array_commands(
        sweep_file, overrides, n_trials=len(trials), sweep_dir=sweep.sweep_dir,
        concurrency=concurrency, sbatch_args=sbatch_args,
    )
    if print_only:
        print(f"# {len(trials)} trial(s) of {sweep_file} -> {sweep.sweep_dir}")
        if missing and not sweep.demo_assets:
            print(f"# not set yet: {' and '.join(missing)} (a submission refuses the plan without "
                  f"{'them' if len(missing) > 1 else 'it'}: add {' '.join(k + '=...' for k in missing)})")
        print(shlex.join(first))
        print(shlex.join(second).replace(shlex.quote("--dependency=afterany:<ARRAY_JOB_ID>"),
                                         "--dependency=afterany:$ARRAY_JOB_ID"))
        return 0
    array_id = _sbatch(first)
    # the sweep folder's first write, once the array is queued (a refused sbatch leaves nothing behind): what
    # the array runs, for `synqt status` and the aggregate; a resubmission with changed keys rewrites it
    from launcher.run.commands import write_sweep_files

    write_sweep_files(sweep, trials, resume=(sweep.sweep_dir / rundir.PLAN).is_file())
    _, second = array_commands(
        sweep_file, overrides, n_trials=len(trials), sweep_dir=sweep.sweep_dir,
        concurrency=concurrency, sbatch_args=sbatch_args, array_job_id=array_id,
    )
    agg_id = _sbatch(second)
    at_once = concurrency or len(trials)
    print(f"submitted array job {array_id} ({len(trials)} trial(s), at most {at_once} at once)")
    print(f"submitted aggregate job {agg_id} (runs after {array_id}; writes {sweep.sweep_dir}/results.*)")
    print(f"watch: squeue -j {array_id},{agg_id}   synqt status {sweep.sweep_dir}")
    return 0


def run_array_task(sweep_file: str, index: int, overrides: list[str]) -> int:
    """Run trial `index` of the plan with the single-trial engine (resuming from its run dir)."""
    from launcher.plan.planfile import set_aside_broken_plan, write_plan
    from synqt.training import run_trial

    sweep, trials = _plan(sweep_file, overrides, prepare=True)
    if not 0 <= index < len(trials):
        raise ConfigError(
            f"{sweep_file}: trial index {index} out of range; the plan has {len(trials)} trial(s) "
            f"(0..{len(trials) - 1})"
        )
    set_aside_broken_plan(sweep)  # a cut plan.json: moved aside, named, written again
    if not (sweep.sweep_dir / rundir.PLAN).is_file():
        write_plan(sweep, trials, False)  # atomic: concurrent tasks write the same content
    trial = trials[index]
    run_dir = trial.run_dir(sweep)
    print(f"[synqt slurm task] {index}/{len(trials)}: {trial.run_name} -> {run_dir}", flush=True)
    # one live owner per run directory: a second copy of this task (resubmitted while the first runs) stops here;
    # a requeued task (same job, next restart) or one whose process has ended is taken over (synqt/run/ownership.py)
    with ownership.Claim(run_dir, "run"):
        metrics = run_trial(trial.config, run_dir, resume=True)
    status = metrics.get("status")
    print(f"[synqt slurm task] {trial.run_name}: {status}", flush=True)
    from launcher.console import Exit, final_line

    print(f"[synqt slurm task] {final_line(metrics, run_dir)}", flush=True)
    return Exit.OK if status == "ok" else Exit.FAILED_RUNS



def write_script(dest: str | Path, name: str = "vtab", *, force: bool = False) -> Path:
    """Copy the shipped sbatch script ``name`` (``vtab`` or ``vtab_array``) to ``dest``, executable.

    ``dest`` may be a folder (the script keeps its file name there; one written with a trailing `/` is
    created). An existing file is kept unless
    ``force``; raises ConfigError naming the path or the unknown script name.
    """
    if name not in SCRIPTS:
        raise ConfigError(f"unknown sbatch script {name!r}: expected one of {', '.join(SCRIPTS)}")
    src = SCRIPTS[name]
    out = Path(dest)
    if str(dest).endswith(("/", os.sep)):  # `jobs/`: a folder, also one that does not exist yet
        out.mkdir(parents=True, exist_ok=True)
    if out.is_dir():
        out = out / src.name
    if out.exists() and not force:
        raise ConfigError(f"{out} exists; choose another path or pass --force to overwrite it")
    if not out.parent.is_dir():
        raise ConfigError(f"folder {out.parent} does not exist; create it or choose another path")
    from synqt.storage import atomic_write_bytes, check_writable

    check_writable(out.parent, "the script's destination")
    return atomic_write_bytes(out, src.read_bytes(), mode=0o755)
