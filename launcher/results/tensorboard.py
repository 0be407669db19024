"""The sweep's own TensorBoard run (``_sweep_summary``): the HParams experiment over all runs, the table and the
chart, and the planned experiment written before the trials start. Each run's own events are written by the
trainers (``synqt.run.tblog``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from synqt.run.tblog import SWEEP_SUMMARY_RUN


def figure_rgb(fig: Any) -> Any:
    import numpy as np

    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def write_tensorboard(results: Mapping[str, Any], table: str, image: Any, log_dir: Path,
                      runs: Sequence[Mapping[str, Any]] = ()) -> Path:
    """The sweep-level TensorBoard run (``_sweep_summary``): the HParams experiment, the table, the chart.

    The experiment (``synqt.run.tblog.write_experiment``) gives TensorBoard's HParams view the domain of every
    hyperparameter over ``runs`` (their metrics.json), so it shows what the sweep varied, with the ``final/*``
    metrics as columns. The table (text) and the chart (image) sit under ``sweep/``; no one-point scalars
    (the per-task numbers are the HParams view's rows). Earlier event files here are removed first, so
    re-aggregating does not stack.
    """
    from torch.utils.tensorboard import SummaryWriter

    from synqt.run.tblog import metric_tags_for, session_hparams, write_experiment

    log_dir.mkdir(parents=True, exist_ok=True)
    for old in log_dir.glob("events.out.tfevents.*"):
        old.unlink()
    if runs:
        write_experiment(log_dir, [session_hparams(m) for m in runs], metric_tags_for(runs))
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        writer.add_text("sweep/results", table, 0)
        writer.add_image("sweep/chart", image, 0, dataformats="HWC")
        writer.flush()
    finally:
        writer.close()
    return log_dir


def write_planned_experiment(sweep_dir: Path, trials: Sequence[Any]) -> Path:
    """The HParams experiment of a sweep about to run (its planned trials), so TensorBoard shows the
    right columns while it runs; ``aggregate`` rewrites it from the finished runs."""
    from synqt.run.tblog import planned_metric_tags, planned_session, write_experiment

    return write_experiment(sweep_dir / SWEEP_SUMMARY_RUN,
                            [planned_session(t.config, t.hparams) for t in trials],
                            planned_metric_tags({t.config.protocol for t in trials}))
