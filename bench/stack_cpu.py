"""CPU time per process of a running stack, from /proc: which process saturates, and where
a change's cost lands (steadier than throughput on a busy machine). And --pin: the stack's
processes and the load generators on CPUs of their own."""

from __future__ import annotations

import os
import sys

from testing.stack import children_of


def role(pid: int) -> str | None:
    """gateway, scheduler, worker, serve (the parent), export (a span-export child), or None."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    if "inflight.span_export" in argv:
        return "export"
    if "cli" in argv:
        for name in ("gateway", "scheduler", "worker", "serve"):
            if name in argv:
                return name
    return None


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def stack_cpu(root: int) -> dict[str, float]:
    """CPU seconds so far of each process under `root`, by role; a span-export child
    counts as "<its parent's role>-export"."""
    out: dict[str, float] = {}

    def walk(pid: int, parent_role: str | None) -> None:
        r = role(pid)
        if r == "export":
            r = f"{parent_role}-export"
        if r:
            out[r] = out.get(r, 0.0) + cpu_seconds(pid)
        for child in children_of(pid):
            walk(child, r or parent_role)

    walk(root, None)
    out.pop("serve", None)
    return out


# --pin: each gateway (the process that saturates) and the load generators get physical
# cores of their own, with the cores' other hardware threads left idle; the rest share
# what remains. A process that lands beside a busy sibling thread runs up to a third
# slower, which moved whole points by more than tracing costs.

def physical_cores() -> list[list[int]]:
    """The logical CPUs this process may use, grouped by physical core."""
    groups: dict[str, list[int]] = {}
    for cpu in sorted(os.sched_getaffinity(0)):
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                key = f.read().strip()
        except OSError:
            key = str(cpu)
        groups.setdefault(key, []).append(cpu)
    return list(groups.values())


def cpu_plan(stacks: int, load_procs: int, dedicated: dict[str, int] | None = None) -> dict:
    """Cores for `stacks` stacks: in each, every role in `dedicated` (default: the gateway)
    gets that many physical cores of its own; the load generators one each; the rest of
    the stacks' processes share what is left. Returns {"stacks": [{role: cpus}], "load":
    cpus, "rest": cpus}."""
    dedicated = dedicated or {"gateway": 1}
    cores = physical_cores()
    need = stacks * sum(dedicated.values()) + load_procs + 1
    if len(cores) < need:
        sys.exit(f"--pin needs {need} physical cores; this machine gives {len(cores)}")
    free = iter(cores)
    plan = {"stacks": [{r: [next(free)[0] for _ in range(n)] for r, n in dedicated.items()} for _ in range(stacks)]}
    plan["load"] = [next(free)[0] for _ in range(load_procs)]
    plan["rest"] = [cpu for c in free for cpu in c]
    return plan


def pin_stack(root: int, dedicated: dict[str, list[int]], rest: list[int]) -> None:
    """Every thread of every process under `root`: those of a role in `dedicated` on its
    CPUs, the others (span-export children included) on `rest`."""
    def walk(pid: int) -> None:
        cpus = dedicated.get(role(pid), rest)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return  # the process ended
        for tid in tids:
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:
                pass  # a thread that just ended
        for child in children_of(pid):
            walk(child)

    walk(root)
