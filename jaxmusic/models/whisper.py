"""The Whisper audio encoder (MuFun's audio tower) in Flax NNX, with its HF name mapping.

Numerically it follows transformers' PyTorch `WhisperEncoder`: conv1 (k3 s1 p1) + GELU,
conv2 (k3 s2 p1) + GELU, plus fixed sinusoidal positions, then pre-LayerNorm blocks and a
final LayerNorm. There is no attention mask: Whisper always sees a full 30 s chunk
(padding included), so every frame attends to every frame.

Logical axis names used by the parameters (the sharding table maps them to mesh axes):

* ``embed``      model width (d_model).
* ``heads``      the flattened ``num_heads * head_dim`` axis of the q/k/v/out projections;
                 sharding it splits whole heads as long as the shard count divides num_heads.
* ``mlp``        the FFN hidden axis (encoder_ffn_dim).
* ``mel``        mel bins, conv1's input channels.
* ``conv_in``    conv2's input channels (d_model; a name of its own so that one tensor
                 never carries ``embed`` twice).
* ``conv_width`` the convolution kernel width (3).

Convolution weights are stored `[out, in, width]` and Linear weights `[out, in]`, as in
PyTorch, so every HF tensor is one of ours as it is.
* ``positions``  rows of the sinusoidal position table (max_source_positions).

Parameters under ``layers`` have a leading layer axis (see `jaxmusic.nn`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmusic.models.hf_mapping import HFTensor
from jaxmusic.nn import LayerNorm, Linear, ModelOptions, attention, linear, scan_layers, stack_layers

# Where the encoder's tensors live in each HF class's state dict:
# WhisperForConditionalGeneration -> "model.encoder.", WhisperModel -> "encoder.",
# a bare WhisperEncoder -> "". The released MuFun checkpoints use "vision_tower._vision_tower.".
HF_ENCODER_PREFIXES = ("model.encoder.", "encoder.", "")

_SUPPORTED_ACTIVATIONS = ("gelu",)


@dataclasses.dataclass(frozen=True)
class WhisperEncoderConfig:
    """Encoder architecture; defaults are Whisper-large-v3 (the MuFun audio tower)."""

    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    max_source_positions: int = 1500  # output frames; the mel input has twice as many
    activation_function: str = "gelu"
    # Kept for config round trips only: transformers' encoder computes `embed_scale` but never
    # applies it, so the encoder output does not depend on this flag.
    scale_embedding: bool = False
    layer_norm_eps: float = 1e-5  # torch.nn.LayerNorm's default; WhisperConfig has no field for it

    def __post_init__(self):
        if self.activation_function not in _SUPPORTED_ACTIVATIONS:
            raise ValueError(f"WhisperEncoderConfig.activation_function: only {_SUPPORTED_ACTIVATIONS} "
                             f"is supported, got {self.activation_function!r}")
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(f"WhisperEncoderConfig: d_model {self.d_model} is not divisible by "
                             f"encoder_attention_heads {self.encoder_attention_heads}")

    @property
    def n_layers(self) -> int:
        return self.encoder_layers

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @classmethod
    def from_hf(cls, d: dict) -> "WhisperEncoderConfig":
        """From a WhisperConfig dict (`WhisperConfig().to_dict()`); decoder fields are ignored.

        Sizes are required (a silently defaulted size would build the wrong model); the
        remaining fields fall back to transformers' defaults.
        """
        required = ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads",
                    "encoder_ffn_dim")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"Whisper config is missing {missing}")
        optional = ("max_source_positions", "activation_function", "scale_embedding")
        return cls(**{k: d[k] for k in required + optional if k in d})


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's position table `[length, channels]`: sines then cosines, geometric timescales."""
    if channels % 2:
        raise ValueError(f"sinusoidal positions need an even width, got {channels}")
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    # float64, then rounded once: transformers' float32 arithmetic is off by up to 1e-4 at
    # 1500 x 1280, so a checkpoint's stored table (which we always import) is authoritative.
    inv_timescales = np.exp(-log_timescale_increment * np.arange(channels // 2, dtype=np.float64))
    scaled_time = np.arange(length, dtype=np.float64)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled_time), np.cos(scaled_time)], axis=1).astype(np.float32)


class Constant(nnx.Variable):
    """A fixed array that is part of the model state but never trained.

    Not an `nnx.Param`, so `nnx.grad(..., wrt=nnx.Param)` and optimizers skip it.
    """


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)  # torch's default GELU is the exact erf form


class Conv1d(nnx.Module):
    """1-D convolution on `[B, T, C]`, weight `[out, in, width]` (PyTorch's), symmetric padding."""

    def __init__(self, d_in: int, d_out: int, *, width: int, stride: int, in_axis: str,
                 opts: ModelOptions, rngs: nnx.Rngs):
        std = 1.0 / math.sqrt(d_in * width)
        # drawn [width, in, out] and transposed, so a seed gives the same weights as ever
        weight = std * jax.random.normal(rngs.params(), (width, d_in, d_out), jnp.float32).transpose(2, 1, 0)
        self.weight = nnx.Param(weight.astype(opts.param_dtype), axes=("embed", in_axis, "conv_width"))
        self.bias = nnx.Param(jnp.zeros((d_out,), opts.param_dtype), axes=("embed",))
        self.stride = stride
        self.dtype = opts.dtype

    def __call__(self, x):
        # As one matmul over the `width` shifted, strided views of the input (im2col): the
        # same sums as a convolution, but its backward pass is a plain matmul, which XLA's CPU
        # backend runs several times faster than a convolution's weight gradient.
        d_out, d_in, width = self.weight.shape
        pad = width // 2
        x = jnp.pad(x.astype(self.dtype), ((0, 0), (pad, pad), (0, 0)))
        n_out = (x.shape[1] - width) // self.stride + 1
        span = self.stride * (n_out - 1) + 1
        cols = jnp.stack([x[:, k:k + span:self.stride] for k in range(width)], axis=-1)  # [B, T', in, width]
        cols = cols.reshape(*cols.shape[:2], d_in * width)
        return linear(cols, self.weight[...].reshape(d_out, d_in * width), self.bias[...], self.dtype)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: WhisperEncoderConfig, opts: ModelOptions, rngs: nnx.Rngs):
        d = cfg.d_model
        self.q_proj = Linear(d, d, axes=("heads", "embed"), use_bias=True, opts=opts, rngs=rngs)
        # Whisper's k_proj has no bias (a key bias would only shift all logits of a query equally).
        self.k_proj = Linear(d, d, axes=("heads", "embed"), use_bias=False, opts=opts, rngs=rngs)
        self.v_proj = Linear(d, d, axes=("heads", "embed"), use_bias=True, opts=opts, rngs=rngs)
        self.out_proj = Linear(d, d, axes=("embed", "heads"), use_bias=True, opts=opts, rngs=rngs)
        self.num_heads = cfg.encoder_attention_heads
        self.head_dim = cfg.head_dim
        self.opts = opts

    def __call__(self, x, mask=None):
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)
        out = attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                        opts=self.opts, mask=mask)
        return self.out_proj(out.reshape(b, t, -1))


class EncoderBlock(nnx.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + fc2(gelu(fc1(ln(x))))."""

    def __init__(self, cfg: WhisperEncoderConfig, opts: ModelOptions, rngs: nnx.Rngs):
        self.self_attn_layer_norm = LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, opts=opts)
        self.self_attn = SelfAttention(cfg, opts, rngs)
        self.final_layer_norm = LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, opts=opts)
        self.fc1 = Linear(cfg.d_model, cfg.encoder_ffn_dim, axes=("mlp", "embed"), use_bias=True,
                          opts=opts, rngs=rngs)
        self.fc2 = Linear(cfg.encoder_ffn_dim, cfg.d_model, axes=("embed", "mlp"), use_bias=True,
                          opts=opts, rngs=rngs)

    def __call__(self, x, mask=None):
        with jax.named_scope("attention"):
            x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        with jax.named_scope("mlp"):
            return x + self.fc2(_gelu(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nnx.Module):
    def __init__(self, cfg: WhisperEncoderConfig, opts: ModelOptions, rngs: nnx.Rngs):
        self.cfg = cfg
        self.opts = opts
        self.conv1 = Conv1d(cfg.num_mel_bins, cfg.d_model, width=3, stride=1, in_axis="mel",
                            opts=opts, rngs=rngs)
        self.conv2 = Conv1d(cfg.d_model, cfg.d_model, width=3, stride=2, in_axis="conv_in",
                            opts=opts, rngs=rngs)
        # Stored (not recomputed) so that imported checkpoints round-trip bit-exactly.
        table = sinusoids(cfg.max_source_positions, cfg.d_model)
        self.embed_positions = Constant(jnp.asarray(table, opts.param_dtype), axes=("positions", "embed"))
        self.layers = stack_layers(cfg.n_layers, lambda r: EncoderBlock(cfg, opts, r), rngs)
        self.layer_norm = LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, opts=opts)

    def stem(self, input_features):
        """`[B, num_mel_bins, 2 * max_source_positions]` log-mel (HF layout) -> the embedding
        output `[B, max_source_positions, d_model]` (convolutions + positions)."""
        cfg = self.cfg
        expected = (cfg.num_mel_bins, 2 * cfg.max_source_positions)
        if input_features.ndim != 3 or tuple(input_features.shape[1:]) != expected:
            raise ValueError(f"Whisper input_features must be [batch, {expected[0]}, {expected[1]}], "
                             f"got {tuple(input_features.shape)}")
        with jax.named_scope("conv_stem"):
            x = jnp.swapaxes(input_features, 1, 2)  # channels last for the convolutions
            x = _gelu(self.conv1(x))
            x = _gelu(self.conv2(x))
            return x + self.embed_positions[...].astype(x.dtype)

    def final_norm(self, h):
        with jax.named_scope("final_norm"):
            return self.layer_norm(h)

    def __call__(self, input_features):
        """Log-mel (see `stem`) -> all hidden states.

        Returns `[encoder_layers + 1, B, max_source_positions, d_model]` indexed like
        transformers' `output_hidden_states`: 0 is the embedding output, i in 1..L-1 the raw
        output of block i, L the last block's output after the final LayerNorm.
        """
        x = self.stem(input_features)

        def body(block, h, _):
            with jax.named_scope("encoder_layer"):
                h = block(h)
            return h, h

        last, per_block = scan_layers(self.layers, body, x, opts=self.opts)
        # transformers reports the final-LayerNorm output in place of the last block's raw output.
        return jnp.concatenate([x[None], per_block[:-1], self.final_norm(last)[None]], axis=0)

    def last_block_output(self, input_features, valid_frames=None):
        """The last block's raw output `[B, max_source_positions, d_model]`, before the final
        LayerNorm, keeping no other layer's (Qwen2-Audio pools it, then applies the norm).

        `valid_frames [B]` (int, optional): frames beyond it are padding that no frame attends
        to, as Qwen2-Audio masks a clip shorter than 30 s (its padding frames are still computed).
        """
        mask = None
        if valid_frames is not None:
            mask = (jnp.arange(self.cfg.max_source_positions)[None, :] < valid_frames[:, None])[:, None, None, :]

        def body(block, h, _):
            with jax.named_scope("encoder_layer"):
                return block(h, mask), None

        last, _ = scan_layers(self.layers, body, self.stem(input_features), opts=self.opts)
        return last


def hf_tensors(cfg: WhisperEncoderConfig) -> list[HFTensor]:
    """Our parameters <-> HF encoder tensors; keys are relative to the encoder root."""
    del cfg  # the encoder's tensor names do not depend on its sizes
    specs = [
        HFTensor(("conv1", "weight"), "conv1.weight"),
        HFTensor(("conv1", "bias"), "conv1.bias"),
        HFTensor(("conv2", "weight"), "conv2.weight"),
        HFTensor(("conv2", "bias"), "conv2.bias"),
        HFTensor(("embed_positions",), "embed_positions.weight"),
    ]
    layer = lambda path, key: HFTensor(("layers",) + path, "layers.{i}." + key, stacked=True)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        specs.append(layer(("self_attn", proj, "weight"), f"self_attn.{proj}.weight"))
        if proj != "k_proj":
            specs.append(layer(("self_attn", proj, "bias"), f"self_attn.{proj}.bias"))
    for norm in ("self_attn_layer_norm", "final_layer_norm"):
        specs.append(layer((norm, "scale"), f"{norm}.weight"))
        specs.append(layer((norm, "bias"), f"{norm}.bias"))
    for fc in ("fc1", "fc2"):
        specs.append(layer((fc, "weight"), f"{fc}.weight"))
        specs.append(layer((fc, "bias"), f"{fc}.bias"))
    specs.append(HFTensor(("layer_norm", "scale"), "layer_norm.weight"))
    specs.append(HFTensor(("layer_norm", "bias"), "layer_norm.bias"))
    return specs
