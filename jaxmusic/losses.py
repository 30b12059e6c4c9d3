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
from jaxmusic.models.mufun import splice
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


# ------------------------------------------------------------------------------- GRPO

def group_advantages(rewards: jax.Array, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> jax.Array:
    """Group-relative advantages of rewards `[R]` in consecutive groups of `group_size`.

    `(r - mean_group) / (std_group + eps)` with the unbiased standard deviation (TRL computes
    it with `torch.std`); `scale=False` keeps `r - mean_group` (Dr. GRPO). A group whose
    rewards are all equal gets advantage 0: it carries no signal.
    """
    r = rewards.astype(jnp.float32).reshape(-1, group_size)
    centred = r - r.mean(axis=1, keepdims=True)
    if scale:
        centred = centred / (r.std(axis=1, ddof=1, keepdims=True) + eps)
    return centred.reshape(-1)


def grpo_objective(logp, old_logp, advantages, mask, *, ref_logp=None, microbatch_tokens=None,
                   epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0, aggregation: str = "bnpo"):
    """The clipped surrogate of a microbatch as the train step's `(total, weight, sums)`.

    logp, old_logp, mask `[B, N]`: per-token log-probs of the completions under the policy being
    trained and the one that sampled them, and which tokens are completion tokens; advantages
    `[B]`. Per token: `-min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A)`, plus
    `beta` times the k3 estimate of KL(policy || reference) when `beta > 0` (`ref_logp` given).

    The step divides the sum of `total` over microbatches by the sum of `weight`, so:

    * bnpo: total = this microbatch's token sum / its completion tokens, weight 1: the mean over
      microbatches of per-microbatch token means (TRL's "bnpo" normalises per local batch; here
      a microbatch counts its tokens on every device together, so the loss does not depend on
      the number of devices). The train step hands each data-parallel replica its own rows
      (`jaxmusic.train.step`), so the microbatch's count comes per row from the batch
      (`microbatch_tokens [B]`; default: this call's rows are the whole microbatch) and the
      weight is these rows' share of it, which adds up to 1 over the replicas;
    * token_mean: the token sum, weight = completion tokens: the mean over all tokens of the
      step (DAPO);
    * sequence_mean: the sum over completions of each one's token mean, weight = completions
      (GRPO's paper);
    * dr_grpo: the token sum / N (the maximum completion length), weight = completions (Dr. GRPO).

    `sums` (each divided by the same weight in the step, so their ratios are exact): completion
    tokens, clipped tokens, and the KL sum when `beta > 0`.
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    m = mask.astype(jnp.float32)
    ratio = jnp.exp(logp - old_logp)
    adv = advantages.astype(jnp.float32)[:, None]
    per_token = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - epsilon, 1 + eps_high) * adv)
    clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    sums = {"completion_tokens": m.sum(), "clipped": (clipped * m).sum()}
    if beta:
        delta = ref_logp - logp
        kl = jnp.exp(delta) - delta - 1
        per_token = per_token + beta * kl
        sums["kl"] = (kl * m).sum()
    tokens = m.sum()
    per_row = (per_token * m).sum(axis=1)
    rows = (m.sum(axis=1) > 0).sum().astype(jnp.float32)
    if aggregation == "bnpo":
        whole = jnp.broadcast_to(tokens if microbatch_tokens is None else microbatch_tokens, per_row.shape)
        whole = jnp.maximum(whole.astype(jnp.float32), 1.0)
        return (per_row / whole).sum(), (m.sum(axis=1) / whole).sum(), sums
    if aggregation == "token_mean":
        return per_row.sum(), tokens, sums
    if aggregation == "sequence_mean":
        return (per_row / jnp.maximum(m.sum(axis=1), 1.0)).sum(), rows, sums
    if aggregation == "dr_grpo":
        return per_row.sum() / mask.shape[1], rows, sums
    raise ValueError(f"unknown aggregation {aggregation!r}")


def completion_log_probs(model, batch: dict, group_size: int):
    """Per-token log-probs and entropies `[B, N]` of a GRPO microbatch's completions.

    Layout (`jaxmusic.train.rollout`): the microbatch's P prompts as right-padded rows (`input_ids`,
    `positions`, `audio_index`, `is_audio`, `attention_mask` `[P, T]`, with their chunk slots;
    one splice group per row) and their completions `completion [B, N]`, B = P * `group_size`,
    a prompt's completions consecutive. As in the sampler, the LLM runs each prompt once, and
    every completion attends to its prompt's keys and values, read in place
    (`hidden_shared_prompts`), so a prompt's compute is spent once per group, not once per
    completion: completion token i has RoPE position `len + i` and sees the prompt's tokens (not
    its padding) and the completion before it. With a frozen encoder the batch holds its output
    as the sampler computed it (`audio_features`) instead of the audio. Logits are computed for
    the N positions that predict the completion only (MuFun's vocabulary is 152k).
    """
    if "audio_features" in batch:
        audio = model.connector(batch["audio_features"])
    else:
        audio = model.audio_embeddings(log_mels(batch, model.whisper.cfg.num_mel_bins))
    llm = model.llm
    prompts, t = batch["input_ids"].shape
    n = batch["completion"].shape[1]
    embeds = splice(llm.embed(batch["input_ids"]), audio, batch["audio_index"], batch["is_audio"], groups=prompts)
    valid = batch["attention_mask"].astype(bool)
    lengths = valid.sum(axis=1)
    positions = jnp.repeat(lengths, group_size)[:, None] + jnp.arange(n)
    h, h_completion = llm.hidden_shared_prompts(embeds, batch["positions"], valid, llm.embed(batch["completion"]),
                                                positions)
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)  # predicts completion token 0
    h = jnp.concatenate([jnp.repeat(last, group_size, axis=0), h_completion[:, :-1]], axis=1)
    logits = llm.logits(h).astype(jnp.float32)
    with jax.named_scope("loss"):
        logp = token_log_probs(logits, batch["completion"])
        fixed = jax.lax.stop_gradient(logits)  # the entropy is a metric
        entropy = jax.nn.logsumexp(fixed, axis=-1) - (jax.nn.softmax(fixed, axis=-1) * fixed).sum(-1)
    return logp, entropy


def grpo(model, batch: dict, *, group_size: int = 8, epsilon: float = 0.2, epsilon_high: float | None = None,
         beta: float = 0.0, aggregation: str = "bnpo"):
    """GRPO's loss on a microbatch of rollouts (`grpo_objective`; layout: `completion_log_probs`).

    Extra keys: `completion [B, N]`, `completion_mask [B, N]`, `advantages [B]`, and
    `microbatch_tokens [B]` (`grpo_objective`), `old_logp [B, N]` (with more than one update per
    batch of rollouts; otherwise the sampling policy is the current one and the ratio is 1 with
    the gradient of REINFORCE with a group baseline), `ref_logp [B, N]` when `beta > 0`. The
    trainer binds the settings from `grpo:`.
    """
    logp, entropy = completion_log_probs(model, batch, group_size)
    old = batch["old_logp"] if "old_logp" in batch else jax.lax.stop_gradient(logp)
    mask = batch["completion_mask"]
    with jax.named_scope("loss"):
        total, weight, sums = grpo_objective(logp, old, batch["advantages"], mask, ref_logp=batch.get("ref_logp"),
                                             microbatch_tokens=batch.get("microbatch_tokens"), epsilon=epsilon,
                                             epsilon_high=epsilon_high, beta=beta, aggregation=aggregation)
    return total, weight, {**sums, "entropy": (entropy * mask).sum()}


LOSSES: dict[str, LossFn] = {"cross_entropy": cross_entropy, "grpo": grpo}
