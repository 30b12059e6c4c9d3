"""MuFun in Flax NNX: Whisper encoder -> multi-layer fusion -> mean pooling -> connector -> Qwen3.

    mel [N, 128, 3000] -> encoder -> hidden states [L+1, N, 1500, d_enc]
      -> fuse (layers 0, 7, 15, 32 concatenated on features)  [N, 1500, 4 d_enc]
      -> pool (mean, kernel 5, stride 5)                       [N, 300, 4 d_enc]
      -> connector (Linear -> exact GELU -> Linear)            [N, 300, d_llm]
      -> splice into the text embeddings at each <audio>       [B, L, d_llm]

The same module is Qwen2-Audio (Chu et al. 2024, arXiv 2407.10759; transformers'
`Qwen2AudioForConditionalGeneration`) under other settings of `MuFunConfig`
(`jaxmusic/configs/qwen2_audio.yaml`; its released layout lives in
`jaxmusic.models.qwen2_audio`):

    encoder -> last block's raw output [N, 1500, d_enc]
      -> pool (mean, kernel 2, stride 2), then the encoder's final LayerNorm  [N, 750, d_enc]
      -> connector (one Linear with bias)                                       [N, 750, d_llm]
      -> Qwen2 (the Qwen3 module with q/k/v biases and no q/k norm)

`pooling` ("fuse_then_pool" | "pool_then_norm") and `connector` ("mlp" | "linear") select
the glue, the LLM config's `model_type` the decoder, `prompt_template` the prompt.

The glue (fusion, pooling, connector, splice) is pure functions of (params, arrays); the
`MuFun` module only owns the parameters of its three parts, `whisper`, `connector` and
`llm`, and wires them together. Its attribute names are the checkpoint's part names, so
`nnx.state(model)` has the tree of a jaxmusic checkpoint and the trainable-set regexes of
the stage configs read naturally (`^connector/`, `^whisper/`). Where each token and audio
frame of a batch goes is decided on the host: `jaxmusic.models.splice_plan`.

The HF mapping of the released checkpoint layout (MuFun's `model_type: "tinyllava"` folders)
is at the end: three prefixes over the backbones' own mappings and the connector's two
Linears, every tensor stored as it is here (Linear weights `[out, in]`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmusic.models.hf_mapping import HFTensor
from jaxmusic.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from jaxmusic.models.whisper import WhisperEncoder, WhisperEncoderConfig
from jaxmusic.nn import ModelOptions, linear
from jaxmusic.templates import AUDIO_PLACEHOLDER, INFERENCE_TEMPLATES

PARTS = ("whisper", "connector", "llm")  # in data-flow order
CONNECTOR_INITS = ("normal", "torch_linear")
POOLINGS = ("fuse_then_pool", "pool_then_norm")
CONNECTORS = ("mlp", "linear")
LAYOUTS = ("mufun", "qwen2-audio")  # released HF layouts (convert/jax_to_hf.py --part)
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "mufun.yaml"  # the released model's


@dataclasses.dataclass(frozen=True)
class MuFunConfig:
    """The glue's settings; `jaxmusic/configs/mufun.yaml` documents the released model's values."""

    pooling: str = "fuse_then_pool"     # "fuse_then_pool" (MuFun) | "pool_then_norm" (Qwen2-Audio)
    connector: str = "mlp"              # "mlp": Linear-GELU-Linear (MuFun) | "linear" (Qwen2-Audio)
    prompt_template: str = "qwen2_instruct"  # jaxmusic.templates: how ask/score/eval render prompts
    layout: str = "mufun"               # the released HF layout the model is exported to
    fusion_layers: tuple[int, ...] = (0, 7, 15, 32)
    pool_kernel: int = 5
    pool_stride: int = 5
    connector_hidden_multiple: int = 2  # "blp_4i_2x": hidden = 2 x fused width
    connector_init: str = "normal"      # "normal" (the reference's effective init) | "torch_linear"
    connector_init_std: float = 0.02    # for "normal": the LLM's initializer_range
    audio_placeholder: str = AUDIO_PLACEHOLDER
    max_chunks_per_file: int = 0        # ask/score/eval keep only this many 30 s chunks of a file (0: all)
    # ask/score/eval: a chunk's zero padding (past the end of a clip) is masked in the encoder and
    # gets no audio tokens, as Qwen2-Audio does ("pool_then_norm" only); else every chunk is 30 s.
    mask_padding: bool = False
    chunk_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    length_buckets: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)

    def __post_init__(self):
        for name in ("fusion_layers", "chunk_buckets", "length_buckets"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.pooling == "pool_then_norm":
            if self.fusion_layers:
                raise ValueError("pooling 'pool_then_norm' reads the last block: fusion_layers must be [], got "
                                 f"{list(self.fusion_layers)}")
        elif not self.fusion_layers or min(self.fusion_layers) < 0:
            raise ValueError(f"fusion_layers must be non-empty hidden-state indices >= 0, got {self.fusion_layers}")
        if self.mask_padding and self.pooling != "pool_then_norm":
            raise ValueError("mask_padding needs pooling 'pool_then_norm'")
        if self.max_chunks_per_file < 0:
            raise ValueError(f"max_chunks_per_file must be >= 0, got {self.max_chunks_per_file}")
        if self.pool_kernel < 1 or self.pool_stride < 1 or self.connector_hidden_multiple < 1:
            raise ValueError("pool_kernel, pool_stride and connector_hidden_multiple must be >= 1")
        for name, allowed in (("pooling", POOLINGS), ("connector", CONNECTORS), ("layout", LAYOUTS),
                              ("prompt_template", INFERENCE_TEMPLATES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.connector_init not in CONNECTOR_INITS:
            raise ValueError(f"connector_init must be one of {CONNECTOR_INITS}, got {self.connector_init!r}")
        for name in ("chunk_buckets", "length_buckets"):
            b = getattr(self, name)
            if not b or b[0] < 1 or any(x >= y for x, y in zip(b, b[1:])):
                raise ValueError(f"{name} must be positive and strictly increasing, got {b}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MuFunConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown MuFun config keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path | None = None) -> "MuFunConfig":
        """From a YAML file of settings; by default the released model's (`DEFAULT_CONFIG`)."""
        from jaxmusic.configs import load_yaml

        return cls.from_dict(load_yaml(path or DEFAULT_CONFIG))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (as stored in a checkpoint's `jaxmusic.json`)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()}

    def check_encoder_depth(self, n_layers: int) -> None:
        """Fusion indices address hidden states 0..n_layers (0 = embeddings, n_layers = final LN)."""
        _check_layers(self.fusion_layers, n_layers)

    def connector_dims(self, d_enc: int, d_llm: int) -> tuple[int, ...]:
        """Widths along the connector: `(in, hidden, out)` for "mlp", `(in, out)` for "linear"."""
        d_in = d_enc if self.pooling == "pool_then_norm" else len(self.fusion_layers) * d_enc
        if self.connector == "linear":
            return d_in, d_llm
        return d_in, self.connector_hidden_multiple * d_in, d_llm

    def tokens_per_chunk(self, n_frames: int) -> int:
        """Audio tokens per chunk for `n_frames` encoder frames (1500 -> 300)."""
        return pooled_length(n_frames, self.pool_kernel, self.pool_stride)

    def valid_lengths(self, mel_frames: int) -> tuple[int, int]:
        """`(encoder frames, audio tokens)` of a chunk whose first `mel_frames` log-mel frames are
        audio (the rest padding), with `mask_padding`: Qwen2-Audio's lengths (its
        `_get_feat_extract_output_lengths`): the stride-2 convolution, then the pooling."""
        frames = (mel_frames - 1) // 2 + 1
        return frames, (frames - self.pool_kernel) // self.pool_stride + 1


# ---------------------------------------------------------------------- audio path (device)

def pooled_length(n_frames: int, kernel: int, stride: int) -> int:
    """Output length of a 'valid' window (torch AvgPool1d defaults: no padding, floor)."""
    if n_frames < kernel:
        raise ValueError(f"cannot pool {n_frames} frames with kernel {kernel}")
    return (n_frames - kernel) // stride + 1


def _check_layers(layers: Sequence[int], n_layers: int) -> None:
    bad = [i for i in layers if not 0 <= i <= n_layers]
    if bad:
        raise ValueError(f"fusion_layers {bad} out of range for an encoder with {n_layers} layers "
                         f"(valid hidden-state indices are 0..{n_layers})")


def fuse(hidden_states: jax.Array, layers: Sequence[int]) -> jax.Array:
    """`[L+1, N, T, D]` (transformers' output_hidden_states order) -> `[N, T, len(layers) * D]`."""
    _check_layers(layers, hidden_states.shape[0] - 1)
    return jnp.concatenate([hidden_states[i] for i in layers], axis=-1)


def pool(x: jax.Array, kernel: int, stride: int) -> jax.Array:
    """Mean over time windows: `[N, T, F] -> [N, T', F]`; sums in float32 like torch's kernels."""
    pooled_length(x.shape[1], kernel, stride)  # validates
    total = jax.lax.reduce_window(x.astype(jnp.float32), 0.0, jax.lax.add,
                                  (1, kernel, 1), (1, stride, 1), "VALID")
    return (total / kernel).astype(x.dtype)


def connector_init(key: jax.Array, d_in: int, d_hidden: int, d_out: int, dtype=jnp.float32, *,
                   scheme: str = "normal", std: float = 0.02) -> dict:
    """Connector parameters `{"linear1": {weight [hidden, in], bias}, "linear2": {...}}`.

    `scheme="normal"`: weights N(0, std), biases 0. This is what the reference trains from:
    its connector is built from plain `nn.Linear`s, but TinyLLaVA's `post_init` then
    re-initialises every non-pretrained Linear with `normal_(0, initializer_range)` and
    zero bias (initializer_range falls back to the LLM's, 0.02 for Qwen3).
    `scheme="torch_linear"`: PyTorch's `nn.Linear` default, weight and bias
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """
    if scheme not in CONNECTOR_INITS:
        raise ValueError(f"scheme must be one of {CONNECTOR_INITS}, got {scheme!r}")
    keys = jax.random.split(key, 4)

    def linear_init(kw, kb, fan_in, fan_out):
        # drawn [in, out] and transposed, so a seed gives the same weights as ever
        if scheme == "normal":
            weight = std * jax.random.normal(kw, (fan_in, fan_out), jnp.float32)
            bias = jnp.zeros((fan_out,), jnp.float32)
        else:
            bound = 1.0 / math.sqrt(fan_in)
            weight = jax.random.uniform(kw, (fan_in, fan_out), jnp.float32, -bound, bound)
            bias = jax.random.uniform(kb, (fan_out,), jnp.float32, -bound, bound)
        return {"weight": weight.T.astype(dtype), "bias": bias.astype(dtype)}

    return {"linear1": linear_init(keys[0], keys[1], d_in, d_hidden),
            "linear2": linear_init(keys[2], keys[3], d_hidden, d_out)}


def linear_connector_init(key: jax.Array, d_in: int, d_out: int, dtype=jnp.float32, *,
                          scheme: str = "normal", std: float = 0.02) -> dict:
    """The "linear" connector `{"linear": {weight [out, in], bias}}`, drawn like `connector_init`'s
    first Linear (Qwen2-Audio's projector is one `nn.Linear` with bias)."""
    params = connector_init(key, d_in, d_out, d_out, dtype, scheme=scheme, std=std)
    return {"linear": params["linear1"]}


def init_connector(cfg: MuFunConfig, key: jax.Array, d_enc: int, d_llm: int, dtype=jnp.float32) -> dict:
    """`connector_init` (or `linear_connector_init`) with the sizes and scheme from `cfg`."""
    init = linear_connector_init if cfg.connector == "linear" else connector_init
    return init(key, *cfg.connector_dims(d_enc, d_llm), dtype, scheme=cfg.connector_init, std=cfg.connector_init_std)


def connector_apply(params: dict, x: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Linear -> GELU (exact erf form, torch's default) -> Linear; no norm, no residual.
    A "linear" connector (`{"linear": ...}`) is its one Linear."""
    with jax.named_scope("connector"):
        if "linear" in params:
            return linear(x, params["linear"]["weight"], params["linear"]["bias"], dtype)
        p1, p2 = params["linear1"], params["linear2"]
        h = jax.nn.gelu(linear(x, p1["weight"], p1["bias"], dtype), approximate=False)
        return linear(h, p2["weight"], p2["bias"], dtype)


def encoder_features(encoder, mel: jax.Array, cfg: MuFunConfig, valid_frames=None) -> jax.Array:
    """Chunks `[N, n_mels, frames]` -> the pooled encoder features the connector reads `[N, T', F]`.

    "fuse_then_pool" (MuFun): `encoder(mel)` (all hidden states `[L+1, N, T, D]`), the fusion
    layers concatenated, then mean-pooled. "pool_then_norm" (Qwen2-Audio, whose encoder pools
    *before* its final LayerNorm): the last block's raw output mean-pooled, then the norm;
    `valid_frames [N]` (optional) masks each chunk's padding in the encoder.
    """
    if cfg.pooling == "pool_then_norm":
        last = encoder.last_block_output(mel, valid_frames)
        with jax.named_scope("pool"):
            pooled = pool(last, cfg.pool_kernel, cfg.pool_stride)
        return encoder.final_norm(pooled)
    hidden = encoder(mel)
    with jax.named_scope("fuse_pool"):
        return pool(fuse(hidden, cfg.fusion_layers), cfg.pool_kernel, cfg.pool_stride)


def audio_embeddings(encoder, connector_params: dict, mel: jax.Array, cfg: MuFunConfig,
                     dtype=None, valid_frames=None) -> jax.Array:
    """Chunks `[N, n_mels, frames]` -> audio tokens `[N, T', d_llm]` (encoder -> pooling -> connector).

    The connector runs in `dtype`, by default the encoder's output dtype. `valid_frames`: see
    `encoder_features`.
    """
    features = encoder_features(encoder, mel, cfg, valid_frames)
    return connector_apply(connector_params, features, dtype or features.dtype)


def splice(text_embeds: jax.Array, audio_embeds: jax.Array, audio_index: jax.Array,
           is_audio: jax.Array, *, groups: int = 1) -> jax.Array:
    """Put audio tokens into the text sequence: one gather, one select.

    text_embeds [B, L, D]: embeddings of the plan's `input_ids` (text already in place).
    audio_embeds [groups * R, P, D]: audio tokens of every chunk row, in the plan's order.
    audio_index, is_audio [B, L]: from `splice_plan.build_splice_plan`; indices are local to each group
    of B / groups rows, so with the batch sharded over `groups` devices the gather needs
    no communication.
    """
    b, length, d = text_embeds.shape
    rows, p, _ = audio_embeds.shape
    if b % groups or rows % groups:
        raise ValueError(f"batch {b} and chunk rows {rows} must both divide into {groups} groups")
    with jax.named_scope("splice"):
        per_group = audio_embeds.reshape(groups, (rows // groups) * p, d)
        index = audio_index.reshape(groups, (b // groups) * length, 1)
        audio = jnp.take_along_axis(per_group, index, axis=1).reshape(b, length, d)
        return jnp.where(is_audio[..., None], audio.astype(text_embeds.dtype), text_embeds)


# ------------------------------------------------------------------------------ the module

class Connector(nnx.Module):
    """The connector's Linears (`weight [out, in]`, `bias`): "linear1" and "linear2" for the
    "mlp" connector, "linear" for the "linear" one; initialised by `init_connector`."""

    # The single Linear shards its output like the MLP's hidden side (tensor-parallel) and its
    # input like the MLP's (the encoder features).
    AXES = {"linear1": ("connector_mlp", "audio_embed"), "linear2": ("embed", "connector_mlp"),
            "linear": ("connector_mlp", "audio_embed")}

    def __init__(self, cfg: MuFunConfig, d_enc: int, d_llm: int, opts: ModelOptions, rngs: nnx.Rngs):
        params = init_connector(cfg, rngs.params(), d_enc, d_llm, opts.param_dtype)
        for name, p in params.items():
            setattr(self, name, nnx.Dict(weight=nnx.Param(p["weight"], axes=self.AXES[name]),
                                         bias=nnx.Param(p["bias"], axes=self.AXES[name][:1])))
        self.names = tuple(params)
        self.dtype = opts.dtype

    def params(self) -> dict:
        return {name: {"weight": getattr(self, name)["weight"][...], "bias": getattr(self, name)["bias"][...]}
                for name in self.names}

    def __call__(self, x):
        return connector_apply(self.params(), x, self.dtype)


class MuFun(nnx.Module):
    def __init__(self, whisper_cfg: WhisperEncoderConfig, llm_cfg: Qwen3Config, cfg: MuFunConfig,
                 opts: ModelOptions, rngs: nnx.Rngs):
        cfg.check_encoder_depth(whisper_cfg.n_layers)
        self.cfg = cfg
        self.whisper = WhisperEncoder(whisper_cfg, opts, rngs)
        self.connector = Connector(cfg, whisper_cfg.d_model, llm_cfg.hidden_size, opts, rngs)
        self.llm = Qwen3ForCausalLM(llm_cfg, opts, rngs)

    def audio_embeddings(self, mel, valid_frames=None):
        """Log-mel chunks `[N, n_mels, frames]` -> audio tokens `[N, frames/2/pool, d_llm]`."""
        return audio_embeddings(self.whisper, self.connector.params(), mel, self.cfg, dtype=self.connector.dtype,
                                valid_frames=valid_frames)

    def inputs_embeds(self, mel, input_ids, audio_index, is_audio, *, groups: int = 1, valid_frames=None):
        """The LLM input for a batch laid out by `splice_plan.build_splice_plan` (`valid_frames`:
        its `chunk_frames`, with `mask_padding`)."""
        text = self.llm.embed(input_ids)
        audio = self.audio_embeddings(mel, valid_frames)
        if self.llm.opts.carry_sharding is not None:
            # split by rows like the residual stream the tokens join: left to XLA, the connector's
            # output follows its FSDP weight (split along the width) and the splice's gather then
            # reshuffles it between devices, in the train step also between nodes
            audio = jax.lax.with_sharding_constraint(audio, self.llm.opts.carry_sharding)
        return splice(text, audio, audio_index, is_audio, groups=groups)

    def __call__(self, mel, input_ids, audio_index, is_audio, positions, *, mask=None, groups: int = 1):
        """Logits `[B, L, vocab]` of a spliced batch (no cache; for training and scoring)."""
        embeds = self.inputs_embeds(mel, input_ids, audio_index, is_audio, groups=groups)
        logits, _ = self.llm(embeds, positions, mask=mask)
        return logits


# ------------------------------------------------------------------- the released layout

# Where each part's tensors live in a released MuFun folder.
RELEASED_PREFIXES = {"whisper": "vision_tower._vision_tower.", "connector": "connector._connector.",
                     "llm": "language_model."}


def connector_hf_tensors(kind: str = "mlp") -> list[HFTensor]:
    """The connector's tensors, relative to the released layout's connector prefix (MuFun's
    `RELEASED_PREFIXES["connector"]`, Qwen2-Audio's `multi_modal_projector.`)."""
    names = ("linear",) if kind == "linear" else ("linear1", "linear2")
    return [HFTensor((lin, name), f"{lin}.{name}") for lin in names for name in ("weight", "bias")]


def connector_config(cfg: MuFunConfig, d_enc: int, d_llm: int) -> dict:
    """The connector's entry of a checkpoint (`connector_type` and sizes): "blp_<n>i_<m>x" (MuFun's
    released name) for the "mlp" connector, "linear" for the one-Linear connector."""
    if cfg.connector == "linear":
        d_in, d_out = cfg.connector_dims(d_enc, d_llm)
        return {"connector_type": "linear", "input_size": d_in, "output_size": d_out}
    d_in, d_hidden, d_out = cfg.connector_dims(d_enc, d_llm)
    return {"connector_type": f"blp_{len(cfg.fusion_layers)}i_{cfg.connector_hidden_multiple}x",
            "input_size": d_in, "hidden_size": d_hidden, "output_size": d_out}


def check_connector_type(connector_type: str, cfg: MuFunConfig) -> None:
    """A released `connector_type` must be the blp connector the glue settings describe."""
    m = re.fullmatch(r"blp_(\d+)i_(\d+)x", connector_type or "")
    if m is None:
        raise ValueError(f"connector_type {connector_type!r} is not the 'blp_<n>i_<m>x' connector "
                         "jaxmusic implements")
    if int(m.group(1)) != len(cfg.fusion_layers) or int(m.group(2)) != cfg.connector_hidden_multiple:
        raise ValueError(f"connector_type {m.group(0)} needs {m.group(1)} fusion layers and hidden multiple "
                         f"{m.group(2)}; the MuFun config has {list(cfg.fusion_layers)} and "
                         f"{cfg.connector_hidden_multiple} (pass --mufun-config)")


def _count_layers(tensors, pattern: str) -> int:
    found = {int(m.group(1)) for k in tensors if (m := re.fullmatch(pattern, k))}
    return max(found) + 1 if found else 0


def infer_whisper_config(config: dict, tensors: dict) -> dict:
    """A released `vision_config` with missing sizes filled in from the encoder's tensors
    (`{name: anything with .shape}`); attention heads are 64 wide in every Whisper size."""
    p = RELEASED_PREFIXES["whisper"]
    out = dict(config)
    if p + "conv1.weight" in tensors:
        d, n_mels, _ = tensors[p + "conv1.weight"].shape
        out.setdefault("d_model", d)
        out.setdefault("num_mel_bins", n_mels)
        out.setdefault("encoder_attention_heads", d // 64)
    if p + "embed_positions.weight" in tensors:
        out.setdefault("max_source_positions", tensors[p + "embed_positions.weight"].shape[0])
    if p + "layers.0.fc1.weight" in tensors:
        out.setdefault("encoder_ffn_dim", tensors[p + "layers.0.fc1.weight"].shape[0])
    out.setdefault("encoder_layers", _count_layers(tensors, re.escape(p) + r"layers\.(\d+)\.fc1\.weight"))
    return out


def infer_qwen3_config(config: dict, tensors: dict) -> dict:
    """A released `text_config` with missing sizes filled in from the LLM's tensors."""
    p = RELEASED_PREFIXES["llm"] + "model."
    out = dict(config)
    if p + "embed_tokens.weight" in tensors:
        vocab, hidden = tensors[p + "embed_tokens.weight"].shape
        out.setdefault("vocab_size", vocab)
        out.setdefault("hidden_size", hidden)
    q, k, norm = (tensors.get(p + f"layers.0.self_attn.{n}.weight") for n in ("q_proj", "k_proj", "q_norm"))
    if norm is not None:
        head_dim = norm.shape[0]
        out.setdefault("head_dim", head_dim)
        if q is not None:
            out.setdefault("num_attention_heads", q.shape[0] // head_dim)
        if k is not None:
            out.setdefault("num_key_value_heads", k.shape[0] // head_dim)
    if p + "layers.0.mlp.gate_proj.weight" in tensors:
        out.setdefault("intermediate_size", tensors[p + "layers.0.mlp.gate_proj.weight"].shape[0])
    out.setdefault("num_hidden_layers",
                   _count_layers(tensors, re.escape(p) + r"layers\.(\d+)\.mlp\.gate_proj\.weight"))
    out.setdefault("tie_word_embeddings", RELEASED_PREFIXES["llm"] + "lm_head.weight" not in tensors)
    out.setdefault("rms_norm_eps", 1e-6)
    if "rope_parameters" not in out and "rope_theta" not in out:
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}  # Qwen3's
    return out


def released_config(whisper_hf: dict, llm_hf: dict, connector: dict, base: dict | None = None) -> dict:
    """The `config.json` of a released-layout folder (the sizes MuFun's code reads), over `base`."""
    config = dict(base or {})
    config.update(model_type="tinyllava", connector_type=connector["connector_type"],
                  hidden_size=llm_hf["hidden_size"], vision_hidden_size=whisper_hf["d_model"],
                  text_config=llm_hf, vision_config=whisper_hf)
    config.setdefault("architectures", ["TinyLlavaForConditionalGeneration"])
    return config
