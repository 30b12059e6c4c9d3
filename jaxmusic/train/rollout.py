"""GRPO's rollouts on the training mesh: the jitted KV-cache sampler and the batch it trains on.

Both are pure functions jitted once over the trainer's parameters, as they lie (sharded by
the stage's mesh, read in place: no copy, no second model). A step's prompts arrive as the
data pipeline's microbatches, `[A, P, T]` (A microbatches of P prompts, `jaxmusic.data.packing`
layout) turned left-padded on the host (`left_align`), so every prompt ends at position T - 1.

`sampler` encodes each prompt's audio once and runs the prompt through the LLM once (the
prefill), then gives copies of its KV cache to the prompt's G completions and samples them
with a `lax.while_loop` of one-token decode steps, until every row has emitted a stop token
or `max_new_tokens` are out. The steps run
the model's scanned layers; on CPU, where XLA copies a layer's weights out of the stack
before every matmul, the stacks are sliced into per-layer arrays once, before the loop, and
the layers run unrolled over a per-layer cache (`jaxmusic.generate.hidden_states`). Token i
of the step uses key `fold_in(key, i)` with `key = fold_in(key(seed), step)`: a rollout is a
function of the parameters, the prompts, the seed and the step, so a resumed run samples
exactly what the uninterrupted one did. Rows are ordered (prompt, microbatch, completion), so
each data-parallel shard samples the groups of its own prompts.

`finisher` turns the rewards into group advantages and lays the rollouts out for the train
step (`jaxmusic.losses.grpo`): per microbatch, its P prompts as right-padded rows with their
chunk slots (so the update, too, encodes a prompt's audio and runs its tokens once), and the
P * G completions, a prompt's G consecutive. Sampling and training see the same sequence:
completion token i has RoPE position `len + i` and attends to the prompt's tokens and the
completion before it (`jaxmusic.losses.completion_log_probs`). The prompt pass runs with
causal attention alone (its padding comes after it and the completions skip those slots), so
no per-row mask reaches the fused attention kernels: JAX's batching rule for cuDNN attention
cannot take one under the train step's vmap over data-parallel replicas.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmusic import sharding
from jaxmusic.generate import hidden_states, pick_tokens
from jaxmusic.losses import completion_log_probs, group_advantages, log_mels
from jaxmusic.models import mufun
from jaxmusic.train import optim

PROMPT_KEYS = ("input_ids", "audio_index", "is_audio", "attention_mask", "positions")


@dataclasses.dataclass(frozen=True)
class Sampling:
    generations: int
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop_ids: tuple[int, ...]
    pad_id: int


def left_align(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A right-padded prompt microbatch (`jaxmusic.data.packing`) with every row moved to end at
    its last position; the chunk slots are left as they are. Labels and segments are dropped."""
    lengths = batch["attention_mask"].sum(axis=1)
    length = batch["input_ids"].shape[1]
    source = (np.arange(length)[None, :] - (length - lengths)[:, None]) % length
    out = {k: v for k, v in batch.items() if k not in PROMPT_KEYS + ("labels", "segment_ids")}
    for key in PROMPT_KEYS:
        out[key] = np.take_along_axis(batch[key], source, axis=1)
    return out


def _rows(x: jax.Array, generations: int) -> jax.Array:
    """`[A, P, ...]` per prompt -> `[P * A * G, ...]` per completion, ordered (prompt, microbatch, completion)."""
    x = jnp.swapaxes(x, 0, 1)
    x = jnp.broadcast_to(x[:, :, None], (*x.shape[:2], generations, *x.shape[2:]))
    return x.reshape(-1, *x.shape[3:])


def _microbatches(x: jax.Array, prompts: int, microbatches: int) -> jax.Array:
    """`[P * A * G, ...]` rows ordered (prompt, microbatch, completion) -> `[A, P * G, ...]`."""
    x = x.reshape(prompts, microbatches, -1, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape(microbatches, -1, *x.shape[3:])


def sampler(graphdef: nnx.GraphDef, settings: Sampling, mesh, *, frozen_encoder: bool):
    """`sample(params, prompts, key) -> (tokens [R, N], lengths [R], stopped [R], features)`, jitted.

    `prompts`: left-aligned `[A, P, T]` microbatches (with their chunk slots `[A, P * C, ...]`);
    R = P * A * G completions. `tokens` hold each completion up to and including its stop token,
    then `pad_id`; `lengths` count those tokens; `stopped` says which rows emitted a stop token.
    `features`: with a `frozen_encoder`, its output for the chunk slots `[A, P * C, T', F]`
    (`mufun.encoder_features`), which the update then reuses instead of encoding again; else None.
    """
    g, n = settings.generations, settings.max_new_tokens
    per_layer = all(d.platform == "cpu" for d in mesh.devices.flat)
    rows = sharding.activation_sharding(mesh)
    cache_rows = sharding.cache_sharding(mesh)
    stop = jnp.asarray(settings.stop_ids, jnp.int32)

    def pick(logits, key, i):
        return pick_tokens(logits, settings.temperature, settings.top_p, jax.random.fold_in(key, i),
                           greedy=False, top_k=settings.top_k)

    def sample(params, prompts, key):
        model = nnx.merge(graphdef, params)
        a, p, t = prompts["input_ids"].shape

        def embed(mb):  # one splice group per prompt: its audio is encoded once
            features = mufun.encoder_features(model.whisper, log_mels(mb, model.whisper.cfg.num_mel_bins), model.cfg)
            text = model.llm.embed(mb["input_ids"])
            return mufun.splice(text, model.connector(features), mb["audio_index"], mb["is_audio"], groups=p), features

        embeds, features = jax.lax.map(embed, prompts)
        embeds = jax.lax.with_sharding_constraint(_rows(embeds, 1), rows)
        valid = _rows(prompts["attention_mask"], 1)
        llm = model.llm
        constrain = lambda c: jax.lax.with_sharding_constraint(c, cache_rows if c.ndim == 4 else rows)  # noqa: E731
        layers = None
        if per_layer:  # CPU: sliced once, before the loop (module docstring)
            stacked = nnx.state(llm.layers)
            layers = [jax.tree.map(lambda w, i=i: w[i], stacked) for i in range(llm.cfg.num_hidden_layers)]
        # the prompt once, then its G completions continue from copies of its cache
        h, cache = hidden_states(llm, layers, embeds, _rows(prompts["positions"], 1), valid=valid,
                                 cache=jax.tree.map(constrain, llm.init_cache(embeds.shape[0], t + n)), cache_index=0)
        cache = jax.tree.map(constrain, llm.repeat_cache(cache, g))
        lengths = jnp.repeat(valid.sum(axis=1), g)
        first = pick(llm.logits(jnp.repeat(h[:, -1], g, axis=0)), key, 0)
        tokens = jnp.full((first.shape[0], n), settings.pad_id, jnp.int32).at[:, 0].set(first)

        def more(carry):
            i, _, done, _ = carry
            return (i + 1 < n) & ~done.all()

        def step(carry):  # feed token i, pick token i + 1
            i, tokens, done, cache = carry
            current = jax.lax.dynamic_index_in_dim(tokens, i, axis=1, keepdims=False)
            h, cache = hidden_states(llm, layers, llm.embed(current[:, None]), (lengths + i)[:, None], cache=cache,
                                     cache_index=t + i)
            new = jnp.where(done, settings.pad_id, pick(llm.logits(h[:, 0]), key, i + 1))
            tokens = jax.lax.dynamic_update_index_in_dim(tokens, new, i + 1, axis=1)
            return i + 1, tokens, done | jnp.isin(new, stop), cache

        _, tokens, _, _ = jax.lax.while_loop(more, step, (jnp.int32(0), tokens, jnp.isin(first, stop), cache))
        is_stop = jnp.isin(tokens, stop)
        stopped = is_stop.any(axis=1)
        return (tokens, jnp.where(stopped, jnp.argmax(is_stop, axis=1) + 1, n), stopped,
                features if frozen_encoder else None)

    return jax.jit(sample)


def finisher(graphdef: nnx.GraphDef, trainable: frozenset, mesh, *, generations: int, weights, aggregation: str,
             old_logp: bool, beta: float):
    """`finish(params, reference, prompts, tokens, lengths, stopped, features, rewards) -> (batch, stats)`, jitted.

    The sampler's outputs, and `rewards [R, F]`: every reward function on every completion
    (`jaxmusic.rewards.score`), summed with `weights` into the reward the advantages are made of.
    `batch`: the train step's microbatches (module docstring; with the frozen encoder's
    `features` in place of the audio when given), with `old_logp` from `params` when the batch
    serves more than one update, and `ref_logp` from the reference's trainable parameters
    (`reference`, the rest being frozen and so the same) when `beta > 0`. `stats`: replicated
    scalars over the rows that hold a prompt.
    """
    g = generations
    weights = jnp.asarray(weights, jnp.float32)

    def finish(params, reference, prompts, tokens, lengths, stopped, features, rewards):
        a, p, t = prompts["input_ids"].shape
        n = tokens.shape[1]
        per_completion = lambda x: _microbatches(x, p, a)  # noqa: E731
        has_prompt = per_completion(_rows(prompts["attention_mask"].any(-1), g))
        mask = (jnp.arange(n) < per_completion(lengths)[..., None]) & has_prompt[..., None]
        total = rewards @ weights
        # the prompts' left padding moves to their end (`jaxmusic.losses.completion_log_probs`)
        shift = t - prompts["attention_mask"].sum(-1)
        source = (jnp.arange(t) + shift[..., None]) % t  # [A, P, T]
        batch = {
            **{k: jnp.take_along_axis(prompts[k], source, axis=-1) for k in PROMPT_KEYS},
            "completion": per_completion(tokens), "completion_mask": mask,
            # every row holds its microbatch's completion-token count (bnpo's normaliser, `grpo_objective`)
            "microbatch_tokens": jnp.broadcast_to(mask.sum(axis=(1, 2))[:, None], mask.shape[:2]),
            "advantages": per_completion(group_advantages(total, g, scale=aggregation != "dr_grpo")),
            **{k: v for k, v in prompts.items() if k not in PROMPT_KEYS}}
        if features is not None:
            batch = {k: v for k, v in batch.items() if k not in ("mel", "wave")} | {"audio_features": features}

        def log_probs(state):
            model = nnx.merge(graphdef, state)
            return jax.lax.map(lambda mb: completion_log_probs(model, mb, g)[0], batch)

        if old_logp:
            batch["old_logp"] = log_probs(params)
        if beta:
            batch["ref_logp"] = log_probs(optim.merge(reference, optim.split(params, trainable)[1]))
        batch = {k: jax.lax.with_sharding_constraint(v, sharding.batch_sharding(mesh, v.ndim))
                 for k, v in batch.items()}
        return batch, _stats(rewards, total, lengths, stopped, _rows(prompts["attention_mask"].any(-1), g), g)

    return jax.jit(finish)


def _stats(rewards, total, lengths, stopped, has_prompt, g: int) -> dict:
    """Replicated metrics of a rollout batch, over the completions of real prompts."""
    w = has_prompt.astype(jnp.float32)
    count = jnp.maximum(w.sum(), 1.0)

    def mean_std(x):
        mean = (x * w).sum() / count
        return mean, jnp.sqrt(((x - mean) ** 2 * w).sum() / count)

    out = {}
    out["reward"], out["reward_std"] = mean_std(total)
    for j in range(rewards.shape[1]):
        out[f"reward_{j}"], out[f"reward_{j}_std"] = mean_std(rewards[:, j])
    groups = total.reshape(-1, g)
    group_w = w.reshape(-1, g)[:, 0]
    flat = (groups.max(axis=1) == groups.min(axis=1)).astype(jnp.float32)
    out["no_signal_groups"] = (flat * group_w).sum() / jnp.maximum(group_w.sum(), 1.0)
    length = lengths.astype(jnp.float32)
    out["completion_length"] = (length * w).sum() / count
    out["completion_length_max"] = (length * w).max()
    out["truncated"] = ((~stopped) * w).sum() / count
    out["generated_tokens"] = (length * w).sum()
    return out
