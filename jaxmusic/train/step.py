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

Gradients cross the replica axes (`jaxmusic.sharding.replica_axes`: ``data``, the axis
between nodes) once per step. Each replica differentiates its own rows with respect to its
own copy of the trainable parameters (`jax.vmap` over the replicas, the copies split over
them, so no copy is ever gathered) and adds up its gradients over the microbatches; the
copies' sums are added after the last microbatch. A loss therefore sees one replica's rows
of a microbatch: its `total` and `weight` must be sums over rows (any normaliser that
spans rows, e.g. a microbatch's token count, must come from the batch). Inside a replica,
FSDP reduce-scatters each microbatch's gradients over ``fsdp``: holding them unreduced
there too would take a whole copy of the trainable gradients per device.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxmusic import sharding
from jaxmusic.audio import log_mel_jax
from jaxmusic.losses import LossFn
from jaxmusic.nn import ModelOptions
from jaxmusic.train import optim


def _where(pred, new, old):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def _pin_carry(model, carry):
    """`model` with its layer scans pinning the residual stream to `carry` (`ModelOptions.carry_sharding`)."""
    for _, module in nnx.iter_modules(model):
        opts = getattr(module, "opts", None)
        if isinstance(opts, ModelOptions):
            module.opts = dataclasses.replace(opts, carry_sharding=carry)
    return model


def _log_mels_where_they_lie(mesh, n_mels: int):
    """`wave [slots, samples] -> mel [slots, n_mels, frames]`, each device transforming its own
    slots. XLA's SPMD partitioner does not split a real FFT over its batch dimensions: left to
    it, every device gathers the microbatch's waveforms (72 MB per microbatch at MuFun's size,
    over all 16 GPUs of 2 nodes) and transforms all of them."""
    return jax.shard_map(lambda wave: log_mel_jax(wave, n_mels), mesh=mesh,
                         in_specs=sharding.batch_sharding(mesh, 2, microbatched=False).spec,
                         out_specs=sharding.batch_sharding(mesh, 3, microbatched=False).spec)


def make_train_step(graphdef: nnx.GraphDef, trainable: frozenset, tx: optax.GradientTransformation,
                    loss_fn: LossFn, *, param_shardings, opt_shardings, batch_shardings, metric_sharding):
    """`step(params, opt_state, batch) -> (params, opt_state, metrics)`, jitted, state donated.

    Only the `trainable` entries of `params` are differentiated and updated; the others are
    returned as they came in. A step whose loss or gradient norm is not finite changes
    nothing (params and optimizer state stay as they were) and reports `finite = False`;
    the trainer then stops or carries on, per the stage's `nan_policy`.
    """
    mesh = metric_sharding.mesh
    replicas, n = sharding.replica_axes(mesh), sharding.replica_count(mesh)
    copy_shardings = optim.split(jax.tree.map(sharding.per_replica, param_shardings), trainable)
    # inside a replica, the residual stream's rows are split over the other batch axes only
    carry = sharding.within_replica(sharding.activation_sharding(mesh))

    def micro_loss(train, frozen, microbatch):
        model = _pin_carry(nnx.merge(graphdef, optim.merge(train, frozen)), carry)
        total, weight, sums = loss_fn(model, microbatch)
        return total, (weight, sums)

    replica_grads = jax.vmap(jax.value_and_grad(micro_loss, has_aux=True), spmd_axis_name=replicas or None)

    def by_replica(x):
        """A microbatch array `[rows, ...]` as `[replicas, rows of each, ...]` (no data moves)."""
        x = x.reshape(n, x.shape[0] // n, *x.shape[1:])
        return jax.lax.with_sharding_constraint(
            x, sharding.per_replica(sharding.batch_sharding(mesh, x.ndim - 1, microbatched=False)))

    def step(params, opt_state, batch):
        train, frozen = optim.split(params, trainable)
        n_mels = nnx.merge(graphdef, params).whisper.cfg.num_mel_bins
        # every replica's own copy of every parameter (a view: each device holds its shard once);
        # copies of the frozen ones too, so that every array in a replica's computation carries
        # the replica axis (a frozen token embedding looked up with per-replica ids is otherwise
        # gathered between the replicas)
        copies, frozen_copies = jax.lax.with_sharding_constraint(
            jax.tree.map(lambda p: jnp.broadcast_to(p, (n, *p.shape)), (train, frozen)), copy_shardings)

        def accumulate(grads, microbatch):
            if "wave" in microbatch:
                microbatch = {**{k: v for k, v in microbatch.items() if k != "wave"},
                              "mel": _log_mels_where_they_lie(mesh, n_mels)(microbatch["wave"])}
            (total, (weight, sums)), g = replica_grads(copies, frozen_copies, jax.tree.map(by_replica, microbatch))
            grads = jax.lax.with_sharding_constraint(jax.tree.map(jnp.add, grads, g), copy_shardings[0])
            return grads, {"total": total, "weight": weight, "sums": sums}  # per replica: summed after the loop

        grads, stats = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, copies), batch)
        grads = jax.tree.map(lambda g: g.sum(0), grads)  # the step's one reduction over the replicas
        stats = jax.tree.map(jnp.sum, stats)
        tokens = batch["attention_mask"].sum() + (batch["completion_mask"].sum() if "completion_mask" in batch else 0)
        counts = {"tokens": tokens, "audio_tokens": batch["is_audio"].sum(),
                  "audio_chunks": batch["chunk_mask"].sum() if "chunk_mask" in batch else -1}
        weight = jnp.maximum(stats["weight"], 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        loss = stats["total"] / weight
        grad_norm = optax.global_norm(grads)
        updates, new_opt_state = tx.update(grads, opt_state, train)
        new_train = optax.apply_updates(train, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_train = _where(finite, new_train, train)
        new_opt_state = _where(finite, new_opt_state, opt_state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "loss_tokens": stats["weight"],
                   **counts, **{k: v / weight for k, v in stats["sums"].items()}}
        return optim.merge(new_train, frozen), new_opt_state, metrics

    return jax.jit(step, in_shardings=(param_shardings, opt_shardings, batch_shardings),
                   out_shardings=(param_shardings, opt_shardings, metric_sharding),
                   donate_argnums=(0, 1))
