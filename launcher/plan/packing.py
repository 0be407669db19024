"""Packs: which trials share one frozen forward pass (every pack-scope key equal, memory budget).
"""

from __future__ import annotations

import logging
from typing import Any

from launcher.plan.schema import MAX_AUTO_PACK, PlannedTrial, Sweep
from synqt.config import pack_key

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# packs


def estimate_memory(cfg: Any, n_branches: int) -> float:
    """Peak training memory (bytes) of a pack of ``n_branches`` (``synqt.model.memory.estimate_trial_memory``)."""
    from synqt.model.memory import estimate_trial_memory

    return float(estimate_trial_memory(cfg, n_branches))


def auto_pack_size(sweep: Sweep, cfg: Any) -> int:
    """Largest pack (<= 8) whose estimate fits the trial's memory budget.

    Budget: `pack_memory_gb` if set, else 16 GB per whole GPU (x resources.gpus), else 4 GB per CPU.
    """
    if sweep.pack_memory_gb:
        budget = sweep.pack_memory_gb * 2**30
    elif sweep.resources["gpus"] > 0:
        budget = sweep.resources["gpus"] * 16 * 2**30
    else:
        budget = sweep.resources["cpus"] * 4 * 2**30
    n = 1
    while n < MAX_AUTO_PACK and estimate_memory(cfg, n + 1) <= budget:
        n += 1
    return n


def assign_packs(sweep: Sweep, trials: list[PlannedTrial]) -> list[list[PlannedTrial]]:
    """Group trials with the same pack key (plan order kept) into packs; set each trial's `pack`."""
    groups: dict[str, list[PlannedTrial]] = {}
    for t in trials:
        # ASHA stops whole Tune trials, so stage-1 trials are not packed under ASHA.
        packing = (
            sweep.pack != "off"
            and sweep.resources["devices"] == 1
            and not (sweep.asha and t.stage == "search")
        )
        key = pack_key(t.config) if packing else t.run_name
        groups.setdefault(key, []).append(t)
    packs: list[list[PlannedTrial]] = []
    for members in groups.values():
        size = 1
        if sweep.pack == "auto" and len(members) > 1:
            size = auto_pack_size(sweep, members[0].config)
        elif isinstance(sweep.pack, int) and not isinstance(sweep.pack, bool):
            size = sweep.pack
        for i in range(0, len(members), size):
            packs.append(members[i : i + size])
    packs.sort(key=lambda p: p[0].index)
    for i, p in enumerate(packs):
        for t in p:
            t.pack = i
    return packs


def packs_of(trials: list[PlannedTrial]) -> list[list[PlannedTrial]]:
    out: dict[int, list[PlannedTrial]] = {}
    for t in trials:
        out.setdefault(t.pack, []).append(t)
    return [out[k] for k in sorted(out)]
