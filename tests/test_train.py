"""Training: configs, optimizer pieces, FLOP count, event files, and `jaxmusic train` end to end
(uninterrupted vs SIGTERM / SIGKILL-interrupted schedules, frozen parts, non-finite steps).

Training runs are subprocesses with their own JAX compilation cache, so the interrupted and
resumed runs reuse the uninterrupted run's executables instead of compiling again.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optax
import pytest

from jaxmusic.models.qwen3 import Qwen3Config
from jaxmusic.models.whisper import WhisperEncoderConfig
from jaxmusic.models.mufun import MuFunConfig
from jaxmusic.train import EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_USER_ERROR, main
from jaxmusic.train import config as C
from jaxmusic.train import metrics as M
from jaxmusic.train import optim
from training_runs import final_item, lines, run_until, saved_steps

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "stages" / "tiny.yaml"
SCHEDULE = REPO / "configs" / "schedules" / "tiny_cpu.yaml"
COMMON = ["steps=8", "checkpoint.every_steps=2", "log.progress=false"]


# ------------------------------------------------------------------------------- configs

def test_shipped_configs_load_and_validate():
    for path in sorted((REPO / "configs" / "schedules").glob("*.yaml")):
        assert C.load(path).stages, path
    for path in sorted((REPO / "configs" / "stages").glob("*.yaml")):
        alone = "source: previous" in path.read_text()  # a later stage run on its own names its init
        assert C.load(path, ["init.source=stage", "init.path=runs/p0"] if alone else []).stages, path
    full = C.load(REPO / "configs" / "schedules" / "mufun_full.yaml").stages
    assert [s.name for s in full] == ["p1", "p2", "p3", "p4", "f1", "f2"]
    assert [s.batch.global_batch for s in full] == [384, 384, 384, 384, 144, 256]
    assert full[0].trainable == ["^connector/"] and full[0].data.template == "pretrain"
    assert full[1].trainable == ["^whisper/", "^connector/"]
    assert all(s.init.source == "previous" for s in full[1:])
    assert full[3].data.seq_len == 4096 and full[3].data.max_audio_seconds == 390
    assert all(s.optimizer.b1 == 0.9 and s.optimizer.b2 == 0.999 and s.optimizer.eps == 1e-8
               and s.optimizer.weight_decay == 0 and s.optimizer.clip_norm == 1.0 for s in full)
    assert all(math.prod(s.mesh.shape().values()) == 16 for s in full)
    f2 = full[5]  # MuFun's scripts/grpo.sh and train_grpo.py
    assert f2.loss == "grpo" and f2.trainable == ["^connector/", "^llm/"] and f2.init.source == "previous"
    assert (f2.optimizer.lr, f2.optimizer.warmup_ratio, f2.optimizer.schedule, f2.epochs) == (2e-6, 0.02, "cosine", 1)
    g = f2.grpo
    assert (g.generations, g.max_new_tokens, g.max_prompt_tokens, g.temperature, g.top_p, g.beta, g.epsilon,
            g.iterations, g.aggregation, g.rewards) == (8, 256, 512, 1.0, 1.0, 0.0, 0.2, 1, "bnpo",
                                                        [{"name": "exact_once", "weight": 1.0}])
    assert f2.records_per_step == 32 and f2.model.dtype == "bfloat16"
    assert [s.name for s in C.load(REPO / "configs" / "schedules" / "mufun_finetune.yaml").stages] == ["f1", "f2"]


def test_overrides_and_errors(tmp_path):
    s = C.load(TINY, ["steps=3", "optimizer.lr=0.5", "mesh.tensor=2", "trainable=[^llm/]"]).stages[0]
    assert (s.steps, s.optimizer.lr, s.mesh.tensor, s.trainable) == (3, 0.5, 2, ["^llm/"])
    sched = C.load(SCHEDULE, ["stages.p3.steps=5", "data.seq_len=32"]).stages
    assert [x.steps for x in sched] == [8, 5] and [x.data.seq_len for x in sched] == [32, 32]
    assert sched[0].trainable == ["^connector/"] and sched[1].init.source == "previous"
    with pytest.raises(C.ConfigError, match=r"unknown config key\(s\) \['optimizer.learning_rate'\]"):
        C.load(TINY, ["optimizer.learning_rate=1"])
    with pytest.raises(C.ConfigError, match="expected KEY.PATH=VALUE"):
        C.load(TINY, ["steps"])
    with pytest.raises(C.ConfigError, match="stages.NAME.KEY with NAME in"):
        C.load(SCHEDULE, ["stages.p9.steps=1"])
    with pytest.raises(C.ConfigError, match="multiple of batch.microbatch 5"):
        C.load(TINY, ["batch.microbatch=5"])
    with pytest.raises(C.ConfigError, match="init.source: 'hf' is not one of"):
        C.load(TINY, ["init.source=hf"])
    with pytest.raises(C.ConfigError, match="init.whisper_positions: 'none' is not one of"):
        C.load(TINY, ["init.whisper_positions=none"])
    with pytest.raises(C.ConfigError, match="init.standardize_encoder_output: 4 must be .* only with init.source random"):
        C.load(TINY, ["init.source=stage", "init.path=runs/p0", "init.standardize_encoder_output=4"])
    assert C.load(TINY, ["optimizer.lr=2e-5"]).stages[0].optimizer.lr == 2e-5  # YAML 1.1 reads a string
    with pytest.raises(C.ConfigError, match="steps: expected int or null, got 'ten'"):
        C.load(TINY, ["steps=ten"])
    with pytest.raises(C.ConfigError, match="mesh.fsdp: expected int, got 2.5"):
        C.load(TINY, ["mesh.fsdp=2.5"])
    with pytest.raises(C.ConfigError, match="config not found"):
        C.load(tmp_path / "nope.yaml")
    # the command line reports it in one line, exit code 2, before touching JAX
    assert main([str(TINY), "--workdir", str(tmp_path / "w"), "batch.size=3"]) == EXIT_USER_ERROR
    assert main([str(TINY), "--workdir", str(tmp_path / "w"), "init.standardize_encoder_output=2",
                 "model.mufun.fusion_layers=[0,1]"]) == EXIT_USER_ERROR  # the last layer (2) is not read


# ------------------------------------------------------------------------------- optimizer

def test_trainable_split_merge_and_schedule():
    import jax
    from flax import nnx

    from jaxmusic.train.state import ModelSpec

    spec = ModelSpec.from_stage(C.load(TINY).stages[0])
    _, state = spec.abstract()
    paths = optim.trainable_paths(state, ["^connector/", "^llm/layers/mlp/"])
    assert ("connector", "linear1", "weight") in paths and ("llm", "layers", "mlp", "up_proj", "weight") in paths
    assert not any(p[0] == "whisper" for p in paths)
    all_paths = optim.trainable_paths(state, [".*"])
    assert ("whisper", "embed_positions") not in all_paths  # a Constant, never trainable
    with pytest.raises(C.ConfigError, match="'\\^encoder/' matches no parameter"):
        optim.trainable_paths(state, ["^encoder/"])
    params = nnx.to_pure_dict(state)
    a, b = optim.split(params, paths)
    assert jax.tree.structure(optim.merge(a, b)) == jax.tree.structure(params)
    assert optim.decays(("llm", "lm_head", "weight")) and not optim.decays(("llm", "norm", "scale"))

    # transformers' get_cosine_schedule_with_warmup: lr * step / warmup, then half a cosine to 0
    opt = C.OptimizerSection(lr=2e-5, warmup_ratio=0.03)
    total = 100
    warm = math.ceil(total * 0.03)
    sched = optim.learning_rate(opt, total)
    for k in range(total):
        want = 2e-5 * (k / warm if k < warm else 0.5 * (1 + math.cos(math.pi * (k - warm) / (total - warm))))
        assert abs(float(sched(k)) - want) < 1e-11
    assert isinstance(optim.adamw(opt, sched), optax.GradientTransformation)


def test_random_encoder_positions_are_whispers_sinusoids_or_zeros():
    from jaxmusic import sharding
    from jaxmusic.models.whisper import sinusoids
    from jaxmusic.train.state import ModelSpec, random_parts

    spec = ModelSpec.from_stage(C.load(TINY).stages[0])
    shardings = sharding.state_shardings(spec.abstract()[1], sharding.make_mesh({}))
    table = sinusoids(spec.whisper.max_source_positions, spec.whisper.d_model)
    params = {how: random_parts(spec, ("whisper",), 0, shardings, whisper_positions=how)["whisper"]
              for how in C.WHISPER_POSITIONS}
    assert np.array_equal(np.asarray(params["sinusoids"]["embed_positions"]), table)
    assert not np.asarray(params["zeros"]["embed_positions"]).any()
    assert np.array_equal(np.asarray(params["zeros"]["conv1"]["weight"]),   # nothing else changes
                          np.asarray(params["sinusoids"]["conv1"]["weight"]))


def test_standardize_encoder_output_folds_its_statistics_into_the_final_layer_norm():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxmusic import sharding
    from jaxmusic.models import mufun
    from jaxmusic.models.mufun import PARTS
    from jaxmusic.train.state import ModelSpec, random_parts, standardize_encoder_output

    spec = ModelSpec.from_stage(C.load(TINY).stages[0])
    graphdef, abstract = spec.abstract()
    shardings = sharding.state_shardings(abstract, sharding.make_mesh({}))
    params = random_parts(spec, PARTS, 0, shardings)
    rng = np.random.default_rng(0)
    shape = (2, 3, spec.whisper.num_mel_bins, 2 * spec.whisper.max_source_positions)  # [A, chunk slots, ...]
    batches = [{"mel": jnp.asarray(rng.normal(size=shape), jnp.float32) * (1 + i),
                "chunk_mask": jnp.asarray([[True, True, False], [True, False, True]])} for i in range(2)]
    folded = standardize_encoder_output(graphdef, params, batches, spec.mufun, shardings["whisper"])

    def last_pooled(params, mel):
        hidden = nnx.merge(graphdef, params).whisper(mel.reshape(-1, *shape[2:]))
        return np.asarray(mufun.pool(hidden[-1], spec.mufun.pool_kernel, spec.mufun.pool_stride)), hidden

    before, after = [], []
    for b in batches:
        audio = np.asarray(b["chunk_mask"]).reshape(-1)  # slots holding audio only
        (x, hidden), (y, hidden_after) = last_pooled(params, b["mel"]), last_pooled(folded, b["mel"])
        before.append(x[audio]), after.append(y[audio])
        np.testing.assert_array_equal(np.asarray(hidden[:-1]), np.asarray(hidden_after[:-1]))  # earlier layers
    x = np.concatenate(before).reshape(-1, before[0].shape[-1])
    y = np.concatenate(after).reshape(-1, x.shape[-1])
    np.testing.assert_allclose(y, (x - x.mean(0)) / x.std(0), atol=5e-5)  # float32 moments; reached 1e-5
    assert np.abs(x.std(0) - 1).max() > 0.1 and np.abs(x.mean(0)).max() > 0.1  # it was not standardised
    for part in ("connector", "llm"):
        assert all(a is b for a, b in zip(jax.tree.leaves(params[part]), jax.tree.leaves(folded[part])))


def test_lr_scales_scale_each_groups_updates():
    import jax
    import jax.numpy as jnp

    trainable = {("whisper", "conv1", "weight"), ("whisper", "conv1", "bias"), ("connector", "linear1", "weight"),
                 ("llm", "norm", "scale")}
    opt = C.OptimizerSection(lr=1e-2, weight_decay=0.1, warmup_steps=0, schedule="constant",
                             lr_scales={"conv1/weight$": 0.5, "^whisper/": 0.1, "^llm/": 1.0})
    factors = optim.lr_factors(opt, trainable)  # the first matching regex wins; factor 1 is left out
    assert factors == {("whisper", "conv1", "weight"): 0.5, ("whisper", "conv1", "bias"): 0.1}
    params = optim.unflatten({p: jnp.full((3,), 2.0) for p in trainable})
    grads = optim.unflatten({p: jnp.array([1.0, -2.0, 0.5]) for p in trainable})

    def update(tx):
        updates, _ = tx.update(grads, tx.init(params), params)
        return optim.flatten(updates)

    plain = update(optim.adamw(opt, optim.learning_rate(opt, 10)))
    scaled = update(optim.adamw(opt, optim.learning_rate(opt, 10), factors))
    for p in trainable:  # AdamW's whole update, weight decay included, scales with the lr
        np.testing.assert_allclose(scaled[p], plain[p] * factors.get(p, 1.0), rtol=1e-6)
    assert jax.tree.structure(scaled) == jax.tree.structure(plain)
    with pytest.raises(C.ConfigError, match="'\\^encoder/' matches no trainable parameter"):
        optim.lr_factors(C.OptimizerSection(lr_scales={"^encoder/": 0.1}), trainable)
    with pytest.raises(C.ConfigError, match="must be a number >= 0"):
        optim.lr_factors(C.OptimizerSection(lr_scales={"^whisper/": "fast"}), trainable)


def test_flop_count_matches_hand_arithmetic():
    llm = Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    whisper = WhisperEncoderConfig()  # large-v3
    f = M.forward_flops(whisper, llm, MuFunConfig(), chunk_rows=2, rows=1, length=4096)
    per_layer = 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096 + 3 * 4096 * 12288  # 192.9M weights
    lm = 2 * 4096 * (36 * per_layer + 4096 * 151936) + 36 * 2 * 4096 ** 2 * 4096
    assert f["llm"] == lm  # 6.7e13: ~2 x 7.57B matmul weights x 4096 tokens + causal attention
    enc = (2 * 3000 * 3 * 128 * 1280 + 2 * 1500 * 3 * 1280 * 1280
           + 32 * (2 * 1500 * 4 * 1280 ** 2 + 4 * 1500 ** 2 * 1280 + 2 * 1500 * 2 * 1280 * 5120))
    assert f["whisper"] == 2 * enc
    assert f["connector"] == 2 * 2 * 300 * (5120 * 10240 + 10240 * 4096)
    # connector only (P1): forward everywhere, backward through the LLM (inputs) and the connector
    assert M.step_flops(f, {"connector"}, 3) == 3 * (f["whisper"] + 3 * f["connector"] + 2 * f["llm"])
    assert M.step_flops(f, {"whisper", "connector", "llm"}, 1) == 3 * sum(f.values())
    assert M.peak_flops("NVIDIA A100-SXM4-40GB") == 312e12 and M.peak_flops("cpu") is None
    assert M.peak_flops("NVIDIA H100 PCIe") == 756e12 and M.peak_flops("cpu", 2.0) == 2e12


def test_crc32c_and_event_records(tmp_path):
    assert M.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    w = M.TensorBoardWriter(tmp_path)
    w.scalars(7, {"train/loss": 1.5})
    w.close()
    (path,) = tmp_path.glob("events.out.tfevents.*")
    records = M.read_tfrecords(path)
    event = _event_class()  # decoded by protobuf itself, from TensorFlow's field numbers
    first, second = event.FromString(records[0]), event.FromString(records[1])
    assert first.file_version == "brain.Event:2" and len(records) == 2
    assert second.step == 7 and abs(second.wall_time - time.time()) < 60
    assert [(v.tag, v.simple_value) for v in second.summary.value] == [("train/loss", 1.5)]


def _event_class():
    """`tensorflow.Event` (event.proto / summary.proto field numbers) as a protobuf class."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="event_for_test.proto", package="tf")
    summary = proto.message_type.add(name="Summary")
    value = summary.nested_type.add(name="Value")
    value.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL)
    summary.field.add(name="value", number=1, type=F.TYPE_MESSAGE, type_name=".tf.Summary.Value",
                      label=F.LABEL_REPEATED)
    event = proto.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    event.field.add(name="step", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    event.field.add(name="file_version", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    event.field.add(name="summary", number=5, type=F.TYPE_MESSAGE, type_name=".tf.Summary",
                    label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tf.Event"))


# ------------------------------------------------------------------------------- end to end

def _env(cache: Path, fast_compile: bool = True) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    if fast_compile:  # -O0 compiles ~2x faster; every comparison is between runs with the same flags
        env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    return env


def _cmd(config: Path, workdir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from jaxmusic.train import main; sys.exit(main(sys.argv[1:]))",
            str(config), "--workdir", str(workdir), *COMMON, *overrides]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """The tiny schedule (p1 connector only, p3 everything), uninterrupted."""
    workdir = tmp_path_factory.mktemp("reference")
    r = subprocess.run(_cmd(SCHEDULE, workdir), env=_env(cache), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return workdir


def test_interrupted_runs_resume_bit_exact(reference, cache, tmp_path):
    env, workdir = _env(cache), tmp_path / "run"
    cmd = _cmd(SCHEDULE, workdir)
    p1, p3 = workdir / "p1", workdir / "p3"
    # SLURM-style preemption during p1: saves the current step and exits 75
    code, err = run_until(cmd, env, lambda: lines(p1 / "metrics.jsonl") >= 2, signal.SIGTERM)
    assert code == EXIT_PREEMPTED, err[-3000:]
    assert "preempted: saved step" in err
    # same command: p1 resumes and finishes, p3 starts; killed hard once it has a complete
    # checkpoint and has gone past it, so the steps since that checkpoint are lost
    past_a_save = lambda: saved_steps(p3) and lines(p3 / "metrics.jsonl") > saved_steps(p3)[-1]  # noqa: E731
    code, err = run_until(cmd, env, past_a_save, signal.SIGKILL)
    assert code == -signal.SIGKILL, err[-3000:]
    assert "resumed from" in err
    # same command again: finishes from p3's newest complete checkpoint
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stage p1: already done" in r.stderr and "resumed from" in r.stderr
    for stage in ("p1", "p3"):
        for item in ("params", "opt_state"):
            got, want = final_item(workdir / stage, item), final_item(reference / stage, item)
            assert got.keys() == want.keys()
            for name in want:  # bit-exact, data order included
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"{stage} {item} {name}")


def test_frozen_parts_are_untouched_and_have_no_optimizer_state(reference, cache, tmp_path):
    # the init, computed apart (same flags as the runs) from the stage's seed
    script = ("import sys, numpy as np, jax; from flax import nnx\n"
              "from jaxmusic import sharding; from jaxmusic.train import config as C\n"
              "from jaxmusic.models.mufun import PARTS\nfrom jaxmusic.train.state import ModelSpec, random_parts\n"
              "spec = ModelSpec.from_stage(C.load(sys.argv[1]).stages[0]); _, st = spec.abstract()\n"
              "p = random_parts(spec, PARTS, 0, sharding.state_shardings(st, sharding.make_mesh({})))\n"
              "np.savez(sys.argv[2], **{jax.tree_util.keystr(k): np.asarray(v)"
              " for k, v in jax.tree_util.tree_leaves_with_path(p)})\n")
    out = tmp_path / "init.npz"
    r = subprocess.run([sys.executable, "-c", script, str(TINY), str(out)], env=_env(cache),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    init = dict(np.load(out))
    final = final_item(reference / "p1", "params")
    assert final.keys() == init.keys()
    for name in init:
        if name.startswith("['connector']"):
            assert not np.array_equal(final[name], init[name]), name  # trained
        else:
            np.testing.assert_array_equal(final[name], init[name], err_msg=name)  # frozen: bit-identical
    opt_names = final_item(reference / "p1", "opt_state").keys()
    assert any("['connector']" in n for n in opt_names)
    assert not any("['whisper']" in n or "['llm']" in n for n in opt_names)
    # p3 trains everything: optimizer state for every part
    opt3 = final_item(reference / "p3", "opt_state").keys()
    assert any("['whisper']" in n for n in opt3) and any("['llm']" in n for n in opt3)
    # and the run left its logs: JSONL metrics and a TensorBoard event file per stage
    lines = [json.loads(x) for x in (reference / "p3" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 9))
    assert {"loss", "grad_norm", "lr", "tokens_per_s", "audio_s_per_s", "step_time", "mfu"} <= lines[0].keys()
    (events,) = (reference / "p3" / "tensorboard").glob("events.out.tfevents.*")
    assert len(M.read_tfrecords(events)) == 9


def test_non_finite_loss_stops_with_the_last_checkpoint_intact(cache, tmp_path):
    """lr 1e30: step 1 (warm-up, lr 0) and step 2 are finite, step 2 blows the weights up, step 3
    overflows: exit 3 with a clear message, the step-3 state is never saved."""
    stage = tmp_path / "run" / "tiny"
    r = subprocess.run(_cmd(TINY, tmp_path / "run", "trainable=[^connector/]", "optimizer.lr=1e30",
                            "checkpoint.every_steps=1"), env=_env(cache), capture_output=True, text=True, timeout=600)
    assert r.returncode == EXIT_DIVERGED, r.stderr[-3000:]
    assert "error: non-finite loss" in r.stderr and "at step 3" in r.stderr
    assert "the newest checkpoint (step 2) is intact" in r.stderr
    assert saved_steps(stage) == [1, 2] and not (stage / "DONE").exists()
    assert all(np.isfinite(v).all() for v in final_item(stage, "params").values())


def test_non_finite_steps_can_be_skipped(reference, cache, tmp_path):
    """A NaN connector makes every loss NaN; with nan_policy=skip no parameter ever changes."""
    # the p1 stage of the reference (same program, so its compiled step is reused), NaN-initialised
    r = subprocess.run(_cmd(TINY, tmp_path / "run", "trainable=[^connector/]", "model.mufun.connector_init_std=.nan",
                            "nan_policy=skip"), env=_env(cache), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning: non-finite loss nan" in r.stderr
    stage = tmp_path / "run" / "tiny"
    lines = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [x["skipped"] for x in lines] == list(range(1, 9))
    final = final_item(stage, "params")
    assert np.isnan(final["['connector']['linear1']['weight']"]).all()
    reference_init = final_item(reference / "p1", "params")  # its whisper and llm are the init too
    for name, value in final.items():
        if not name.startswith("['connector']"):
            np.testing.assert_array_equal(value, reference_init[name], err_msg=name)


def test_trains_on_manifests_through_the_data_pipeline(cache, tmp_path):
    """Real manifests, audio files and tokenizer; waveforms turned into log-mels on the device."""
    import soundfile
    import yaml

    from jaxmusic import templates
    from jaxmusic.demo.tokenizer import train_tokenizer

    (tmp_path / "audio").mkdir()
    for i in range(2):
        t = np.arange(int((1.5 + i) * 16000)) / 16000
        soundfile.write(tmp_path / "audio" / f"{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 100 * i) * t)), 16000)
    records = [{"id": f"s{i}", "audio": f"{i % 2}.wav",
                "conversations": [{"from": "human", "value": "<audio>\nWhat is the pitch?"},
                                  {"from": "gpt", "value": f"tone number {i % 2}"}]} for i in range(4)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    train_tokenizer([templates.SYSTEM, "USER: What is the pitch? ASSISTANT: tone number 0 1 2"],
                    vocab_size=300, out_dir=tmp_path / "tok")
    stage = yaml.safe_load(TINY.read_text())
    stage["model"]["whisper"].update(num_mel_bins=128, max_source_positions=1500)  # Whisper's input shape
    stage["model"]["llm"]["vocab_size"] = 320
    stage["data"] = {"source": "manifests", "template": "qwen2_instruct", "features": "waveform",
                     "mixture": [{"manifest": str(tmp_path / "train.jsonl")}], "audio_root": str(tmp_path / "audio"),
                     "tokenizer": str(tmp_path / "tok"), "seq_len": 512, "chunks_per_row": 1, "workers": 0}
    stage.update(steps=None, epochs=1, batch={"global_batch": 2})
    (tmp_path / "stage.yaml").write_text(yaml.safe_dump(stage))
    # optimised code: the 30 s log-mel and encoder would run slowly at -O0
    r = subprocess.run(_cmd(tmp_path / "stage.yaml", tmp_path / "run", "steps=null"),
                       env=_env(cache, fast_compile=False), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]  # 1 epoch of 4 records in batches of 2
    assert all(math.isfinite(x["loss"]) and x["loss_tokens"] > 0 for x in lines)
    assert lines[0]["audio_s_per_s"] > 0
    state = json.loads((tmp_path / "run" / "tiny" / "checkpoints" / "2" / "data" / "process_0-of-1.json").read_text())
    assert state["next_index"] == 4 and state["examples"] == 4  # the pipeline's state, saved with the step
    assert json.loads((tmp_path / "run" / "tiny" / "data_report.json").read_text())["examples"] >= 4


def test_stage_starts_from_a_converted_hf_checkpoint(reference, cache, tmp_path):
    """init.source=checkpoint: sizes and weights from `convert/hf_to_jax.py`'s output; the
    connector, absent there, starts random; frozen parts stay the converted weights."""
    import jax
    import torch
    import transformers as tr
    import yaml

    from jaxmusic.checkpoints import import_hf, load_params

    tiny = yaml.safe_load(TINY.read_text())["model"]
    torch.manual_seed(0)
    whisper = tr.WhisperForConditionalGeneration(tr.WhisperConfig(
        **tiny["whisper"], vocab_size=64, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32,
        max_target_positions=16, pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2))
    llm = tr.Qwen3ForCausalLM(tr.Qwen3Config(**tiny["llm"]))
    whisper.save_pretrained(tmp_path / "whisper", safe_serialization=True)
    llm.save_pretrained(tmp_path / "llm", safe_serialization=True)
    import_hf(tmp_path / "ckpt", whisper=str(tmp_path / "whisper"), llm=str(tmp_path / "llm"))

    # same sizes and trainable set as the reference's p1, so its compiled step is reused
    r = subprocess.run(_cmd(TINY, tmp_path / "run", "trainable=[^connector/]", "init.source=checkpoint",
                            f"init.path={tmp_path / 'ckpt'}", "model.whisper=null", "model.llm=null"),
                       env=_env(cache), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    resolved = yaml.safe_load((tmp_path / "run" / "tiny" / "config.yaml").read_text())
    assert resolved["model"]["llm"]["hidden_size"] == 64 and resolved["model"]["whisper"]["d_model"] == 32
    final = final_item(tmp_path / "run" / "tiny", "params")
    for part in ("whisper", "llm"):  # frozen: still exactly the converted weights
        converted = load_params(tmp_path / "ckpt", part, _abstract_part(part))
        for path, value in jax.tree_util.tree_leaves_with_path(converted):
            name = f"['{part}']" + jax.tree_util.keystr(path)
            np.testing.assert_array_equal(final[name], np.asarray(value), err_msg=name)
    assert "['connector']['linear1']['weight']" in final


def _abstract_part(part: str):
    from flax import nnx

    from jaxmusic.train.state import ModelSpec

    _, state = ModelSpec.from_stage(C.load(TINY).stages[0]).abstract()
    return nnx.to_pure_dict(state)[part]
