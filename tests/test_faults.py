"""`jaxmusic train` under cluster accidents: an unreadable checkpoint, a second run on the
same workdir, SIGTERM/SIGINT at every phase, a save that fails, changed settings on a rerun.

Every run is a subprocess on the tiny stage (8 steps, a checkpoint every 4, the last two
kept) sharing one JAX compilation cache, so runs of the same program compile once.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from jaxmusic.train import EXIT_PREEMPTED, EXIT_USER_ERROR
from jaxmusic.train import config as C
from jaxmusic.train import optim, rerun
from jaxmusic.train.lock import LOCK_FILE, WorkdirInUse, WorkdirLock

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "stages" / "tiny.yaml"
LOCAL = REPO / "launch" / "local.py"
QUIET = ["log.progress=false", "log.tensorboard=false"]


def _env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # one process, no job
    # -O0 compiles ~2x faster; every comparison is between runs with the same flags
    return dict(env, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache), JAXMUSIC_HEARTBEAT_TIMEOUT="10",
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                XLA_FLAGS="--xla_backend_optimization_level=0")


def _cmd(workdir: Path, *args: str, processes: int = 1, max_file_bytes: int | None = None) -> list[str]:
    """`jaxmusic train` on the tiny stage: one process, or `processes` x 1 CPU device (launch/local.py);
    `max_file_bytes`: no file it writes may grow larger (RLIMIT_FSIZE, which binds root too)."""
    start = ["-m", "jaxmusic.cli"]
    if max_file_bytes:
        start = ["-c", f"import resource, runpy; resource.setrlimit(resource.RLIMIT_FSIZE, ({max_file_bytes}, "
                       "resource.RLIM_INFINITY)); runpy.run_module('jaxmusic.cli', run_name='__main__')"]
    cmd = [sys.executable, *start, "train", str(TINY), "--workdir", str(workdir), *QUIET, *args]
    if processes > 1:
        cmd = [sys.executable, str(LOCAL), "-n", str(processes), "--cpu-devices", "1", "--", *cmd]
    return cmd


def _train(cache: Path, workdir: Path, *args: str, **how) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(workdir, *args, **how), env=_env(cache), capture_output=True, text=True, timeout=600)


def _signal_when(cache: Path, workdir: Path, ready, sig=signal.SIGTERM, processes: int = 1) -> tuple[int, str]:
    """Run the tiny stage, send `sig` once `ready(stderr lines)` holds; (exit code, stderr).
    Fails unless the signal reached the running process (launch/local.py passes it on to all)."""
    proc = subprocess.Popen(_cmd(workdir, processes=processes), env=_env(cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: [lines.append(line) for line in proc.stderr], daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while proc.poll() is None and not ready(lines):
        assert time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before the signal:\n{''.join(lines)[-3000:]}"
    proc.send_signal(sig)
    proc.wait(timeout=300)
    reader.join(timeout=60)
    return proc.returncode, "".join(lines)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _steps(stage_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (stage_dir / "checkpoints").iterdir() if p.name.isdigit())


def _arrays(folder: Path) -> dict:
    """`{name: numpy array}` of an Orbax item folder, whatever mesh wrote it."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckpt:
        tree = ckpt.metadata(folder).item_metadata.tree
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        tree = ckpt.restore(folder, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_same_state(got: Path, want: Path) -> None:
    for item in ("params", "opt_state"):
        a, b = _arrays(got / item), _arrays(want / item)
        assert a.keys() == b.keys()
        for name in b:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{item} {name}")  # bit-exact


def _killed_after(source: Path, dest: Path, *, last: int) -> Path:
    """A copy of a finished run as a run killed once checkpoint `last` was complete."""
    shutil.copytree(source, dest)
    stage = dest / "tiny"
    for step in _steps(stage):
        if step > last:
            shutil.rmtree(stage / "checkpoints" / str(step))
    shutil.rmtree(stage / "model")
    (stage / "DONE").unlink()
    return dest


def _damage(step_dir: Path, process: int = 0) -> Path:
    """Overwrite the largest parameter data file a process wrote, as a storage fault would."""
    files = (step_dir / "params" / f"ocdbt.process_{process}" / "d").iterdir()
    victim = max(files, key=lambda f: f.stat().st_size)
    victim.write_bytes(bytes(victim.stat().st_size))
    return victim


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """The tiny stage, uninterrupted: checkpoints 4 and 8 and DONE."""
    workdir = tmp_path_factory.mktemp("reference")
    r = _train(cache, workdir)
    assert r.returncode == 0, r.stderr[-4000:]
    assert _steps(workdir / "tiny") == [4, 8]
    return workdir


# ------------------------------------------------------------------ unreadable checkpoints

def test_an_unreadable_newest_checkpoint_is_set_aside_and_the_older_one_resumes(reference, cache, tmp_path):
    workdir = _killed_after(reference, tmp_path / "run", last=8)
    _damage(workdir / "tiny" / "checkpoints" / "8")
    r = _train(cache, workdir)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "checkpoint step 8 cannot be read (ValueError: " in r.stderr and "Traceback" not in r.stderr
    assert f"moved it to {workdir / 'tiny' / 'checkpoints' / '8.corrupt'}" in r.stderr
    assert "resumed from" in r.stderr and "step 4" in r.stderr
    stage = workdir / "tiny"
    assert _steps(stage) == [4, 8] and (stage / "checkpoints" / "8.corrupt" / "params").is_dir()  # kept
    # resumed from step 4 exactly as an uninterrupted run continues it
    _assert_same_state(stage / "checkpoints" / "8", reference / "tiny" / "checkpoints" / "8")
    assert (stage / "DONE").read_text() == "8\n"


def test_no_readable_checkpoint_is_one_clear_error(reference, cache, tmp_path):
    workdir = _killed_after(reference, tmp_path / "run", last=8)
    for step in (4, 8):
        _damage(workdir / "tiny" / "checkpoints" / str(step))
    for attempt in range(2):  # the second run does not start the stage over either
        r = _train(cache, workdir)
        assert r.returncode == EXIT_USER_ERROR, r.stderr[-4000:]
        assert "Traceback" not in r.stderr
        (error,) = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert "can be restored (set aside as unreadable: 4.corrupt, 8.corrupt)" in error
    assert sorted(p.name for p in (workdir / "tiny" / "checkpoints").iterdir()) == ["4.corrupt", "8.corrupt"]


# ------------------------------------------------------------------ one run per workdir

def test_workdir_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path, caplog):
    lock = WorkdirLock(tmp_path, timeout=0.4).acquire()
    first = json.loads((tmp_path / LOCK_FILE).read_text())
    assert first["pid"] == os.getpid() and first["host"] == socket.gethostname()
    with pytest.raises(WorkdirInUse, match=f"in use by another run \\(host {socket.gethostname()}, pid {os.getpid()}"):
        WorkdirLock(tmp_path, timeout=60).acquire()
    time.sleep(0.3)  # the heartbeat is refreshed every timeout / 4
    assert json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"] > first["heartbeat"]
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()

    def plant(**holder):
        (tmp_path / LOCK_FILE).write_text(json.dumps(dict({"job": "77", "token": "x"}, **holder)))

    plant(host="elsewhere", pid=1, heartbeat=time.time())  # alive on another host
    with pytest.raises(WorkdirInUse, match="host elsewhere, pid 1, job 77, heartbeat 0 s ago"):
        WorkdirLock(tmp_path).acquire()
    plant(host="elsewhere", pid=1, heartbeat=time.time() - 500)  # silent for longer than the timeout
    with caplog.at_level("WARNING"):
        WorkdirLock(tmp_path, timeout=120).acquire().release()
    assert "its heartbeat is 500 s old" in caplog.text
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    plant(host=socket.gethostname(), pid=int(gone.stdout), heartbeat=time.time())  # a process that has exited
    with caplog.at_level("WARNING"):
        WorkdirLock(tmp_path).acquire().release()
    assert f"process {int(gone.stdout)} is gone" in caplog.text


def test_a_second_run_is_refused_and_a_killed_runs_lock_is_taken_over(cache, tmp_path):
    workdir, stage = tmp_path / "run", tmp_path / "run" / "tiny"
    holder = subprocess.Popen(_cmd(workdir), env=_env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while _lines(stage / "metrics.jsonl") < 1:
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        holder.send_signal(signal.SIGSTOP)  # alive but frozen mid-run: only its lock speaks for it
        second = _train(cache, workdir)
        assert second.returncode == EXIT_USER_ERROR, second.stderr[-3000:]
        assert f"is in use by another run (host {socket.gethostname()}, pid {holder.pid}" in second.stderr
        assert second.stderr.count("\n") == 1  # one line, nothing trained
    finally:
        holder.kill()  # kill -9 (also ends a stopped process)
        holder.wait()
    third = _train(cache, workdir)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"process {holder.pid} is gone" in third.stderr
    assert (stage / "DONE").exists() and not (workdir / LOCK_FILE).exists()


# ------------------------------------------------------------------ signals at every phase

PHASES = {  # phase: (when to send the signal, expected exit code)
    "set-up": (lambda stage, err: any(x.startswith("stage tiny:") for x in err), EXIT_PREEMPTED),
    "a step": (lambda stage, err: _lines(stage / "metrics.jsonl") >= 2, EXIT_PREEMPTED),
    "a save": (lambda stage, err: any((stage / "checkpoints").glob("4*")), EXIT_PREEMPTED),
    "the final save": (lambda stage, err: _lines(stage / "metrics.jsonl") >= 8, 0),  # after the last step
    "shutdown": (lambda stage, err: (stage / "DONE").exists(), 0),
}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("phase", list(PHASES))
def test_a_signal_at_any_phase_exits_75_or_0_once_finished(reference, cache, tmp_path, phase, sig):
    ready, expected = PHASES[phase]
    # set-up: a resumed run (restoring, starting data, compiling); otherwise from the start
    workdir = _killed_after(reference, tmp_path / "run", last=4) if phase == "set-up" else tmp_path / "run"
    stage = workdir / "tiny"
    code, err = _signal_when(cache, workdir, lambda lines: ready(stage, lines), sig)
    assert code == expected, err[-3000:]
    assert "Traceback" not in err
    if phase == "set-up":  # stopped before training: nothing new to save
        assert "preempted before step 5: nothing new to save" in err and _steps(stage) == [4]
    elif expected == EXIT_PREEMPTED:  # the step it stopped at was saved
        saved = int(err.split("preempted: saved step ")[1].split()[0])
        assert _steps(stage)[-1] == saved < 8 and not (stage / "DONE").exists()
    else:
        assert (stage / "DONE").read_text() == "8\n" and _steps(stage) == [4, 8]


# ------------------------------------------------------------------ a save that fails

def test_a_failing_save_stops_with_the_previous_checkpoint_intact(reference, cache, tmp_path):
    """Files written by the run may not exceed 256 KiB (`ulimit -f`, binding root too): step 8's
    parameter and optimizer files do, the logs and the lock do not. Python ignores SIGXFSZ, so
    the write fails (EFBIG) as it would on a full disk (ENOSPC)."""
    workdir = _killed_after(reference, tmp_path / "run", last=4)
    stage = workdir / "tiny"
    before = _digest(stage / "checkpoints" / "4")
    r = _train(cache, workdir, max_file_bytes=256 << 10)
    assert r.returncode == 1, r.stderr[-4000:]
    assert "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr
    (error,) = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: saving checkpoint step 8 to {stage / 'checkpoints'} failed (")
    assert "File too large" in error and error.endswith("the newest complete checkpoint (step 4) is intact")
    assert _steps(stage) == [4] and _digest(stage / "checkpoints" / "4") == before
    assert not (stage / "DONE").exists() and not (workdir / LOCK_FILE).exists()
    # with room again the same command resumes from step 4 and ends where an uninterrupted run does
    r = _train(cache, workdir)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from" in r.stderr and "step 4" in r.stderr
    _assert_same_state(stage / "checkpoints" / "8", reference / "tiny" / "checkpoints" / "8")


# ------------------------------------------------------------------ changed settings

def test_which_settings_a_rerun_may_change():
    stage = C.load(TINY).stages[0]
    saved = json.loads(json.dumps(stage.to_dict()))
    for free in ("log.every_steps=7", "checkpoint.every_steps=1", "mesh.fsdp=2", "data.workers=9", "nan_policy=skip",
                 "model.remat=full"):
        assert rerun.changes(saved, C.load(TINY, [free]).stages[0]) == [], free
    changed = C.load(TINY, ["steps=20", "optimizer.lr=0.5", "model.llm.hidden_size=32"]).stages[0]
    assert [(k, old, new) for k, old, new in rerun.changes(saved, changed) if k != "model.llm"] == [
        ("optimizer.lr", 1e-3, 0.5), ("steps", 8, 20)]
    assert [k for k, _, _ in rerun.changes(saved, changed)] == ["model.llm", "optimizer.lr", "steps"]
    nan = C.load(TINY, ["model.mufun.connector_init_std=.nan"]).stages[0]
    assert rerun.changes(json.loads(json.dumps(nan.to_dict())), nan) == []  # NaN equals NaN here
    del saved["optimizer"]["lr_scales"]  # a checkpoint written before the setting existed
    assert rerun.changes(saved, stage) == []
    with pytest.raises(C.ConfigError, match='steps: 8 there, 20 now.*or add --extend to continue it to 20 steps'):
        rerun.check(saved, C.load(TINY, ["steps=20"]).stages[0], "stage tiny")
    assert rerun.check(saved, C.load(TINY, ["steps=20"]).stages[0], "stage tiny", extend=True) == 8
    with pytest.raises(C.ConfigError, match="--extend only adds steps"):
        rerun.check(saved, C.load(TINY, ["steps=6"]).stages[0], "stage tiny", extend=True)


def test_changed_settings_are_refused_and_extend_continues(reference, cache, tmp_path):
    finished = tmp_path / "finished"
    shutil.copytree(reference, finished)
    stage = finished / "tiny"
    config = (stage / "config.yaml").read_text()
    r = _train(cache, finished, "steps=12")
    assert r.returncode == EXIT_USER_ERROR, r.stderr[-3000:]
    assert r.stderr.splitlines() == [
        f"error: stage tiny (finished in {stage}) was trained with other settings (steps: 8 there, 12 now); rerun "
        "with the saved settings, or use another --workdir, or add --extend to continue it to 12 steps"]
    r = _train(cache, finished, "log.every_steps=2", "checkpoint.keep_last=3", "data.workers=1")
    assert r.returncode == 0 and "stage tiny: already done" in r.stderr, r.stderr[-3000:]
    assert (stage / "config.yaml").read_text() == config
    # an init that cannot be read any more (a deleted checkpoint): the finished stage is left as it is
    r = _train(cache, finished, "init.source=checkpoint", f"init.path={tmp_path / 'deleted'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stage tiny: its settings cannot be compared with the finished run's" in r.stderr
    assert "stage tiny: already done" in r.stderr and (stage / "config.yaml").read_text() == config
    # a stage in progress: refused before anything is read or written
    resumed = _killed_after(reference, tmp_path / "resumed", last=4)
    r = _train(cache, resumed, "optimizer.lr=0.002")
    assert r.returncode == EXIT_USER_ERROR, r.stderr[-3000:]
    assert "(checkpoint step 4 in" in r.stderr and "(optimizer.lr: 0.001 there, 0.002 now)" in r.stderr
    assert "--extend" not in r.stderr and "resumed from" not in r.stderr

    r = _train(cache, finished, "steps=12", "--extend")
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("--extend: 8 -> 12 steps; the cosine learning-rate schedule now spans 12 steps, and steps 9-12 "
            "continue from step 8's state at lr ") in r.stderr
    assert (stage / "DONE").read_text() == "12\n" and _steps(stage) == [8, 12]
    logged = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()][8:]
    assert [x["step"] for x in logged] == [9, 10, 11, 12]
    schedule = optim.learning_rate(C.load(TINY).stages[0].optimizer, 12)  # recomputed for 12 steps
    assert [x["lr"] for x in logged] == [float(schedule(k)) for k in range(8, 12)]
    assert logged[0]["lr"] > 0  # the 8-step cosine had reached 0


# ------------------------------------------------------------------ two processes

@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, cache):
    """The tiny stage on 2 processes x 1 CPU device (fsdp 2), uninterrupted."""
    workdir = tmp_path_factory.mktemp("two")
    r = _train(cache, workdir, processes=2)
    assert r.returncode == 0, r.stderr[-4000:]
    return workdir


def test_two_processes_lock_once_and_agree_on_the_step_they_fall_back_to(two_processes, cache, tmp_path):
    workdir = _killed_after(two_processes, tmp_path / "run", last=8)
    holder = {"host": "elsewhere", "pid": 1, "job": None, "heartbeat": time.time(), "token": "x"}
    (workdir / LOCK_FILE).write_text(json.dumps(holder))  # a live run on another host
    r = _train(cache, workdir, processes=2)
    assert r.returncode == EXIT_USER_ERROR, r.stderr[-4000:]
    assert "error: " + str(workdir) + " is in use by another run (host elsewhere" in r.stderr  # process 0
    assert f"error: {workdir} is in use by another run (process 0 names it)" in r.stderr    # process 1
    (workdir / LOCK_FILE).unlink()

    # only process 1 reads this file (the parameter shards it wrote): process 0 reads step 8 fine
    _damage(workdir / "tiny" / "checkpoints" / "8", process=1)
    r = _train(cache, workdir, processes=2)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "process 1: checkpoint step 8 cannot be read (ValueError: " in r.stderr
    assert "process 0: checkpoint step 8 cannot be read (another process could not read it); moved it to" in r.stderr
    assert r.stderr.count("resumed from") == 1 and "step 4" in r.stderr
    _assert_same_state(workdir / "tiny" / "checkpoints" / "8", two_processes / "tiny" / "checkpoints" / "8")


def test_two_processes_stop_together_when_preempted_during_a_resumes_set_up(two_processes, cache, tmp_path):
    """Both processes resume at step 4 and SIGTERM arrives before either has trained a step: they
    stop together at their first chance, before step 5 or right after it. (JAX's preemption
    sync point is one past the highest count of sync calls; the trainer counts its own calls,
    so a resumed stage no longer passes step numbers that never meet it and train on.)"""
    workdir = _killed_after(two_processes, tmp_path / "run", last=4)
    # both processes can take the notice once they have joined (their lines may interleave)
    started = lambda lines: all(f"process {i} of 2" in "".join(lines) for i in range(2))  # noqa: E731
    code, err = _signal_when(cache, workdir, started, processes=2)
    assert code == EXIT_PREEMPTED, err[-4000:]
    # JAX's notifier passes the signal on within a second: before the first sync point or after step 5
    if "preempted before step 5: nothing new to save" in err:
        assert _steps(workdir / "tiny") == [4]
    else:
        assert "preempted: saved step 5 " in err and _steps(workdir / "tiny") == [4, 5], err[-4000:]


def test_only_the_trainer_asks_the_preemption_sync_point(tmp_path, monkeypatch):
    """JAX's sync point answers True to the call whose id meets the agreed point, whoever calls.
    Orbax's manager asks it on every save with the training step; interleaved with the trainer's
    own count, that call could take the notice and the run would train to the end of the stage
    (seen under load: SLURM requeued the job, the training exited 0 at the last step)."""
    from jax.experimental import multihost_utils

    from jaxmusic.checkpoints.training import Checkpoints

    asked = []
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: asked.append(step) or True)
    ckpts = Checkpoints(tmp_path / "checkpoints", C.CheckpointSection(every_steps=2))
    state = {"w": np.arange(4, dtype=np.float32)}
    saved = [ckpts.save(step, state, state, {}, {"step": step}, {}) for step in (1, 2, 3)]
    ckpts.wait()
    assert saved == [False, True, False] and asked == []
