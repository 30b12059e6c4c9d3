"""MuFun's glue between the Whisper encoder and the Qwen3 LLM, as pure functions.

    mel [N, 128, 3000] -> encoder -> hidden states [L+1, N, 1500, d_enc]
      -> fuse (layers 0, 7, 15, 32 concatenated on features)  [N, 1500, 4 d_enc]
      -> pool (mean, kernel 5, stride 5)                       [N, 300, 4 d_enc]
      -> connector (Linear -> exact GELU -> Linear)            [N, 300, d_llm]
      -> splice into the text embeddings at each <audio>       [B, L, d_llm]

Everything on the device has fixed shapes: the host (NumPy) decides where every token
and audio frame goes (`build_splice_plan`), rounding the sequence length and the number
of audio chunks up to configured buckets, so a jitted step compiles once per bucket pair.
The device side (`splice`) is then a single gather and a select.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmusic.hf_mapping import LINEAR, SAME, HFTensor
from jaxmusic.templates import AUDIO_PLACEHOLDER, TokenizedText

IGNORE_INDEX = -100  # label of positions without loss (audio, prompt, padding), as in the reference
CONNECTOR_INITS = ("normal", "torch_linear")


@dataclasses.dataclass(frozen=True)
class MuFunConfig:
    """The glue's settings; see `configs/mufun.yaml` for the documented defaults."""

    fusion_layers: tuple[int, ...] = (0, 7, 15, 32)
    pool_kernel: int = 5
    pool_stride: int = 5
    connector_hidden_multiple: int = 2  # "blp_4i_2x": hidden = 2 x fused width
    connector_init: str = "normal"      # "normal" (the reference's effective init) | "torch_linear"
    connector_init_std: float = 0.02    # for "normal": the LLM's initializer_range
    audio_placeholder: str = AUDIO_PLACEHOLDER
    chunk_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    length_buckets: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)

    def __post_init__(self):
        for name in ("fusion_layers", "chunk_buckets", "length_buckets"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if not self.fusion_layers or min(self.fusion_layers) < 0:
            raise ValueError(f"fusion_layers must be non-empty hidden-state indices >= 0, got {self.fusion_layers}")
        if self.pool_kernel < 1 or self.pool_stride < 1 or self.connector_hidden_multiple < 1:
            raise ValueError("pool_kernel, pool_stride and connector_hidden_multiple must be >= 1")
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
    def from_yaml(cls, path: str | Path) -> "MuFunConfig":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"MuFun config not found: {path}")
        try:
            d = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a mapping of MuFun settings")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (as stored in a checkpoint's `jaxmusic.json`)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()}

    def check_encoder_depth(self, n_layers: int) -> None:
        """Fusion indices address hidden states 0..n_layers (0 = embeddings, n_layers = final LN)."""
        _check_layers(self.fusion_layers, n_layers)

    def connector_dims(self, d_enc: int, d_llm: int) -> tuple[int, int, int]:
        d_in = len(self.fusion_layers) * d_enc
        return d_in, self.connector_hidden_multiple * d_in, d_llm

    def tokens_per_chunk(self, n_frames: int) -> int:
        """Audio tokens per chunk for `n_frames` encoder frames (1500 -> 300)."""
        return pooled_length(n_frames, self.pool_kernel, self.pool_stride)


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
    """Connector parameters `{"linear1": {kernel [in, hidden], bias}, "linear2": {...}}`.

    `scheme="normal"`: kernels N(0, std), biases 0. This is what the reference trains from:
    its connector is built from plain `nn.Linear`s, but TinyLLaVA's `post_init` then
    re-initialises every non-pretrained Linear with `normal_(0, initializer_range)` and
    zero bias (initializer_range falls back to the LLM's, 0.02 for Qwen3).
    `scheme="torch_linear"`: PyTorch's `nn.Linear` default, kernel and bias
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """
    if scheme not in CONNECTOR_INITS:
        raise ValueError(f"scheme must be one of {CONNECTOR_INITS}, got {scheme!r}")
    keys = jax.random.split(key, 4)

    def linear(kw, kb, fan_in, fan_out):
        if scheme == "normal":
            kernel = std * jax.random.normal(kw, (fan_in, fan_out), jnp.float32)
            bias = jnp.zeros((fan_out,), jnp.float32)
        else:
            bound = 1.0 / math.sqrt(fan_in)
            kernel = jax.random.uniform(kw, (fan_in, fan_out), jnp.float32, -bound, bound)
            bias = jax.random.uniform(kb, (fan_out,), jnp.float32, -bound, bound)
        return {"kernel": kernel.astype(dtype), "bias": bias.astype(dtype)}

    return {"linear1": linear(keys[0], keys[1], d_in, d_hidden),
            "linear2": linear(keys[2], keys[3], d_hidden, d_out)}


def init_connector(cfg: MuFunConfig, key: jax.Array, d_enc: int, d_llm: int, dtype=jnp.float32) -> dict:
    """`connector_init` with the sizes and scheme from `cfg`."""
    return connector_init(key, *cfg.connector_dims(d_enc, d_llm), dtype,
                          scheme=cfg.connector_init, std=cfg.connector_init_std)


def connector_apply(params: dict, x: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Linear -> GELU (exact erf form, torch's default) -> Linear; no norm, no residual."""
    def linear(p, h):
        return jnp.dot(h, p["kernel"].astype(dtype)) + p["bias"].astype(dtype)

    h = jax.nn.gelu(linear(params["linear1"], x.astype(dtype)), approximate=False)
    return linear(params["linear2"], h)


def connector_hf_tensors() -> list[HFTensor]:
    """Connector tensors in the released checkpoint (`connector._connector.*`, torch layout)."""
    specs = []
    for lin in ("linear1", "linear2"):
        specs.append(HFTensor((lin, "kernel"), f"connector._connector.{lin}.weight", LINEAR))
        specs.append(HFTensor((lin, "bias"), f"connector._connector.{lin}.bias", SAME))
    return specs


def audio_embeddings(encoder, connector_params: dict, mel: jax.Array, cfg: MuFunConfig,
                     dtype=None) -> jax.Array:
    """Chunks `[N, n_mels, frames]` -> audio tokens `[N, T', d_llm]` (encoder -> fuse -> pool -> connector).

    `encoder(mel)` must return all hidden states stacked `[L+1, N, T, D]`. The connector runs
    in `dtype`, by default the encoder's output dtype.
    """
    hidden = encoder(mel)
    pooled = pool(fuse(hidden, cfg.fusion_layers), cfg.pool_kernel, cfg.pool_stride)
    return connector_apply(connector_params, pooled, dtype or hidden.dtype)


def splice(text_embeds: jax.Array, audio_embeds: jax.Array, audio_index: jax.Array,
           is_audio: jax.Array, *, groups: int = 1) -> jax.Array:
    """Put audio tokens into the text sequence: one gather, one select.

    text_embeds [B, L, D]: embeddings of the plan's `input_ids` (text already in place).
    audio_embeds [groups * R, P, D]: audio tokens of every chunk row, in the plan's order.
    audio_index, is_audio [B, L]: from `build_splice_plan`; indices are local to each group
    of B / groups rows, so with the batch sharded over `groups` devices the gather needs
    no communication.
    """
    b, length, d = text_embeds.shape
    rows, p, _ = audio_embeds.shape
    if b % groups or rows % groups:
        raise ValueError(f"batch {b} and chunk rows {rows} must both divide into {groups} groups")
    per_group = audio_embeds.reshape(groups, (rows // groups) * p, d)
    index = audio_index.reshape(groups, (b // groups) * length, 1)
    audio = jnp.take_along_axis(per_group, index, axis=1).reshape(b, length, d)
    return jnp.where(is_audio[..., None], audio.astype(text_embeds.dtype), text_embeds)


# -------------------------------------------------------------------------- host-side plan

@dataclasses.dataclass(frozen=True)
class SplicePlan:
    """Where every token and audio frame of a batch goes; NumPy arrays of shape [B, L].

    `labels` follow the Hugging Face convention: `labels[b, t]` is the token at position t
    (or IGNORE_INDEX), so the loss compares logits[:, :-1] with labels[:, 1:].
    """

    input_ids: np.ndarray       # int32: text tokens in their final place, pad_id elsewhere
    audio_index: np.ndarray     # int32: chunk_row * tokens_per_chunk + frame within the group; 0 elsewhere
    is_audio: np.ndarray        # bool
    attention_mask: np.ndarray  # bool: True on real positions (text or audio)
    positions: np.ndarray       # int32: 0..len-1 per row, 0 on padding
    labels: np.ndarray          # int32: targets, IGNORE_INDEX on audio, prompt and padding
    lengths: np.ndarray         # int32 [B]: real length of each row (after any truncation)
    chunk_counts: tuple[tuple[int, ...], ...]  # per row, per audio file
    chunk_rows: int             # chunk rows per group (bucketed); the chunk batch has groups * chunk_rows
    groups: int


def pick_bucket(n: int, buckets: Sequence[int], what: str) -> int:
    """Smallest bucket >= n."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{what} {n} exceeds the largest bucket {buckets[-1]}")


def _row_layout(sample: TokenizedText, counts: Sequence[int], tokens_per_chunk: int,
                first_chunk: int, pad_id: int):
    """One row's ids, labels, audio indices and audio flags, unpadded."""
    parts = []  # (ids, labels, audio_index, is_audio)
    chunk = first_chunk
    for i, (ids, mask) in enumerate(zip(sample.pieces, sample.loss_masks)):
        ids = np.asarray(ids, np.int32)
        parts.append((ids, np.where(mask, ids, IGNORE_INDEX), np.zeros_like(ids), np.zeros(len(ids), bool)))
        if i < sample.n_audio:
            n = counts[i] * tokens_per_chunk
            parts.append((np.full(n, pad_id, np.int32), np.full(n, IGNORE_INDEX, np.int32),
                          chunk * tokens_per_chunk + np.arange(n, dtype=np.int32), np.ones(n, bool)))
            chunk += counts[i]
    return [np.concatenate(col) for col in zip(*parts)]


def build_splice_plan(samples: Sequence[TokenizedText], chunk_counts: Sequence[Sequence[int]], *,
                      tokens_per_chunk: int, length_buckets: Sequence[int],
                      chunk_buckets: Sequence[int], groups: int = 1, pad_id: int = 0,
                      truncate: bool = False) -> SplicePlan:
    """Lay out a batch: each sample's text pieces with its files' audio tokens in between.

    `chunk_counts[b][i]` is the number of 30 s chunks of sample b's audio file i. Chunk rows
    are numbered per group of `len(samples) // groups` consecutive samples, in sample order,
    then file order, then chunk order (see `stack_chunks`). L is the smallest length bucket
    that fits the longest row; a row longer than the largest bucket is an error, or, with
    `truncate`, is cut there as the reference does at `tokenizer_model_max_length`.
    """
    if len(samples) != len(chunk_counts):
        raise ValueError(f"{len(samples)} samples but {len(chunk_counts)} chunk-count lists")
    if groups < 1 or len(samples) % groups:
        raise ValueError(f"batch of {len(samples)} does not divide into {groups} groups")
    per_group = len(samples) // groups
    rows, used = [], [0] * groups
    for b, (sample, counts) in enumerate(zip(samples, chunk_counts)):
        counts = tuple(int(c) for c in counts)
        if len(counts) != sample.n_audio:
            raise ValueError(f"sample {b}: {sample.n_audio} audio placeholders but {len(counts)} chunk counts")
        if any(c < 0 for c in counts):
            raise ValueError(f"sample {b}: negative chunk count in {counts}")
        g = b // per_group
        rows.append((_row_layout(sample, counts, tokens_per_chunk, used[g], pad_id), counts))
        used[g] += sum(counts)

    longest = max(len(ids) for (ids, *_), _ in rows)
    limit = length_buckets[-1]
    if longest > limit and not truncate:
        raise ValueError(f"sequence length {longest} exceeds the largest length bucket {limit}")
    length = pick_bucket(min(longest, limit), length_buckets, "sequence length")
    chunk_rows = pick_bucket(max(used), chunk_buckets, "audio chunks per group")

    shape = (len(samples), length)
    plan = dict(input_ids=np.full(shape, pad_id, np.int32), labels=np.full(shape, IGNORE_INDEX, np.int32),
                audio_index=np.zeros(shape, np.int32), is_audio=np.zeros(shape, bool),
                attention_mask=np.zeros(shape, bool), positions=np.zeros(shape, np.int32))
    lengths = np.zeros(len(samples), np.int32)
    for b, ((ids, labels, audio_index, is_audio), _) in enumerate(rows):
        n = min(len(ids), length)
        lengths[b] = n
        plan["input_ids"][b, :n] = ids[:n]
        plan["labels"][b, :n] = labels[:n]
        plan["audio_index"][b, :n] = audio_index[:n]
        plan["is_audio"][b, :n] = is_audio[:n]
        plan["attention_mask"][b, :n] = True
        plan["positions"][b, :n] = np.arange(n)
    return SplicePlan(**plan, lengths=lengths, chunk_counts=tuple(c for _, c in rows),
                      chunk_rows=chunk_rows, groups=groups)


def stack_chunks(mels: Sequence[Sequence[np.ndarray]], plan: SplicePlan,
                 feature_shape: tuple[int, int] = (128, 3000)) -> np.ndarray:
    """Per-sample, per-file log-mels `[n_chunks, *feature_shape]` -> the chunk batch of `plan`.

    Returns float32 `[groups * chunk_rows, *feature_shape]`, with zero rows where a group
    has fewer chunks than the bucket (their audio tokens are computed but never gathered).
    """
    if len(mels) != len(plan.chunk_counts):
        raise ValueError(f"{len(mels)} samples of audio but the plan has {len(plan.chunk_counts)}")
    out = np.zeros((plan.groups * plan.chunk_rows, *feature_shape), np.float32)
    per_group = len(mels) // plan.groups
    used = [0] * plan.groups
    for b, (sample, counts) in enumerate(zip(mels, plan.chunk_counts)):
        if tuple(len(m) for m in sample) != counts:
            raise ValueError(f"sample {b}: chunk counts {tuple(len(m) for m in sample)} "
                             f"differ from the plan's {counts}")
        g = b // per_group
        for m in sample:
            if tuple(m.shape[1:]) != tuple(feature_shape):
                raise ValueError(f"sample {b}: log-mel chunks of shape {m.shape[1:]}, expected {feature_shape}")
            start = g * plan.chunk_rows + used[g]
            out[start:start + len(m)] = m
            used[g] += len(m)
    return out
