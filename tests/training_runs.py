"""Helpers for tests that run `jaxmusic train` in subprocesses and interrupt them."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def saved_steps(stage_dir: Path) -> list[int]:
    """Complete checkpoints (Orbax renames a step's folder to its number once it is whole)."""
    folder = stage_dir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def run_until(cmd, env, ready, sig) -> tuple[int, str]:
    """Start `cmd`, send `sig` as soon as `ready()`; return (exit code, stderr)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if ready():
            proc.send_signal(sig)
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def final_item(stage_dir: Path, item: str) -> dict:
    """`{name: array}` of a stage's final checkpoint item, read with plain Orbax."""
    import jax
    import orbax.checkpoint as ocp

    step = max(int(p.name) for p in (stage_dir / "checkpoints").iterdir() if p.name.isdigit())
    tree = ocp.StandardCheckpointer().restore((stage_dir / "checkpoints" / str(step) / item).absolute())
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def run_on_eight_devices(script: str, workdir: Path, timeout: int) -> dict:
    """Run `script` as `python script workdir` on an 8-device CPU mesh (the flag stays out of this
    process's jax) and return the `result.json` it writes into `workdir`."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               # -O0: faster compiles; every number compared comes from runs with the same flags
               XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
               JAX_COMPILATION_CACHE_DIR=str(workdir / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    r = subprocess.run([sys.executable, script, str(workdir)], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads((workdir / "result.json").read_text())
