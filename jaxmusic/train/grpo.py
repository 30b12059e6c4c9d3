"""What a `loss: grpo` stage adds to the trainer: rollouts and rewards make each step's batch.

MuFun's F2 (arXiv 2508.01178; scripts/grpo.sh and train_grpo.py of its released code, on
TRL 0.19's GRPOTrainer) trains the LLM and the connector with Group Relative Policy
Optimisation. A step here:

1. reads `batch.global_batch / grpo.generations` prompts (the data pipeline's prompt mode: the
   conversation up to its last `"ASSISTANT: "`, the last answer kept as the ground truth);
2. samples `grpo.generations` completions per prompt with the jitted KV-cache sampler on the
   training mesh, from the parameters being trained (`jaxmusic.train.rollout`);
3. decodes them, scores them with the stage's reward functions (`jaxmusic.rewards`) on the host,
   and turns the rewards into group advantages on the device;
4. trains on them with `jaxmusic.losses.grpo` in the ordinary train step.

With `grpo.iterations` M > 1 a batch of rollouts serves M updates, with the log-probs of the
policy that sampled it stored; checkpoints are then written only between two such batches
(a preemption notice finishes the current batch's updates first), so a resumed run never
needs parameters it did not save. Rollouts are a function of (seed, step), the data order is
the pipeline's, and a reference model (beta > 0) is the stage's initial parameters loaded again:
resuming is exact with nothing more in a checkpoint.

Metrics (`metrics.jsonl`, TensorBoard): reward mean and spread, overall and per function; the
share of groups whose rewards are all equal (no signal); completion length (mean, max, share
truncated at `max_new_tokens`); clip fraction, KL (beta > 0), entropy; rollout tokens per second
and the split of the step's time between rollout and update (the last step's update is not timed). `samples.jsonl` gets a few
completions with their rewards every `grpo.samples_every` steps.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import numpy as np

from jaxmusic import rewards as rewards_lib
from jaxmusic import sharding
from jaxmusic.data.pipeline import PROMPT_FIELDS
from jaxmusic.generate import Completion
from jaxmusic.losses import grpo as grpo_loss
from jaxmusic.templates import stop_ids
from jaxmusic.train import optim, rollout
from jaxmusic.train.batches import next_batch
from jaxmusic.train.config import ConfigError


def programs(setup, weights, stop: tuple[int, ...], pad_id: int):
    """`(sample, finish, loss_fn)` of a GRPO stage (`jaxmusic.train.rollout`'s sampler and finisher,
    the bound `jaxmusic.losses.grpo`), for the trainer's `Setup`, reward `weights` and the
    tokenizer's stop and pad ids. `jaxmusic plan` compiles them as the trainer runs them."""
    g = setup.stage.grpo
    settings = rollout.Sampling(g.generations, g.max_new_tokens, g.temperature, g.top_p, g.top_k, tuple(stop), pad_id)
    frozen_encoder = not any(path[0] == "whisper" for path in setup.trainable)
    sample = rollout.sampler(setup.graphdef, settings, setup.mesh, frozen_encoder=frozen_encoder)
    finish = rollout.finisher(setup.graphdef, setup.trainable, setup.mesh, generations=g.generations,
                              weights=weights, aggregation=g.aggregation, old_logp=g.iterations > 1, beta=g.beta)
    loss_fn = functools.partial(grpo_loss, group_size=g.generations, epsilon=g.epsilon,
                                epsilon_high=g.epsilon_high, beta=g.beta, aggregation=g.aggregation)
    return sample, finish, loss_fn


class GRPO:
    """The rollout side of a GRPO stage; `jaxmusic.train.trainer` calls `batch`, `record` and `boundary`."""

    def __init__(self, setup, stage_dir: Path, source, load_init, *, primary: bool = True):
        """`setup`: the trainer's `Setup`; `source`: the stage's prompt iterator; `load_init()`:
        the stage's initial parameters (read again for the reference when beta > 0)."""
        from transformers import AutoTokenizer

        stage, g = setup.stage, setup.stage.grpo
        self.s, self.g, self.source = setup, g, source
        self.rewards = rewards_lib.resolve(g.rewards)
        prompts = setup.micro_rows // g.generations
        shards = sharding.data_parallel_size(setup.mesh)
        if prompts % shards:
            raise ConfigError(f"grpo: {prompts} prompts per microbatch (batch.microbatch / grpo.generations) must "
                              f"divide into the {shards} data-parallel shards of mesh {dict(setup.mesh.shape)}, "
                              "so that every shard holds whole groups")
        self.prompts = prompts
        self.tokenizer = AutoTokenizer.from_pretrained(stage.data.tokenizer, local_files_only=True)
        self.sample, self.finish, self.loss_fn = programs(
            setup, [r.weight for r in self.rewards], stop_ids(self.tokenizer), int(self.tokenizer.pad_token_id or 0))
        # the reference: trainable parameters only (the frozen rest is the same), no optimizer state
        self.reference = optim.split(load_init(), setup.trainable)[0] if g.beta else {}
        self.samples = open(stage_dir / "samples.jsonl", "a") if primary and g.samples_every else None
        self._batch, self._stats, self._stop, self._update_time = None, {}, False, None

    # -------------------------------------------------------------------- the trainer's hooks

    def batch(self, step: int, params) -> dict:
        """The train step's batch for step `step` (0-based): new rollouts every `iterations` steps."""
        # called right after the previous update was dispatched: waiting for it times it
        t0 = time.perf_counter()
        jax.block_until_ready(params)
        self._update_time = time.perf_counter() - t0
        if step % self.g.iterations == 0 or self._batch is None:
            t0 = time.perf_counter()
            self._batch = None  # its arrays may go while the next batch is made
            self._batch, self._stats[step] = self._rollout(step, params)
            self._stats[step]["rollout_time"] = time.perf_counter() - t0
        return self._batch

    def record(self, step: int, metrics: dict) -> dict:
        """Metrics of step `step` (1-based) for the trainer's record: its rollouts' and its update's."""
        rolled = max(k for k in self._stats if k < step)
        self._stats = {k: v for k, v in self._stats.items() if k >= rolled}
        out = dict(self._stats[rolled])
        if rolled != step - 1:  # a batch of rollouts serving another update
            out["rollout_time"] = 0.0
        if self._update_time is not None:  # timed when the next batch was asked for: not after the last step
            out["update_time"], self._update_time = self._update_time, None
        tokens = max(float(metrics["completion_tokens"]), 1e-9)
        out["clip_fraction"] = float(metrics["clipped"]) / tokens
        out["entropy"] = float(metrics["entropy"]) / tokens
        if self.g.beta:
            out["kl"] = float(metrics["kl"]) / tokens
        return out

    def boundary(self, step: int, preempted: bool) -> tuple[bool, bool]:
        """`(may save, stop now)` after step `step`: only between two batches of rollouts."""
        self._stop |= preempted
        at = step % self.g.iterations == 0
        return at, at and self._stop

    def close(self) -> None:
        if self.samples:
            self.samples.close()

    # -------------------------------------------------------------------- a batch of rollouts

    def _prompts(self, step: int) -> tuple[dict, list[dict]]:
        """The step's prompt microbatches (global, left-aligned) and their host fields, per microbatch."""
        fields = []

        def arrays():
            for mb in self.source:
                fields.append({k: mb.pop(k) for k in PROMPT_FIELDS})
                yield rollout.left_align(mb)

        prompts = next_batch(arrays(), self.s.stage.accumulation, self.s.mesh, self.prompts, step, packing=False)
        return prompts, fields

    def _rollout(self, step: int, params) -> tuple[dict, dict]:
        g = self.g
        prompts, fields = self._prompts(step)
        key = jax.random.fold_in(jax.random.key(g.seed), step)
        t0 = time.perf_counter()
        tokens, lengths, stopped, features = self.sample(params, prompts, key)
        local = {k: sharding.to_local(v) for k, v in (("tokens", tokens), ("lengths", lengths), ("stopped", stopped))}
        sampling = time.perf_counter() - t0
        # local rows are ordered (prompt, microbatch, completion), as the sampler's
        a, n_prompts = len(fields), len(fields[0]["answer"])
        where = [(a_i, p_i) for p_i in range(n_prompts) for a_i in range(a) for _ in range(g.generations)]
        texts = [Completion(self.tokenizer.decode(ids[:n], skip_special_tokens=True), bool(done))
                 for ids, n, done in zip(local["tokens"], local["lengths"], local["stopped"])]
        host = {k: [fields[a_i][k][p_i] for a_i, p_i in where] for k in PROMPT_FIELDS}
        real = [i for i, answer in enumerate(host["answer"]) if answer is not None]  # padding rows score 0
        scores = np.zeros((len(texts), len(self.rewards)), np.float32)
        if real:
            pick = lambda key: [host[key][i] for i in real]  # noqa: E731
            scores[real] = rewards_lib.score(self.rewards, pick("prompt"), [texts[i] for i in real], pick("answer"),
                                             pick("record"))
        rows = self.prompts * a * g.generations
        global_scores = sharding.to_global(self.s.mesh, {"r": scores}, {"r": rows}, microbatched=False)["r"]
        batch, stats = self.finish(params, self.reference, prompts, tokens, lengths, stopped, features, global_scores)
        stats = {k: float(v) for k, v in jax.device_get(stats).items()}
        for j, r in enumerate(self.rewards):
            stats[f"reward/{r.name}"] = stats.pop(f"reward_{j}")
            stats[f"reward/{r.name}_std"] = stats.pop(f"reward_{j}_std")
        stats["rollout_tokens_per_s"] = stats.pop("generated_tokens") / max(sampling, 1e-9)
        if self.samples and step % g.samples_every == 0:
            self._log_samples(step, host, texts, scores)
        return batch, stats

    def _log_samples(self, step: int, host: dict, texts: list, scores: np.ndarray) -> None:
        for i in range(min(self.g.samples, len(texts))):
            if host["answer"][i] is None:
                continue
            question = host["record"][i]["conversations"][-2]["value"]
            self.samples.write(json.dumps({
                "step": step + 1, "question": question, "answer": host["answer"][i], "completion": str(texts[i]),
                "terminated": texts[i].terminated,
                "rewards": {r.name: float(scores[i, j]) for j, r in enumerate(self.rewards)}}) + "\n")
        self.samples.flush()
