"""Does stored state fit what it is about to be used with? One rule each for resumes and for weights.

**Resuming a run** (``synqt train --resume``, a pack or DeepSpeed trial that finds a run directory with
state in it, a resumed sweep): a resume continues exactly the same run, or stops. The run directory's
``config.yaml`` (the resolved config the run started with) is compared key by key with the config now
given; any difference in a key that can change a result is a ``ConfigError`` listing every changed key
as ``key: old -> new``, before any data is read or any weight is loaded. Keys that cannot change a
result (``RESULT_NEUTRAL_KEYS``: how often to log or checkpoint, the eval batch size, where the decoded
images are cached) may change. The same holds for a finished run: asking to "resume" it with other
settings is refused instead of silently doing nothing.

**Using trained weights** (``synqt eval``, resuming from ``resume.pt``): the weights record the dataset,
its class count, the image size and the backbone identity they were trained with. The rule: a
difference that changes what the weights compute (class count, image size, backbone) is refused,
naming the file, what it records and what the data/config gives; a difference that only names the data
(the dataset folder name, e.g. a renamed or aliased folder with the same classes) is a warning, logged
and recorded in the result.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from synqt.config import (
    RESULT_KEYS,
    RESULT_NEUTRAL_KEYS,
    TrialConfig,
    config_to_dict,
    saved_config_problem,
    yaml_load,
)
from synqt.errors import ConfigError, ModelError
from synqt.run import rundir
from synqt.storage import set_aside

log = logging.getLogger("synqt.weights.compat")

# RESULT_NEUTRAL_KEYS (from synqt.config's key declarations, ``result=False``): how often to log or
# checkpoint, how many images to score at once (evaluation is per image), where decoded images are cached.

# files whose presence means a run directory holds a run (started or finished)
_STATE_FILES = (rundir.RESUME, rundir.METRICS, rundir.PROGRESS, rundir.DS_CHECKPOINT)

_MISSING = object()


def _fmt(value: Any) -> str:
    return "(absent)" if value is _MISSING else repr(value)


def config_changes(old: Mapping[str, Any], new: TrialConfig | Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``[(key, old, new)]`` for every result-relevant key (``RESULT_KEYS``, a trial's identity; a key no
    longer declared counts too) whose value differs, in declaration order.

    ``old``: a resolved config mapping as saved in a run's ``config.yaml``. A key the old file lacks
    (one added to TrialConfig since) counts as unchanged when the new value is its default.
    """
    new_d = config_to_dict(new) if isinstance(new, TrialConfig) else dict(new)
    defaults = config_to_dict(TrialConfig())
    out = []
    for key in [*new_d, *[k for k in old if k not in new_d]]:
        if key in defaults and key not in RESULT_KEYS:  # RESULT_NEUTRAL_KEYS may change
            continue
        before, after = old.get(key, _MISSING), new_d.get(key, _MISSING)
        if before is _MISSING and after == defaults.get(key, _MISSING):
            continue
        if before != after:
            out.append((key, before, after))
    return out


def format_changes(changes: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{k}: {_fmt(a)} -> {_fmt(b)}" for k, a, b in changes)


def saved_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The resolved config a run directory was started with (``config.yaml``, else metrics.json's copy).

    A broken config.yaml (empty, cut short, not YAML, not a mapping) follows the broken-file rule
    (``synqt.storage.set_aside``): moved aside and named once; the trainer writes it again from the run's config.
    """
    run_dir = Path(run_dir)
    path = run_dir / rundir.CONFIG
    if path.is_file():
        try:
            text = path.read_text()
            problem = saved_config_problem(text)
            data = yaml_load(text, str(path)) if problem is None else None
            if problem is None and not isinstance(data, dict):
                problem = f"holds a {type(data).__name__}, not a mapping of keys"
        except (UnicodeDecodeError, ConfigError) as err:
            problem, data = str(err), None
        if problem is not None:
            set_aside(path, problem, "it is written again from this run's config (the run's other files are kept)")
        elif isinstance(data, dict):
            return data
    metrics = rundir.read_metrics(run_dir)
    cfg = metrics.get("config") if isinstance(metrics, dict) else None
    return cfg if isinstance(cfg, dict) else None


def has_state(run_dir: str | Path) -> bool:
    """True when the run directory holds a started or finished run."""
    return any((Path(run_dir) / name).exists() for name in _STATE_FILES)


def check_same_run(cfg: TrialConfig, run_dir: str | Path) -> None:
    """Refuse to continue (or count as done) a run directory started with another configuration.

    Raises ``ConfigError`` naming the run directory and every changed key (old -> new). A directory
    without state, or without a recorded config, passes.
    """
    if not has_state(run_dir):
        return
    old = saved_config(run_dir)
    if old is None:
        return
    changes = config_changes(old, cfg)
    if changes:
        raise ConfigError(
            f"{run_dir} holds a run made with another configuration; a resume continues exactly the same run. "
            f"Changed: {format_changes(changes)}. Drop these overrides to continue it, or give a new run "
            f"directory to start a new run (keys that cannot change a result may change: "
            f"{', '.join(sorted(RESULT_NEUTRAL_KEYS))})"
        )


BACKBONE_IDENTITY_KEYS = ("name", "embed_dim", "depth", "num_heads", "checkpoint_sha256")


def check_weights_fit(source: str, recorded: Mapping[str, Any], *, dataset: str, num_classes: int,
                      image_size: int | None, backbone: Mapping[str, Any] | None = None) -> list[str]:
    """Apply the weights rule (module docstring); returns the warnings, raises ``ModelError`` on a misfit.

    ``recorded``: what the weights file says (``dataset``, ``num_classes``, ``image_size``, ``backbone``
    identity; absent keys are not checked); the keyword arguments: what the data and config give now.
    (``synqt eval`` checks the backbone where it loads the weights, ``synqt.weights.checkpoint.load_trainable``.)
    """
    misfits = []
    rec_backbone = recorded.get("backbone") or {}
    for key in BACKBONE_IDENTITY_KEYS if backbone is not None else ():
        theirs, ours = rec_backbone.get(key), backbone.get(key)
        if theirs is not None and theirs != ours:
            misfits.append(f"backbone {key}={theirs!r}, but this config's backbone has {key}={ours!r}"
                           + (f" ({backbone.get('checkpoint')})" if key == "checkpoint_sha256" else ""))
    rec_classes = recorded.get("num_classes")
    if rec_classes is not None and int(rec_classes) != int(num_classes):
        misfits.append(f"{rec_classes} classes, but {dataset!r} has {num_classes}")
    rec_size = recorded.get("image_size")
    if rec_size is not None and image_size is not None and int(rec_size) != int(image_size):
        misfits.append(f"image size {rec_size}, but this config gives {image_size}")
    if misfits:
        trained_on = recorded.get("dataset")
        raise ModelError(
            f"{source} does not fit this data: the weights record {'; '.join(misfits)}"
            + (f" (trained on {trained_on!r})" if trained_on else "")
            + ". Weights are only scored or resumed on data and settings they were trained for"
        )
    warnings = []
    rec_dataset = recorded.get("dataset")
    if rec_dataset and rec_dataset != dataset:
        warnings.append(
            f"{source} was trained on dataset {rec_dataset!r} and is used on {dataset!r} "
            f"(same class count, {num_classes}); the dataset name differs"
        )
    for w in warnings:
        log.warning("%s", w)
    return warnings


__all__ = ["RESULT_NEUTRAL_KEYS", "check_same_run", "check_weights_fit", "config_changes", "format_changes",
           "has_state", "saved_config"]
