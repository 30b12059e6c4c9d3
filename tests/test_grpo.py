"""GRPO: the loss against hand computation, group advantages, rewards, the sampler, and the
stage end to end (learning, 1 vs 8 devices, SIGTERM / SIGKILL resume, bad records).

End-to-end runs are subprocesses sharing one JAX compilation cache, on a tiny MuFun whose
prompts are real manifest records (audio files, a trained tokenizer).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from flax import nnx

from jaxmusic import rewards as R
from jaxmusic.losses import LOSSES, completion_log_probs, group_advantages, grpo_objective, token_log_probs
from jaxmusic.train import optim, rollout
from training_runs import final_item, lines, run_until, saved_steps

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "stages" / "tiny.yaml"


# ------------------------------------------------------------------------------- the loss

def _batch(seed=0, rows=4, n=5):
    """Log-probs of a sampling policy and of a policy a few updates on, masks, advantages."""
    rng = np.random.default_rng(seed)
    old = rng.normal(-2.0, 0.5, (rows, n)).astype(np.float32)
    logp = (old + rng.normal(0, 0.3, (rows, n))).astype(np.float32)  # ratios 0.4-2.5: both clips active
    ref = (old + rng.normal(0, 0.2, (rows, n))).astype(np.float32)
    lengths = rng.integers(1, n + 1, rows)
    mask = np.arange(n)[None, :] < lengths[:, None]
    adv = rng.normal(0, 1, rows).astype(np.float32)
    return logp, old, ref, mask, adv


def _numpy_loss(logps, olds, refs, masks, advs, *, eps, eps_high, beta, aggregation):
    """The loss of a step of several microbatches, and its gradient per microbatch, written out."""
    totals, weights, grads = [], [], []
    for logp, old, ref, mask, adv in zip(logps, olds, refs, masks, advs):
        logp, old, ref = (x.astype(np.float64) for x in (logp, old, ref))
        m, a = mask.astype(np.float64), adv.astype(np.float64)[:, None]
        r = np.exp(logp - old)
        unclipped, clipped = r * a, np.clip(r, 1 - eps, 1 + eps_high) * a
        per_token = -np.minimum(unclipped, clipped)
        # d(-min(rA, clip(r)A))/dlogp: -rA where the min is the unclipped term or the ratio is inside the clip
        inside = (r >= 1 - eps) & (r <= 1 + eps_high)
        d_token = np.where((unclipped <= clipped) | inside, -r * a, 0.0)
        if beta:
            per_token += beta * (np.exp(ref - logp) - (ref - logp) - 1)
            d_token += beta * (1 - np.exp(ref - logp))
        tokens, lens, rows = m.sum(), m.sum(1), (m.sum(1) > 0).sum()
        if aggregation == "bnpo":
            total, weight, scale = (per_token * m).sum() / tokens, 1.0, m / tokens
        elif aggregation == "token_mean":
            total, weight, scale = (per_token * m).sum(), tokens, m
        elif aggregation == "sequence_mean":
            total, weight, scale = ((per_token * m).sum(1) / lens).sum(), rows, m / lens[:, None]
        else:
            total, weight, scale = (per_token * m).sum() / m.shape[1], rows, m / m.shape[1]
        totals.append(total), weights.append(weight), grads.append(d_token * scale)
    return sum(totals) / sum(weights), [g / sum(weights) for g in grads]


@pytest.mark.parametrize("aggregation", ["bnpo", "token_mean", "sequence_mean", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradient_match_hand_computation(aggregation, beta):
    micro = [_batch(seed) for seed in (1, 2)]  # two microbatches of a step
    settings = dict(epsilon=0.2, epsilon_high=0.28, beta=beta, aggregation=aggregation)

    def step_loss(logps):  # what the train step does: sum of totals / sum of weights
        out = [grpo_objective(lp, o, a, m, ref_logp=rf, **settings) for lp, (_, o, rf, m, a) in zip(logps, micro)]
        return sum(t for t, _, _ in out) / sum(w for _, w, _ in out)

    logps = [jnp.asarray(b[0]) for b in micro]
    loss, grads = jax.value_and_grad(step_loss)(logps)
    want, want_grads = _numpy_loss(*zip(*micro), eps=0.2, eps_high=0.28, beta=beta, aggregation=aggregation)
    np.testing.assert_allclose(float(loss), want, rtol=0, atol=1e-6)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=1e-6)
    _, _, sums = grpo_objective(logps[0], *(jnp.asarray(x) for x in (micro[0][1], micro[0][4], micro[0][3])),
                                ref_logp=jnp.asarray(micro[0][2]), **settings)
    r = np.exp(micro[0][0].astype(np.float64) - micro[0][1])
    a = micro[0][4][:, None]
    clipped = ((r < 0.8) & (a < 0)) | ((r > 1.28) & (a > 0))
    assert float(sums["clipped"]) == (clipped & micro[0][3]).sum() > 0
    assert float(sums["completion_tokens"]) == micro[0][3].sum()


@pytest.mark.parametrize("aggregation", ["bnpo", "token_mean", "sequence_mean", "dr_grpo"])
def test_replicas_rows_add_up_to_the_microbatch(aggregation):
    """The train step hands each data-parallel replica its own rows of a microbatch: the replicas'
    totals and weights must add up to the whole microbatch's, bnpo's normaliser included."""
    logp, old, ref, mask, adv = (jnp.asarray(x) for x in _batch(3, rows=6))
    settings = dict(ref_logp=ref, beta=0.04, aggregation=aggregation)
    whole = grpo_objective(logp, old, adv, mask, **settings)
    tokens = jnp.full(6, mask.sum())
    parts = [grpo_objective(logp[r], old[r], adv[r], mask[r], microbatch_tokens=tokens[r],
                            **{**settings, "ref_logp": ref[r]}) for r in (slice(0, 2), slice(2, 6))]
    for i in (0, 1):
        np.testing.assert_allclose(float(sum(p[i] for p in parts)), float(whole[i]), rtol=1e-6)


def test_group_advantages_follow_the_formula():
    rewards = np.array([1, 0, 0, 1, 1, 1, 1, 1, 0.5, 0, 0, 0], np.float32)  # groups of 4
    adv = np.asarray(group_advantages(jnp.asarray(rewards), 4))
    groups = rewards.reshape(3, 4).astype(np.float64)
    want = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(adv, want.reshape(-1), rtol=1e-6)
    assert (adv[4:8] == 0).all()  # all equal: no signal
    centred = np.asarray(group_advantages(jnp.asarray(rewards), 4, scale=False))  # Dr. GRPO
    np.testing.assert_allclose(centred, (groups - groups.mean(1, keepdims=True)).reshape(-1), rtol=1e-6)


# ------------------------------------------------------------------------------- rewards

MCQ = {"conversations": [
    {"from": "human", "value": "<audio>\nChoose the correct option for the question based on the audio. "
                               "Which genre is it? A. rock\nB. blues\nC. jazz\nD. pop"},
    {"from": "gpt", "value": "B. blues"}]}


def test_exact_once_is_mufuns_reward():
    answers = ["B. blues"] * 6
    completions = ["It is blues.", "blues", "blues, definitely blues", "Blues", "rock", "B. blues"]
    assert R.exact_once([""] * 6, completions, answers, [MCQ] * 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert R.ground_truth("B. blues") == "blues" and R.ground_truth("very fast") == "very fast"
    assert R.ground_truth("Mr. A. Smith") == "Smith"  # the text after the *last* ". "
    assert R.exact_once([""], ["fast"], ["very fast"], [{}]) == [0.0]
    assert R.exact_once([""], ["very fast"], ["fast"], [{}]) == [1.0]  # a substring counts, as in MuFun's


def test_choice_reads_the_option_as_jaxmusic_eval_does():
    completions = ["B", "The answer is (B).", "blues", "rock", "A. rock", "I cannot tell", "b"]
    want = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert R.choice([""] * 7, completions, ["B. blues"] * 7, [MCQ] * 7) == want
    assert R.choice([""] * 7, completions, ["blues"] * 7, [MCQ] * 7) == want  # the answer as option text
    listed = {"choices": ["slow", "fast", "very fast"], "conversations": []}
    assert R.choice([""] * 3, ["very fast", "fast", "C"], ["very fast"] * 3, [listed] * 3) == [1.0, 0.0, 1.0]
    assert R.choice([""], ["blues"], ["blues"], [{"conversations": []}]) == [0.0]  # no options: nothing to read


def test_format_wants_a_terminated_answer():
    completions = [R.Completion("blues", True), R.Completion("blues", False), R.Completion("  ", True)]
    assert R.terminated_answer([""] * 3, completions, ["x"] * 3, [{}] * 3) == [1.0, 0.0, 0.0]


def test_rewards_resolve_user_functions_and_weights(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def short(prompts, completions, answers, records):\n"
                                            "    return [1.0 / (1 + len(c)) for c in completions]\n"
                                            "NOT_A_FUNCTION = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rs = R.resolve([{"name": "exact_once", "weight": 1.0}, {"name": "my_rewards:short", "weight": 0.5}])
    assert [(r.name, r.weight) for r in rs] == [("exact_once", 1.0), ("my_rewards:short", 0.5)]
    scores = R.score(rs, ["p", "p"], ["blues", "no"], ["B. blues"] * 2, [MCQ] * 2)
    np.testing.assert_allclose(scores, [[1.0, 1 / 6], [0.0, 1 / 3]], rtol=1e-6)
    for bad, words in ((["nope"], "neither one of"), (["my_rewards:missing"], "cannot load my_rewards:missing"),
                       (["my_rewards:NOT_A_FUNCTION"], "is not a function"), (["no_such_module:f"], "cannot load")):
        with pytest.raises(R.ConfigError, match=words):
            R.resolve([{"name": n} for n in bad])
    with pytest.raises(R.ConfigError, match="listed twice"):
        R.resolve([{"name": "choice"}, {"name": "choice"}])


# ------------------------------------------------------------------------------- the sampler

@pytest.fixture(scope="module")
def tiny():
    """A tiny random MuFun on one device and a step's prompts: 2 microbatches of 2 prompts
    (left-aligned, of different lengths, with 1 and 2 audio chunks), in the trainer's layout."""
    from jaxmusic import sharding
    from jaxmusic.models.mufun import PARTS
    from jaxmusic.models.splice_plan import build_splice_plan, stack_chunks
    from jaxmusic.templates import TokenizedText
    from jaxmusic.train import config as C
    from jaxmusic.train.state import ModelSpec, random_parts

    spec = ModelSpec.from_stage(C.load(TINY).stages[0])
    graphdef, abstract = spec.abstract()
    mesh = sharding.make_mesh({}, jax.devices()[:1])
    params = random_parts(spec, PARTS, 0, sharding.state_shardings(abstract, mesh))
    rng = np.random.default_rng(0)
    micro = []
    for _ in range(2):
        texts = [TokenizedText((rng.integers(3, 256, 4).astype(np.int32), rng.integers(3, 256, n).astype(np.int32)),
                               (np.zeros(4, bool), np.zeros(n, bool))) for n in (3, 9)]
        plan = build_splice_plan(texts, [[1], [2]], tokens_per_chunk=spec.tokens_per_chunk, length_buckets=(32,),
                                 chunk_buckets=(2,), groups=2)
        mels = [[rng.normal(size=(c, 16, 60)).astype(np.float32)] for c in (1, 2)]
        fields = {k: getattr(plan, k) for k in ("input_ids", "audio_index", "is_audio", "attention_mask",
                                                "positions", "labels")}
        micro.append(rollout.left_align({**fields, "mel": stack_chunks(mels, plan, (16, 60)),
                                         "chunk_mask": np.array([1, 0, 1, 1], bool)}))
    prompts = {k: jnp.asarray(np.stack([m[k] for m in micro])) for k in micro[0]}
    trainable = frozenset(p for p in optim.flatten(params) if p[0] != "whisper")
    return {"graphdef": graphdef, "params": params, "mesh": mesh, "prompts": prompts, "trainable": trainable}


def _sample(tiny, *, top_k=0, stop=(), seed=0, step=0):
    settings = rollout.Sampling(generations=3, max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=top_k,
                                stop_ids=stop, pad_id=0)
    key = jax.random.fold_in(jax.random.key(seed), step)
    sample = rollout.sampler(tiny["graphdef"], settings, tiny["mesh"], frozen_encoder=True)
    return [np.asarray(x) for x in sample(tiny["params"], tiny["prompts"], key)]


def _finish(tiny, sampled, scores, *, aggregation="bnpo", features=False):
    """The train step's batch; with `features`, the frozen encoder's output in place of the audio."""
    fn = rollout.finisher(tiny["graphdef"], tiny["trainable"], tiny["mesh"], generations=3, weights=[1.0, 0.5],
                          aggregation=aggregation, old_logp=False, beta=0.0)
    tokens, lengths, stopped, feats = (jnp.asarray(x) for x in sampled)
    return fn(tiny["params"], {}, tiny["prompts"], tokens, lengths, stopped, feats if features else None,
              jnp.asarray(scores))


def test_sampler_is_deterministic_given_seed_and_step(tiny):
    a, b = _sample(tiny), _sample(tiny)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (12, 6)  # 2 prompts x 2 microbatches x 3 completions, 6 tokens
    assert a[3].shape[:2] == (2, 4)  # the encoder ran once per prompt: 2 x 2 prompts' chunk slots
    assert not np.array_equal(a[0], _sample(tiny, seed=1)[0]) and not np.array_equal(a[0], _sample(tiny, step=1)[0])
    assert len({tuple(r) for r in a[0][:3]}) > 1  # a group's completions differ


def _whole_rows(model, mb, g):
    """The model's logits over each completion row written out whole -- its prompt (padding
    masked), then the completion -- with no cache, and the positions that predict completion
    token i: an independent reading of the sequence the update scores."""
    p, t = mb["input_ids"].shape
    b, n = mb["completion"].shape
    rep = lambda x: jnp.repeat(x, g, axis=0)  # noqa: E731
    lengths = rep(mb["attention_mask"].sum(1))
    ids = jnp.concatenate([rep(mb["input_ids"]), mb["completion"]], axis=1)
    positions = jnp.concatenate([rep(mb["positions"]), lengths[:, None] + jnp.arange(n)], axis=1)
    pad = lambda x: jnp.pad(rep(x), ((0, 0), (0, n)))  # noqa: E731
    key_ok = jnp.concatenate([rep(mb["attention_mask"]), jnp.ones((b, n), bool)], axis=1)
    causal = jnp.tril(jnp.ones((t + n, t + n), bool))
    logits = model(mb["mel"], ids, pad(mb["audio_index"]), pad(mb["is_audio"]), positions,
                   mask=(key_ok[:, None, :] & causal)[:, None], groups=p)
    at = jnp.concatenate([lengths[:, None] - 1, jnp.broadcast_to(t + jnp.arange(n - 1), (b, n - 1))], axis=1)
    return logits, at


def test_sampler_and_update_see_the_same_sequence(tiny):
    """With top_k=1 every sampled token is the argmax of the model's forward pass over the whole
    rows (prompt, completion), without a cache: same positions and audio. The update's own
    log-probs (prompt once, completions over its cache) are those of the whole rows."""
    sampled = _sample(tiny, top_k=1)
    assert (sampled[1] == 6).all() and not sampled[2].any()
    tokens, lengths, stopped, _ = _sample(tiny, top_k=1, stop=(int(sampled[0][0, 0]),))
    assert lengths[0] == 1 and stopped[0] and (tokens[0, 1:] == 0).all()  # its stop token, then padding

    scores = np.tile([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], (4, 1)).astype(np.float32)
    batch, stats = _finish(tiny, sampled, scores)
    assert batch["input_ids"].shape == (2, 2, 32)  # per microbatch: 2 prompts of 32 positions, once each
    assert batch["completion"].shape == (2, 6, 6)  # ... their 3 completions each, 6 tokens
    assert batch["mel"].shape[1] == 4              # ... and the 2 prompts' chunk slots
    assert float(stats["reward"]) == pytest.approx(0.5) and float(stats["reward_1"]) == pytest.approx(1 / 3)
    assert float(stats["no_signal_groups"]) == 0 and float(stats["truncated"]) == 1
    model = nnx.merge(tiny["graphdef"], tiny["params"])
    for a in range(2):
        mb = {k: v[a] for k, v in batch.items()}
        logits, at = _whole_rows(model, mb, 3)
        picked = jnp.take_along_axis(logits, at[..., None], 1)
        np.testing.assert_array_equal(np.asarray(jnp.argmax(picked, -1)), np.asarray(mb["completion"]))
        logp = completion_log_probs(model, mb, 3)[0]
        np.testing.assert_allclose(np.asarray(logp), np.asarray(token_log_probs(picked, mb["completion"])),
                                   rtol=0, atol=1e-5)
    # the update reads the sampler's encoder output instead of encoding again: the same log-probs
    reused, _ = _finish(tiny, sampled, scores, features=True)
    assert "mel" not in reused and reused["audio_features"].shape[:2] == (2, 4)
    for a in range(2):
        logp = [completion_log_probs(model, {k: v[a] for k, v in b.items()}, 3)[0] for b in (batch, reused)]
        np.testing.assert_allclose(np.asarray(logp[1]), np.asarray(logp[0]), rtol=0, atol=1e-6)


def test_one_update_is_reinforce_with_a_group_baseline(tiny):
    """beta 0, one update per batch: the ratio is 1 and the gradient is that of
    -sum(A_i log p(o_i)) / tokens, written here from the model's logits over the whole rows."""
    sampled = _sample(tiny)
    rewards = np.random.default_rng(1).random((12, 2)).astype(np.float32)
    batch, _ = _finish(tiny, sampled, rewards, aggregation="token_mean")
    mb = {k: v[0] for k, v in batch.items()}
    train, frozen = optim.split(tiny["params"], tiny["trainable"])

    def grpo_loss(train):
        total, weight, _ = LOSSES["grpo"](nnx.merge(tiny["graphdef"], optim.merge(train, frozen)), mb,
                                          group_size=3, aggregation="token_mean")
        return total / weight

    def reinforce(train):
        logits, at = _whole_rows(nnx.merge(tiny["graphdef"], optim.merge(train, frozen)), mb, 3)
        logp = token_log_probs(jnp.take_along_axis(logits, at[..., None], 1), mb["completion"])
        return -(mb["advantages"][:, None] * logp * mb["completion_mask"]).sum() / mb["completion_mask"].sum()

    got, want = jax.grad(grpo_loss)(train), jax.grad(reinforce)(train)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7, err_msg=str(path))
    assert max(float(jnp.abs(w).max()) for w in jax.tree.leaves(want)) > 1e-3


# ------------------------------------------------------------------------------- configuration

def test_grpo_settings_are_checked(tmp_path):
    from jaxmusic.train import EXIT_USER_ERROR, main
    from jaxmusic.train import config as C

    grpo = ["loss=grpo", "grpo.generations=4"]
    for over, words in ((["grpo.aggregation=mean"], "grpo.aggregation: 'mean' is not one of"),
                        (["grpo.generations=3"], "batch.microbatch 8 must be a multiple of grpo.generations 3"),
                        (["grpo.generations=1"], "grpo.generations must be >= 2"),
                        (["grpo.iterations=3"], "checkpoint.every_steps 4 must be a multiple of grpo.iterations 3"),
                        (["grpo.temperature=0"], "need temperature > 0"),
                        (["grpo.typo=1"], r"unknown config key\(s\) \['grpo.typo'\]")):
        with pytest.raises(C.ConfigError, match=words):
            C.load(TINY, grpo + over)
    assert C.load(TINY, grpo).stages[0].records_per_step == 4  # 16 completions in groups of 4
    # the command line: one line, exit code 2 (synthetic data has no answers to reward)
    assert main([str(TINY), "--workdir", str(tmp_path / "w"), *grpo]) == EXIT_USER_ERROR


# ------------------------------------------------------------------------------- end to end

REWARDS_MODULE = '''def vowels(prompts, completions, answers, records):
    """Share of a completion's characters that are lowercase vowels: learnable from random weights."""
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Audio files, a manifest of prompts with answers (and two bad records), a tokenizer, a
    reward module and a GRPO stage on a tiny MuFun that reads Whisper's 30 s log-mel input."""
    import soundfile

    from jaxmusic import templates
    from jaxmusic.demo.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("grpo_data")
    (root / "audio").mkdir()
    for i, (seconds, hz) in enumerate(((1.5, 220), (2.5, 880))):
        t = np.arange(int(seconds * 16000)) / 16000
        soundfile.write(root / "audio" / f"{i}.wav", 0.3 * np.sin(2 * np.pi * hz * t), 16000)
    lines = [json.dumps({"id": f"s{i}", "audio": f"{i % 2}.wav", "conversations": [
        {"from": "human", "value": "<audio>\nIs the tone low or high?"},
        {"from": "gpt", "value": f"B. {('low', 'high')[i % 2]}"}]}) for i in range(32)]
    lines.insert(5, '{"id": "broken", "audio": ')  # malformed JSON
    lines.insert(9, json.dumps({"id": "gone", "audio": "missing.wav", "conversations": [
        {"from": "human", "value": "<audio>\nIs the tone low or high?"}, {"from": "gpt", "value": "B. low"}]}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "grpo_test_rewards.py").write_text(REWARDS_MODULE)
    train_tokenizer([templates.SYSTEM, "USER: Is the tone low or high? ASSISTANT: B. low high"] * 3,
                    vocab_size=300, out_dir=root / "tok", space_joins="previous")
    stage = yaml.safe_load(TINY.read_text())
    stage["model"]["whisper"].update(num_mel_bins=128, max_source_positions=1500, encoder_layers=1)
    stage["model"]["mufun"] = {"fusion_layers": [0, 1], "pool_kernel": 150, "pool_stride": 150}
    stage["model"]["llm"]["vocab_size"] = 320
    stage["data"] = {"source": "manifests", "template": "qwen2_instruct", "mixture": [{"manifest": str(root / "train.jsonl")}],
                     "audio_root": str(root / "audio"), "tokenizer": str(root / "tok"), "seq_len": 192,
                     "chunks_per_row": 1, "workers": 0}
    # a constant lr: the compiled step does not depend on the step count, so runs share it
    stage.update(name="grpo", loss="grpo", trainable=["^connector/", "^llm/"], batch={"global_batch": 16, "microbatch": 8},
                 grpo={"generations": 4, "max_new_tokens": 6, "rewards": [{"name": "grpo_test_rewards:vowels"}],
                       "samples_every": 5, "samples": 2},
                 optimizer={"lr": 1e-2, "schedule": "constant", "warmup_steps": 0, "clip_norm": 1.0},
                 checkpoint={"every_steps": 2, "keep_last": 2, "async_save": True})
    (root / "stage.yaml").write_text(yaml.safe_dump(stage))
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("grpo_jax_cache")


def _env(data: Path, cache: Path, devices: int = 1) -> dict:
    flags = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache), XLA_FLAGS=flags,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                PYTHONPATH=os.pathsep.join([str(data), os.environ.get("PYTHONPATH", "")]))


def _cmd(data: Path, workdir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from jaxmusic.train import main; sys.exit(main(sys.argv[1:]))",
            str(data / "stage.yaml"), "--workdir", str(workdir), "log.progress=false", *overrides]


def _metrics(stage_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_reward_rises_and_bad_records_are_skipped(data, cache, tmp_path):
    r = subprocess.run(_cmd(data, tmp_path, "steps=30"), env=_env(data, cache), capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    stage = tmp_path / "grpo"
    lines = _metrics(stage)
    assert [x["step"] for x in lines] == list(range(1, 31))
    early, late = (np.mean([x["reward"] for x in lines[a:b]]) for a, b in ((0, 5), (25, 30)))
    assert late > early + 0.15, [round(x["reward"], 3) for x in lines]  # reached: 0.08 -> 0.47
    keys = {"reward", "reward_std", "reward/grpo_test_rewards:vowels", "reward/grpo_test_rewards:vowels_std",
            "no_signal_groups", "completion_length", "completion_length_max", "truncated", "clip_fraction",
            "entropy", "rollout_tokens_per_s", "rollout_time", "update_time"}
    assert keys <= lines[0].keys() and "kl" not in lines[0]
    assert all(x["clip_fraction"] == 0 for x in lines)  # one update per batch: the ratio is 1
    report = json.loads((stage / "data_report.json").read_text())
    assert report["skipped"] == {"malformed_json": report["skipped"]["malformed_json"],
                                 "missing_audio": report["skipped"]["missing_audio"]}
    assert report["skipped"]["malformed_json"] >= 1 and report["skipped"]["missing_audio"] >= 1
    samples = [json.loads(x) for x in (stage / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 1, 6, 6, 11, 11, 16, 16, 21, 21, 26, 26]
    assert {"question", "answer", "completion", "terminated", "rewards"} <= samples[0].keys()
    (events,) = (stage / "tensorboard").glob("events.out.tfevents.*")
    from jaxmusic.train import metrics as M

    assert len(M.read_tfrecords(events)) == 31


def _last_per_step(stage_dir: Path) -> dict[int, dict]:
    """A stage's metrics by step; a resumed run logs again the steps it repeats: the last counts."""
    return {x["step"]: x for x in _metrics(stage_dir)}


RESUME = ["steps=8", "grpo.iterations=2", "grpo.beta=0.04", "grpo.aggregation=token_mean", "grpo.epsilon_high=0.28"]


def test_interrupted_runs_resume_bit_exact(data, cache, tmp_path):
    """Two updates per batch of rollouts (stored old log-probs), a KL term against the initial
    model: SIGTERM finishes the batch's updates, saves and exits 75; SIGKILL loses the steps
    since the last save; both resume to exactly the uninterrupted run (sampler keys and data order)."""
    env = _env(data, cache)
    r = subprocess.run(_cmd(data, tmp_path / "ref", *RESUME), env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    ref, run = tmp_path / "ref" / "grpo", tmp_path / "run" / "grpo"
    cmd = _cmd(data, tmp_path / "run", *RESUME)
    code, err = run_until(cmd, env, lambda: lines(run / "metrics.jsonl") >= 1, signal.SIGTERM)
    assert code == 75, err[-3000:]
    assert saved_steps(run) and all(step % 2 == 0 for step in saved_steps(run))  # between batches of rollouts
    assert lines(run / "metrics.jsonl") == saved_steps(run)[-1]
    past_a_save = lambda: lines(run / "metrics.jsonl") > saved_steps(run)[-1] + 1  # noqa: E731
    code, err = run_until(cmd, env, past_a_save, signal.SIGKILL)
    assert code == -signal.SIGKILL and "resumed from" in err, err[-3000:]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-3000:]
    for item in ("params", "opt_state"):
        got, want = final_item(run, item), final_item(ref, item)
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{item} {name}")
    assert not any("['whisper']" in name for name in final_item(ref, "opt_state"))  # frozen: no optimizer state
    a, b = _last_per_step(run), _last_per_step(ref)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in b:  # the same rollouts, rewards and losses at every step
        assert {k: a[step][k] for k in ("loss", "reward", "grad_norm", "kl")} == \
               {k: b[step][k] for k in ("loss", "reward", "grad_norm", "kl")}
    assert b[1]["kl"] < 1e-6 < b[8]["kl"]  # the first update starts at the reference
    assert b[2]["rollout_time"] == 0 and b[2]["reward"] == b[1]["reward"]  # one batch of rollouts, two updates


MESH = ["steps=4", "batch.global_batch=32", "batch.microbatch=16", "log.progress=false", "log.tensorboard=false"]


def test_one_device_and_eight_devices_give_the_same_run(data, cache, tmp_path):
    """1 device, and 8 (data 2 x fsdp 2 x tensor 2: two replicas, 4 data-parallel shards, one
    prompt's group each per microbatch): the same completions, rewards, losses and gradient norms."""
    r = subprocess.run([sys.executable, __file__, str(data), str(tmp_path)], env=_env(data, cache, devices=8),
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    one, eight = _metrics(tmp_path / "one"), _metrics(tmp_path / "eight")
    assert [x["step"] for x in one] == [x["step"] for x in eight] == [1, 2, 3, 4]
    for a, b in zip(one, eight):
        assert a["completion_length"] == b["completion_length"]
        assert a["reward"] == pytest.approx(b["reward"], rel=0, abs=1e-7)  # reached: 7.5e-9 (sums in another order)
        assert a["loss"] == pytest.approx(b["loss"], rel=0, abs=1e-6)      # reached: 1.9e-8
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=5e-5)   # reached: 2.2e-5 at step 4
    assert max(x["reward_std"] for x in one) > 0  # there was something to learn from
    # the same completions (samples.jsonl logs those of step 1)
    assert (tmp_path / "one" / "samples.jsonl").read_text() == (tmp_path / "eight" / "samples.jsonl").read_text()


def _mesh_worker(data: Path, workdir: Path) -> None:
    from jaxmusic.train import config as C
    from jaxmusic.train.trainer import run_stage

    assert len(jax.devices()) == 8
    one = C.load(data / "stage.yaml", MESH).stages[0]
    eight = C.load(data / "stage.yaml", MESH + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]).stages[0]
    assert run_stage(one, workdir / "one", devices=jax.devices()[:1]) == 0
    assert run_stage(eight, workdir / "eight") == 0


if __name__ == "__main__":
    _mesh_worker(Path(sys.argv[1]), Path(sys.argv[2]))
