"""The Qwen decoder family (Qwen3, MuFun's LLM; Qwen2, Qwen2-Audio's) in Flax NNX, with a KV cache.

Architecture (transformers' `Qwen3ForCausalLM`): token embedding; N pre-norm decoder
layers, each RMSNorm -> grouped-query self-attention (q/k/v/o projections without
biases, per-head RMSNorm on q and k *before* RoPE, rotate-half RoPE) -> residual,
RMSNorm -> SwiGLU MLP (`down(silu(gate(x)) * up(x))`) -> residual; final RMSNorm;
`lm_head` (or the embedding matrix transposed when `tie_word_embeddings`).

Qwen2 (`Qwen2ForCausalLM`) is the same network with two switches of `Qwen3Config`:
`attention_bias` (biases on the q, k and v projections, none on o) on and `qk_norm` (the
per-head q/k RMSNorm) off. `Qwen3Config.from_hf` sets them from a config's `model_type`.

Logical axis names in the params' `axes` metadata (one layer's shape for stacked params):

    vocab     vocabulary                       embed_tokens, lm_head.weight
    embed     model width (hidden_size)        every projection's input or output side
    heads     fused query heads x head_dim     q_proj out, o_proj in (head-major, so
              (N*H); splitting it evenly       sharding it N ways never cuts a head)
    kv_heads  fused KV heads x head_dim (K*H)  k_proj / v_proj out
    head_dim  one head's width                 q_norm / k_norm scale
    mlp       SwiGLU width                     gate_proj / up_proj out, down_proj in

The API is split so callers materialise only what they need: `embed(ids)` (the MuFun
splice builds `inputs_embeds` from it), `hidden(...)` (final-normed hidden states, plus
the updated cache) and `logits(h)`; `__call__` is `logits(hidden(...))`.

Attention rule (what a query may see):

* No cache: query t sees key s iff s <= t, AND `mask[b, :, t, s]` if a boolean `mask`
  (broadcastable to `[B, N, T, T]`, e.g. `[B, 1, T, T]` for packed segments) is given,
  AND `valid[b, s]` if `valid` (`[B, T]`, False on padding) is given.
* With a cache (`init_cache`): this call's T tokens are written to slots
  `[cache_index, cache_index + T)`, and their `valid` flags (default all True) into the
  cache's per-slot validity. Query t (living in slot `cache_index + t`) sees slot s iff
  `cache["valid"][b, s]` and `s <= cache_index + t` (and `mask[b, :, t, s]` if given,
  broadcastable to `[B, N, T, S]`). Slots are storage, not positions: RoPE uses
  `positions` only, so a right-padded batch can leave invalid holes after its shorter
  prompts and still decode every row in the same slot.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmusic.models.hf_mapping import HFTensor
from jaxmusic.nn import Linear, ModelOptions, RMSNorm, attention, scan_layers, stack_layers


FAMILIES = ("qwen3", "qwen2")


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    attention_bias: bool = False  # biases on q/k/v (Qwen2); o_proj never has one
    qk_norm: bool = True          # per-head RMSNorm on q and k before RoPE (Qwen3)
    model_type: str = "qwen3"     # the HF family these settings come from: "qwen3" | "qwen2"

    @property
    def n_layers(self) -> int:
        return self.num_hidden_layers

    @classmethod
    def from_hf(cls, d: dict) -> "Qwen3Config":
        """Read a transformers Qwen3 or Qwen2 `config.json` dict (v5 `rope_parameters` or legacy
        `rope_theta`); `model_type` (default "qwen3") picks the family."""
        model_type = d.get("model_type") or "qwen3"
        if model_type not in FAMILIES:
            raise ValueError(f"LLM config: model_type {model_type!r} is not supported (one of {FAMILIES})")
        # Qwen3's `attention_bias` would also put a bias on o_proj, which no released Qwen3 has.
        unsupported = {"use_sliding_window": d.get("use_sliding_window", False)}
        if model_type == "qwen3":
            unsupported["attention_bias"] = d.get("attention_bias", False)
        for name, value in unsupported.items():
            if value:
                raise ValueError(f"{model_type} config: {name}={value!r} is not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{model_type} config: hidden_act={d['hidden_act']!r} is not supported (only 'silu')")

        rope = d.get("rope_parameters") or d.get("rope_scaling")
        rope_type = (rope or {}).get("rope_type", (rope or {}).get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"Qwen3 config: RoPE type {rope_type!r} is not supported (only 'default')")
        # transformers' legacy Qwen3Config default theta is 10000 when the key is absent.
        theta = (rope or {}).get("rope_theta", d.get("rope_theta", 10000.0))

        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            attention_bias=model_type == "qwen2",  # Qwen2 always has q/k/v biases
            qk_norm=model_type == "qwen3",
            model_type=model_type,
        )


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """`1 / theta ** (arange(0, H, 2) / H)` in float32, transformers' formula.

    Computed on the host so every backend gets the same constant. NumPy's float32 pow is
    correctly rounded; torch's vectorised one is not, so at most an element or two can
    differ from transformers' by 1 ulp (relative 6e-8).
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return np.float32(1.0) / (np.float32(theta) ** exponent)


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):
    """cos/sin tables `[B, T, H]` for integer `positions [B, T]`: float32, then cast."""
    freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on `[B, T, heads, H]` with `[B, T, H]` tables."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def write_slots(cache, new, index, *, axis: int):
    """Write `new [B, T, K, H]` into a layer's cache at slots `[index, index + T)`.

    Values are `[B*K, S, H]` (slots on axis 1), keys `[B*K, H, S]` (slots on axis 2).
    """
    b, t, k, h = new.shape
    rows = new.swapaxes(1, 2).reshape(b * k, t, h).astype(cache.dtype)
    return jax.lax.dynamic_update_slice_in_dim(cache, rows if axis == 1 else rows.swapaxes(1, 2), index, axis)


def cached_attention(q, cache_k, cache_v, allowed):
    """Attention of `q [B, T, N, H]` over a layer's cache (keys `[B*K, H, S]`, values `[B*K, S, H]`).

    `allowed` broadcasts to `[B, N, T, S]`. The math of `jax.nn.dot_product_attention`'s XLA
    path (float32 scores and softmax, probabilities in the cache dtype, query head
    `k * G + g` on KV head k), as two batched matmuls over the B*K cache rows that read the
    cache where it lies: the G*T queries of a row against its `[H, S]` keys, then its `[S, H]`
    values.
    """
    b, t, n, h = q.shape
    rows, _, s = cache_k.shape
    k = rows // b
    g = n // k
    f32 = jnp.float32
    q = q.reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4).reshape(rows, g * t, h)
    scores = jnp.einsum("rqh,rhs->rqs", q, cache_k.astype(q.dtype), preferred_element_type=f32)
    scores = scores * jnp.array(1 / np.sqrt(h), f32)
    allowed = jnp.broadcast_to(allowed, (b, n, t, s)).reshape(rows, g * t, s)
    scores = jnp.where(allowed, scores, -0.7 * jnp.finfo(f32).max)
    probs = jax.nn.softmax(scores, axis=-1).astype(cache_v.dtype)
    out = jnp.einsum("rqs,rsh->rqh", probs, cache_v).astype(q.dtype)
    return out.reshape(b, k, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scores(spec: str, q, k):
    """`einsum(spec, q, k)` with float32 output, whose backward matmuls run in the inputs' dtype:
    autodiff would multiply the float32 score gradient with the bfloat16 operand as float32
    matmuls. Rounding the score gradient to the inputs' dtype first is what fused attention
    kernels do."""
    return jnp.einsum(spec, q, k, preferred_element_type=jnp.float32)


def _scores_forward(spec, q, k):
    return _scores(spec, q, k), (q, k)


def _scores_backward(spec, inputs, grad):
    _, vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), *inputs)
    return vjp(grad.astype(inputs[0].dtype))


_scores.defvjp(_scores_forward, _scores_backward)


# Queries per block of `prefix_attention`: its float32 scores span the whole prompt, so a block's
# scores, recomputed in the backward pass, are what it holds at once.
PREFIX_QUERY_BLOCK = 64


def prefix_attention(q, key, value, prefix_k, prefix_v, prefix_valid):
    """Attention of rows that continue a shared prompt, over the prompt's cache and themselves.

    `q [B, T, N, H]`, `key`/`value [B, T, K, H]`: B = P * G rows, the G continuations of each of
    P prompts consecutive. `prefix_k [P*K, H, S]`, `prefix_v [P*K, S, H]`: one layer of the
    prompts' cache (`init_cache`'s layout), `prefix_valid [P, S]` its real slots. Query t of a
    row sees its prompt's valid slots and keys 0..t of its own row; the prompt's keys are read
    once per prompt, not copied per row. The math of `cached_attention`, in blocks of
    `PREFIX_QUERY_BLOCK` queries, each rematerialised in the backward pass.
    """
    b, t, n, h = q.shape
    k = key.shape[2]
    p, s = prefix_valid.shape
    g, heads = b // p, n // k
    f32 = jnp.float32
    scale, never = jnp.array(1 / np.sqrt(h), f32), -0.7 * jnp.finfo(f32).max
    prefix_k = prefix_k.reshape(p, k, h, s).astype(q.dtype)
    prefix_v = prefix_v.reshape(p, k, s, h)
    own_k = key.reshape(p, g, t, k, h).astype(q.dtype)
    own_v = value.reshape(p, g, t, k, h).astype(prefix_v.dtype)

    def block(q_block, first):  # queries first, first + 1, ... of every row
        c = q_block.shape[2]
        on_prefix = _scores("pgtkqh,pkhs->pgkqts", q_block, prefix_k) * scale
        on_prefix = jnp.where(prefix_valid[:, None, None, None, None, :], on_prefix, never)
        on_self = _scores("pgtkqh,pgukh->pgkqtu", q_block, own_k) * scale
        on_self = jnp.where((first + jnp.arange(c))[:, None] >= jnp.arange(t), on_self, never)
        probs = jax.nn.softmax(jnp.concatenate([on_prefix, on_self], axis=-1), axis=-1).astype(prefix_v.dtype)
        return (jnp.einsum("pgkqts,pksh->pgtkqh", probs[..., :s], prefix_v)
                + jnp.einsum("pgkqtu,pgukh->pgtkqh", probs[..., s:], own_v))

    q = q.reshape(p, g, t, k, heads, h)
    size = PREFIX_QUERY_BLOCK
    if t <= size or t % size:
        out = block(q, 0)
    else:
        blocks = q.reshape(p, g, t // size, size, k, heads, h).swapaxes(0, 2).swapaxes(1, 2)  # [T/c, p, g, c, ...]
        out = jax.lax.map(lambda a: jax.checkpoint(block)(*a), (blocks, size * jnp.arange(t // size)))
        out = out.swapaxes(1, 2).swapaxes(0, 2).reshape(p, g, t, k, heads, h)
    return out.astype(q.dtype).reshape(b, t, n, h)


class Qwen3Attention(nnx.Module):
    def __init__(self, cfg: Qwen3Config, opts: ModelOptions, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        if n % k:
            raise ValueError(f"num_attention_heads={n} is not a multiple of num_key_value_heads={k}")
        lin = dict(opts=opts, rngs=rngs)
        qkv_bias = cfg.attention_bias
        self.q_proj = Linear(d, n * h, axes=("heads", "embed"), use_bias=qkv_bias, **lin)
        self.k_proj = Linear(d, k * h, axes=("kv_heads", "embed"), use_bias=qkv_bias, **lin)
        self.v_proj = Linear(d, k * h, axes=("kv_heads", "embed"), use_bias=qkv_bias, **lin)
        self.o_proj = Linear(n * h, d, axes=("embed", "heads"), use_bias=False, **lin)
        norm = lambda: RMSNorm(h, eps=cfg.rms_norm_eps, opts=opts, axis_name="head_dim")  # noqa: E731
        self.q_norm = norm() if cfg.qk_norm else None
        self.k_norm = norm() if cfg.qk_norm else None
        self.shape = (n, k, h)
        self.opts = opts

    def __call__(self, x, cos, sin, allowed, kv, cache_index, *, shared_prefix: bool = False):
        """`kv` is this layer's `(k, v)` cache (layouts: `init_cache`) or None; returns (out, new kv).
        With `shared_prefix`, `kv` is a prompt cache the rows continue and `allowed` its valid
        slots (`prefix_attention`); the cache is not written (new kv None)."""
        b, t, _ = x.shape
        n, k, h = self.shape
        q = self.q_proj(x).reshape(b, t, n, h)
        key = self.k_proj(x).reshape(b, t, k, h)
        if self.q_norm is not None:
            q, key = self.q_norm(q), self.k_norm(key)
        q, key = apply_rope(q, cos, sin), apply_rope(key, cos, sin)
        value = self.v_proj(x).reshape(b, t, k, h)
        if shared_prefix:
            return self.o_proj(prefix_attention(q, key, value, *kv, allowed).reshape(b, t, n * h)), None
        if kv is not None:
            kv = (write_slots(kv[0], key, cache_index, axis=2), write_slots(kv[1], value, cache_index, axis=1))
        if kv is None or (isinstance(cache_index, int) and cache_index == 0):
            # Written from slot 0, the queries sit in slots [0, T) and see no later slot:
            # the T new keys are all they can attend to.
            mask = allowed if kv is None or allowed is None else allowed[..., :t]
            out = attention(q, key, value, opts=self.opts, mask=mask, is_causal=True)
        else:
            out = cached_attention(q, kv[0], kv[1], allowed)
        return self.o_proj(out.reshape(b, t, n * h)), kv


class Qwen3MLP(nnx.Module):
    def __init__(self, cfg: Qwen3Config, opts: ModelOptions, rngs: nnx.Rngs):
        d, m = cfg.hidden_size, cfg.intermediate_size
        lin = dict(use_bias=False, opts=opts, rngs=rngs)
        self.gate_proj = Linear(d, m, axes=("mlp", "embed"), **lin)
        self.up_proj = Linear(d, m, axes=("mlp", "embed"), **lin)
        self.down_proj = Linear(m, d, axes=("embed", "mlp"), **lin)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen3Config, opts: ModelOptions, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, opts=opts)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = Qwen3Attention(cfg, opts, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = Qwen3MLP(cfg, opts, rngs)

    def __call__(self, x, cos, sin, allowed, kv, cache_index, *, shared_prefix: bool = False):
        with jax.named_scope("attention"):
            attn_out, kv = self.self_attn(self.input_layernorm(x), cos, sin, allowed, kv, cache_index,
                                          shared_prefix=shared_prefix)
            x = x + attn_out
        with jax.named_scope("mlp"):
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


class Qwen3ForCausalLM(nnx.Module):
    """Qwen3 LM. See the module docstring for the attention rule and axis names."""

    def __init__(self, cfg: Qwen3Config, opts: ModelOptions, rngs: nnx.Rngs):
        self.cfg = cfg
        self.opts = opts
        std = 0.02  # transformers' initializer_range; real runs load weights anyway
        table = std * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), jnp.float32)
        self.embed_tokens = nnx.Param(table.astype(opts.param_dtype), axes=("vocab", "embed"))
        self.layers = stack_layers(cfg.num_hidden_layers, lambda r: Qwen3DecoderLayer(cfg, opts, r), rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, opts=opts)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Linear(cfg.hidden_size, cfg.vocab_size, axes=("vocab", "embed"),
                               use_bias=False, opts=opts, rngs=rngs))

    def embed(self, input_ids):
        """Token ids `[B, T]` -> embeddings `[B, T, D]` in the compute dtype."""
        with jax.named_scope("embed"):
            return jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.opts.dtype)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
        """Empty KV cache: `k` `[L, B*K, H, S]`, `v` `[L, B*K, S, H]`, per-slot `valid` `[B, S]` (all False).

        Row `b*K + k` of a layer holds batch row b's KV head k over the S slots, keys
        slot-minor and values slot-major, so that attending over the cache is two plain
        batched matmuls over the rows that read it where it lies (`cached_attention`), and
        writing a step's keys and values updates it in place.
        """
        c = self.cfg
        rows, dtype = batch * c.num_key_value_heads, dtype or self.opts.dtype
        return {"k": jnp.zeros((c.num_hidden_layers, rows, c.head_dim, max_len), dtype),
                "v": jnp.zeros((c.num_hidden_layers, rows, max_len, c.head_dim), dtype),
                "valid": jnp.zeros((batch, max_len), bool)}

    def repeat_cache(self, cache: dict, times: int) -> dict:
        """`cache` (`init_cache`'s layout, or per-layer lists of its `k` and `v`) with every batch
        row repeated `times` times in place: row b becomes rows `b * times ... b * times + times - 1`."""
        def repeat(x, axis, heads):
            shape = x.shape
            x = x.reshape(*shape[:axis], shape[axis] // heads, heads, *shape[axis + 1:])
            return jnp.repeat(x, times, axis=axis).reshape(*shape[:axis], -1, *shape[axis + 1:])

        kv = lambda x: repeat(x, x.ndim - 3, self.cfg.num_key_value_heads)  # noqa: E731  rows*K: third from last
        return {"k": jax.tree.map(kv, cache["k"]), "v": jax.tree.map(kv, cache["v"]),
                "valid": repeat(cache["valid"], 0, 1)}

    def layer_inputs(self, positions, *, mask=None, valid=None, cache=None, cache_index=None):
        """What every layer of one call shares: `(cos, sin, allowed, slot_valid)`.

        `allowed` is the attention rule of the module docstring as a boolean mask; `slot_valid`
        the cache's per-slot validity after this call (None without a cache).
        """
        b, t = positions.shape
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, self.opts.dtype)
        if cache is None:
            allowed = mask
            if valid is not None:
                key_ok = valid[:, None, None, :]
                allowed = key_ok if allowed is None else allowed & key_ok
            return cos, sin, allowed, None
        if cache_index is None:
            raise ValueError("cache_index is required with a cache")
        step_valid = jnp.ones((b, t), bool) if valid is None else valid.astype(bool)
        slot_valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], step_valid, cache_index, 1)
        slots = jnp.arange(slot_valid.shape[1])
        query_slots = cache_index + jnp.arange(t)
        allowed = slot_valid[:, None, None, :] & (slots[None, :] <= query_slots[:, None])[None, None]
        if mask is not None:
            allowed = allowed & mask
        return cos, sin, allowed, slot_valid

    def hidden(self, inputs_embeds, positions, *, mask=None, valid=None, cache=None, cache_index=None):
        """Final-normed hidden states `[B, T, D]` and the updated cache (None without one).

        `positions [B, T]` int feed RoPE; `mask`, `valid`, `cache`, `cache_index`: see the
        module docstring.
        """
        cos, sin, allowed, slot_valid = self.layer_inputs(positions, mask=mask, valid=valid, cache=cache,
                                                          cache_index=cache_index)

        def body(layer, x, kv):
            with jax.named_scope("decoder_layer"):
                return layer(x, cos, sin, allowed, kv, cache_index)

        kv = None if cache is None else (cache["k"], cache["v"])
        x, new_kv = scan_layers(self.layers, body, inputs_embeds.astype(self.opts.dtype), kv, opts=self.opts)
        new_cache = None if cache is None else {"k": new_kv[0], "v": new_kv[1], "valid": slot_valid}
        with jax.named_scope("final_norm"):
            return self.norm(x), new_cache

    def hidden_shared_prompts(self, prompt_embeds, prompt_positions, prompt_valid, inputs_embeds, positions):
        """Final-normed hidden states of P prompts `[P, S, D]` and of their continuations `[P * G, T, D]`.

        `prompt_valid [P, S]` marks each prompt's tokens, which must precede its padding (causal
        attention alone then keeps the padding out of their view); `inputs_embeds` holds the G
        continuations of each prompt, consecutive, at RoPE `positions [P * G, T]`. One pass over
        the layers: each runs the prompts, then the continuations, which attend to that layer's
        prompt keys in place (`prefix_attention`): a prompt is computed once, not once per
        continuation, and every weight's gradient comes out of one scan.
        """
        p, s = prompt_valid.shape
        k, h = self.cfg.num_key_value_heads, self.cfg.head_dim
        dtype = self.opts.dtype
        rope = lambda pos: rope_cos_sin(pos, h, self.cfg.rope_theta, dtype)  # noqa: E731
        (cos_p, sin_p), (cos, sin) = rope(prompt_positions), rope(positions)

        def body(layer, carry, _):
            x_p, x = carry
            with jax.named_scope("decoder_layer"):
                empty = (jnp.zeros((p * k, h, s), dtype), jnp.zeros((p * k, s, h), dtype))
                x_p, kv = layer(x_p, cos_p, sin_p, None, empty, 0)
                x, _ = layer(x, cos, sin, prompt_valid, kv, None, shared_prefix=True)
            return (x_p, x), None

        (x_p, x), _ = scan_layers(self.layers, body, (prompt_embeds.astype(dtype), inputs_embeds.astype(dtype)),
                                  opts=self.opts)
        with jax.named_scope("final_norm"):
            return self.norm(x_p), self.norm(x)

    def output_table(self):
        """The `[V, D]` matrix logits are computed with: `lm_head.weight`, or the tied embeddings."""
        return (self.embed_tokens if self.lm_head is None else self.lm_head.weight)[...]

    def logits(self, h):
        """Hidden states `[..., D]` -> logits `[..., V]` in the compute dtype."""
        with jax.named_scope("lm_head"):
            dtype = self.opts.dtype
            return jnp.dot(h.astype(dtype), self.output_table().astype(dtype).T)

    def __call__(self, inputs_embeds, positions, *, mask=None, valid=None, cache=None, cache_index=None):
        """`(logits [B, T, V], cache)`; see `hidden` for the arguments."""
        h, cache = self.hidden(inputs_embeds, positions, mask=mask, valid=valid,
                               cache=cache, cache_index=cache_index)
        return self.logits(h), cache


def hf_tensors(cfg: Qwen3Config) -> list[HFTensor]:
    """Our params <-> transformers `Qwen3ForCausalLM` / `Qwen2ForCausalLM` keys (MuFun and
    Qwen2-Audio prefix them with `language_model.`)."""
    layer = "model.layers.{i}."
    specs = [HFTensor(("embed_tokens",), "model.embed_tokens.weight")]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        specs.append(HFTensor(("layers", "self_attn", name, "weight"), f"{layer}self_attn.{name}.weight",
                              stacked=True))
        if cfg.attention_bias and name != "o_proj":
            specs.append(HFTensor(("layers", "self_attn", name, "bias"), f"{layer}self_attn.{name}.bias",
                                  stacked=True))
    for name in ("q_norm", "k_norm") if cfg.qk_norm else ():
        specs.append(HFTensor(("layers", "self_attn", name, "scale"), f"{layer}self_attn.{name}.weight",
                              stacked=True))
    for name in ("gate_proj", "up_proj", "down_proj"):
        specs.append(HFTensor(("layers", "mlp", name, "weight"), f"{layer}mlp.{name}.weight", stacked=True))
    for name in ("input_layernorm", "post_attention_layernorm"):
        specs.append(HFTensor(("layers", name, "scale"), f"{layer}{name}.weight", stacked=True))
    specs.append(HFTensor(("norm", "scale"), "model.norm.weight"))
    if not cfg.tie_word_embeddings:
        specs.append(HFTensor(("lm_head", "weight"), "lm_head.weight"))
    return specs
