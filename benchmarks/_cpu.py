"""CPU seconds of this process and of the embedded server: where a benchmark's time went.

On this project's 2-core machine the client and SeaweedFS share the cores, so a row's
wall time is bounded below by (client CPU + server CPU) / cores: the benchmarks report
both, to tell a client-bound row from a server-bound one.
"""

from __future__ import annotations

import os
import resource

__all__ = ["process_cpu", "server_cpu"]


def process_cpu() -> float:
    """CPU seconds of this process (all threads) and of its children that have ended and been
    waited for (a DataLoader's workers, once its iterator is done)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def server_cpu(pid: int | None) -> float | None:
    """CPU seconds used so far by process ``pid`` (Linux /proc), or None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
