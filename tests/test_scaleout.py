"""Data parallelism across replicas (the ``data`` axis, between nodes): one gradient reduction per step.

On an 8-device CPU mesh (data 2 x fsdp 4) the tiny stage's compiled train step reduces over
``data`` once, after the accumulation loop, whatever the number of microbatches; and training
on it gives the single device's losses and parameters. The multi-device part runs in a
subprocess (this file, run as a script), so that `--xla_force_host_platform_device_count=8`
never leaks into other test modules.
"""

import json
import sys
from pathlib import Path

import numpy as np

from training_runs import run_on_eight_devices

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "stages" / "tiny.yaml"
RUN = ["steps=3", "checkpoint.every_steps=3", "log.progress=false", "log.tensorboard=false",
       "batch.global_batch=32", "batch.microbatch=8"]   # 4 microbatches of 8 rows: 1 row per device
MESH = ["mesh.data=2", "mesh.fsdp=4"]


def test_replicas_come_from_the_sharding_table():
    """The replica axes are the batch axes no parameter is split over: ``data``, when it has 2+ devices."""
    from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

    from jaxmusic import sharding

    mesh = AbstractMesh((2, 4, 2), sharding.MESH_AXES)
    assert sharding.replica_axes(mesh) == ("data",) and sharding.replica_count(mesh) == 2
    rows = NamedSharding(mesh, P(("data", "fsdp"), None))
    assert sharding.within_replica(rows).spec == P("fsdp", None)
    # [rows, ...] viewed as [replicas, rows of each, ...]: the same devices hold the same rows
    assert sharding.per_replica(sharding.within_replica(rows)).spec == P("data", "fsdp", None)
    weight = NamedSharding(mesh, P("tensor", "fsdp"))
    assert sharding.per_replica(weight).spec == P("data", "tensor", "fsdp")
    single = AbstractMesh((1, 8, 1), sharding.MESH_AXES)
    assert sharding.replica_axes(single) == () and sharding.replica_count(single) == 1
    assert sharding.per_replica(NamedSharding(single, P("fsdp"))).spec == P(None, "fsdp")


def test_one_reduction_over_data_per_step_and_single_device_results(tmp_path):
    res = run_on_eight_devices(__file__, tmp_path, timeout=900)

    for a, hlo in res["hlo"].items():
        # nothing moves between the two replicas while the microbatches are accumulated ...
        assert hlo["inside_loop_over_data"] == [], (a, hlo["inside_loop_over_data"])
        # ... and after the loop the gradients are reduced over them once: every trainable gradient
        # shard once, plus the loss sums and token counts (reached: 20 bytes)
        assert 0 <= hlo["reduced_over_data"] - res["grad_bytes"] < 1024, (a, hlo["reduced_over_data"])
        assert all(kind == "all-reduce" for kind in hlo["kinds_over_data"]), hlo["kinds_over_data"]
    assert res["hlo"]["4"]["reduced_over_data"] == res["hlo"]["2"]["reduced_over_data"]

    one, mesh = res["one"], res["mesh"]
    assert len(one["loss"]) == len(mesh["loss"]) == 3
    # the tolerances of the 1- vs 8-device comparison of tests/test_train_mesh.py
    np.testing.assert_allclose(mesh["loss"], one["loss"], rtol=0, atol=5e-6)  # reached 4.8e-7
    np.testing.assert_allclose(mesh["grad_norm"], one["grad_norm"], rtol=1e-6)  # reached 0
    # the parameters after 3 AdamW steps (each moved by up to 3e-3), to the losses' tolerance
    assert res["max_param_diff"] < 5e-6, res["max_param_diff"]  # reached 5.3e-7


def _compiled_collectives(stage) -> dict:
    """Collectives of `stage`'s compiled train step: those crossing the data axis inside the
    accumulation loop, and the bytes the step reduces over the data axis."""
    from jaxmusic.plan import hlo
    from jaxmusic.plan.train import abstract_batch
    from jaxmusic.train.state import with_shardings
    from jaxmusic.train.trainer import setup

    s = setup(stage)
    half = s.mesh.devices.size // 2  # data 2: devices 0-3 are one replica, 4-7 the other
    params = with_shardings(s.abstract, s.param_shardings)
    opt = with_shardings(s.abstract_opt, s.opt_shardings)
    compiled, _ = s.compile_step(params, opt, abstract_batch(s.stage, s.spec, s.micro_rows))
    analysis = hlo.analyse(compiled.as_text())
    over_data = [c for c in analysis.collectives if any(len({d // half for d in g}) > 1 for g in c.groups)]
    return {"inside_loop_over_data": [(c.kind, c.scope, c.count) for c in over_data if c.count > 1],
            "reduced_over_data": sum(c.count * c.data_bytes for c in over_data),
            "kinds_over_data": sorted({c.kind for c in over_data})}


def _worker(workdir: Path) -> None:
    import jax
    from flax import nnx

    from jaxmusic import sharding
    from jaxmusic.checkpoints import restore_params
    from jaxmusic.checkpoints.training import Checkpoints
    from jaxmusic.plan.train import per_device_bytes
    from jaxmusic.train import config as config_lib
    from jaxmusic.train import optim
    from jaxmusic.train.state import ModelSpec, with_shardings
    from jaxmusic.train.trainer import run_stage, setup

    assert len(jax.devices()) == 8
    one = config_lib.load(TINY, RUN).stages[0]
    mesh = config_lib.load(TINY, RUN + MESH).stages[0]
    assert mesh.accumulation == 4
    one_device = jax.devices()[:1]
    assert run_stage(one, workdir / "one", devices=one_device) == 0
    assert run_stage(mesh, workdir / "mesh") == 0

    s = setup(mesh)
    grad_bytes = per_device_bytes(optim.split(s.abstract, s.trainable)[0],
                                  optim.split(s.param_shardings, s.trainable)[0])
    hlo = {str(a): _compiled_collectives(config_lib.load(TINY, RUN + MESH + [f"batch.global_batch={8 * a}"])
                                         .stages[0]) for a in (4, 2)}

    _, abstract_state = ModelSpec.from_stage(one).abstract()
    target = with_shardings(nnx.to_pure_dict(abstract_state),
                            sharding.state_shardings(abstract_state, sharding.make_mesh({}, one_device)))
    final = {}
    for name in ("one", "mesh"):
        ckpts = Checkpoints(workdir / name / "checkpoints", read_only=True)
        final[name] = restore_params(ckpts.params_dir(3), target)
        ckpts.close()
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(final["one"]), jax.tree.leaves(final["mesh"])))

    def history(name):
        lines = [json.loads(x) for x in (workdir / name / "metrics.jsonl").read_text().splitlines()]
        return {"loss": [x["loss"] for x in lines], "grad_norm": [x["grad_norm"] for x in lines]}

    (workdir / "result.json").write_text(json.dumps({
        "one": history("one"), "mesh": history("mesh"), "grad_bytes": grad_bytes, "hlo": hlo,
        "max_param_diff": diff}))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
