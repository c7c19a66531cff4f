"""How many CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota.

A Kubernetes CPU limit becomes a CFS quota, not an affinity mask: a pod limited to 2 CPUs on a
64-core node sees 64 CPUs in ``os.sched_getaffinity``. Sizing torch's OpenMP pool (or a thread
pool) by that oversubscribes the quota; the kernel then throttles the pod mid-step and every
parallel region waits for its slowest thread. As Go's automaxprocs does, the quota is rounded
down (at least 1).

Why not a library: ``os.process_cpu_count()`` (Python 3.13+) reads only the affinity mask, not
a quota; joblib's ``cpu_count()`` (loky) reads the same cgroup files but rounds a fractional
quota up (``math.ceil``: 1.5 CPUs -> 2 busy threads -> throttled every period), which is the
case this module exists for. So the few lines stay here, tested in tests/test_resources.py.

Read from the container's own cgroup mount: ``cpu.max`` (cgroup v2) or
``cpu/cpu.cfs_quota_us`` and ``cpu/cpu.cfs_period_us`` (v1) under ``/sys/fs/cgroup``. Without
a readable quota the affinity mask alone counts.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path | None = None) -> float | None:
    """The CPU quota in CPUs (1.5 for "150000 100000"), or None when unlimited or unreadable."""
    root = CGROUP_ROOT if root is None else root
    try:
        fields = (root / "cpu.max").read_text().split()
    except OSError:
        fields = None
    if fields is not None:  # cgroup v2: "<quota|max> <period>"
        if len(fields) != 2 or fields[0] == "max":
            return None
        try:
            quota, period = int(fields[0]), int(fields[1])
        except ValueError:
            return None
    else:  # cgroup v1: quota -1 means unlimited
        try:
            quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
            period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def available_cpus(root: Path | None = None) -> int:
    """CPUs to size thread pools by: the affinity mask, capped by the cgroup quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        n = min(n, max(1, math.floor(limit)))
    return max(1, n)
