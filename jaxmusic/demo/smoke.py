"""`jaxmusic smoke`: both backbones on tiny random weights, end to end, timed.

It proves the install works (JAX, Flax, the models, jit, the KV-cache decode) in
seconds, before any checkpoint is downloaded.
"""

from __future__ import annotations

import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from jaxmusic.generate import generate
from jaxmusic.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from jaxmusic.models.whisper import WhisperEncoder, WhisperEncoderConfig
from jaxmusic.nn import ModelOptions

CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "tiny_backbones.yaml"


def _timed(label: str, fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    print(f"  {label:<34} {time.perf_counter() - t0:7.2f} s")
    return out


def run(seconds: float = 5.0, config: pathlib.Path = CONFIG) -> None:
    cfg = yaml.safe_load(config.read_text())
    opts = ModelOptions()
    wcfg = WhisperEncoderConfig.from_hf(cfg["whisper"])
    lcfg = Qwen3Config.from_hf(cfg["llm"])
    print(f"jaxmusic smoke on {jax.devices()[0].platform}: tiny random backbones from {config.name}")
    encoder = WhisperEncoder(wcfg, opts, nnx.Rngs(0))
    llm = Qwen3ForCausalLM(lcfg, opts, nnx.Rngs(1))

    # A tone of `seconds` seconds, as log-mel-like input of one 30 s chunk.
    frames = 2 * wcfg.max_source_positions
    t = np.arange(frames) / frames
    mel = np.sin(2 * np.pi * np.outer(np.arange(1, wcfg.num_mel_bins + 1), t) * seconds)
    mel = jnp.asarray(mel[None], jnp.float32)

    enc = nnx.jit(lambda m, x: m(x))
    hidden = _timed("encoder (compile + run)", lambda: enc(encoder, mel))
    hidden = _timed("encoder (run)", lambda: enc(encoder, mel))
    print(f"  encoder hidden states {tuple(hidden.shape)}")

    ids = jnp.arange(64, dtype=jnp.int32)[None] % lcfg.vocab_size
    positions = jnp.arange(64, dtype=jnp.int32)[None]
    fwd = nnx.jit(lambda m, i, p: m(m.embed(i), p)[0])
    logits = _timed("LM forward (compile + run)", lambda: fwd(llm, ids, positions))
    print(f"  LM logits {tuple(logits.shape)}")

    tokens = _timed("greedy decode, 16 tokens", lambda: generate(
        llm, llm.embed(ids), jnp.array([64]), max_new_tokens=16))
    print(f"  generated {np.asarray(tokens)[0].tolist()}")
    print("smoke run ok")
