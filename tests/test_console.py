"""What `synqt` prints and returns (issue 13 "Talk like a tool", issue 12 kind 8 "the command line").

Real processes where the console matters (pipes, a pseudo-terminal, SIGINT); every expected number is
read from the files the run wrote (metrics.json) or from the command line the test gave.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from engine_helpers import (  # noqa: F401 - _one_thread_no_progress is an autouse fixture
    TASK,
    TINY_BACKBONE,
    TINY_KW,
    _one_thread_no_progress,
    env_one_thread,
    read_json,
    write_tiny_assets,
)

from launcher.cli import main

REPO = Path(__file__).resolve().parent.parent
EPOCHS = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("console_assets")
    return write_tiny_assets(root)


def _train_args(tiny, out: Path, *extra: str) -> list[str]:
    data_root, ckpt = tiny
    return ["train", "--dataset", TASK, "--data-root", str(data_root), "--checkpoint", str(ckpt), "--out", str(out),
            f"backbone={TINY_BACKBONE}", *[f"backbone_kwargs.{k}={v}" for k, v in TINY_KW.items()],
            f"epochs={EPOCHS}", "warmup_epochs=1", "batch_size=16", "eval_every=2", "device=cpu",
            f"cache_dir={out.parent / 'cache'}", *extra]


def _synqt(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True,
                          env=kw.pop("env", env_one_thread()), timeout=kw.pop("timeout", 300), cwd=REPO, **kw)


EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+)  loss (\d+\.\d{4})  lr (\d\.\d\de[-+]\d\d)  (\d+) img/s  left (.+)$")
EVAL_LINE = re.compile(r"^eval  epoch (\d+)/(\d+)  test accuracy (\d+\.\d\d)%$")


def test_train_off_a_terminal_prints_epoch_eval_and_final_lines(tiny, tmp_path):
    """stdout is a pipe: one line per epoch, one per evaluation, the final accuracy and the run dir last."""
    run = tmp_path / "run"
    proc = _synqt(_train_args(tiny, run))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    m = read_json(run / "metrics.json")
    epochs = [EPOCH_LINE.match(x) for x in lines if x.startswith("epoch ")]
    assert all(epochs) and [(int(e[1]), int(e[2])) for e in epochs] == [(e, EPOCHS) for e in range(1, EPOCHS + 1)]
    assert all(float(e[3]) > 0 and int(e[5]) > 0 for e in epochs)
    # the lr printed for an epoch is the lr of its last optimizer step, the value TensorBoard logged there
    evals = [EVAL_LINE.match(x) for x in lines if x.startswith("eval ")]
    assert all(evals)
    assert [(int(e[1]), float(e[3])) for e in evals] == [(h["epoch"], round(h["acc"], 2)) for h in m["eval_history"]]
    assert [h["epoch"] for h in m["eval_history"]] == [2, 3]  # eval_every=2 and the last epoch
    assert lines[-1] == (f"done in {lines[-1].split('done in ')[1].split(':')[0]}: final test accuracy "
                         f"{m['test_acc']:.2f}%, best of test {m['best_of_test']:.2f}% (selected on test); "
                         f"run dir {run}")
    # the first line: the thread count and why (synqt.training.threads; issue 21 item 3), as metrics.json records it
    assert lines[0].startswith(f"threads: {m['provenance']['threads']['threads']} (")
    assert len(lines) == 1 + EPOCHS + len(m["eval_history"]) + 1  # nothing else on stdout: no step lines, no dicts
    assert "Traceback" not in proc.stderr and "{" not in proc.stdout


def test_train_quiet_prints_only_the_final_line(tiny, tmp_path):
    run = tmp_path / "run"
    proc = _synqt([*_train_args(tiny, run), "-q"])
    assert proc.returncode == 0, proc.stderr
    m = read_json(run / "metrics.json")
    assert proc.stdout.splitlines() == [proc.stdout.strip()]
    assert f"final test accuracy {m['test_acc']:.2f}%" in proc.stdout and str(run) in proc.stdout


def test_train_on_a_terminal_draws_a_progress_bar(tiny, tmp_path):
    """stderr is a pseudo-terminal: tqdm draws a bar over the optimizer steps (4 per epoch here)."""
    run = tmp_path / "run"
    env = env_one_thread()
    env.pop("SYNQT_NO_PROGRESS")
    master, slave = pty.openpty()
    # a terminal window of 30 x 120 (a fresh pty is 0 x 0, where tqdm draws an empty bar)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", *_train_args(tiny, run)], stdout=subprocess.PIPE,
                            stderr=slave, env=env, cwd=REPO)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    out = proc.communicate(timeout=60)[0].decode()
    os.close(master)
    assert proc.returncode == 0, seen.decode(errors="replace")[-2000:]
    bar = seen.decode(errors="replace")
    total = EPOCHS * 4
    assert f"/{total} [" in bar and "step/s" in bar, bar[-1000:]  # tqdm's n/total [elapsed<left, rate]
    assert f"{total}/{total}" in bar
    # the epoch and final lines still reach stdout (written above the bar)
    assert sum(x.startswith("epoch ") for x in out.splitlines()) == EPOCHS and "final test accuracy" in out


def test_overrides_are_accepted_after_flags(tmp_path):
    """`synqt sweep FILE --dry-run key=val` (issue 12 kind 8): the override reaches the plan, in order."""
    sweep = REPO / "configs" / "sweeps" / "ci.yaml"
    proc = _synqt(["sweep", str(sweep), "--dry-run", "seeds=[7]", "--json", "datasets=[syn_count]",
                   "grid.lr=[0.5]", "grid.lr=[0.25,0.125]"])
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["datasets"] == ["syn_count"]
    assert sorted((t["seed"], t["hparams"]["lr"]) for t in plan["trials"]) == [(7, 0.125), (7, 0.25)]  # last wins
    # --resume followed by an override parses too (it fails later, for the reason a user should see)
    proc = _synqt(["sweep", str(sweep), "--resume", f"storage_path={tmp_path}", "name=nothing_here"])
    assert proc.returncode == 2 and "unrecognized arguments" not in proc.stderr
    assert "--resume: no sweep at" in proc.stderr and "Traceback" not in proc.stderr


def test_an_unknown_flag_or_bare_word_after_flags_is_still_refused(capsys):
    with pytest.raises(SystemExit) as err:
        main(["sweep", str(REPO / "configs" / "sweeps" / "ci.yaml"), "--dry-run", "oops"])
    assert err.value.code == 2 and "unrecognized arguments: oops" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["status", "somewhere", "lr=1"])
    assert err.value.code == 2 and "takes no key=value overrides" in capsys.readouterr().err


def test_data_check_takes_dataset_names_after_flags(tmp_path, capsys):
    from synqt.data.synthetic import write_benchmark

    root = write_benchmark(tmp_path / "data", tasks=["syn_count", "syn_blobs"], n_train=8, n_val=4, n_test=4)
    assert main(["data", "check", str(root), "--decode", "syn_blobs"]) == 0
    out = capsys.readouterr().out
    assert "syn_blobs" in out and "syn_count" not in out  # only the named folder was checked


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`synqt sweep ... --dry-run | head -1` through a real shell pipe: no BrokenPipe traceback.

    60 seeds x 19 tasks make the plan far larger than the pipe's buffer, so the writer is certain to hit
    the closed pipe after `head` has exited; the documented status for that is 141 (as SIGPIPE).
    """
    seeds = ",".join(str(i) for i in range(60))
    err = tmp_path / "stderr"
    cmd = (f"set -o pipefail; {sys.executable} -m launcher.cli sweep configs/sweeps/vtab1k.yaml --dry-run --json "
           f"'seeds=[{seeds}]' 2>{err} | head -1")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=REPO, env=env_one_thread(),
                          timeout=300)
    assert proc.stdout == "{\n"
    assert err.read_text() == ""  # no traceback, no "Exception ignored" from the interpreter's last flush
    assert proc.returncode == 141


# ------------------------------------------------------------------------------------------ exit codes


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _metrics(dataset: str, seed: int, acc: float | None, status: str = "ok") -> dict:
    return {"dataset": dataset, "group": "Natural", "protocol": "paper", "stage": "final", "seed": seed,
            "hparams": {"lr": 1e-3}, "val_acc": None, "test_acc": acc, "best_of_test": acc,
            "trainable_params": 10, "peak_memory_bytes": 2**20, "images_per_s": 1.0, "wall_time_s": 60.0,
            "status": status, "error": None if status == "ok" else "RuntimeError: boom", "epochs_done": 2,
            "run_name": f"{dataset}_s{seed}", "eval_history": []}


def _sweep_dir(root: Path, states: list[str]) -> Path:
    """plan.json with one trial per state (done / failed / running / pending) and the matching files."""
    trials = [{"index": i, "run_name": f"cifar_s{i}", "stage": "final", "dataset": "cifar", "seed": i,
               "hparams": {"lr": 1e-3}, "epochs": 2} for i in range(len(states))]
    _write(root / "plan.json", {"name": "x", "protocol": "paper", "trials": trials, "datasets": ["cifar"]})
    for t, state in zip(trials, states, strict=True):
        d = root / "runs" / t["run_name"]
        if state in ("done", "failed"):
            _write(d / "metrics.json", _metrics("cifar", t["seed"], 50.0 + t["seed"],
                                                "ok" if state == "done" else "failed"))
        elif state == "running":
            _write(d / "progress.json", {"epoch": 1, "epochs": 2, "updated": time.time()})
        elif state == "broken":  # a metrics.json cut off mid-write
            d.mkdir(parents=True)
            (d / "metrics.json").write_text('{"dataset": "cifar", "status": "o')
    return root


@pytest.mark.parametrize(("states", "code"), [
    (["done", "done"], 0), (["done", "failed"], 3), (["done", "running", "pending"], 4),
    (["failed", "running"], 3), (["done", "broken"], 3),
])
def test_status_exit_codes(tmp_path, capsys, states, code):
    assert main(["status", str(_sweep_dir(tmp_path, states))]) == code
    assert f"done {states.count('done')} | failed {states.count('failed')}" in capsys.readouterr().out


def test_status_json_is_the_counts_and_trials(tmp_path, capsys):
    root = _sweep_dir(tmp_path, ["done", "failed", "running", "pending"])
    assert main(["status", str(root), "--json"]) == 3
    st = json.loads(capsys.readouterr().out)
    assert st["counts"] == {"done": 1, "failed": 1, "broken": 0, "running": 1, "pending": 1}
    assert {t["run_name"]: t["state"] for t in st["trials"]} == {
        "cifar_s0": "done", "cifar_s1": "failed", "cifar_s2": "running", "cifar_s3": "pending"}
    assert st["trials"][1]["error"] == "RuntimeError: boom"


def test_status_watch_follows_until_done_and_ctrl_c_is_130(tmp_path):
    """--watch --json prints one object a line until nothing runs; SIGINT ends it with 130, no traceback."""
    root = _sweep_dir(tmp_path, ["done", "running"])
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "status", str(root), "--watch", "--json",
                             "--interval", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env_one_thread(), cwd=REPO)
    first = json.loads(proc.stdout.readline())
    assert first["counts"]["running"] == 1
    # the running trial finishes: the watch prints the final state and exits 0
    (root / "runs" / "cifar_s1" / "progress.json").unlink()
    _write(root / "runs" / "cifar_s1" / "metrics.json", _metrics("cifar", 1, 51.0))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    last = json.loads(out.strip().splitlines()[-1])["counts"]
    assert last == {"done": 2, "failed": 0, "broken": 0, "running": 0, "pending": 0}

    root2 = _sweep_dir(tmp_path / "b", ["running"])
    # Ctrl-C reaches a foreground process whose SIGINT is the default; a test run started in the background
    # (CI scripts, nohup) hands its children SIGINT ignored, which Python then keeps ignoring
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "status", str(root2), "--watch",
                             "--interval", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env_one_thread(), cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().startswith("-- ")  # off a terminal each snapshot starts with its time
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err


def test_aggregate_exit_codes(tmp_path, capsys):
    ok = tmp_path / "ok"
    for seed in (1, 2):
        _write(ok / "runs" / f"cifar_s{seed}" / "metrics.json", _metrics("cifar", seed, 50.0 + seed))
    assert main(["aggregate", str(ok)]) == 0
    bad = tmp_path / "bad"
    _write(bad / "runs" / "cifar_s1" / "metrics.json", _metrics("cifar", 1, 51.0))
    _write(bad / "runs" / "cifar_s2" / "metrics.json", _metrics("cifar", 2, None, "failed"))
    assert main(["aggregate", str(bad)]) == 3
    # a planned task without any run is missing: also 3
    missing = tmp_path / "missing"
    _write(missing / "plan.json", {"name": "m", "protocol": "paper", "trials": [], "datasets": ["cifar", "dtd"]})
    _write(missing / "runs" / "cifar_s1" / "metrics.json", _metrics("cifar", 1, 51.0))
    assert main(["aggregate", str(missing)]) == 3
    capsys.readouterr()
    assert main(["aggregate", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_of_a_diverging_run_exits_3_and_says_failed(tiny, tmp_path):
    """A trial that fails (non-finite loss: lr=1e30) finishes with status 3 and a FAILED last line."""
    run = tmp_path / "run"
    proc = _synqt([*_train_args(tiny, run), "lr=1e30", "warmup_epochs=0"])
    m = read_json(run / "metrics.json")
    assert m["status"] == "failed"
    assert proc.returncode == 3, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("FAILED") and "non-finite training loss" in last and str(run) in last


def test_sequential_sweep_with_a_failing_trial_prints_it_and_exits_3(tiny, tmp_path):
    """A sweep whose second grid point diverges (lr=1e30: non-finite loss) finishes the first, lists both, exits 3."""
    data_root, ckpt = tiny
    proc = _synqt(["sweep", str(REPO / "configs" / "sweeps" / "ci.yaml"), "--sequential", f"storage_path={tmp_path}",
                   f"data_root={data_root}", f"checkpoint={ckpt}", f"datasets=[{TASK}]", "grid.lr=[0.001,1e30]",
                   "seeds=[42]", "pack=off", "epochs=1", "warmup_epochs=0", "batch_size=16", "eval_every=1",
                   "demo_assets=false", f"backbone={TINY_BACKBONE}",
                   *[f"trial.backbone_kwargs.{k}={v}" for k, v in TINY_KW.items()]])
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = {p.parent.name: read_json(p) for p in (tmp_path / "ci" / "runs").glob("*/metrics.json")}
    ok = next(n for n, m in runs.items() if m["status"] == "ok")
    bad = next(n for n, m in runs.items() if m["status"] == "failed")
    lines = proc.stdout.splitlines()
    assert f"done   {ok}   test {runs[ok]['test_acc']:.2f}%" in "\n".join(lines)
    assert any(x.startswith(f"FAILED {bad}: non-finite training loss") for x in lines)
    assert lines.count(next(x for x in lines if x.startswith("[2/2]"))) == 1
    assert any(re.fullmatch(r"\[2/2\] done 1 · running 0 · pending 0 · failed 1 · left .+", x) for x in lines)
    assert "trial(s) failed" in proc.stderr and "Traceback" not in proc.stderr


def _leaf_parsers(parser, path=()):
    """Every subcommand parser that runs a command (nested subcommands such as `slurm script` included)."""
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from _leaf_parsers(child, (*path, name))


def test_every_subcommand_takes_verbose_and_quiet():
    """-v/-q on every subcommand, including ones added later (compare, slurm script): main() reads both."""
    from launcher.cli import build_parser

    leaves = dict(_leaf_parsers(build_parser()))
    assert ("compare",) in leaves and ("slurm", "script") in leaves and ("train",) in leaves
    missing = [" ".join(p) for p, parser in leaves.items()
               if not {"-v", "-q"} <= {s for a in parser._actions for s in a.option_strings}]
    assert missing == [], f"subcommands without -v/-q: {missing}"



def test_status_of_a_folder_without_runs_is_bad_input_not_all_done(tmp_path, capsys):
    """An empty folder (a mistyped path into the storage root, say) is exit 2 with a message, never 0."""
    from launcher.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["status", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no sweep (plan.json) and no run directories" in err and "Traceback" not in err
    assert main(["status", str(tmp_path / "absent")]) == 2
