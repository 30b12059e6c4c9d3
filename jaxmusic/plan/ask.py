"""`jaxmusic plan --ask`: does MuFun answering questions about songs fit one GPU, in bfloat16?

It compiles what `jaxmusic ask` runs, at the shapes `jaxmusic.inference` and
`jaxmusic.generate` give a batch of B requests of S seconds of audio each: the spliced
prompt embeddings (encoder, fusion, pooling, connector over the chunk slots of a chunk
bucket, the text in a length bucket), the prefill of the LLM over the prompt (padded to a
multiple of 64) into a KV cache with room for the answer, and one decode step, with the
weights in bfloat16 on one GPU. Each phase's peak is compared with XLA's pool; the decode
step's bandwidth bound is the bytes it must read (LLM weights and KV cache) over the HBM
bandwidth.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmusic import checkpoints
from jaxmusic.audio import CHUNK_SECONDS
from jaxmusic.generate import round_up
from jaxmusic.models.mufun import MuFun, MuFunConfig
from jaxmusic.models.qwen3 import Qwen3Config
from jaxmusic.models.whisper import WhisperEncoderConfig
from jaxmusic.nn import ModelOptions
from jaxmusic.plan.gpus import JAX_DEFAULT_FRACTION, Gpu, PlanError, cluster_devices
from jaxmusic.plan.train import captured_stderr, planning_stages
from jaxmusic.train import config as config_lib

# Text around the audio in an `ask` prompt: MuFun's qwen2_instruct system prompt and turn
# markers (~35 tokens) and a question (~30).
PROMPT_TEXT_TOKENS = 64
GENERATE_BUCKET = 64  # jaxmusic.generate.generate's default `bucket`


def inference_fraction() -> float:
    """`jaxmusic ask` runs with JAX's default pool (75% of the memory) unless told otherwise."""
    return float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", JAX_DEFAULT_FRACTION))


@dataclasses.dataclass
class AskPlan:
    batch: int
    audio_seconds: float
    prompt_tokens: int
    max_new_tokens: int
    weights: int
    cache: int
    embed_peak: int
    prefill_peak: int
    decode_peak: int
    decode_bytes: int
    pool: int
    hbm_bytes_per_s: float

    @property
    def peak(self) -> int:
        return max(self.embed_peak, self.prefill_peak, self.decode_peak)

    @property
    def fits(self) -> bool:
        return self.peak <= self.pool

    @property
    def tokens_per_s_bound(self) -> float:
        """Decode tokens/s per row if a step only streamed its bytes from HBM."""
        return self.hbm_bytes_per_s / self.decode_bytes

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "peak": self.peak, "fits": self.fits,
                "tokens_per_s_bound": self.tokens_per_s_bound}


def model_configs(source: str) -> tuple[WhisperEncoderConfig, Qwen3Config, MuFunConfig]:
    """The architecture of a jaxmusic checkpoint, or of the last stage of a stage/schedule file."""
    path = Path(source)
    if path.is_dir():
        meta = checkpoints.read_meta(path)
        parts = meta.get("parts", {})
        if "whisper" not in parts or "llm" not in parts:
            raise PlanError(f"{source}: not a whole MuFun checkpoint")
        return (WhisperEncoderConfig.from_hf(parts["whisper"]["hf_config"]),
                Qwen3Config.from_hf(parts["llm"]["hf_config"]), MuFunConfig.from_dict(meta.get("mufun", {})))
    # only the architecture matters: where the stages start from does not
    stage = planning_stages(config_lib.load(path, ["init.source=random", "init.path=null"]).stages, steps=1)[-1]
    return (WhisperEncoderConfig.from_hf(stage.model.whisper), Qwen3Config.from_hf(stage.model.llm),
            MuFunConfig.from_dict(stage.model.mufun))


def _bucket(n: int, buckets) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise PlanError(f"{n} exceeds the largest bucket {buckets[-1]} of the MuFun config")


def _peak(compiled) -> int:
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def plan_ask(source: str, gpu: Gpu, *, batch: int, audio_seconds: float, max_new_tokens: int,
             options: dict) -> AskPlan:
    whisper, llm, cfg = model_configs(source)
    bf16 = jnp.dtype(jnp.bfloat16)
    opts = ModelOptions(param_dtype=bf16, dtype=bf16, platform="gpu")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MuFun(whisper, llm, cfg, opts, nnx.Rngs(0))))
    device = cluster_devices(gpu, 1, 1)[0]
    on_gpu = jax.sharding.SingleDeviceSharding(device)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=on_gpu)  # noqa: E731
    state = jax.tree.map(lambda a: spec(a.shape, a.dtype), state)

    chunks_per_request = math.ceil(audio_seconds / CHUNK_SECONDS)
    frames = 2 * whisper.max_source_positions
    length = chunks_per_request * cfg.tokens_per_chunk(whisper.max_source_positions) + PROMPT_TEXT_TOKENS
    slots = _bucket(batch * chunks_per_request, cfg.chunk_buckets)
    text = (batch, _bucket(length, cfg.length_buckets))
    t_pad = round_up(length, GENERATE_BUCKET)
    cache_len = round_up(t_pad + max_new_tokens, GENERATE_BUCKET)

    def embed(state, mel, ids, audio_index, is_audio):
        return nnx.merge(graphdef, state).inputs_embeds(mel, ids, audio_index, is_audio)

    def prefill(state, embeds, lengths):
        model = nnx.merge(graphdef, state).llm
        positions = jnp.broadcast_to(jnp.arange(t_pad, dtype=jnp.int32), (batch, t_pad))
        h, cache = model.hidden(embeds, positions, valid=positions < lengths[:, None],
                                cache=model.init_cache(batch, cache_len), cache_index=0)
        last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return jnp.argmax(model.logits(last), axis=-1).astype(jnp.int32), cache

    def decode(state, cache, tokens, positions, index):
        model = nnx.merge(graphdef, state).llm
        h, cache = model.hidden(model.embed(tokens[:, None]), positions[:, None], cache=cache, cache_index=index)
        return jnp.argmax(model.logits(h[:, 0]), axis=-1).astype(jnp.int32), cache

    i32 = jnp.int32
    # every phase holds all the weights (keep_unused: jit would otherwise drop the encoder's from
    # the prefill's arguments, and from its memory figures, though they stay on the GPU)
    with captured_stderr([]):
        embed_c = jax.jit(embed, keep_unused=True).lower(
            state, spec((slots, whisper.num_mel_bins, frames), bf16), spec(text, i32), spec(text, i32),
            spec(text, jnp.bool_)).compile(options)
        prefill_c = jax.jit(prefill, keep_unused=True).lower(state, spec((batch, t_pad, llm.hidden_size), bf16),
                                           spec((batch,), i32)).compile(options)
        cache = jax.tree.map(lambda a: spec(a.shape, a.dtype), jax.eval_shape(
            prefill, state, spec((batch, t_pad, llm.hidden_size), bf16), spec((batch,), i32))[1])
        decode_c = jax.jit(decode, donate_argnums=1, keep_unused=True).lower(state, cache, spec((batch,), i32), spec((batch,), i32),
                                                           spec((), i32)).compile(options)
    weights = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state))
    llm_weights = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state["llm"]))
    table = llm.vocab_size * llm.hidden_size * bf16.itemsize  # embedding lookup reads one row per token
    cache_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
    return AskPlan(batch=batch, audio_seconds=audio_seconds, prompt_tokens=length, max_new_tokens=max_new_tokens,
                   weights=weights, cache=cache_bytes, embed_peak=_peak(embed_c), prefill_peak=_peak(prefill_c),
                   decode_peak=_peak(decode_c), decode_bytes=llm_weights - (0 if llm.tie_word_embeddings else table)
                   + cache_bytes, pool=int(gpu.memory_bytes * inference_fraction()),
                   hbm_bytes_per_s=gpu.hbm_bytes_per_s)
