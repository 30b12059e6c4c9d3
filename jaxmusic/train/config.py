"""Stage and schedule configuration: YAML files, dotted overrides, validation.

A *stage* file describes one training run (see `configs/stages/*.yaml` for documented
examples). A *schedule* file lists stages run in order, each starting from the
previous stage's result:

    stages:
      - name: p1                          # sub-folder of the workdir
        config: ../stages/p1_alignment.yaml   # relative to the schedule file
        overrides: {steps: 100}           # optional, same syntax as the command line

Command-line overrides `a.b.c=VALUE` (VALUE parsed as YAML) apply to every stage;
`stages.NAME.a.b=VALUE` to one stage only. Unknown keys are errors that name the key.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from jaxmusic.checkpoints.training import CheckpointSection
from jaxmusic.configs import ConfigError, load_yaml  # noqa: F401 (ConfigError re-exported)
from jaxmusic.data.config import DataConfig


@dataclasses.dataclass(frozen=True)
class ModelSection:
    # HF WhisperConfig / Qwen3Config fields, or the name of a file in jaxmusic/configs/models/
    # (e.g. whisper-large-v3, qwen3-8b); None: from the init checkpoint
    whisper: dict | str | None = None
    llm: dict | str | None = None
    # MuFunConfig fields (defaults: jaxmusic/configs/mufun.yaml), or the name of a glue file in
    # jaxmusic/configs/ (e.g. qwen2_audio: Qwen2-Audio's pooling, connector and template)
    mufun: dict | str = dataclasses.field(default_factory=dict)
    param_dtype: str = "float32"     # master weights and optimizer state
    dtype: str = "bfloat16"          # compute
    remat: str = "dots"              # jaxmusic.nn.REMAT_POLICIES
    attention: str = "auto"

    def __post_init__(self):
        if isinstance(self.mufun, str):  # read once here, so every user of the stage sees fields
            from jaxmusic.configs import ROOT

            object.__setattr__(self, "mufun", load_yaml(ROOT / f"{self.mufun}.yaml"))


WHISPER_POSITIONS = ("sinusoids", "zeros")


@dataclasses.dataclass(frozen=True)
class InitSection:
    # random: fresh weights (seed) | checkpoint: a jaxmusic checkpoint from convert/hf_to_jax.py
    # (parts it lacks, e.g. the connector, start random) | stage: the newest checkpoint of a
    # stage folder | previous: the previous stage of the schedule
    source: str = "random"
    path: str | None = None
    seed: int = 0
    # A random Whisper encoder's position table: "sinusoids" (Whisper's) | "zeros" (no absolute
    # positions; the demo's choice, see configs/stages/demo.yaml). Checkpoints carry their own.
    whisper_positions: str = "sinusoids"
    # Batches of the stage's data over which a random encoder's final layer norm is set so that
    # its output comes out standardised per feature (train.state.standardize_encoder_output);
    # 0: off. A random encoder's features are badly scaled (the demo's choice).
    standardize_encoder_output: int = 0


@dataclasses.dataclass(frozen=True)
class BatchSection:
    global_batch: int = 8            # rows per optimizer step, all devices together
    microbatch: int | None = None    # rows per forward/backward pass; accumulation = global / micro


@dataclasses.dataclass(frozen=True)
class OptimizerSection:
    lr: float = 2e-5
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    schedule: str = "cosine"         # cosine | linear | constant (after warmup)
    warmup_ratio: float = 0.03       # of the stage's steps, rounded up (as transformers' Trainer)
    warmup_steps: int | None = None  # overrides warmup_ratio
    end_lr_ratio: float = 0.0        # final lr / peak lr
    # {regex: factor}: a trainable parameter whose path (e.g. whisper/layers/fc1/weight) the
    # first listed regex matches learns at factor x lr (weight decay scales with it), like
    # TinyLLaVA's vision_tower_lr / mm_projector_lr; the rest at lr.
    lr_scales: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def shape(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}


@dataclasses.dataclass(frozen=True)
class LogSection:
    every_steps: int = 1             # console / JSONL / TensorBoard cadence
    tensorboard: bool = True
    progress: bool = True
    peak_tflops: float | None = None  # per device; default: known GPUs (see metrics.peak_flops)


AGGREGATIONS = ("bnpo", "token_mean", "sequence_mean", "dr_grpo")


@dataclasses.dataclass(frozen=True)
class GRPOSection:
    """Group Relative Policy Optimisation, read when `loss: grpo` (`jaxmusic.train.grpo`).

    Defaults are MuFun's F2 as its released code runs it (scripts/grpo.sh, train_grpo.py on
    TRL 0.19's GRPOTrainer). With `loss: grpo` the batch sizes count completions, as TRL's do:
    `batch.global_batch / generations` prompts per step, `batch.microbatch / generations` per
    microbatch, whole groups on every data-parallel shard.
    """

    generations: int = 8             # completions per prompt (a group)
    max_new_tokens: int = 256        # per completion
    max_prompt_tokens: int = 512     # prompt text tokens, each <audio> counting one; longer: left-truncated (TRL)
    temperature: float = 1.0
    top_p: float = 1.0               # 1.0: off
    top_k: int = 0                   # 0: off
    seed: int = 0                    # rollouts are a function of (seed, step)
    epsilon: float = 0.2             # the ratio is clipped to [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # None: epsilon; DAPO's clip-higher sets it above (0.28)
    beta: float = 0.0                # KL weight against the stage's initial model (k3 estimator); 0: no reference
    iterations: int = 1              # policy updates per batch of rollouts (old log-probs stored when > 1)
    # bnpo (MuFun's): summed over a microbatch's completion tokens / their count, mean over microbatches |
    # token_mean (DAPO): / the step's completion tokens | sequence_mean (GRPO's paper): mean per completion,
    # then over completions | dr_grpo (Dr. GRPO): no std scaling of advantages, / (completions x max_new_tokens)
    aggregation: str = "bnpo"
    # [{name: exact_once | choice | format | module:function, weight: W}]; jaxmusic.rewards
    rewards: list = dataclasses.field(default_factory=lambda: [{"name": "exact_once", "weight": 1.0}])
    samples_every: int = 0           # write `samples` completions with their rewards to samples.jsonl every N steps
    samples: int = 4


@dataclasses.dataclass(frozen=True)
class StageConfig:
    name: str = "stage"
    model: ModelSection = ModelSection()
    init: InitSection = InitSection()
    trainable: list = dataclasses.field(default_factory=lambda: [".*"])  # regexes over "part/path/to/param"
    data: DataConfig = DataConfig()  # jaxmusic.data.config
    batch: BatchSection = BatchSection()
    optimizer: OptimizerSection = OptimizerSection()
    loss: str = "cross_entropy"      # key of jaxmusic.losses.LOSSES
    grpo: GRPOSection = GRPOSection()  # read by loss: grpo
    steps: int | None = None         # optimizer steps; or set epochs
    epochs: float | None = None      # needs a data source with a known length
    checkpoint: CheckpointSection = CheckpointSection()
    mesh: MeshSection = MeshSection()
    nan_policy: str = "stop"         # stop | skip (a non-finite step leaves params untouched)
    log: LogSection = LogSection()

    @property
    def accumulation(self) -> int:
        return self.batch.global_batch // (self.batch.microbatch or self.batch.global_batch)

    @property
    def records_per_step(self) -> int:
        """Records a step reads: one per row, or one per group of completions (GRPO)."""
        return self.batch.global_batch // (self.grpo.generations if self.loss == "grpo" else 1)

    def validate(self) -> "StageConfig":
        b = self.batch
        micro = b.microbatch or b.global_batch
        if b.global_batch < 1 or micro < 1 or b.global_batch % micro:
            raise ConfigError(f"batch.global_batch {b.global_batch} must be a positive multiple of "
                              f"batch.microbatch {micro}")
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError("set exactly one of steps and epochs")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        choices = {"init.source": (self.init.source, ("random", "checkpoint", "stage", "previous")),
                   "init.whisper_positions": (self.init.whisper_positions, WHISPER_POSITIONS),
                   "optimizer.schedule": (self.optimizer.schedule, ("cosine", "linear", "constant")),
                   "nan_policy": (self.nan_policy, ("stop", "skip"))}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{key}: {value!r} is not one of {allowed}")
        n = self.init.standardize_encoder_output
        if n < 0 or (n and self.init.source != "random"):
            raise ConfigError(f"init.standardize_encoder_output: {n!r} must be a number of batches >= 0, "
                              "and > 0 only with init.source random (a fresh encoder)")
        if self.init.source in ("checkpoint", "stage") and not self.init.path:
            raise ConfigError(f"init.source {self.init.source} needs init.path")
        if not self.trainable or not all(isinstance(r, str) for r in self.trainable):
            raise ConfigError("trainable must be a non-empty list of regexes")
        c = self.checkpoint
        if c.keep_last < 1:
            raise ConfigError("checkpoint.keep_last must be >= 1")
        if self.loss == "grpo":
            self._validate_grpo(micro)
        return self

    def _validate_grpo(self, micro: int) -> None:
        g = self.grpo
        if g.aggregation not in AGGREGATIONS:
            raise ConfigError(f"grpo.aggregation: {g.aggregation!r} is not one of {AGGREGATIONS}")
        least = {"generations": 2, "max_new_tokens": 1, "max_prompt_tokens": 1, "iterations": 1, "top_k": 0,
                 "samples_every": 0, "samples": 0}
        for key, low in least.items():
            if getattr(g, key) < low:
                raise ConfigError(f"grpo.{key} must be >= {low}, got {getattr(g, key)}")
        if g.temperature <= 0 or not 0 < g.top_p <= 1 or g.epsilon < 0 or (g.epsilon_high or 0) < 0 or g.beta < 0:
            raise ConfigError("grpo: need temperature > 0, 0 < top_p <= 1 and epsilon, epsilon_high, beta >= 0")
        if micro % g.generations:
            raise ConfigError(f"grpo: batch.microbatch {micro} must be a multiple of grpo.generations "
                              f"{g.generations} (whole groups per microbatch)")
        every = self.checkpoint.every_steps
        if g.iterations > 1 and every and every % g.iterations:
            raise ConfigError(f"checkpoint.every_steps {every} must be a multiple of grpo.iterations "
                              f"{g.iterations}: a checkpoint falls between two batches of rollouts")
        if self.init.standardize_encoder_output:
            raise ConfigError("init.standardize_encoder_output sets up a random encoder, which a GRPO stage "
                              "never starts from")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, d: Any, where: str):
    """Dataclass `cls` from a dict, recursing into dataclass-typed fields; unknown keys are errors."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; "
                          f"{where or 'the top level'} has {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in d.items():
        sub = hints[name]
        key = f"{where}.{name}" if where else name
        kwargs[name] = _build(sub, value, key) if dataclasses.is_dataclass(sub) else _check_type(sub, value, key)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def _check_type(hint, value, key: str):
    """`value` if it fits the field's annotation (int also fits float); else a ConfigError."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    allowed = tuple(typing.get_origin(a) or a for a in allowed)
    if value is None and type(None) in allowed:
        return value
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if float in allowed and isinstance(value, str):
        try:  # YAML 1.1 reads "2e-5" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed):
        return value
    names = " or ".join("null" if a is type(None) else a.__name__ for a in allowed)
    raise ConfigError(f"{key}: expected {names}, got {value!r}")


def stage_from_dict(d: dict) -> StageConfig:
    return _build(StageConfig, d, "").validate()


# ------------------------------------------------------------------------------ overrides

def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=VALUE` -> (["a", "b", "c"], VALUE parsed as YAML)."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected KEY.PATH=VALUE")
    try:
        parsed = yaml.safe_load(value) if value else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return key.split("."), parsed


def apply_override(d: dict, path: list[str], value: Any) -> None:
    node = d
    for i, key in enumerate(path[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[:i + 1])} is not a mapping")
        node = child
    node[path[-1]] = value


@dataclasses.dataclass(frozen=True)
class Schedule:
    stages: tuple[StageConfig, ...]
    source: str  # the file it came from


def load(path: str | Path, overrides: list[str] = (), *, alone: bool = False) -> Schedule:
    """A stage or schedule file (with overrides) -> the stages to run, validated. `alone`: the
    first stage may start from `previous` (`jaxmusic plan` plans a stage from its shapes)."""
    path = Path(path)
    raw = load_yaml(path)
    parsed = [parse_override(o) for o in overrides]
    if "stages" in raw:
        entries = raw["stages"]
        extra = sorted(set(raw) - {"stages"})
        if extra or not isinstance(entries, list) or not entries:
            raise ConfigError(f"{path}: a schedule has one key, 'stages', a non-empty list"
                              + (f" (found also {extra})" if extra else ""))
    else:
        entries = [{"name": raw.get("name", path.stem), "inline": raw}]
    names = [e.get("name") if isinstance(e, dict) else None for e in entries]
    for keys, _ in parsed:
        if keys[0] == "stages" and (len(keys) < 3 or keys[1] not in names):
            raise ConfigError(f"override {'.'.join(keys)}: expected stages.NAME.KEY with NAME in {names}")
    stages = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("name") or not ("config" in entry or "inline" in entry):
            raise ConfigError(f"{path}: stage {i} needs a name and a config file")
        unknown = sorted(set(entry) - {"name", "config", "overrides", "inline"})
        if unknown:
            raise ConfigError(f"{path}: stage {entry['name']!r} has unknown keys {unknown}")
        d = copy.deepcopy(entry["inline"]) if "inline" in entry else load_yaml(path.parent / entry["config"])
        for keys, value in _flatten_overrides(entry.get("overrides") or {}):
            apply_override(d, keys, value)
        for keys, value in parsed:
            if keys[0] != "stages":
                apply_override(d, keys, value)
            elif keys[1] == entry["name"]:
                apply_override(d, keys[2:], value)
        d["name"] = entry["name"]
        if i == 0 and d.get("init", {}).get("source") == "previous" and not alone:
            raise ConfigError(f"{path}: the first stage {entry['name']!r} cannot start from 'previous'")
        stages.append(stage_from_dict(d))
    if len({s.name for s in stages}) != len(stages):
        raise ConfigError(f"{path}: stage names must be unique, got {[s.name for s in stages]}")
    return Schedule(tuple(stages), str(path))


def _flatten_overrides(d: dict, prefix: tuple = ()):
    """`{a: {b: 1}}` -> `[(["a", "b"], 1)]`: a schedule's overrides change single keys."""
    for key, value in d.items():
        keys = prefix + (key,)
        if isinstance(value, dict) and value:
            yield from _flatten_overrides(value, keys)
        else:
            yield list(keys), value
