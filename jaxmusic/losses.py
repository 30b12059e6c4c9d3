"""Log-likelihoods and training losses: pure functions of (model or logits, arrays).

`token_log_probs` is the one log-likelihood computation of jaxmusic: `jaxmusic score`,
`jaxmusic eval --mode loglik` and the training loss all read it. It is `picked logit -
logsumexp(logits)` in float32, so neither a float32 log-softmax of the `[B, L, vocab]` logits
nor a shifted copy of them is ever materialised.

A *training loss* `loss_fn(model, microbatch) -> (total, weight, sums)` returns a sum over
tokens, the number it is to be divided by (e.g. answer tokens) and extra metric sums; the
train step (`jaxmusic.train.step`) divides the sum over all microbatches and devices by the
summed weight, so the loss is the mean over every answer token of the global batch. A new
loss is a function here and a name in `LOSSES`; a stage picks it with `loss: NAME`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxmusic.audio import log_mel_jax
from jaxmusic.data.packing import segment_attention_mask
from jaxmusic.models.splice_plan import IGNORE_INDEX

LossFn = Callable[[Any, dict], tuple[jax.Array, jax.Array, dict]]


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) under `logits [..., V]` for int `targets [...]` (valid ids), in float32."""
    x = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(x, axis=-1)


def next_token_log_probs(logits: jax.Array, labels: jax.Array):
    """Next-token log-likelihoods `[B, L]` (0 where ignored) and the valid mask.

    Hugging Face's label convention: `labels[:, t]` (or IGNORE_INDEX) is predicted by
    `logits[:, t - 1]`, so position t of the result scores `labels[:, t + 1]` and the last
    position scores nothing.
    """
    targets = jnp.pad(labels[:, 1:], ((0, 0), (0, 1)), constant_values=IGNORE_INDEX)
    valid = targets != IGNORE_INDEX
    return jnp.where(valid, token_log_probs(logits, jnp.where(valid, targets, 0)), 0.0), valid


# ------------------------------------------------------------------------- training losses

def log_mels(microbatch: dict, n_mels: int) -> jax.Array:
    """A microbatch's chunk slots as `n_mels`-bin log-mels: given, or made from waveforms on the device."""
    return microbatch["mel"] if "mel" in microbatch else log_mel_jax(microbatch["wave"], n_mels)


def batch_logits(model, batch: dict) -> jax.Array:
    """The model on one microbatch (`jaxmusic.train.step` layout). Without `segment_ids` no
    mask is built: with right padding a causal query never sees the padding after it."""
    mask = segment_attention_mask(batch["segment_ids"]) if "segment_ids" in batch else None
    mel = log_mels(batch, model.whisper.cfg.num_mel_bins)
    return model(mel, batch["input_ids"], batch["audio_index"], batch["is_audio"], batch["positions"],
                 mask=mask, groups=batch["input_ids"].shape[0])  # one splice group per row


def cross_entropy(model, batch: dict):
    """Supervised loss: summed cross-entropy over answer tokens (labels != -100)."""
    logits = batch_logits(model, batch)
    with jax.named_scope("loss"):
        logp, valid = next_token_log_probs(logits, batch["labels"])
        return -logp.sum(), valid.sum().astype(jnp.float32), {}


LOSSES: dict[str, LossFn] = {"cross_entropy": cross_entropy}
