"""Issue 21, item 6 (noise and polish): Ray's and Tune's misleading lines, the cost chart's axes, a stable
time-left estimate, the config table against synqt/config.py, the documented cache folder, `dist/` ignored.

The finished-sweep resume without Ray, the second `synqt demo` and the eval-on-training-images warning run in
tests/test_examples.py (they need the finished demo sweep it builds once).
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import logging
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tune's own line on Ctrl-C, as ray/tune/tune.py writes it (logger "ray.tune.tune")
TUNE_HINT = ('Experiment has been interrupted, but the most recent state was saved.\nResume experiment with: '
             'Tuner.restore(path="/x/_ray/final", trainable=...)')


def _emit_ray_notices() -> None:
    from ray._private.authentication import authentication_token_setup as ray_auth

    ray_auth._warn_token_auth_enabled()  # Ray's own function: the exact record a local ray.init() logs
    ray_auth._warn_token_auth_disabled()  # another Ray warning of the same logger: must still show
    logging.getLogger("ray.tune.tune").warning(TUNE_HINT)


class _Collect(logging.Handler):
    """The records a logger passes on (after its filters), whatever handlers Ray set up for the output."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _ray_notices_passed() -> str:
    collect = _Collect()
    loggers = [logging.getLogger(n) for n in ("ray._private.authentication.authentication_token_setup",
                                               "ray.tune.tune")]
    for logger in loggers:
        logger.addHandler(collect)
    try:
        _emit_ray_notices()
    finally:
        for logger in loggers:
            logger.removeHandler(collect)
    return "\n".join(collect.messages)


@pytest.mark.parametrize("verbosity, token_shown, hint_shown", [(0, False, False), (-1, False, False),
                                                                 (1, True, False), (2, True, True)])
def test_rays_token_notice_and_tunes_restore_hint_are_left_out(verbosity, token_shown, hint_shown):
    from launcher.console import configure_logging

    restore = configure_logging(verbosity)
    try:
        passed = _ray_notices_passed()
    finally:
        restore()
    assert ("Token authentication is enabled for this Ray cluster" in passed) is token_shown
    assert ("Tuner.restore(path=" in passed) is hint_shown
    assert "Token authentication is disabled for this Ray cluster" in passed  # only those two are filtered
    # after main() returns nothing stays filtered (in-process callers, tests)
    assert "Token authentication is enabled" in _ray_notices_passed()


def _cost_inputs(params: list[int], rss: list[int]) -> tuple[dict, list[dict]]:
    runs = [{"dataset": f"t{i}", "group": "Natural", "stage": "final", "status": "ok", "test_acc": 50.0 + i,
             "hparams": {"lr": 0.001}, "trainable_params": p, "peak_memory_bytes": m, "peak_memory_kind": "cpu_max_rss"}
            for i, (p, m) in enumerate(zip(params, rss, strict=True))]
    results = {"datasets": {r["dataset"]: {"group": "Natural", "hparams": {"lr": 0.001}} for r in runs}}
    return results, runs


def test_cost_chart_axes_start_at_zero_and_say_what_memory_is():
    from launcher.results.plots import cost_figure

    # the demo's case: 0.16870 M and 0.16930 M parameters (0.3 % apart), RSS 600 and 612 MiB
    results, runs = _cost_inputs([168_700, 169_300], [600 * 2**20, 612 * 2**20])
    fig = cost_figure(results, runs)
    ax_p, ax_m = fig.axes[:2]
    for ax, largest in ((ax_p, 0.1693), (ax_m, 612.0)):
        low, high = ax.get_xlim()
        assert low == 0 and largest < high < 2 * largest  # from zero, the points in the right half
    # on a linear axis from zero the two parameter counts are 0.3 % of the span apart, not the whole span
    xs = sorted(x for line in ax_p.get_lines() for x in line.get_xdata())
    assert (xs[-1] - xs[0]) / (ax_p.get_xlim()[1] - ax_p.get_xlim()[0]) < 0.01
    assert "peak process RSS" in ax_m.get_xlabel() and "MiB" in ax_m.get_xlabel()


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _steady_sweep(root: Path, now: float, running: dict[str, int]) -> None:
    """8 trials of 10 epochs at 10 s per epoch, 2 at a time from now - 200: t0..t3 done, ``running`` (name -> epoch
    reached, started when its slot freed at now - epoch*10 - jitter), the rest pending. True time left is known."""
    names = [f"t{i}" for i in range(8)]
    trials = [{"run_name": n, "dataset": "cifar", "stage": "final", "seed": i, "epochs": 10, "hparams": {}}
              for i, n in enumerate(names)]
    _write(root / "plan.json", {"name": "s", "protocol": "paper", "trials": trials, "datasets": ["cifar"],
                                "stage2_pending": 0})
    for i, n in enumerate(names[:4]):  # pairs: [now-200, now-100] and [now-100, now]
        end = now - 100 * (1 - i // 2)
        _write(root / "runs" / n / "metrics.json", {"status": "ok", "error": None, "wall_time_s": 100.0,
                                                     "epochs_done": 10, "finished_at": end, "dataset": "cifar",
                                                     "stage": "final", "seed": i, "hparams": {}})
    for n, epoch in running.items():
        _write(root / "runs" / n / "progress.json", {"epoch": epoch, "epochs": 10, "wall_time_s": epoch * 10.0,
                                                      "updated": now})


def test_time_left_is_stable_while_packs_start_and_end(tmp_path):
    """Issue 21: 7 -> 14 -> 4 -> 8 min during the demo. A sweep running 2 trials at 0.1 epoch/s each: 40 trial-epochs
    left at 0.2 epochs/s is 200 s, whether one or two trials are running at the instant of asking."""
    from launcher.results.status import collect_status

    now = 1_700_000_000.0
    etas = []
    for i, running in enumerate(({}, {"t4": 0}, {"t4": 0, "t5": 0})):  # between packs, one started, both
        root = tmp_path / str(i)
        _steady_sweep(root, now, running)
        st = collect_status(root, now=now)
        assert st["remaining_epochs"] == 40
        etas.append(st["eta_s"])
    assert etas == [pytest.approx(200.0)] * 3


def test_status_says_nothing_is_running(tmp_path):
    from launcher.results.status import collect_status, status_text

    now = 1_700_000_000.0
    _steady_sweep(tmp_path, now, {})
    text = status_text(tmp_path, collect_status(tmp_path, now=now))
    assert "nothing running now" in text and "~3 min 20 s" in text
    assert "0 remaining epochs / 1 running" not in text
    for i in range(4, 8):  # all done
        _write(tmp_path / "runs" / f"t{i}" / "metrics.json", {"status": "ok", "error": None, "wall_time_s": 100.0,
                                                               "epochs_done": 10, "finished_at": now,
                                                               "dataset": "cifar", "stage": "final", "seed": i,
                                                               "hparams": {}})
    text = status_text(tmp_path, collect_status(tmp_path, now=now))
    assert "nothing running or pending" in text and "remaining" not in text


def _markdown_table(path: Path, header: str) -> list[list[str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _doc_default(text: str):
    """A default as the table writes it: `"..."`/`word` code spans, null, true/false, numbers, lists, {}."""
    text = text.strip("`")
    if text == "null":
        return None
    if text in ("true", "false"):
        return text == "true"
    if text == '""':
        return ""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@pytest.mark.parametrize("doc", ["README.md", "docs/config.md"])
def test_config_tables_list_every_key_with_its_default(doc):
    """Every TrialConfig key, in declaration order, with the dataclass default (synqt/config.py's settings)."""
    from synqt.config import TrialConfig

    rows = _markdown_table(REPO / doc, "| key | type | default | meaning |")
    keys = [r[0].strip("`") for r in rows]
    fields = dataclasses.fields(TrialConfig)
    assert keys == [f.name for f in fields]
    defaults = TrialConfig()
    for row, f in zip(rows, fields, strict=True):
        got, want = _doc_default(row[2]), getattr(defaults, f.name)
        assert got == (pytest.approx(want) if isinstance(want, float) else want), f"{doc}: {f.name}"


def test_the_documented_cache_folder_is_the_default(monkeypatch):
    from synqt.data.images import default_cache_dir

    for var in ("SYNQT_CACHE_DIR", "SLURM_TMPDIR"):
        monkeypatch.delenv(var, raising=False)
    assert default_cache_dir().name == f"synqt-cache-{re.sub(r'[^A-Za-z0-9_.-]', '_', getpass.getuser())}"
    stale = []
    for path in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        for m in re.finditer(r"(/tmp|<tmp>|<tempdir>|<system temp dir>)/synqt-cache(?![-\w])", path.read_text()):
            stale.append(f"{path.name}: {m.group(0)}")
    assert not stale, f"the per-user suffix is missing: {stale}"


def test_dist_is_ignored():
    """`pip wheel -w dist .` (README) must not leave files git would add."""
    out = subprocess.run(["git", "check-ignore", "-q", "dist/synqt_launcher-0.1.0-py3-none-any.whl"], cwd=REPO)
    assert out.returncode == 0
