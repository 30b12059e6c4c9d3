"""1 device vs an 8-device FSDP x tensor mesh; an 8-device checkpoint resumed on 1 device.

The multi-device part runs in a subprocess (this file, run as a script) so that
`--xla_force_host_platform_device_count=8` never leaks into other test modules.
"""

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from training_runs import run_on_eight_devices

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "stages" / "tiny.yaml"


def test_one_device_and_eight_device_mesh_agree(tmp_path):
    res = run_on_eight_devices(__file__, tmp_path, timeout=600)

    one, eight = np.array(res["one"]["loss"]), np.array(res["eight"]["loss"])
    assert len(one) == len(eight) == 6
    # same steps, same losses: float32, reductions in another order (reached: 9.5e-7 abs on ~5.5)
    np.testing.assert_allclose(eight, one, rtol=0, atol=5e-6)
    np.testing.assert_allclose(res["eight"]["grad_norm"], res["one"]["grad_norm"], rtol=1e-6)  # reached 9.4e-8
    assert one[-1] < one[0]

    # step 1 is the mean over all answer tokens of the global batch (computed here without the
    # trainer, with jaxmusic.losses.next_token_log_probs) ...
    np.testing.assert_allclose(one[0], res["reference_step1"], rtol=0, atol=2e-6)  # reached 3.4e-7
    np.testing.assert_allclose(eight[0], res["reference_step1"], rtol=0, atol=2e-6)  # reached 1.4e-7
    # ... not the mean of the 8 shards' (4 groups x 2 microbatches) own means (1.2e-3 away)
    assert abs(res["reference_step1"] - res["mean_of_shard_means"]) > 100 * 2e-6

    # the 8-device checkpoint restores bit-exactly onto 1 device, and sharded onto 8
    assert res["restore_bit_exact"]
    assert res["q_proj_spec"] == "P(None, 'tensor', 'fsdp')"
    assert res["q_proj_shard_shape"] == [2, 32, 16]
    shapes = [shape for shape, _ in res["collectives"]]
    # (arrays may carry the train step's leading replica axis, of size 1 on this mesh)
    assert not any(re.search(r"\[(1,)*(8,64|16,30),", x) for x in shapes), shapes
    assert "all-gather" in {op for _, op in res["collectives"]}
    # resuming the 8-device run's step-4 checkpoint on 1 device continues the same run
    resharded = np.array(res["resharded"]["loss"])
    np.testing.assert_allclose(resharded, one[4:], rtol=0, atol=5e-6)  # reached: 0 (same 1-device program)


def _worker(workdir: Path) -> None:
    import jax
    from flax import nnx

    from jaxmusic import sharding
    from jaxmusic.checkpoints import restore_params
    from jaxmusic.checkpoints.training import Checkpoints
    from jaxmusic.losses import next_token_log_probs
    from jaxmusic.models.mufun import PARTS
    from jaxmusic.train import config as config_lib
    from jaxmusic.train.state import ModelSpec, random_parts, with_shardings
    from jaxmusic.train.synthetic import SyntheticSource
    from jaxmusic.train.batches import make_source, next_batch
    from jaxmusic.train.trainer import run_stage, setup

    assert len(jax.devices()) == 8
    base = ["steps=6", "checkpoint.every_steps=2", "log.progress=false", "log.tensorboard=false"]
    one = config_lib.load(TINY, base).stages[0]
    eight = config_lib.load(TINY, base + ["mesh.fsdp=4", "mesh.tensor=2"]).stages[0]
    one_device = jax.devices()[:1]
    assert run_stage(one, workdir / "one", devices=one_device) == 0
    assert run_stage(eight, workdir / "eight") == 0

    # resume the 8-device run from its step-4 checkpoint on one device
    shutil.copytree(workdir / "eight", workdir / "resharded")
    shutil.rmtree(workdir / "resharded" / "checkpoints" / "6")
    (workdir / "resharded" / "DONE").unlink()
    (workdir / "resharded" / "metrics.jsonl").unlink()
    assert run_stage(one, workdir / "resharded", devices=one_device) == 0

    spec = ModelSpec.from_stage(one)
    graphdef, abstract_state = spec.abstract()
    abstract = nnx.to_pure_dict(abstract_state)
    mesh1 = sharding.make_mesh({}, one_device)
    mesh8 = sharding.make_mesh(eight.mesh.shape())
    ckpts = Checkpoints(workdir / "eight" / "checkpoints", read_only=True)
    p1 = restore_params(ckpts.params_dir(4), with_shardings(abstract, sharding.state_shardings(abstract_state, mesh1)))
    p8 = restore_params(ckpts.params_dir(4), with_shardings(abstract, sharding.state_shardings(abstract_state, mesh8)))
    exact = all(np.array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
    q_proj = p8["llm"]["layers"]["self_attn"]["q_proj"]["weight"]

    # step 1 by hand: init params, the first two microbatches, one global token mean
    params = random_parts(spec, PARTS, 0, sharding.state_shardings(abstract_state, mesh1))
    model = nnx.merge(graphdef, params)
    source = SyntheticSource(vocab_size=spec.llm.vocab_size, n_mels=spec.whisper.num_mel_bins,
                             frames=2 * spec.whisper.max_source_positions, tokens_per_chunk=spec.tokens_per_chunk,
                             seq_len=one.data.seq_len, chunks_per_row=one.data.chunks_per_row, global_rows=8,
                             rows=slice(0, 8), seed=one.data.seed)
    total, count, shard_means = 0.0, 0, []
    for _ in range(one.accumulation):
        mb = next(source)
        logits = model(mb["mel"], mb["input_ids"], mb["audio_index"], mb["is_audio"], mb["positions"], groups=8)
        logp, valid = (np.asarray(x) for x in next_token_log_probs(logits, mb["labels"]))
        total, count = total - logp.sum(dtype=np.float64), count + valid.sum()
        for rows in np.split(np.arange(8), 4):  # the 4 data-parallel shards of the 8-device mesh
            shard_means.append(-logp[rows].sum(dtype=np.float64) / valid[rows].sum())

    # FSDP moves weights, never whole-batch activations: no collective carries an array with all
    # 8 rows x 64 positions or all 16 chunk rows x 30 frames (tensor parallelism all-reduces
    # activations of the 2 local rows only). The one exception, by XLA's choice, is the token
    # embedding lookup: it gathers the token ids and sums the looked-up slices of the vocabulary-
    # and width-sharded table, which moves far less than gathering the table.
    s8 = setup(eight)
    params8, opt8 = s8.init_state()
    source8 = make_source(eight, s8.spec, s8.mesh, s8.micro_rows, workdir)
    batch8 = next_batch(source8, eight.accumulation, s8.mesh, s8.micro_rows, 0, False)
    hlo = s8.compile_step(params8, opt8, batch8)[0].as_text()
    collectives = [(shape, op) for shape, op, where in re.findall(
        r"= (.+?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\((?:.*op_name=\"([^\"]*))?",
        hlo) if "jit(_take)" not in where]

    def history(name):
        lines = [json.loads(x) for x in (workdir / name / "metrics.jsonl").read_text().splitlines()]
        return {"loss": [x["loss"] for x in lines], "grad_norm": [x["grad_norm"] for x in lines]}

    (workdir / "result.json").write_text(json.dumps({
        "one": history("one"), "eight": history("eight"), "resharded": history("resharded"),
        "reference_step1": total / count, "mean_of_shard_means": float(np.mean(shard_means)),
        "restore_bit_exact": exact, "q_proj_spec": str(q_proj.sharding.spec), "collectives": collectives,
        "q_proj_shard_shape": list(q_proj.addressable_shards[0].data.shape)}))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
