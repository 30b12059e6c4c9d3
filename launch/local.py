#!/usr/bin/env python3
"""Start N processes of one command on this machine as one multi-process JAX run.

    launch/local.py -n 8 --gpus-per-process 1 -- jaxmusic train CONFIG --workdir DIR
    launch/local.py -n 2 --cpu-devices 4 -- jaxmusic train CONFIG --workdir DIR   # CPU, gloo

Each process gets `JAXMUSIC_COORDINATOR` (localhost and a free port),
`JAXMUSIC_NUM_PROCESSES` and `JAXMUSIC_PROCESS_ID`, which `jaxmusic.distributed.initialize`
reads. SIGINT/SIGTERM/SIGUSR1 are forwarded to every process (SIGTERM makes
`jaxmusic train` save and exit 75). When one process fails, the others get SIGTERM and,
after `--grace` seconds, SIGKILL. Exit code: the first failure's (128 + signal for a
process killed by a signal), else 0. Needs only the standard library.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(rank: int, args) -> dict:
    env = dict(os.environ, JAXMUSIC_COORDINATOR=f"localhost:{args.port}",
               JAXMUSIC_NUM_PROCESSES=str(args.num_processes), JAXMUSIC_PROCESS_ID=str(rank))
    if args.cpu_devices:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={args.cpu_devices}").strip()
    if args.gpus_per_process:
        first = rank * args.gpus_per_process
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(args.gpus_per_process))
    return env


def exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def run(args) -> int:
    procs: list[subprocess.Popen] = []
    forwarded = []

    def forward(sig, _frame):
        forwarded.append(sig)
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    for rank in range(args.num_processes):
        # own session: a terminal's Ctrl-C reaches the processes once, through `forward`
        procs.append(subprocess.Popen(args.command, env=process_env(rank, args), start_new_session=True))
    first_failure, deadline = None, None
    while None in [p.poll() for p in procs]:  # a list: poll every process, not just up to a running one
        failed = [p for p in procs if p.returncode not in (None, 0)]
        if first_failure is None and failed and not forwarded:  # after a forwarded signal: let them finish
            first_failure = exit_code(failed[0].returncode)
            print(f"launch/local.py: process {procs.index(failed[0])} exited with {first_failure}; "
                  "stopping the others", file=sys.stderr, flush=True)
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            deadline = time.monotonic() + args.grace
        elif deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)
    if first_failure is None:
        first_failure = next((exit_code(p.returncode) for p in procs if p.returncode), 0)
    return first_failure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    devices = parser.add_mutually_exclusive_group()
    devices.add_argument("--gpus-per-process", type=int, default=0, metavar="K",
                         help="process i sees GPUs i*K .. i*K+K-1 (CUDA_VISIBLE_DEVICES)")
    devices.add_argument("--cpu-devices", type=int, default=0, metavar="K",
                         help="run on the CPU with K virtual devices per process (testing)")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds between SIGTERM and SIGKILL for the survivors of a failure")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command or args.num_processes < 1:
        parser.error("give -n N >= 1 and a command after --")
    args.port = args.port or free_port()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
