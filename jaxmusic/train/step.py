"""The train step: one `jax.jit` for forward, backward, accumulation and the update.

A *batch* is a dict of arrays whose axis 0 is the microbatch (gradient accumulation)
axis and axis 1 the rows, sharded over the data-parallel mesh axes. Each microbatch is
laid out as `jaxmusic.data.packing` describes (B rows of L positions, C chunk slots per row,
one splice group per row):

    mel            float [A, B*C, n_mels, frames]   log-mel chunk slots (or `wave` [A, B*C, samples],
                                                    turned into log-mels on the device)
    chunk_mask     bool  [A, B*C]                   slots holding audio (optional; for metrics)
    input_ids, audio_index, positions, labels       int  [A, B, L]
    is_audio, attention_mask                        bool [A, B, L]
    segment_ids    int   [A, B, L]                  packed rows only: attention stays in a segment

The loss (`jaxmusic.losses`) returns a sum over tokens and the weight it is divided by;
the step divides the sum over all microbatches and devices by the summed weight: the mean
over every answer token of the global batch, never a mean of per-device means.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxmusic.losses import LossFn
from jaxmusic.train import optim


def _where(pred, new, old):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def make_train_step(graphdef: nnx.GraphDef, trainable: frozenset, tx: optax.GradientTransformation,
                    loss_fn: LossFn, *, param_shardings, opt_shardings, batch_shardings, metric_sharding):
    """`step(params, opt_state, batch) -> (params, opt_state, metrics)`, jitted, state donated.

    Only the `trainable` entries of `params` are differentiated and updated; the others are
    returned as they came in. A step whose loss or gradient norm is not finite changes
    nothing (params and optimizer state stay as they were) and reports `finite = False`;
    the trainer then stops or carries on, per the stage's `nan_policy`.
    """
    grad_shardings = optim.split(param_shardings, trainable)[0]

    def step(params, opt_state, batch):
        train, frozen = optim.split(params, trainable)

        def micro_loss(train, microbatch):
            model = nnx.merge(graphdef, optim.merge(train, frozen))
            total, weight, sums = loss_fn(model, microbatch)
            return total, (weight, sums)

        def accumulate(grads, microbatch):
            (total, (weight, sums)), g = jax.value_and_grad(micro_loss, has_aux=True)(train, microbatch)
            grads = jax.tree.map(jnp.add, grads, g)
            grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
            stats = {"total": total, "weight": weight, "sums": sums,
                     "tokens": microbatch["attention_mask"].sum(),
                     "audio_tokens": microbatch["is_audio"].sum()}
            if "chunk_mask" in microbatch:
                stats["audio_chunks"] = microbatch["chunk_mask"].sum()
            return grads, stats

        zeros = jax.tree.map(jnp.zeros_like, train)
        grads, stats = jax.lax.scan(accumulate, zeros, batch)
        stats = jax.tree.map(jnp.sum, stats)
        weight = jnp.maximum(stats["weight"], 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        loss = stats["total"] / weight
        grad_norm = optax.global_norm(grads)
        updates, new_opt_state = tx.update(grads, opt_state, train)
        new_train = optax.apply_updates(train, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_train = _where(finite, new_train, train)
        new_opt_state = _where(finite, new_opt_state, opt_state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite,
                   "loss_tokens": stats["weight"], "tokens": stats["tokens"],
                   "audio_tokens": stats["audio_tokens"], "audio_chunks": stats.get("audio_chunks", -1),
                   **{k: v / weight for k, v in stats["sums"].items()}}
        return optim.merge(new_train, frozen), new_opt_state, metrics

    return jax.jit(step, in_shardings=(param_shardings, opt_shardings, batch_shardings),
                   out_shardings=(param_shardings, opt_shardings, metric_sharding),
                   donate_argnums=(0, 1))
