"""How many CPUs this process may really use: what `--workers auto` starts.

`os.sched_getaffinity` alone overcounts in containers: a pod limited to 2 CPUs on a 64-core
node sees 64 cores, and 64 workers would each load every model. The cgroup CPU quota (v2
`cpu.max`, or v1 `cpu.cfs_quota_us`/`cpu.cfs_period_us`) caps the count, rounded up.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def usable_cpus(cgroup: Path = CGROUP) -> int:
    """CPUs of the affinity mask, capped by the cgroup quota when there is one; at least 1."""
    count = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_limit(cgroup)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(count, 1)


def cgroup_cpu_limit(cgroup: Path = CGROUP) -> float | None:
    """The CPU quota in CPUs (1.5 = one and a half), or None when unlimited or unknown."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        if quota == "max":
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None
