"""`ray job submit` as the tests run it: retried while Ray's job agent is not up yet."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping, Sequence

NO_AGENT = "No available agent to submit job"


def ray_job_submit(argv: Sequence[str], env: Mapping[str, str], timeout: float,
                   agent_wait_s: float = 120.0) -> subprocess.CompletedProcess:
    """Run ``argv`` (a ``ray job submit ...`` command line) and return its result.

    The dashboard answers HTTP before its job agent is ready; Ray then refuses the submission without starting
    anything ("No available agent to submit job, please try again later"), so that answer alone is retried,
    for up to ``agent_wait_s`` seconds.
    """
    deadline = time.time() + agent_wait_s
    while True:
        job = subprocess.run(list(argv), env=dict(env), capture_output=True, text=True, timeout=timeout)
        if NO_AGENT not in job.stdout + job.stderr or time.time() > deadline:
            return job
        time.sleep(3)
