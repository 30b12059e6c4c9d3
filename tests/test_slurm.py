"""`launch/slurm.sbatch` on a real, single-node SLURM cluster started by the test.

The fixture runs munged, slurmctld and slurmd (Debian's `slurm-wlm` and `munge`, as root)
from a temporary folder with their own config, socket and ports, so nothing on the
machine is touched. The job is the sbatch script in CPU mode, 2 tasks x 1 CPU device
(several devices per process are tests/test_distributed.py's subject; one keeps this fast):
it trains, is requeued with `scontrol requeue` (SIGTERM: checkpoint, exit 75, back to
the queue) and resumes; then SIGUSR1, the script's time-limit warning, makes it save
and requeue itself; the third run finishes the stage.

Where SLURM cannot be started the test is skipped with the reason; with `CI` set it
fails instead.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm.sbatch"
TINY = REPO / "configs" / "stages" / "tiny.yaml"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "srun", "sinfo")
STEPS = 32  # room for a preemption to land a few steps late on a loaded machine (stops must be < STEPS)
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"SLURM is required in CI: {reason}")
    pytest.skip(f"SLURM cannot be started here: {reason}")


def _binary(name: str) -> str | None:
    return shutil.which(name) or next((p for d in ("/usr/sbin", "/sbin") if os.access(p := f"{d}/{name}", os.X_OK)),
                                      None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, log=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{log()}")


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        # our cluster only, even when the tests themselves run inside a SLURM job
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env["SLURM_CONF"] = str(self.conf)
        self.daemons: list[subprocess.Popen] = []

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if check and r.returncode:
            pytest.fail(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def start(self, *args: str, log: str) -> subprocess.Popen:
        out = open(self.root / log, "w")
        proc = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.daemons.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                         for p in sorted(self.root.glob("*.log")))

    def job_state(self, job: str) -> str:
        out = self.run("scontrol", "show", "job", job, check=False).stdout
        m = re.search(r"JobState=(\S+)", out)
        return m.group(1) if m else "UNKNOWN"

    def stop(self) -> None:
        self.run("scancel", "--full", "--user", "root", check=False)  # jobs first: their steps need slurmd
        for _ in range(40):
            if not self.run("squeue", "-h", check=False).stdout.strip():
                break
            time.sleep(0.5)
        for proc in reversed(self.daemons):  # slurmd, slurmctld, munged
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def slurm():
    if os.name != "posix" or os.geteuid() != 0:
        _unavailable("the test starts slurmd, which must run as root")
    missing = [b for b in DAEMONS + CLIENTS + ("slurmstepd",) if not _binary(b)]
    if missing:
        _unavailable(f"missing {', '.join(missing)} (Debian: apt-get install slurm-wlm munge)")
    node = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(node)
    except OSError:
        _unavailable(f"this host's name {node!r} does not resolve (the job's coordinator address)")
    # munged insists that every folder above its socket is executable by all: not pytest's tmp
    root = Path(tempfile.mkdtemp(prefix="jaxmusic-slurm-"))
    root.chmod(0o755)
    cluster = Cluster(root)
    try:
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        sock = root / "munge.socket"
        cluster.start(_binary("munged"), "--foreground", f"--socket={sock}", f"--key-file={key}",
                      f"--log-file={root / 'munged.log'}", f"--pid-file={root / 'munged.pid'}",
                      f"--seed-file={root / 'munged.seed'}", log="munged.out")
        _wait(sock.exists, 15, "munged's socket", cluster.logs)
        for d in ("state", "spool"):
            (root / d).mkdir()
        cluster.conf.write_text(f"""\
ClusterName=jaxmusictest
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'slurmctld.log'}
SlurmdLogFile={root / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
KillWait=60
InactiveLimit=0
NodeName={node} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        cluster.start(_binary("slurmctld"), "-D", "-i", "-f", str(cluster.conf), log="slurmctld.out")
        cluster.start(_binary("slurmd"), "-D", "-f", str(cluster.conf), "-N", node, log="slurmd.out")

        def idle():
            dead = [p.args[0] for p in cluster.daemons if p.poll() is not None]
            if dead:
                _unavailable(f"{', '.join(dead)} exited at start-up:\n{cluster.logs()}")
            return cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle"

        deadline = time.monotonic() + 30
        while not idle():
            if time.monotonic() > deadline:
                _unavailable(f"the node did not become idle in 30 s:\n{cluster.logs()}")
            time.sleep(0.5)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _metric_steps(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]


def test_sbatch_trains_checkpoints_and_resumes_after_requeue(slurm, tmp_path):
    workdir = tmp_path / "run"
    out = tmp_path / "job.out"
    metrics = workdir / "tiny" / "metrics.jsonl"
    env = dict(slurm.env, JAXMUSIC=str(Path(sys.executable).with_name("jaxmusic")), JAXMUSIC_PLATFORM="cpu",
               CPU_DEVICES_PER_TASK="1", JAXMUSIC_HEARTBEAT_TIMEOUT="15",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),  # the requeued runs skip compiling
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               XLA_FLAGS="--xla_backend_optimization_level=0")  # compiles ~2x faster on CPU
    r = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
                        "--cpus-per-task=1", "--time=15", f"--output={out}", str(SBATCH), str(TINY), str(workdir),
                        f"steps={STEPS}", "checkpoint.every_steps=2", "log.progress=false", "log.tensorboard=false"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    def log() -> str:
        return (out.read_text(errors="replace")[-4000:] if out.exists() else "(no job output)") + "\n" + slurm.logs()

    def trained(steps: int):
        def check() -> bool:
            if slurm.job_state(job) in FINISHED:
                pytest.fail(f"the job ended before step {steps}:\n{log()}")
            return len(_metric_steps(metrics)) >= steps
        return check

    def wait_requeued_and_release(runs: int):
        """The job is back in the queue after `runs` runs; SLURM holds a requeued job for two
        minutes before it may start again: release it now."""
        _wait(lambda: out.exists() and out.read_text().count("training exited with code 75") == runs,
              120, f"run {runs} to checkpoint and exit 75", log)
        _wait(lambda: slurm.job_state(job) == "PENDING", 90, "the job to be pending again", log)
        time.sleep(2)  # the old run's credential is revoked with a 1 s resolution: a restart within it fails
        slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")

    # run 1: trains; `scontrol requeue` (as on preemption) stops it with a checkpoint
    _wait(trained(2), 240, "two training steps", log)
    slurm.run("scontrol", "requeue", job)
    wait_requeued_and_release(1)
    first_stop = _metric_steps(metrics)[-1]

    # run 2: resumes from that checkpoint; SIGUSR1 (the time-limit warning) makes the script
    # stop training with a checkpoint and requeue the job itself
    _wait(trained(first_stop + 1), 180, "a step of the resumed run", log)
    slurm.run("scancel", "--batch", "--signal=USR1", job)
    wait_requeued_and_release(2)
    second_stop = _metric_steps(metrics)[-1]

    # run 3: resumes again and finishes
    _wait(lambda: slurm.job_state(job) in FINISHED, 180, "the job to finish", log)
    text = out.read_text()
    assert slurm.job_state(job) == "COMPLETED", log()
    assert "(restart 1)" in text and "(restart 2)" in text and "requeueing job" in text, log()
    assert re.findall(r"resumed from \S+ step (\d+)", text) == [str(first_stop), str(second_stop)], log()
    assert 2 <= first_stop < second_stop < STEPS, (first_stop, second_stop)
    # every step was trained once, in order: each run continued where the previous one stopped
    assert _metric_steps(metrics) == list(range(1, STEPS + 1)), log()
    assert (workdir / "tiny" / "DONE").exists()
    checkpoints = sorted(int(p.name) for p in (workdir / "tiny" / "checkpoints").iterdir() if p.name.isdigit())
    assert checkpoints[-1] == STEPS, checkpoints
    assert text.count("process 0 of 2 (slurm)") == 3 and text.count("process 1 of 2 (slurm)") == 3
