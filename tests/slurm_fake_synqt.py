"""Stand-in for `synqt sweep` used as SYNQT_BIN by the Ray-security test of slurm/vtab.sh.

It answers `sweep FILE ... --dry-run --json` with a sweep_dir, and otherwise connects to the Ray
cluster vtab.sh started, records what it saw (resources, address) in `<sweep_dir>/seen.json`,
then keeps the cluster up until `<sweep_dir>/release` exists (or SIGINT arrives), so the test can
probe the live cluster with right and wrong tokens.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    assert argv[0] == "sweep", argv
    args = argv[2:]
    overrides = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("--"))
    sweep_dir = Path(overrides["storage_path"]) / "fake"
    if "--dry-run" in args:
        print(json.dumps({"sweep_dir": str(sweep_dir), "trials": []}))
        return 0
    import ray

    address = args[args.index("--address") + 1]
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    stop = {"flag": False}
    signal.signal(signal.SIGINT, lambda *_: stop.update(flag=True))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "plan.json").write_text("{}")
    seen = {"address": address, "resources": ray.cluster_resources(), "resume": "--resume" in args,
            "token_path": os.environ.get("RAY_AUTH_TOKEN_PATH"), "auth_mode": os.environ.get("RAY_AUTH_MODE")}
    tmp = sweep_dir / "seen.json.tmp"
    tmp.write_text(json.dumps(seen))
    os.replace(tmp, sweep_dir / "seen.json")
    deadline = time.time() + 600
    while not stop["flag"] and not (sweep_dir / "release").exists() and time.time() < deadline:
        time.sleep(0.5)
    (sweep_dir / ("interrupted" if stop["flag"] else "released")).write_text("")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
