"""Multi-process start-up: `jax.distributed` from explicit flags, `launch/local.py`, or SLURM.

`initialize()` must run before anything touches a JAX device. Where the process
layout comes from, first match wins:

1. explicit arguments (`jaxmusic train --coordinator HOST:PORT --num-processes N --process-id I`,
   for launchers other than ours);
2. `JAXMUSIC_COORDINATOR`, `JAXMUSIC_NUM_PROCESSES`, `JAXMUSIC_PROCESS_ID` (set by
   `launch/local.py`);
3. a SLURM job step (`srun`): process count and rank from `SLURM_STEP_NUM_TASKS` /
   `SLURM_PROCID`, coordinator = the first node of `SLURM_STEP_NODELIST`, port
   `JAXMUSIC_COORDINATOR_PORT` or 61440 + job id mod 4096 (above Linux's ephemeral
   range, so it rarely collides, and the same for a requeued job);
4. otherwise a single process: nothing to do.

One process per GPU: on a GPU node each process must drive its own GPU. SLURM either
shows every task all of the node's GPUs (`--gpus-per-node=8`, our sbatch script; task
`SLURM_LOCALID` then takes GPU number `SLURM_LOCALID`) or binds one GPU per task
(`--gpus-per-task=1`, `--gpu-bind`; the task sees exactly one). `local_device_ids` below
handles both, and one task per node drives all of them. JAX's own SLURM detection gives
every process GPU `SLURM_LOCALID` only, which leaves 7 of 8 GPUs idle with one task per
node and fails with per-task binding; we therefore pass the layout explicitly.

Failure detection: the processes exchange heartbeats with the coordination service
(process 0). When a process dies, the service notices within `heartbeat_timeout`
seconds and every other process aborts with a non-zero exit (when process 0 dies the
others abort at once; on CPUs gloo's closed connections usually raise at once too). A
process that raises exits at once instead of waiting at JAX's exit barrier (where it
would sit for `shutdown_timeout` while its peers wait in a collective). A process that
is alive but stuck (a hung collective) is caught by `StepWatchdog`. Timeouts (seconds)
come from the arguments or `JAXMUSIC_HEARTBEAT_TIMEOUT` (default 60),
`JAXMUSIC_INIT_TIMEOUT` (300: the time all processes have to show up),
`JAXMUSIC_SHUTDOWN_TIMEOUT` (60).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import threading
import time
import traceback

from jaxmusic.errors import UserError

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = (
    "JAXMUSIC_COORDINATOR", "JAXMUSIC_NUM_PROCESSES", "JAXMUSIC_PROCESS_ID")
PORT_BASE = 61440  # + job id mod 4096: ports 61440-65535
EXIT_HUNG = 70     # StepWatchdog: no step finished in time (EX_SOFTWARE)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where this process sits in a multi-process run."""

    coordinator: str                     # HOST:PORT of process 0's coordination service
    num_processes: int
    process_id: int
    local_device_ids: list[int] | None   # GPUs (indices among the visible ones) this process drives; None: all
    source: str                          # "arguments", "environment" or "slurm"
    processes_per_node: int | None = None  # known under SLURM

    def devices_per_node(self) -> int | None:
        """Devices of this process's node (for `sharding.make_mesh`); after `initialize`."""
        import jax

        return self.processes_per_node * jax.local_device_count() if self.processes_per_node else None


# ---------------------------------------------------------------------------- the layout

def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: `"gpu[007-009,012],cpu1"` -> `"gpu007"`."""
    host, i = [], 0
    while i < len(nodelist) and nodelist[i] != ",":
        if nodelist[i] == "[":
            end = nodelist.index("]", i)
            host.append(re.split(r"[,-]", nodelist[i + 1:end])[0])
            i = end + 1
        else:
            host.append(nodelist[i])
            i += 1
    return "".join(host)


def tasks_on_node(tasks_per_node: str, node_index: int) -> int:
    """This node's task count from SLURM's compressed form: `"8(x2),4"`, node 2 -> 4."""
    counts = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise UserError(f"cannot read SLURM tasks per node {tasks_per_node!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if node_index >= len(counts):
        raise UserError(f"node {node_index} is not among the {len(counts)} nodes of {tasks_per_node!r}")
    return counts[node_index]


def local_device_ids(local_rank: int, local_tasks: int, env=os.environ) -> list[int] | None:
    """GPUs (indices among the visible ones) for task `local_rank` of `local_tasks` on a node."""
    platforms = env.get("JAX_PLATFORMS", "")
    if platforms and not re.search(r"cuda|gpu", platforms):
        return None  # CPU (or TPU) processes: no GPUs to divide
    if local_tasks == 1:
        return None  # one process per node drives every GPU it sees
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible:
        return [local_rank]  # nothing restricts visibility: GPU i for local task i
    if len(visible) == 1:
        return None  # SLURM bound one GPU to this task (--gpus-per-task=1 / --gpu-bind)
    if len(visible) % local_tasks:
        raise UserError(f"{local_tasks} tasks on this node share {len(visible)} visible GPUs "
                        f"(CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}); use one task per GPU "
                        "(--ntasks-per-node equal to --gpus-per-node)")
    per_task = len(visible) // local_tasks
    return list(range(local_rank * per_task, (local_rank + 1) * per_task))


def slurm_layout(env=os.environ) -> Layout | None:
    """The layout of a SLURM job step (inside `srun`), or None outside one."""
    if "SLURM_JOB_ID" not in env or "SLURM_STEP_NODELIST" not in env or "SLURM_PROCID" not in env:
        return None  # not in a job step (the batch script itself has no step node list)
    num = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
    port = env.get("JAXMUSIC_COORDINATOR_PORT") or str(PORT_BASE + int(env["SLURM_JOB_ID"]) % 4096)
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
    local_tasks = tasks_on_node(per_node, int(env.get("SLURM_NODEID", 0)))
    return Layout(f"{first_host(env['SLURM_STEP_NODELIST'])}:{port}", num, int(env["SLURM_PROCID"]),
                  local_device_ids(int(env.get("SLURM_LOCALID", 0)), local_tasks, env), "slurm", local_tasks)


def resolve_layout(coordinator: str | None = None, num_processes: int | None = None,
                   process_id: int | None = None, env=os.environ) -> Layout | None:
    """Arguments, else `JAXMUSIC_*` variables, else SLURM; None for a single process."""
    given = (coordinator, num_processes, process_id)
    source = "arguments"
    if all(v is None for v in given):
        given = tuple(env.get(k) for k in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID))
        source = "environment"
        if all(v is None for v in given):
            layout = slurm_layout(env)
            return layout if layout and layout.num_processes > 1 else None
    if any(v is None for v in given):
        raise UserError("multi-process runs need all of --coordinator HOST:PORT, --num-processes N and "
                        f"--process-id I (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})")
    coordinator, num, rank = given[0], int(given[1]), int(given[2])
    if not re.fullmatch(r".+:\d+", coordinator):
        raise UserError(f"coordinator {coordinator!r} is not HOST:PORT")
    if not 0 <= rank < num:
        raise UserError(f"process id {rank} is not in 0..{num - 1}")
    return Layout(coordinator, num, rank, None, source) if num > 1 else None


# ------------------------------------------------------------------------------ start-up

def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, heartbeat_timeout: int | None = None,
               init_timeout: int | None = None, shutdown_timeout: int | None = None) -> Layout | None:
    """Join the multi-process run this process belongs to (see the module docs); returns its layout."""
    layout = resolve_layout(coordinator, num_processes, process_id)
    if layout is None:
        return None
    import jax

    # CPU processes exchange collectives over TCP with gloo (GPUs use NCCL regardless).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        layout.coordinator, layout.num_processes, layout.process_id,
        local_device_ids=layout.local_device_ids,
        cluster_detection_method="deactivate",  # the layout above is complete; JAX must not redo it
        heartbeat_timeout_seconds=_seconds(heartbeat_timeout, "JAXMUSIC_HEARTBEAT_TIMEOUT", 60),
        initialization_timeout=_seconds(init_timeout, "JAXMUSIC_INIT_TIMEOUT", 300),
        shutdown_timeout_seconds=_seconds(shutdown_timeout, "JAXMUSIC_SHUTDOWN_TIMEOUT", 60))
    sys.excepthook = _exit_now_on_uncaught
    print(f"process {layout.process_id} of {layout.num_processes} ({layout.source}): coordinator "
          f"{layout.coordinator}, {jax.local_device_count()} local / {jax.device_count()} devices",
          file=sys.stderr, flush=True)
    return layout


def _seconds(value: int | None, env_name: str, default: int) -> int:
    return int(value if value is not None else os.environ.get(env_name, default))


def _exit_now_on_uncaught(kind, value, tb) -> None:
    """Report, then leave without JAX's exit barrier: the other processes see this one gone
    within the heartbeat timeout instead of waiting in their collectives."""
    traceback.print_exception(kind, value, tb)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--coordinator/--num-processes/--process-id` (defaults: the `JAXMUSIC_*` variables, else SLURM)."""
    group = parser.add_argument_group("multi-process (other launchers; SLURM and launch/local.py need none)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    group.add_argument("--num-processes", type=int, metavar="N")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's rank, 0..N-1")


# ------------------------------------------------------------------------------ watchdog

class StepWatchdog:
    """Ends the process (exit code `EXIT_HUNG`) when no `beat()` arrives for `timeout` seconds.

    Heartbeats catch dead processes, not live ones stuck in a collective whose peer
    never arrives (NCCL waits forever). The trainer beats once per finished step; the
    clock starts at the first beat, so the first compilation is never timed. The timeout
    must cover the slowest step including a synchronous checkpoint save, and in a
    schedule the next stage's start (restore and compilation) as well.
    """

    def __init__(self, timeout: float, *, poll: float | None = None):
        self.timeout = timeout
        self._last: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(poll or min(5.0, timeout / 4),),
                                        name="jaxmusic-step-watchdog", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls) -> "StepWatchdog | None":
        """A watchdog with `JAXMUSIC_STEP_TIMEOUT` seconds, or None when unset or 0."""
        timeout = float(os.environ.get("JAXMUSIC_STEP_TIMEOUT") or 0)
        return cls(timeout) if timeout > 0 else None

    def beat(self, _step: int | None = None) -> None:
        """A step finished (usable as the trainer's `on_step` callback)."""
        self._last = time.monotonic()

    def close(self) -> None:
        self._stop.set()

    def _watch(self, poll: float) -> None:
        while not self._stop.wait(poll):
            if self._last is not None and time.monotonic() - self._last > self.timeout:
                print(f"error: no training step finished in {self.timeout:g} s (JAXMUSIC_STEP_TIMEOUT); a "
                      "collective is probably stuck on a peer. Exiting so the job can be restarted.",
                      file=sys.stderr, flush=True)
                os._exit(EXIT_HUNG)
