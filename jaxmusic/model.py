"""The whole MuFun model as one NNX module: `whisper` encoder, `connector`, `llm`.

The attribute names are the checkpoint's part names, so `nnx.state(model)` has the same
tree as a jaxmusic checkpoint (`{"whisper": ..., "connector": ..., "llm": ...}`) and the
trainable-set regexes of the stage configs read naturally (`^connector/`, `^whisper/`).
The glue itself (fusion, pooling, connector, splice) stays in `jaxmusic.mufun` as pure
functions; this module only owns parameters and wires them together.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmusic import mufun
from jaxmusic.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from jaxmusic.models.whisper import WhisperEncoder, WhisperEncoderConfig
from jaxmusic.nn import ModelOptions


class Connector(nnx.Module):
    """The two-layer connector's parameters (initialised by `mufun.connector_init`)."""

    def __init__(self, cfg: mufun.MuFunConfig, d_enc: int, d_llm: int, opts: ModelOptions, rngs: nnx.Rngs):
        d_in, d_hidden, d_out = cfg.connector_dims(d_enc, d_llm)
        params = mufun.init_connector(cfg, rngs.params(), d_enc, d_llm, opts.param_dtype)
        axes = {"linear1": ("audio_embed", "connector_mlp"), "linear2": ("connector_mlp", "embed")}
        for name, p in params.items():
            setattr(self, name, nnx.Dict(kernel=nnx.Param(p["kernel"], axes=axes[name]),
                                         bias=nnx.Param(p["bias"], axes=axes[name][1:])))
        self.dtype = opts.dtype

    def params(self) -> dict:
        return {name: {"kernel": getattr(self, name)["kernel"][...], "bias": getattr(self, name)["bias"][...]}
                for name in ("linear1", "linear2")}

    def __call__(self, x):
        return mufun.connector_apply(self.params(), x, self.dtype)


class MuFun(nnx.Module):
    def __init__(self, whisper_cfg: WhisperEncoderConfig, llm_cfg: Qwen3Config, cfg: mufun.MuFunConfig,
                 opts: ModelOptions, rngs: nnx.Rngs):
        cfg.check_encoder_depth(whisper_cfg.n_layers)
        self.cfg = cfg
        self.whisper = WhisperEncoder(whisper_cfg, opts, rngs)
        self.connector = Connector(cfg, whisper_cfg.d_model, llm_cfg.hidden_size, opts, rngs)
        self.llm = Qwen3ForCausalLM(llm_cfg, opts, rngs)

    def audio_embeddings(self, mel):
        """Log-mel chunks `[N, n_mels, frames]` -> audio tokens `[N, frames/2/pool, d_llm]`."""
        return mufun.audio_embeddings(self.whisper, self.connector.params(), mel, self.cfg,
                                      dtype=self.connector.dtype)

    def inputs_embeds(self, mel, input_ids, audio_index, is_audio, *, groups: int = 1):
        """The LLM input for a batch laid out by `mufun.build_splice_plan`."""
        text = self.llm.embed(input_ids)
        return mufun.splice(text, self.audio_embeddings(mel), audio_index, is_audio, groups=groups)

    def __call__(self, mel, input_ids, audio_index, is_audio, positions, *, mask=None, groups: int = 1):
        """Logits `[B, L, vocab]` of a spliced batch (no cache; for training and scoring)."""
        embeds = self.inputs_embeds(mel, input_ids, audio_index, is_audio, groups=groups)
        logits, _ = self.llm(embeds, positions, mask=mask)
        return logits


def token_log_likelihoods(logits, labels, ignore_index: int = mufun.IGNORE_INDEX):
    """Per-position log p(label) of next-token prediction, 0 where ignored.

    Uses the Hugging Face label convention: `labels[b, t]` is predicted by `logits[b, t-1]`.
    Returns `(logp [B, L-1], valid [B, L-1])` in float32.
    """
    targets = labels[:, 1:]
    valid = targets != ignore_index
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, picked, 0.0), valid
