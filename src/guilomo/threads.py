"""Threads sized to the CPU this process may actually use.

torch starts one OpenMP thread per core it sees, but a pod with a CPU limit on a large
node, or a process pinned to a few cores, gets less: its threads then spin on cores they do
not get, and a step runs 30-50x slower for 3-6x less CPU. The usable CPU is the smaller of
the process's affinity and its cgroup quota (v2 `cpu.max`, or v1 `cpu.cfs_quota_us` over
`cpu.cfs_period_us`, the tightest along the cgroup's ancestors).

Cores shared with other processes (no quota, busy neighbours) meet the same spinning:
libgomp's threads wait at each barrier by spinning 300,000 times before they sleep, so a
thread whose partner lost its core burns its own. `prepare_openmp` lowers that to
`SPINCOUNT` unless `GOMP_SPINCOUNT` or `OMP_WAIT_POLICY` is set; libgomp reads it when torch
loads it, so the CLI and the tasks call it before importing torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: libgomp's spin count before a waiting thread sleeps (its default is 300,000): the same
#: speed alone, a third less slowdown beside CPU-bound neighbours (benchmarks/contended.py)
SPINCOUNT = "100000"
PROC_CGROUP = Path("/proc/self/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _quota(folder: Path) -> float | None:
    """CPUs allowed by one cgroup folder's own limit (None: no limit there)."""
    v2 = _read(folder / "cpu.max")  # "max 100000" or "150000 100000"
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100000)
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    if quota is None or period is None or int(quota) <= 0:
        return None
    return int(quota) / int(period)


def _cgroup_folders(root: Path, proc_cgroup: Path) -> list[Path]:
    """This process's cgroup folder and its ancestors up to the mount (v2, or v1's cpu)."""
    folders = []
    for line in (_read(proc_cgroup) or "").splitlines():  # "0::/a/b" (v2), "4:cpu,cpuacct:/a"
        _, controllers, path = line.split(":", 2)
        if controllers and "cpu" not in controllers.split(","):
            continue
        mount = root / controllers if controllers else root
        folder = mount / path.lstrip("/")
        folders.append(folder)
        while folder != mount and mount in folder.parents:
            folder = folder.parent
            folders.append(folder)
    return folders or [root]


def cgroup_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The tightest CPU quota on this process's cgroup and its ancestors (None: unlimited)."""
    quotas = [q for q in map(_quota, _cgroup_folders(root, proc_cgroup)) if q is not None]
    return min(quotas) if quotas else None


def usable_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float:
    """CPUs this process may use: its affinity, capped by its cgroup quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = cgroup_cpus(root, proc_cgroup)
    return float(cpus or 1) if quota is None else min(float(cpus or 1), quota)


def thread_count(
    configured: int | None = None,
    env: Mapping[str, str] = os.environ,
    root: Path = CGROUP_ROOT,
    proc_cgroup: Path = PROC_CGROUP,
) -> tuple[int, str]:
    """(threads, where the figure came from): the config field, else `OMP_NUM_THREADS`,
    else the usable CPUs rounded down (at least 1)."""
    if configured:
        return configured, "config"
    omp = env.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    return max(1, math.floor(usable_cpus(root, proc_cgroup))), "cpu quota"


def prepare_openmp(env: MutableMapping[str, str] = os.environ) -> None:
    """Lower libgomp's spin count before torch is imported (see the module docstring)."""
    if "GOMP_SPINCOUNT" not in env and "OMP_WAIT_POLICY" not in env:
        env["GOMP_SPINCOUNT"] = SPINCOUNT


def configure_threads(configured: int | None = None) -> dict[str, object]:
    """Set torch's intra-op threads to `thread_count` and return what to log as params."""
    import torch

    threads, source = thread_count(configured)
    torch.set_num_threads(threads)
    spin = os.environ.get("GOMP_SPINCOUNT") or os.environ.get("OMP_WAIT_POLICY") or "default"
    return {"threads": threads, "threads_source": source, "openmp_wait": spin}
