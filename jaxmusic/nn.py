"""Building blocks shared by the Whisper encoder and Qwen3.

Conventions every model in `jaxmusic.models` follows:

* Parameters are `nnx.Param`s carrying an `axes` metadata tuple of *logical*
  axis names (e.g. `("embed", "mlp")`). The sharding table in the trainer is the
  only place that turns logical names into mesh axes. We deliberately do not use
  Flax's `sharding` metadata: it shards eagerly at construction time, while we
  decide placement once, outside the model.
* Weights are stored in PyTorch's layout (Linear `[out, in]`), so every HF tensor
  loads as it is. On XLA:CPU a one-token (matrix-vector) step also streams a weight
  fastest this way, every output a dot product over a contiguous row
  (`bench/RESULTS.md`, "Generation"); on GPUs either layout is one cuBLAS call.
* Layers are built with `nnx.vmap` into one module whose arrays carry a leading
  layer axis, and run with `scan_layers`. The logical `axes` of a stacked param
  describe one layer; the layer axis is implied by the param living under a
  `layers` attribute.
* `ModelOptions` holds what is not architecture: parameter dtype, compute dtype,
  rematerialisation policy, attention implementation, and the sharding the layer scan
  pins its carry to.
* Blocks run under `jax.named_scope`s (`embed`, `attention`, `mlp`, `encoder_layer`,
  `decoder_layer`, `connector`, `loss`, ...), so profiles and HLO dumps say where time goes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

REMAT_POLICIES: dict[str, Any] = {
    # No rematerialisation: fastest, most memory.
    "none": None,
    # Recompute everything in the backward pass: least memory.
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep matmul outputs, recompute elementwise work: the usual LLM trade-off.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """Numerics of a model instance (not part of the checkpointed architecture)."""

    param_dtype: Any = jnp.float32
    dtype: Any = jnp.float32  # compute dtype
    remat: str = "none"  # key of REMAT_POLICIES
    attention: str = "auto"  # "auto" | "xla" | "cudnn"
    # Where `scan_layers` pins the residual stream between layers (None: left to XLA). The
    # trainer passes the batch sharding: left alone, XLA's sharding propagation may follow
    # the FSDP-sharded weights, split activations along the model width and all-reduce
    # whole activations; pinned to the batch sharding, it all-gathers the weights (ZeRO-3).
    carry_sharding: Any = None
    # The platform the model is compiled for ("gpu", "cpu"; None: jax.default_backend()), which
    # `attention: auto` reads. The trainer sets it from its mesh's devices, so a step compiled
    # for GPU devices from a CPU-only machine (`jaxmusic plan`) picks what a GPU run picks.
    platform: str | None = None

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        if self.attention not in ("auto", "xla", "cudnn"):
            raise ValueError(f"attention must be auto, xla or cudnn, got {self.attention!r}")

    @classmethod
    def from_names(cls, param_dtype="float32", dtype="float32", **kw) -> "ModelOptions":
        return cls(param_dtype=jnp.dtype(param_dtype), dtype=jnp.dtype(dtype), **kw)


def _normal(rngs: nnx.Rngs, shape, dtype, std: float):
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def linear(x, weight, bias, dtype):
    """`x @ weight.T + bias` in `dtype`, for `weight [out, in]` (bias may be None)."""
    y = jax.lax.dot_general(x.astype(dtype), weight.astype(dtype), (((x.ndim - 1,), (1,)), ((), ())))
    return y if bias is None else y + bias.astype(dtype)


class Linear(nnx.Module):
    """`y = x @ weight.T + bias`, weight stored `[out, in]`; `axes` names its two axes in that order."""

    def __init__(self, d_in: int, d_out: int, *, axes: tuple[str, str], use_bias: bool,
                 opts: ModelOptions, rngs: nnx.Rngs, std: float = 0.02):
        self.weight = nnx.Param(_normal(rngs, (d_out, d_in), opts.param_dtype, std), axes=axes)
        self.bias = (nnx.Param(jnp.zeros((d_out,), opts.param_dtype), axes=axes[:1])
                     if use_bias else None)
        self.dtype = opts.dtype

    def __call__(self, x):
        return linear(x, self.weight[...], None if self.bias is None else self.bias[...], self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias; statistics in float32 whatever the compute dtype."""

    def __init__(self, dim: int, *, eps: float, opts: ModelOptions, axis_name: str = "embed"):
        self.scale = nnx.Param(jnp.ones((dim,), opts.param_dtype), axes=(axis_name,))
        self.bias = nnx.Param(jnp.zeros((dim,), opts.param_dtype), axes=(axis_name,))
        self.eps = eps
        self.dtype = opts.dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """Qwen-style RMSNorm: normalise in float32, cast back, then multiply by the weight."""

    def __init__(self, dim: int, *, eps: float, opts: ModelOptions, axis_name: str = "embed"):
        self.scale = nnx.Param(jnp.ones((dim,), opts.param_dtype), axes=(axis_name,))
        self.eps = eps
        self.dtype = opts.dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        # transformers casts to the input dtype before the weight multiply; we do the same
        # so bfloat16 runs round exactly where the reference rounds.
        return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


def attention_impl(opts: ModelOptions, dtype, head_dim: int) -> str:
    """Pick the `jax.nn.dot_product_attention` backend.

    cuDNN's fused attention wants a GPU, half-precision inputs and head_dim <= 128
    in multiples of 8; everything else (CPU, float32 parity runs) goes through XLA.
    """
    if opts.attention != "auto":
        return opts.attention
    on_gpu = (opts.platform or jax.default_backend()) == "gpu"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if on_gpu and half and head_dim <= 128 and head_dim % 8 == 0 else "xla"


def attention(q, k, v, *, opts: ModelOptions, mask=None, is_causal: bool = False):
    """Multi-head / grouped-query attention on `[B, T, N, H]` / `[B, S, K, H]` arrays.

    `mask` is boolean, broadcastable to `[B, N, T, S]`, True where attention is allowed.
    """
    impl = attention_impl(opts, q.dtype, q.shape[-1])
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                        implementation=impl)


def stack_layers(n_layers: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs):
    """Build `n_layers` copies of a block as one module with a leading layer axis."""

    @nnx.split_rngs(splits=n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(r):
        return make(r)

    return build(rngs)


def scan_layers(layers: nnx.Module, body: Callable, carry, xs=None, *, opts: ModelOptions):
    """Run `body(block, carry, x) -> (carry, y)` over the stacked `layers`.

    One compiled block serves every layer, so a 36-layer model compiles as fast as a
    2-layer one. `xs` (optional) is scanned alongside the layer parameters, e.g. the
    per-layer KV cache. `opts` gives the remat policy and the carry's sharding.
    """
    graphdef, state = nnx.split(layers)
    sharding = opts.carry_sharding
    pin = ((lambda c: c) if sharding is None
           else (lambda c: jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, sharding), c)))

    def step(c, inputs):
        layer_state, x = inputs
        c, y = body(nnx.merge(graphdef, layer_state), pin(c), x)
        return pin(c), y

    if opts.remat != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[opts.remat], prevent_cse=False)
    return jax.lax.scan(step, carry, (state, xs))
