"""Trainable/frozen split, learning-rate schedule and AdamW.

Parameters live in one pure dict `{"whisper": ..., "connector": ..., "llm": ...}` (the
checkpoint's tree). A stage's `trainable` regexes select entries by their path string
`part/a/b/leaf` (e.g. `^connector/`, `^llm/layers/`); only `nnx.Param`s can be trainable
(Whisper's fixed position table is an `nnx.Variable` of another type). The selected
entries form the *trainable* subtree, which alone gets gradients and optimizer state;
the rest (*frozen*) is passed through the step untouched, so it stays bit-identical.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Mapping

import optax
from flax import nnx

from jaxmusic.train.config import ConfigError, OptimizerSection
from jaxmusic.trees import Path, flatten, unflatten



def path_str(path: Path) -> str:
    return "/".join(path)


def trainable_paths(abstract_state: nnx.State, patterns: Iterable[str]) -> frozenset[Path]:
    """Paths of the `nnx.Param`s matching any of `patterns` (`re.search` on `part/a/b`).

    A pattern that matches no parameter is an error (a typo would silently freeze it).
    """
    params = [tuple(str(k) for k in p) for p, v in nnx.to_flat_state(abstract_state)
              if isinstance(v, nnx.Param)]
    chosen: set[Path] = set()
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"trainable: bad regex {pattern!r} ({e})") from None
        hits = {p for p in params if regex.search(path_str(p))}
        if not hits:
            raise ConfigError(f"trainable: {pattern!r} matches no parameter (paths look like "
                              f"{path_str(params[0])!r})")
        chosen |= hits
    return frozenset(chosen)


def split(params: Mapping, trainable: frozenset[Path]) -> tuple[dict, dict]:
    """`(trainable subtree, frozen subtree)` of a nested params dict."""
    flat = flatten(params)
    return (unflatten({p: v for p, v in flat.items() if p in trainable}),
            unflatten({p: v for p, v in flat.items() if p not in trainable}))


def merge(a: Mapping, b: Mapping) -> dict:
    """Inverse of `split`."""
    return unflatten({**flatten(a), **flatten(b)})


def warmup_steps(opt: OptimizerSection, total_steps: int) -> int:
    if opt.warmup_steps is not None:
        return int(opt.warmup_steps)
    return math.ceil(total_steps * opt.warmup_ratio)  # transformers' Trainer rounds up too


def learning_rate(opt: OptimizerSection, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then cosine / linear decay to `end_lr_ratio * lr`, or constant.

    Step k (0-based count of applied updates) uses `schedule(k)`, as transformers'
    `get_cosine_schedule_with_warmup`: the first update has lr 0 when there is warmup.
    """
    warm = min(warmup_steps(opt, total_steps), total_steps)
    decay_steps = max(total_steps - warm, 1)
    if opt.schedule == "cosine":
        decay = optax.cosine_decay_schedule(opt.lr, decay_steps, alpha=opt.end_lr_ratio)
    elif opt.schedule == "linear":
        decay = optax.linear_schedule(opt.lr, opt.lr * opt.end_lr_ratio, decay_steps)
    else:
        decay = optax.constant_schedule(opt.lr)
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, opt.lr, warm), decay], [warm])


def decays(path: Path) -> bool:
    """Weight decay on matrices and embeddings only, not on biases and norm scales.

    transformers' Trainer excludes biases and LayerNorm/RMSNorm weights the same way.
    """
    return path[-1] not in ("bias", "scale")


def lr_factors(opt: OptimizerSection, trainable: Iterable[Path]) -> dict[Path, float]:
    """`{path: factor}` for the trainable parameters that `opt.lr_scales` gives a factor other than 1.

    A regex that matches no trainable parameter is an error, as in `trainable`.
    """
    factors: dict[Path, float] = {}
    for pattern, factor in opt.lr_scales.items():
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"optimizer.lr_scales: bad regex {pattern!r} ({e})") from None
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor < 0:
            raise ConfigError(f"optimizer.lr_scales: factor for {pattern!r} must be a number >= 0, got {factor!r}")
        hits = [p for p in trainable if regex.search(path_str(p))]
        if not hits:
            raise ConfigError(f"optimizer.lr_scales: {pattern!r} matches no trainable parameter")
        for p in hits:
            factors.setdefault(p, float(factor))  # the first matching regex wins
    return {p: f for p, f in factors.items() if f != 1.0}


def adamw(opt: OptimizerSection, schedule: optax.Schedule,
          factors: Mapping[Path, float] | None = None) -> optax.GradientTransformation:
    """Global-norm clipping, AdamW with decoupled weight decay (torch.optim.AdamW's), then the
    per-parameter lr `factors` (`lr_factors`): scaling an AdamW update is scaling its lr."""
    decay_mask = lambda tree: unflatten({p: decays(p) for p in flatten(tree)})  # noqa: E731
    adam = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                       mask=decay_mask)
    parts = ([optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm else []) + [adam]
    if factors:
        parts.append(optax.stateless(lambda updates, params=None: unflatten(
            {p: u * factors[p] if p in factors else u for p, u in flatten(updates).items()})))
    return optax.chain(*parts) if len(parts) > 1 else adam
