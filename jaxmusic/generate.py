"""Autoregressive generation for `Qwen3ForCausalLM` with a KV cache.

The model is split into (graphdef, state) once, outside jit; two jitted functions merge
it back inside: `prefill` (the whole right-padded prompt batch, writes the cache, picks
the first token) and `decode` (one token per row). A Python loop drives `decode`, so
every token can be streamed to a callback as soon as it exists; the next step is
dispatched before the host waits for the current token, so the device stays busy.

Compilation: each jitted function compiles once per distinct shape. To keep that to a
handful of shapes, the prompt length is padded up to a multiple of `bucket` (default
64) and the cache to a multiple of `bucket` covering prompt + `max_new_tokens`; a new
prompt length inside the same bucket reuses the compiled code. Batch size is not
bucketed: callers that vary it should pad the batch themselves (e.g. with length-1 rows).

CPU fast path (`unrolled`, on by default where it applies): the model keeps each weight
stacked over layers (`[L, ...]`) for its scanned layer loop, but XLA:CPU copies a layer's
slice out of the stack before every matmul, which multiplies the memory traffic of a decode
step, a step bound by reading the weights. So on CPU, `layer_views` turns the stacks into
per-layer arrays that alias the same memory (no copy), both jitted functions run the
model's own layers as an unrolled loop over them with a per-layer KV cache that each
donated decode step updates in place, the logits are a matrix-vector product over the
output table, greedy picks are `first_argmax`, and both functions compile with 512-bit
vectors (`_CPU_COMPILER_OPTIONS`). The price is compilation: XLA compiles every layer
instead of one scanned body. On other backends such views would be copies, so the scan
stays there.
(`bench/RESULTS.md`, "Generation", has the measurements.)

Cache layout: row b's prompt fills slots `[0, len_b)`, slots `[len_b, T_pad)` are
invalid holes, and generated token i of every row lives in slot `T_pad + i` with RoPE
position `len_b + i`, so rows of different lengths decode in lockstep.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Completion(str):
    """Generated text, with `terminated`: whether it ended on a stop token rather than at the
    token budget (`max_new_tokens`)."""

    terminated: bool

    def __new__(cls, text: str, terminated: bool):
        obj = super().__new__(cls, text)
        obj.terminated = terminated
        return obj


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pick_tokens(logits, temperature, top_p, key, *, greedy: bool, top_k: int = 0):
    """Next token per row from `[B, V]` logits: argmax, or temperature, top-k (0: off) and nucleus
    (top-p) sampling, in transformers' order. A Python `top_p` of 1 is off: no sort, no cut."""
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if isinstance(top_p, (int, float)) and top_p >= 1:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    ranked = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ranked, axis=-1)
    # Keep the smallest top-ranked set whose mass reaches top_p (the best token always stays).
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# Per-layer views must start on PJRT:CPU's 64-byte alignment to alias; others are copied.
_ALIGN = 64
_MAX_COPIED_BYTES = 1 << 20


def layer_views(layers_state) -> list | None:
    """Per-layer param states sharing the memory of the stacked `[L, ...]` ones, or None.

    On CPU, `np.asarray` of an array and `device_put` of an aligned NumPy view back are
    both zero-copy, so layer i's arrays are views into the stacks. Slices whose size is
    not a multiple of the alignment get copied; that is tolerated for small vectors (norm
    scales), but if more than 1 MiB would be copied, or off CPU, returns None (use the scan).
    """
    leaves = jax.tree.leaves(layers_state)
    on_cpu = all(isinstance(a, jax.Array) and len(a.devices()) == 1 and a.is_fully_addressable
                 and next(iter(a.devices())).platform == "cpu" for a in leaves)
    if not leaves or not on_cpu:
        return None
    copied = sum(a.nbytes for a in leaves if (a.nbytes // a.shape[0]) % _ALIGN)
    if copied > _MAX_COPIED_BYTES:
        return None
    host = jax.tree.map(np.asarray, layers_state)  # zero-copy views of the device buffers
    return [jax.tree.map(lambda a, a_host: jax.device_put(a_host[i], next(iter(a.devices()))),
                         layers_state, host)
            for i in range(leaves[0].shape[0])]


def hidden_states(model, layer_params, embeds, positions, **kw):
    """`model.hidden`, or with per-layer params the same layers as an unrolled loop.

    In the unrolled form the cache's `k` and `v` are per-layer lists (a stacked cache is
    accepted as input), so a donated per-layer cache is updated in place, not re-stacked.
    """
    if layer_params is None:
        return model.hidden(embeds, positions, **kw)
    cache, cache_index = kw["cache"], kw["cache_index"]
    cos, sin, allowed, slot_valid = model.layer_inputs(positions, **kw)
    graphdef = nnx.graphdef(model.layers)
    x, ks, vs = embeds.astype(model.opts.dtype), [], []
    for i, params in enumerate(layer_params):
        x, (k, v) = nnx.merge(graphdef, params)(x, cos, sin, allowed, (cache["k"][i], cache["v"][i]), cache_index)
        ks.append(k)
        vs.append(v)
    return model.norm(x), {"k": ks, "v": vs, "valid": slot_valid}


def first_argmax(logits):
    """`jnp.argmax(logits, axis=-1)`, ties and NaN alike, as two vectorised reductions: the
    maximum, then the first index that holds it (or a NaN, which argmax ranks first).

    XLA:CPU runs `argmax` (a reduction over value-index pairs) as a scalar loop.
    """
    vocab = logits.shape[-1]
    hit = (logits == logits.max(axis=-1, keepdims=True)) | jnp.isnan(logits)
    return jnp.where(hit, jnp.arange(vocab, dtype=jnp.int32), vocab).min(axis=-1)


def _next_tokens(model, h, unrolled: bool, temperature, top_p, key, *, greedy: bool):
    """The next token of each row from its final hidden state `h [B, D]` (`pick_tokens` rules).

    Unrolled (CPU): the logits are `table @ h.T`, XLA:CPU's matrix-vector kernel (`h @ table.T`
    became a loop fusion that streams the table slower), and greedy is `first_argmax`.
    """
    if not unrolled:
        return pick_tokens(model.logits(h), temperature, top_p, key, greedy=greedy)
    table = model.output_table().astype(model.opts.dtype)
    logits = jnp.dot(table, h.astype(model.opts.dtype).T).T.astype(jnp.float32)
    return first_argmax(logits) if greedy else pick_tokens(logits, temperature, top_p, key, greedy=False)


def _merge(graphdef, treedef, leaves):
    """The model and its per-layer params (or None) from the flat leaves `generate` passes."""
    state, layer_params = jax.tree.unflatten(treedef, leaves)
    return nnx.merge(graphdef, state), layer_params


def _prefill(graphdef, treedef, leaves, embeds, lengths, temperature, top_p, key, *, cache_len, greedy):
    model, layer_params = _merge(graphdef, treedef, leaves)
    b, t, _ = embeds.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = model.init_cache(b, cache_len)
    h, cache = hidden_states(model, layer_params, embeds, positions, valid=positions < lengths[:, None],
                             cache=cache, cache_index=0)
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
    return _next_tokens(model, last, layer_params is not None, temperature, top_p, jax.random.fold_in(key, 0),
                        greedy=greedy), cache


def _decode(graphdef, treedef, leaves, cache, tokens, lengths, prompt_slots, step, temperature, top_p, key, *,
            greedy):
    """Feed generated token `step` (0-based) of every row; pick token `step + 1`."""
    model, layer_params = _merge(graphdef, treedef, leaves)
    h, cache = hidden_states(model, layer_params, model.embed(tokens[:, None]), (lengths + step)[:, None],
                             cache=cache, cache_index=prompt_slots + step)
    return _next_tokens(model, h[:, 0], layer_params is not None, temperature, top_p,
                        jax.random.fold_in(key, step + 1), greedy=greedy), cache


# XLA:CPU options for the fast path's compiled steps: 512-bit vectors, so the matrix-vector
# kernel loads a whole cache line of a weight row at a time (LLVM splits the vectors where
# the CPU has no AVX-512).
_CPU_COMPILER_OPTIONS = {"xla_cpu_prefer_vector_width": 512}


def _jit_both(fn, **kw):
    """`fn` jitted for the scanned path (False) and for the CPU fast path (True)."""
    return {False: jax.jit(fn, **kw), True: jax.jit(fn, compiler_options=_CPU_COMPILER_OPTIONS, **kw)}


_prefill_jit = _jit_both(_prefill, static_argnames=("treedef", "cache_len", "greedy"))
_decode_jit = _jit_both(_decode, static_argnames=("treedef", "greedy"), donate_argnames=("cache",))


def generate(model, inputs_embeds, prompt_lengths, *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, stop_ids=(), bucket: int = 64, unrolled: bool = True,
             on_token: Callable[[int, np.ndarray], None] | None = None) -> list[list[int]]:
    """Generate up to `max_new_tokens` per row of a right-padded prompt batch.

    model: a `Qwen3ForCausalLM`, or its `(graphdef, state)` from `nnx.split` (split once
      and reuse it when calling many times).
    inputs_embeds: `[B, T, D]` prompt embeddings, row b valid in `[0, prompt_lengths[b])`.
    temperature: 0 means greedy (argmax); otherwise sample from softmax(logits / temperature)
      restricted to the top-p nucleus, with `jax.random.key(seed)`.
    stop_ids: a row stops after emitting any of these (e.g. `<|im_end|>` and EOS); the stop
      token is included in its output, as transformers does.
    unrolled: the CPU fast path (module docstring) where it applies; False always scans.
    on_token(step, ids): called once per step with an int array `[B]` of the new tokens,
      -1 for rows that had already stopped.
    Returns the generated ids of each row.
    """
    graphdef, state = model if isinstance(model, tuple) else nnx.split(model)
    lengths = np.asarray(prompt_lengths, dtype=np.int32)
    if inputs_embeds.ndim != 3:
        raise ValueError(f"inputs_embeds must be [B, T, D], got shape {inputs_embeds.shape}")
    b, t, _ = inputs_embeds.shape
    if lengths.shape != (b,) or lengths.min() < 1 or lengths.max() > t:
        raise ValueError(f"prompt_lengths must be {b} values in [1, {t}], got {lengths.tolist()}")
    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1; got "
                         f"{max_new_tokens}, {temperature}, {top_p}")

    t_pad = round_up(int(lengths.max()), bucket)
    embeds = inputs_embeds[:, :t_pad]
    if embeds.shape[1] < t_pad:
        embeds = jnp.pad(embeds, ((0, 0), (0, t_pad - embeds.shape[1]), (0, 0)))
    sampling = dict(temperature=jnp.float32(max(temperature, 1e-6)), top_p=jnp.float32(top_p),
                    key=jax.random.key(seed))
    greedy = temperature == 0

    # Flattened once here, so a step's dispatch takes a plain list of arrays instead of
    # walking hundreds of nnx Variables in Python (on 2 cores that steals from XLA).
    views = layer_views(state["layers"]) if unrolled else None
    leaves, treedef = jax.tree.flatten((state, views))
    lengths_dev = jnp.asarray(lengths)
    fast = views is not None
    tokens, cache = _prefill_jit[fast](graphdef, treedef, leaves, embeds, lengths_dev, **sampling,
                                       cache_len=round_up(t_pad + max_new_tokens, bucket), greedy=greedy)
    outputs: list[list[int]] = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    stop = np.asarray(list(stop_ids), dtype=np.int64)
    for step in range(max_new_tokens):
        if step + 1 < max_new_tokens:  # dispatch the next step before blocking on this one
            upcoming = _decode_jit[fast](graphdef, treedef, leaves, cache, tokens, lengths_dev, np.int32(t_pad),
                                         np.int32(step), **sampling, greedy=greedy)
        ids = np.asarray(tokens)
        for row in np.flatnonzero(~done):
            outputs[row].append(int(ids[row]))
        if on_token is not None:
            on_token(step, np.where(done, -1, ids))
        done |= np.isin(ids, stop)
        if done.all() or step + 1 == max_new_tokens:
            break
        tokens, cache = upcoming
    return outputs
