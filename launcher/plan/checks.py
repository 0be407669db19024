"""Everything a plan is checked for before any resource is taken (``validate``): storage, outputs, data folders
and lists (also those stage 2 will read), checkpoint files, precision, split leaks. Whether the cluster fits the
request is checked once Ray is up (``launcher.run.cluster.check_fits``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from launcher.plan.estimates import trial_device
from launcher.plan.schema import PlannedTrial, Sweep
from synqt.data import registry
from synqt.errors import ConfigError, DataError
from synqt.weights.identify import is_random, require_backbone_weights

log = logging.getLogger(__name__)


def check_storage(sweep: Sweep, trials: list[PlannedTrial] | None = None) -> None:
    """Before data, backbone or cluster: the sweep folder (``storage_path``/``name``) must take a new file
    (``synqt.storage.check_writable``; a folder not made yet is not made here: its nearest existing parent is
    probed), and the trials' cache folders are checked (an unwritable one is said once)."""
    from synqt.storage import check_writable
    from synqt.training import check_outputs

    check_writable(sweep.sweep_dir, "storage_path")
    if trials:
        check_outputs([t.config for t in trials], [])


def with_stage2(sweep: Sweep, trials: list[PlannedTrial]) -> list[tuple[PlannedTrial, Any]]:
    """(trial, config) pairs to validate: each trial, and for a vtab stage-1 trial also the config its dataset's
    stage 2 will have (train800val200 + test): a missing test list must refuse the sweep now, not after
    stage 1 has run."""
    out = [(t, t.config) for t in trials]
    if sweep.protocol == "vtab":
        out += [(t, dataclasses.replace(t.config, stage="final")) for t in trials if t.stage == "search"]
    return out


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def validate(sweep: Sweep, trials: list[PlannedTrial], *, in_process: bool = False, preview: bool = False,
             check_gpus: bool = True) -> None:
    """Refuse a sweep before any Ray resource and before its first write: checkpoint file, data folders + list
    files (also stage 2's), device and precision against the GPUs the trials will get (``in_process``: the
    trials run in this process, ``--sequential``, and see this machine's GPUs). Raises ConfigError /
    DataError naming the key, file or dataset.

    ``preview`` (``--dry-run``): what is not set yet (data_root, checkpoint) is not refused, what is set and
    wrong is; without data_root a dataset name that is no known task but close to one is refused (a typo).
    ``check_gpus=False``: the trials' GPUs are not known here (a SLURM array: its sbatch arguments give them)."""
    from synqt.config import splits_for
    from synqt.data.splits import validate_dataset
    from synqt.weights.identify import check_file

    # Ray hides every GPU from a trial that asked for none; in this process (--sequential) the trials see this
    # machine's GPUs
    no_gpu = not _has_cuda() if in_process else sweep.resources["gpus"] == 0
    if no_gpu and check_gpus:
        where = "this machine has no CUDA GPU" if in_process else "resources.gpus is 0, so no trial gets one"
        for t in trials:
            for key, value in (("device", "cuda"), ("precision", "fp16")):
                if getattr(t.config, key) == value:
                    raise ConfigError(
                        f"{sweep.source}: dataset {t.dataset!r}: {key}={value} needs a GPU, but {where}; "
                        + ("" if in_process else "set resources.gpus (e.g. resources.gpus=1) or ")
                        + ("device=auto" if key == "device" else "precision=bf16 or precision=no"))
    if trial_device(sweep) == "cpu" and any(t.config.precision == "bf16" for t in trials):
        from synqt.model.precision import check_precision

        check_precision("bf16", "cpu")  # CPU trials: this node's CPU stands for the cluster's (each trial rechecks)

    seen: set[tuple] = set()
    checked: set[str] = set()
    folders: dict[tuple[str, str, str], str] = {}  # (data_root, dataset folder, layout) -> the sweep's name
    for t, cfg in with_stage2(sweep, trials):
        where = f"{sweep.source}: dataset {t.dataset!r}"
        # the files first (checkpoint), then the data: a missing file is named before the data it would read
        if cfg.checkpoint or not preview:
            require_backbone_weights(cfg.checkpoint, where)
        if cfg.checkpoint and not is_random(cfg.checkpoint) and cfg.checkpoint not in checked:
            if not Path(cfg.checkpoint).is_file():
                raise ConfigError(
                    f"{sweep.source}: backbone checkpoint {cfg.checkpoint} (key 'checkpoint', "
                    f"dataset {t.dataset!r}) does not exist"
                )
            check_file(Path(cfg.checkpoint))  # a cut-off download or an HTML page: refused before Ray
            checked.add(cfg.checkpoint)
        if not cfg.data_root:
            if preview:  # the data may not be in place yet; a name that is no task but close to one is a typo
                if hint := registry.did_you_mean(t.dataset):
                    raise DataError(f"{where}: {t.dataset!r} is not a known task{hint}, and no data_root is "
                                    "set to find it as a folder of your own")
                continue
            raise ConfigError(
                f"{sweep.source}: no data_root for dataset {t.dataset!r} (set data_root=... "
                "in the sweep file or on the command line)"
            )
        folder = Path(cfg.data_root) / cfg.dataset
        if not folder.is_dir():
            raise DataError(
                f"dataset {t.dataset!r}: folder {folder} does not exist (data_root={cfg.data_root})"
                f"{registry.did_you_mean(t.dataset)}"
            )
        splits = tuple(splits_for(cfg))
        key = (cfg.data_root, cfg.dataset, splits, cfg.num_classes, cfg.layout)
        if key not in seen:
            seen.add(key)
            try:
                validate_dataset(cfg.data_root, cfg.dataset, list(splits), cfg.num_classes, cfg.layout)
            except DataError as err:
                raise DataError(f"dataset {t.dataset!r} ({folder}): {err}") from None
        folders.setdefault((cfg.data_root, cfg.dataset, cfg.layout), t.dataset)
    if not preview:  # --dry-run decodes nothing: `synqt data check` runs the leak check on its own
        check_split_leaks(sweep, folders)


def check_split_leaks(sweep: Sweep, folders: dict[tuple[str, str, str], str]) -> None:
    """The pre-flight leak check: one warning per dataset with the counts (``synqt.data.check.split_leaks``, by file and
    decoded pixels, every split the folder has), or with ``sweep.strict`` a DataError naming each dataset."""
    from synqt.data.check import split_leaks

    if not folders:
        return
    log.info("checking %d dataset(s) for split leaks (by file and by decoded pixels; pixel hashes are cached) ...",
             len(folders))
    leaky = []
    for (root, folder, layout), name in folders.items():
        report = split_leaks(root, folder, layout)
        if report.findings:
            where = f"dataset {name!r} ({Path(root) / folder}): {report.summary()}"
            leaky.append(where)
            if not sweep.strict:
                log.warning("split leak in %s; see `synqt data check %s %s`; strict=true (--strict) refuses the "
                            "sweep", where, root, folder)
    if leaky and sweep.strict:
        raise DataError("strict: split leaks found (see `synqt data check`): " + " | ".join(leaky))
