"""Multi-process training on CPU (gloo): `jaxmusic.distributed` and `launch/local.py`.

Every JAX run is a subprocess with its own XLA flags: 1 process x 8 CPU devices, or
2 processes x 4 devices started by `launch/local.py`, all sharing one compilation cache.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxmusic import distributed as D
from jaxmusic.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "stages" / "tiny.yaml"
LOCAL = REPO / "launch" / "local.py"
TRAIN = ["-m", "jaxmusic.cli", "train"]  # `jaxmusic train`: it initialises jax.distributed itself
RUN = ["steps=6", "checkpoint.every_steps=2", "log.progress=false", "log.tensorboard=false"]
MESH8 = ["mesh.fsdp=4", "mesh.tensor=2"]  # 2 processes: tensor pairs inside a process, fsdp across


# ------------------------------------------------------------------------ the layout

def test_first_host_of_slurm_node_lists():
    assert D.first_host("node07") == "node07"
    assert D.first_host("a-1,b-2") == "a-1"
    assert D.first_host("gpu[007-009,012],cpu1") == "gpu007"
    assert D.first_host("gpu[12,3-4]") == "gpu12"
    assert D.first_host("rack[2-3]-n[01-08]") == "rack2-n01"


def test_tasks_per_node():
    assert [D.tasks_on_node("8(x2),4", i) for i in range(3)] == [8, 8, 4]
    assert D.tasks_on_node("2", 0) == 2
    with pytest.raises(UserError, match="tasks per node"):
        D.tasks_on_node("eight", 0)


def test_one_process_per_gpu():
    ids = D.local_device_ids
    assert ids(3, 8, {}) == [3]                                    # every task sees all GPUs
    assert ids(3, 8, {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}) == [3]
    assert ids(3, 8, {"CUDA_VISIBLE_DEVICES": "5"}) is None        # SLURM bound one GPU to the task
    assert ids(0, 1, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}) is None  # one task per node: all of them
    assert ids(1, 2, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}) == [2, 3]
    assert ids(1, 2, {"JAX_PLATFORMS": "cpu"}) is None
    with pytest.raises(UserError, match="3 tasks on this node share 8 visible GPUs"):
        ids(0, 3, {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"})


SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[03-04]", "SLURM_STEP_NUM_TASKS": "16",
              "SLURM_NTASKS": "16", "SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_NODEID": "1",
              "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}


def test_slurm_layout():
    layout = D.resolve_layout(env=SLURM_STEP)
    assert layout == D.Layout(f"gpu03:{61440 + 4242 % 4096}", 16, 13, [5], "slurm", 8)
    assert D.resolve_layout(env=dict(SLURM_STEP, JAXMUSIC_COORDINATOR_PORT="1234")).coordinator == "gpu03:1234"
    # the batch script itself (no step node list) and one-task steps are single processes
    assert D.resolve_layout(env={k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}) is None
    assert D.resolve_layout(env=dict(SLURM_STEP, SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0")) is None
    assert D.resolve_layout(env={}) is None


def test_explicit_layout_wins_and_is_checked():
    env = dict(SLURM_STEP, JAXMUSIC_COORDINATOR="h:1", JAXMUSIC_NUM_PROCESSES="2", JAXMUSIC_PROCESS_ID="1")
    assert D.resolve_layout(env=env) == D.Layout("h:1", 2, 1, None, "environment")
    assert D.resolve_layout("x:9", 4, 0, env=env) == D.Layout("x:9", 4, 0, None, "arguments")
    with pytest.raises(UserError, match="need all of --coordinator"):
        D.resolve_layout("x:9", None, 0, env={})
    with pytest.raises(UserError, match="not HOST:PORT"):
        D.resolve_layout("x", 2, 0, env={})
    with pytest.raises(UserError, match=r"process id 2 is not in 0..1"):
        D.resolve_layout("x:9", 2, 2, env={})


# ---------------------------------------------------------------- process supervision

def test_step_watchdog_ends_a_stuck_process():
    script = ("import time; from jaxmusic.distributed import StepWatchdog\n"
              "w = StepWatchdog(1.0, poll=0.1); w.beat(); time.sleep(0.5); w.beat(); time.sleep(60)\n")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == D.EXIT_HUNG and "no training step finished in 1 s" in r.stderr
    assert time.monotonic() - t0 < 20  # 1.5 s + interpreter start


def test_local_launcher_stops_the_others_when_one_fails():
    body = ("import os, sys, time; e = os.environ; r = int(e['JAXMUSIC_PROCESS_ID']); "
            "assert e['JAXMUSIC_NUM_PROCESSES'] == '3' and e['JAXMUSIC_COORDINATOR'].startswith('localhost:'); "
            "time.sleep(0.5); sys.exit(7) if r == 1 else time.sleep(120)")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(LOCAL), "-n", "3", "--grace", "2", "--", sys.executable, "-c", body],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 7, r.stderr
    assert "process 1 exited with 7; stopping the others" in r.stderr
    assert time.monotonic() - t0 < 30


def test_local_launcher_forwards_signals(tmp_path):
    # each process writes a file once its handler is in place, exits 75 on SIGTERM (as the trainer)
    body = ("import os, signal, sys, time, pathlib; r = os.environ['JAXMUSIC_PROCESS_ID']; "
            "signal.signal(signal.SIGTERM, lambda *_: sys.exit(75)); "
            f"pathlib.Path({str(tmp_path)!r}, r).touch(); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, str(LOCAL), "-n", "2", "--", sys.executable, "-c", body],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while len(list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err
    assert "stopping the others" not in err  # a forwarded signal is not a failure


# ------------------------------------------------------------------ training on CPUs

def _env(cache: Path, devices: int | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # a single process here
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               # -O0 compiles ~2x faster; every comparison is between runs with the same flags
               XLA_FLAGS="--xla_backend_optimization_level=0", JAXMUSIC_HEARTBEAT_TIMEOUT="10")
    if devices:
        env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
    return env


def _train(cache: Path, workdir: Path, *overrides: str, processes: int = 1, devices: int = 8) -> str:
    """`jaxmusic train` on 1 process x `devices` devices, or on `processes` x 4 (launch/local.py)."""
    cmd = [sys.executable, *TRAIN, str(TINY), "--workdir", str(workdir), *RUN, *overrides]
    if processes > 1:
        cmd = [sys.executable, str(LOCAL), "-n", str(processes), "--cpu-devices", "4", "--", *cmd]
        env = _env(cache)
    else:
        env = _env(cache, devices)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stderr


def _history(workdir: Path) -> dict:
    lines = [json.loads(x) for x in (workdir / "tiny" / "metrics.jsonl").read_text().splitlines()]
    return {k: np.array([x[k] for x in lines]) for k in ("step", "loss", "grad_norm")}


def _from_step_4(source: Path, dest: Path) -> Path:
    """A copy of a finished 6-step run as it was after step 4's checkpoint."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("jax_cache"))
    stage = dest / "tiny"
    shutil.rmtree(stage / "checkpoints" / "6")
    (stage / "DONE").unlink()
    (stage / "metrics.jsonl").unlink()
    return dest


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory, cache):
    """The reference: one process with 8 CPU devices, fsdp 4 x tensor 2."""
    workdir = tmp_path_factory.mktemp("eight")
    _train(cache, workdir, *MESH8)
    return workdir


def test_two_processes_reproduce_eight_devices(eight_devices, cache, tmp_path):
    log = _train(cache, tmp_path / "two", *MESH8, processes=2)
    assert "process 0 of 2 (environment)" in log and "process 1 of 2 (environment)" in log
    assert "4 local / 8 devices" in log
    want, got = _history(eight_devices), _history(tmp_path / "two")
    np.testing.assert_array_equal(got["step"], np.arange(1, 7))
    # the same program, only the gloo all-reduces add in another order (reached: 4.8e-7, one ulp at 5.5)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-6)  # reached 9e-8
    assert want["loss"][-1] < want["loss"][0]


def test_eight_device_checkpoint_resumes_on_two_processes_and_on_one(eight_devices, cache, tmp_path):
    want = _history(eight_devices)
    # 2 processes x 4 devices, same mesh: the data iterator state of 1 process is resharded to 2
    two = _from_step_4(eight_devices, tmp_path / "two")
    log = _train(cache, two, *MESH8, processes=2)
    assert "resumed from" in log and "step 4" in log
    got = _history(two)
    np.testing.assert_array_equal(got["step"], [5, 6])
    np.testing.assert_allclose(got["loss"], want["loss"][4:], rtol=0, atol=1e-6)  # reached 4.8e-7
    # 1 process, 1 device (no mesh axis left to split)
    one = _from_step_4(eight_devices, tmp_path / "one")
    log = _train(cache, one, "mesh.fsdp=-1", "mesh.tensor=1", devices=1)
    assert "resumed from" in log
    got = _history(one)
    np.testing.assert_array_equal(got["step"], [5, 6])
    np.testing.assert_allclose(got["loss"], want["loss"][4:], rtol=0, atol=5e-6)  # reached 9.5e-7


@pytest.mark.parametrize("victim", [1, 0], ids=["worker-dies", "coordinator-dies"])
def test_a_dying_process_ends_the_other(cache, tmp_path, victim):
    """SIGKILL one of two training processes: the other exits non-zero within a bounded time
    instead of hanging."""
    workdir = tmp_path / "run"
    env = dict(_env(cache, 4), JAXMUSIC_COORDINATOR=f"localhost:{_free_port()}", JAXMUSIC_NUM_PROCESSES="2")
    # 1000 steps: the survivor cannot finish before the kill (one compilation for both cases)
    cmd = [sys.executable, *TRAIN, str(TINY), "--workdir", str(workdir), *RUN, *MESH8, "steps=1000"]
    procs = [subprocess.Popen(cmd, env=dict(env, JAXMUSIC_PROCESS_ID=str(i)), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        metrics = workdir / "tiny" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text().strip()):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no step in 300 s"
            time.sleep(0.05)
        procs[victim].kill()
        killed = time.monotonic()
        survivor = procs[1 - victim]
        _, err = survivor.communicate(timeout=120)
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    print(f"the survivor exited with {survivor.returncode} {waited:.1f} s after the kill")
    assert survivor.returncode != 0, err[-3000:]
    assert f"process {1 - victim} of 2" in err
    # reached: 0.7 s when a worker dies (gloo sees the closed connection and raises; the
    # heartbeat timeout, 10 s here, bounds it where the transport does not notice), 0.2 s when
    # the coordinator dies
    assert waited < 30, (waited, err[-3000:])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]
