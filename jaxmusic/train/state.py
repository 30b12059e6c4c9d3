"""The model a stage trains: its architecture, and its parameters created or loaded sharded.

Parameters are always born on their target shardings: random ones inside a `jax.jit`
with `out_shardings`, stored ones restored by Orbax straight onto the devices (each
device reads its own shard). Nothing is materialised whole on one device or host.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmusic import checkpoints
from jaxmusic.losses import log_mels
from jaxmusic.models import mufun
from jaxmusic.models.mufun import PARTS, Connector, MuFun, MuFunConfig
from jaxmusic.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from jaxmusic.models.whisper import WhisperEncoder, WhisperEncoderConfig
from jaxmusic.nn import ModelOptions
from jaxmusic.train.config import ConfigError, StageConfig, load_yaml

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    whisper: WhisperEncoderConfig
    llm: Qwen3Config
    mufun: MuFunConfig
    opts: ModelOptions

    @classmethod
    def from_stage(cls, stage: StageConfig) -> "ModelSpec":
        m = stage.model
        if m.whisper is None or m.llm is None:
            raise ConfigError(f"stage {stage.name}: model.whisper and model.llm must be given "
                              "(or come from an init checkpoint)")
        try:
            return cls(WhisperEncoderConfig.from_hf(m.whisper), Qwen3Config.from_hf(m.llm),
                       MuFunConfig.from_dict(m.mufun),
                       ModelOptions.from_names(m.param_dtype, m.dtype, remat=m.remat, attention=m.attention))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"stage {stage.name}: bad model config: {e}") from None

    def build(self, rngs: nnx.Rngs) -> MuFun:
        return MuFun(self.whisper, self.llm, self.mufun, self.opts, rngs)

    def build_part(self, part: str, rngs: nnx.Rngs) -> nnx.Module:
        if part == "whisper":
            return WhisperEncoder(self.whisper, self.opts, rngs)
        if part == "connector":
            return Connector(self.mufun, self.whisper.d_model, self.llm.hidden_size, self.opts, rngs)
        return Qwen3ForCausalLM(self.llm, self.opts, rngs)

    def abstract(self) -> tuple[nnx.GraphDef, nnx.State]:
        """Graph definition and abstract state (shapes, dtypes, logical axes); no memory used."""
        return nnx.split(nnx.eval_shape(lambda: self.build(nnx.Rngs(0))))

    @property
    def tokens_per_chunk(self) -> int:
        return self.mufun.tokens_per_chunk(self.whisper.max_source_positions)


def random_parts(spec: ModelSpec, parts: tuple[str, ...], seed: int, shardings: dict, *,
                 whisper_positions: str = "sinusoids") -> dict:
    """Fresh parameters `{part: ...}` of `parts`, created directly on `shardings[part]`.

    `whisper_positions="zeros"` gives a random encoder no absolute positions (InitSection).
    """
    def make():
        # Each part has its own stream, so a part's values do not depend on which others are random.
        keys = {p: jax.random.fold_in(jax.random.key(seed), PARTS.index(p)) for p in parts}
        params = {p: nnx.to_pure_dict(nnx.state(spec.build_part(p, nnx.Rngs(keys[p])))) for p in parts}
        if "whisper" in params and whisper_positions == "zeros":
            params["whisper"]["embed_positions"] = jnp.zeros_like(params["whisper"]["embed_positions"])
        return params

    return jax.jit(make, out_shardings={p: shardings[p] for p in parts})()


def init_params(spec: ModelSpec, stage: StageConfig, shardings: dict, abstract: dict, *,
                restore_stage=None) -> dict:
    """A stage's initial parameters (pure dict `{part: ...}`) on `shardings`.

    `restore_stage(path, abstract_with_shardings) -> params` restores a stage checkpoint
    (passed in by the trainer to keep this module free of checkpoint-manager details).
    """
    init = stage.init
    if init.source == "random":
        return random_parts(spec, PARTS, init.seed, shardings, whisper_positions=init.whisper_positions)
    if init.source in ("stage", "previous"):
        return restore_stage(Path(init.path), with_shardings(abstract, shardings))
    stored = checkpoints.read_meta(init.path)["parts"]
    missing = tuple(p for p in PARTS if p not in stored)
    if missing:
        log.warning("init: %s has no %s; starting those from random weights (seed %d)",
                    init.path, " or ".join(missing), init.seed)
    params = (random_parts(spec, missing, init.seed, shardings, whisper_positions=init.whisper_positions)
              if missing else {})
    for part in PARTS:
        if part in stored:
            params[part] = checkpoints.load_params(init.path, part, abstract[part], shardings[part])
    return params


def standardize_encoder_output(graphdef: nnx.GraphDef, params: dict, batches, cfg: MuFunConfig,
                               encoder_sharding) -> dict:
    """`params` with the encoder's final layer norm set so its output comes out standardised.

    A data-dependent initialisation for a random encoder: mean and standard deviation per
    feature of the last hidden state, mean-pooled as the connector reads it, over every
    audio chunk of `batches` (train-step batches, `jaxmusic.train.step` layout), folded into
    the layer norm's scale and bias (exact; the architecture stays Whisper's). A connector
    learns slowly from badly scaled features: Adam's step is the same for every weight, so
    features that vary little about a large mean move its output little.
    """
    @jax.jit
    def moments(params, batch):
        # the microbatches' chunk slots as one microbatch
        slots = {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items() if k in ("mel", "wave", "chunk_mask")}
        encoder = nnx.merge(graphdef, params).whisper
        last = encoder(log_mels(slots, encoder.cfg.num_mel_bins))[-1]
        x = mufun.pool(last, cfg.pool_kernel, cfg.pool_stride).astype(jnp.float32)
        w = slots["chunk_mask"] if "chunk_mask" in slots else jnp.ones(x.shape[0], bool)
        w = w.astype(jnp.float32)[:, None, None]
        return w.sum() * x.shape[1], (w * x).sum((0, 1)), (w * x * x).sum((0, 1))

    totals = None
    for batch in batches:
        m = moments(params, batch)
        totals = m if totals is None else jax.tree.map(jnp.add, totals, m)
    count, s1, s2 = totals
    mean = s1 / count
    std = jnp.sqrt(jnp.maximum(s2 / count - mean * mean, 0.0))
    std = jnp.where(std > 1e-3 * jnp.max(std), std, 1.0)  # a feature that never varies keeps its scale

    def fold(whisper):
        norm = whisper["layer_norm"]
        return {**whisper, "layer_norm": {"scale": (norm["scale"] / std).astype(norm["scale"].dtype),
                                          "bias": ((norm["bias"] - mean) / std).astype(norm["bias"].dtype)}}

    return {**params, "whisper": jax.jit(fold, out_shardings=encoder_sharding)(params["whisper"])}


def with_shardings(abstract: dict, shardings: dict) -> dict:
    """ShapeDtypeStructs carrying their target shardings (Orbax restores onto them)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


MODELS_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"
BACKBONE_CONFIGS = {"whisper": WhisperEncoderConfig, "llm": Qwen3Config}


def named_model(name: str) -> dict:
    """The HF config fields of a model a stage names (`jaxmusic/configs/models/NAME.yaml`)."""
    path = MODELS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"model: no model config named {name!r}; known: "
                          f"{sorted(p.stem for p in MODELS_DIR.glob('*.yaml'))}")
    return load_yaml(path)


def _check_agrees(part: str, named: str, given: dict, stored: dict, source: str) -> None:
    """A named model config must describe the same computation as the init source's config
    (`max_position_embeddings` only bounds inputs: not compared)."""
    cls = BACKBONE_CONFIGS[part]
    a, b = (dataclasses.asdict(cls.from_hf(c)) for c in (given, stored))
    differ = [f"{k} {a[k]} vs {b[k]}" for k in a if a[k] != b[k] and k != "max_position_embeddings"]
    if differ:
        raise ConfigError(f"model.{part}: {named} differs from {source}'s config ({', '.join(differ)}); "
                          f"set model.{part}=null to take {source}'s")


def resolve_model(stage: StageConfig, previous_config: dict | None) -> StageConfig:
    """Fill `model.whisper/llm` and `data.tokenizer` from the init source when not given.

    A model given by name (`whisper-large-v3`) is read from `jaxmusic/configs/models/`, and must
    agree with the init source's config where there is one. From a converted checkpoint: its
    stored HF configs and `tokenizer/llm`. From a previous stage: that stage's resolved
    configuration.
    """
    model, data = stage.model, stage.data
    names = {p: c for p, c in (("whisper", model.whisper), ("llm", model.llm)) if isinstance(c, str)}
    given = {"whisper": model.whisper, "llm": model.llm}
    given.update({p: named_model(c) for p, c in names.items()})
    stored, source = {}, None
    if stage.init.source == "checkpoint":
        parts = checkpoints.read_meta(stage.init.path)["parts"]
        stored = {p: parts[p]["hf_config"] for p in given if p in parts}
        source = f"the init checkpoint {stage.init.path}"
        tok = Path(stage.init.path) / parts.get("llm", {}).get("tokenizer", "tokenizer/llm")
        if data.tokenizer is None and tok.is_dir():
            data = dataclasses.replace(data, tokenizer=str(tok))
    elif stage.init.source in ("stage", "previous") and previous_config is not None:
        stored = {p: c for p, c in previous_config["model"].items() if p in given and c is not None}
        source = f"the init stage {stage.init.path}"
        if data.tokenizer is None:
            data = dataclasses.replace(data, tokenizer=previous_config["data"].get("tokenizer"))
    for part, cfg in stored.items():
        if given[part] is None:
            given[part] = cfg
        elif part in names:
            _check_agrees(part, names[part], given[part], cfg, source)
    return dataclasses.replace(stage, model=dataclasses.replace(model, **given), data=data)
