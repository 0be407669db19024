"""What TensorBoard's HParams view shows: one session per run, one experiment per sweep.

TensorBoard's HParams plugin takes the *first* experiment summary it finds anywhere under the log
directory and, without one, guesses the columns from the runs (and shows every scalar tag as a metric).
A run that writes its own experiment (``SummaryWriter.add_hparams``) therefore hides what a sweep varied:
its hparams carry no domain and ``differs`` is false, so the view marks them all constant. Here:

- every run writes a *session* (its hparams, ``write_session``) and its final metrics as ``final/*``
  scalars at its last optimizer step, never an experiment;
- a sweep writes one *experiment* (``write_experiment``) into its ``_sweep_summary`` run, with the
  domain of every hparam over all the sweep's runs and ``differs`` set where the value varies, and the
  ``final/*`` metrics as columns.

Protos come from ``tensorboard.plugins.hparams`` (``summary_v2`` domains, ``api_pb2``,
``plugin_data_pb2``, ``metadata``); files are written with ``torch.utils.tensorboard``'s ``FileWriter``.
No TensorFlow is needed.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# (tag, metrics.json key, how it is shown): the final numbers of a run, as HParams metric columns
FINAL_METRICS: tuple[tuple[str, str, str], ...] = (
    ("final/test_acc", "test_acc", "test accuracy % (final)"),
    ("final/val_acc", "val_acc", "val200 accuracy % (final)"),
    ("final/best_of_test", "best_of_test", "best of test % (selected on test)"),
    ("final/trainable_params", "trainable_params", "trainable parameters"),
    ("final/peak_memory_mib", "peak_memory_mib", "peak memory MiB (per process)"),
    ("final/images_per_s", "images_per_s", "training images/s"),
    ("final/wall_time_min", "wall_time_min", "wall time (min)"),
)
SWEEP_SUMMARY_RUN = "_sweep_summary"  # the sweep-level TensorBoard run (experiment, results table, chart)
MAX_DISCRETE = 24  # more distinct numbers than this (random search): an interval domain instead of a list

HParamValue = bool | int | float | str


def _scalar(value: Any) -> HParamValue:
    """A TensorBoard hparam value: bool, number or string (anything else as its string)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return "none" if value is None else str(value)


def session_hparams(metrics: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> dict[str, HParamValue]:
    """The hparams a run shows in TensorBoard, from its metrics.json (so a sweep can rebuild them exactly).

    ``metrics["hparams"]`` (the recorded settings + what the sweep varied) plus ``dataset``, ``seed``,
    ``protocol``, ``stage`` and ``trainer`` (from the resolved config).
    """
    hp = {k: _scalar(v) for k, v in (metrics.get("hparams") or {}).items()}
    trainer = (metrics.get("config") or {}).get("trainer", "pack")
    for key, value in (("dataset", metrics.get("dataset")), ("seed", metrics.get("seed")),
                       ("protocol", metrics.get("protocol")), ("stage", metrics.get("stage")),
                       ("trainer", trainer)):
        hp[key] = _scalar(value)
    hp.update({k: _scalar(v) for k, v in (extra or {}).items()})
    return hp


def planned_session(cfg: Any, extra: Mapping[str, Any] | None = None) -> dict[str, HParamValue]:
    """``session_hparams`` of a run not yet trained: what its metrics.json will record for ``cfg``."""
    from synqt.config import HPARAM_KEYS

    hp = {k: getattr(cfg, k) for k in HPARAM_KEYS}  # as synqt.training.loop.run_hparams records them
    hp.update(extra or {})
    return session_hparams({"hparams": hp, "dataset": cfg.dataset, "seed": cfg.seed, "protocol": cfg.protocol,
                            "stage": cfg.stage if cfg.protocol == "vtab" else "final",
                            "config": {"trainer": cfg.trainer}})


def final_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``final/*`` tag -> value for the metrics a run has (None, NaN and missing are left out)."""
    derived = dict(metrics)
    if isinstance(metrics.get("peak_memory_bytes"), (int, float)):
        derived["peak_memory_mib"] = metrics["peak_memory_bytes"] / 2**20
    if isinstance(metrics.get("wall_time_s"), (int, float)):
        derived["wall_time_min"] = metrics["wall_time_s"] / 60
    out = {}
    for tag, key, _ in FINAL_METRICS:
        value = derived.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[tag] = float(value)
    return out


def _plugin_summary(tag: str, data: Any) -> Any:
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata

    return Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data))])


def _file_writer(log_dir: str | Path) -> Any:
    from torch.utils.tensorboard.writer import FileWriter

    return FileWriter(str(log_dir))


def write_session(writer: Any, metrics: Mapping[str, Any], *, extra: Mapping[str, Any] | None = None,
                  step: int = 0) -> None:
    """One run's HParams session (start with its hparams, end with ok/failed) and its ``final/*`` scalars.

    ``writer``: the run's ``SummaryWriter`` (its log dir is the run directory); ``step``: the run's last
    optimizer step, so the final numbers sit at the end of the curves they summarise.
    """
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from tensorboard.plugins.hparams.summary_v2 import hparams_pb

    run_dir = Path(writer.get_logdir())
    for tag, value in final_values(metrics).items():
        writer.add_scalar(tag, value, step)
    writer.flush()
    start = hparams_pb(session_hparams(metrics, extra), trial_id=run_dir.name,
                       start_time_secs=time.time() - float(metrics.get("wall_time_s") or 0.0))
    status = api_pb2.STATUS_SUCCESS if metrics.get("status") == "ok" else api_pb2.STATUS_FAILURE
    end = _plugin_summary(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(
        session_end_info=plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time()),
        version=metadata.PLUGIN_DATA_VERSION))
    fw = _file_writer(run_dir)
    try:
        fw.add_summary(start, step)
        fw.add_summary(end, step)
    finally:
        fw.close()


def hparam_infos(sessions: Iterable[Mapping[str, HParamValue]]) -> list[Any]:
    """``api_pb2.HParamInfo`` per hparam name over all sessions: type, domain, ``differs``.

    The domain lists every value seen (numbers sorted; more than ``MAX_DISCRETE`` distinct numbers become
    an interval [min, max]); a name whose values mix types is shown as strings.
    """
    from tensorboard.plugins.hparams import api_pb2
    from tensorboard.plugins.hparams import summary_v2 as hp

    values: dict[str, list[HParamValue]] = {}
    for session in sessions:
        for name, value in session.items():
            values.setdefault(name, []).append(value)
    infos = []
    for name in sorted(values):
        seen = values[name]
        if all(isinstance(v, bool) for v in seen):
            domain = hp.Discrete(sorted(set(seen)))
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in seen):
            numbers = sorted({float(v) for v in seen})
            if len(numbers) > MAX_DISCRETE:
                domain = hp.RealInterval(numbers[0], numbers[-1])
            else:
                domain = hp.Discrete(numbers)
        else:
            domain = hp.Discrete(sorted({str(v) for v in seen}))
        info = api_pb2.HParamInfo(name=name, differs=len({repr(v) for v in seen}) > 1)
        domain.update_hparam_info(info)
        infos.append(info)
    return infos


def experiment_summary(sessions: Iterable[Mapping[str, HParamValue]], metric_tags: Iterable[str]) -> Any:
    """The ``Summary`` holding one HParams experiment: these sessions' hparam domains and these metrics."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    shown = {tag: label for tag, _, label in FINAL_METRICS}
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=shown.get(tag, tag))
               for tag in metric_tags]
    experiment = api_pb2.Experiment(hparam_infos=hparam_infos(sessions), metric_infos=metrics,
                                    time_created_secs=time.time())
    return _plugin_summary(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(
        experiment=experiment, version=metadata.PLUGIN_DATA_VERSION))


def write_experiment(log_dir: str | Path, sessions: Iterable[Mapping[str, HParamValue]],
                     metric_tags: Iterable[str]) -> Path:
    """Write the sweep's one experiment summary into ``log_dir`` (its ``_sweep_summary`` run).

    Earlier experiment files of ``log_dir`` are replaced (TensorBoard uses the first experiment it finds).
    """
    import shutil
    import tempfile

    from torch.utils.tensorboard.writer import FileWriter

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    old = list(log_dir.glob("events.out.tfevents.*.experiment"))
    # written in a hidden folder beside it, then renamed in: a full disk never leaves half an experiment
    # in place of the previous one (synqt.storage's rule for every file of a sweep folder)
    tmp = Path(tempfile.mkdtemp(prefix=".experiment.", dir=log_dir))
    try:
        fw = FileWriter(str(tmp), filename_suffix=".experiment")
        try:
            fw.add_summary(experiment_summary(list(sessions), list(metric_tags)), 0)
        finally:
            fw.close()
        new = [path.name for path in tmp.iterdir()]
        for name in new:
            os.replace(tmp / name, log_dir / name)
    except OSError as err:
        from synqt.storage import as_write_failed

        raise (as_write_failed(err, log_dir) or err) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for path in old:
        if path.name not in new:
            path.unlink(missing_ok=True)
    return log_dir


def metric_tags_for(metrics: Iterable[Mapping[str, Any]]) -> list[str]:
    """The ``final/*`` tags at least one of these runs has, in ``FINAL_METRICS`` order."""
    have: set[str] = set()
    for m in metrics:
        have |= set(final_values(m))
    return [tag for tag, _, _ in FINAL_METRICS if tag in have]


def planned_metric_tags(protocols: Iterable[str]) -> list[str]:
    """The ``final/*`` tags runs of these protocols will write (paper: no val200; vtab: no best of test)."""
    protocols = set(protocols)
    skip = set()
    if protocols == {"paper"}:
        skip.add("final/val_acc")
    if protocols == {"vtab"}:
        skip.add("final/best_of_test")
    return [tag for tag, _, _ in FINAL_METRICS if tag not in skip]
