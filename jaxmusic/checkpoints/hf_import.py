"""Hugging Face folders -> jaxmusic checkpoints, streamed tensor by tensor.

* `import_hf`: a Whisper and/or a Qwen3 folder -> a backbone checkpoint;
* `assemble`: a Whisper and a Qwen3 folder -> a new whole MuFun, the connector freshly
  initialised as the MuFun config's `connector_init` says;
* `import_mufun`: a released MuFun folder (`model_type: "tinyllava"`) -> a MuFun checkpoint;
* `import_qwen2_audio`: a Qwen2-Audio folder (`model_type: "qwen2_audio"`) -> a checkpoint of
  the same three parts with Qwen2-Audio's glue settings (`jaxmusic/configs/qwen2_audio.yaml`);
* `import_released`: either of the two, by the folder's `model_type`.

Everything is validated before anything is written: missing, unexpected or mis-shaped
tensors are listed all at once. Sizes missing from a released config are inferred from
the tensors (`jaxmusic.models.mufun.infer_*_config`: the released config file is not public).
The fusion layers are not in the released config (the reference hard-codes 0, 7, 15, 32):
they come from the MuFun config (default `jaxmusic/configs/mufun.yaml`) and must match the
connector's input width.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxmusic.checkpoints import streaming
from jaxmusic.checkpoints.format import (CKPT_DTYPES, PARAMS_DIR, ConversionError, copy_tokenizer_files,
                                         part_leaves, read_json, refuse_existing, staged_folder, write_meta)
from jaxmusic.checkpoints.safetensors import HFWeights, SafetensorsWriter, dtype_code
from jaxmusic.models import mufun, qwen2_audio

SOURCE_DTYPES = ("F32", "BF16", "F16")  # HF weights we convert (other dtypes are refused)


@dataclasses.dataclass
class Stats:
    tensors: int = 0
    nbytes: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        mb_s = self.nbytes / 1e6 / max(self.seconds, 1e-9)
        return (f"converted {self.tensors} tensors, {self.nbytes / 1e9:.2f} GB in "
                f"{self.seconds:.1f} s ({mb_s:.0f} MB/s)")


def progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="tensor", disable=None, leave=False)


def whisper_prefix(keys) -> str:
    """Which HF class saved a Whisper folder: `model.encoder.` (WhisperForConditionalGeneration),
    `encoder.` (WhisperModel) or `` (a bare WhisperEncoder)."""
    from jaxmusic.models.whisper import HF_ENCODER_PREFIXES

    for prefix in HF_ENCODER_PREFIXES:
        if prefix + "conv1.weight" in keys:
            return prefix
    raise ConversionError(f"no Whisper encoder tensors (no conv1.weight under any of "
                          f"{[p or '<root>' for p in HF_ENCODER_PREFIXES]})")


@dataclasses.dataclass
class Source:
    """One part to import: its HF config, where its tensors are and under which prefix."""

    part: str
    folder: Path
    hf_config: dict
    weights: HFWeights
    prefix: str
    leaves: list[streaming.Leaf]
    keys: frozenset  # the folder's tensors that belong to this part
    tokenizer: bool = True  # keep the folder's tokenizer files as the part's

    @property
    def source_dtype(self) -> str:
        """The dtype holding most of the part's bytes (HF folders are normally uniform)."""
        counts = collections.Counter()
        for leaf in self.leaves:
            for key, _ in leaf.slots():
                info = self.weights.tensors[self.prefix + key]
                counts[info.np_dtype.name] += info.nbytes
        return counts.most_common(1)[0][0]

    def problems(self) -> list[str]:
        """Every mismatch between the tensors and the model the config describes."""
        problems, expected = [], set()
        for leaf in self.leaves:
            for key, _ in leaf.slots():
                key = self.prefix + key
                expected.add(key)
                info = self.weights.tensors.get(key)
                if info is None:
                    problems.append(f"missing {key}")
                elif info.shape != leaf.layer_shape:
                    problems.append(f"{key} has shape {list(info.shape)}, the config implies {list(leaf.layer_shape)}")
                elif info.dtype not in SOURCE_DTYPES:
                    problems.append(f"{key} has dtype {info.dtype}, expected one of {SOURCE_DTYPES}")
        problems += [f"unexpected {key}" for key in sorted(self.keys - expected)]
        return [f"{self.part} ({self.folder}): {p}" for p in problems]


def backbone_source(part: str, folder: str | os.PathLike) -> Source:
    """A Whisper (encoder kept) or Qwen3 HF folder as the `whisper` or `llm` part."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"--{part} {folder}: no such folder")
    hf_config = read_json(folder / "config.json", "an HF model folder needs its config.json")
    weights = HFWeights(folder)
    keys = set(weights.tensors)
    if part == "whisper":
        try:
            prefix = whisper_prefix(keys)
        except ConversionError as e:
            raise ConversionError(f"{folder}: {e}") from None
        root = prefix[: -len("encoder.")]  # the decoder and the output projection are not ours
        keys = {k for k in keys if not k.startswith((root + "decoder.", "proj_out."))}
    else:
        prefix = ""
        if hf_config.get("tie_word_embeddings", False):
            keys.discard("lm_head.weight")  # a tied head saved anyway is the embedding table
    return Source(part, folder, hf_config, weights, prefix, part_leaves(part, hf_config), frozenset(keys))


def write_checkpoint(out: Path, sources: list[Source], dtype: str, **extra_meta) -> Stats:
    """Validate every source, then stream all of them into a new checkpoint folder `out`."""
    problems = [p for src in sources for p in src.problems()]
    if problems:
        raise ConversionError(f"{len(problems)} problem(s) with the HF weights, nothing written: "
                              + "; ".join(problems))
    if dtype not in CKPT_DTYPES:
        raise ConversionError(f"--dtype must be one of {CKPT_DTYPES}, got {dtype!r}")
    start, dtype = time.time(), np.dtype(dtype)
    with staged_folder(out) as tmp:
        params_dir = tmp / PARAMS_DIR
        params_dir.mkdir()
        ctx, pipeline, stats = streaming.ts_context(), streaming.Pipeline(), Stats()
        n_tensors = sum(len(leaf.slots()) for src in sources for leaf in src.leaves)
        with progress(n_tensors, "hf->jax") as bar:
            for src in sources:
                for leaf in src.leaves:
                    store = streaming.open_array(params_dir, leaf.name, ctx, create={
                        "dtype": dtype.name, "shape": list(leaf.shape), "chunks": leaf.chunks(dtype.itemsize)})
                    rows = leaf.rows_per_block(dtype.itemsize)
                    for key, layer in leaf.slots():
                        info = src.weights.tensors[src.prefix + key]
                        for first in range(0, info.shape[0], rows):
                            stop = min(first + rows, info.shape[0])
                            block = src.weights.read(info.name, first, stop).astype(dtype, copy=False)
                            pipeline.push(store[leaf.index(layer, first, stop)].write(block), block.nbytes, block)
                        stats.tensors += 1
                        stats.nbytes += info.nbytes
                        bar.update()
            pipeline.drain()
        streaming.write_orbax_metadata(params_dir, [leaf for src in sources for leaf in src.leaves], dtype.itemsize)
        parts = {}
        for src in sources:
            parts[src.part] = {"hf_config": src.hf_config, "source_dtype": src.source_dtype}
            tokenizer = Path("tokenizer") / src.part
            if src.tokenizer:
                copy_tokenizer_files(src.folder, tmp / tokenizer)
                parts[src.part]["tokenizer"] = str(tokenizer)
        write_meta(tmp, parts, dtype.name, **extra_meta)
    stats.seconds = time.time() - start
    return stats


def _close(sources: list[Source]) -> None:
    for src in sources:
        src.weights.close()


def import_hf(out: str | os.PathLike, *, whisper: str | None = None, llm: str | None = None,
              dtype: str = "float32") -> Stats:
    """HF folder(s) -> backbone checkpoint `out`. Validates everything before writing anything.

    `dtype` is the checkpoint's parameter dtype: float32 (default; the master weights training
    updates) or bfloat16 (half the size; exact only for bfloat16 sources).
    """
    folders = {p: f for p, f in (("whisper", whisper), ("llm", llm)) if f is not None}
    if not folders:
        raise ConversionError("nothing to convert: give --whisper and/or --llm")
    refuse_existing(Path(out))  # before the slow work
    sources: list[Source] = []
    try:
        for part, folder in folders.items():
            sources.append(backbone_source(part, folder))
        return write_checkpoint(Path(out), sources, dtype)
    finally:
        _close(sources)


def load_mufun_config(path: str | None) -> mufun.MuFunConfig:
    try:
        return mufun.MuFunConfig.from_yaml(path)
    except (OSError, ValueError) as e:
        raise ConversionError(f"--mufun-config: {e}") from None


def import_mufun(out, folder, *, mufun_config: str | None = None, dtype: str = "float32") -> Stats:
    """Released MuFun folder -> jaxmusic MuFun checkpoint `out`."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise ConversionError(f"--mufun {folder}: no such folder")
    released = read_json(folder / "config.json", "a released MuFun folder needs its config.json")
    if released.get("model_type") != "tinyllava":
        raise ConversionError(f"{folder / 'config.json'}: model_type is {released.get('model_type')!r}, "
                              "expected 'tinyllava' (the released MuFun layout)")
    cfg = load_mufun_config(mufun_config)

    def part_configs(tensors: dict) -> dict:
        mufun.check_connector_type(released.get("connector_type", ""), cfg)
        return {"whisper": mufun.infer_whisper_config(released.get("vision_config") or {}, tensors),
                "llm": mufun.infer_qwen3_config(released.get("text_config") or {}, tensors)}

    return _import_released_layout(out, folder, released, cfg, part_configs, mufun.RELEASED_PREFIXES, dtype)


def _import_released_layout(out: Path, folder: Path, released: dict, cfg: mufun.MuFunConfig, part_configs,
                            prefixes: dict, dtype: str) -> Stats:
    """A released folder's three parts (`part_configs(tensors)` gives the encoder's and the LLM's
    configs, each under its prefix) -> jaxmusic checkpoint `out`, with glue settings `cfg`."""
    refuse_existing(out)
    weights = HFWeights(folder)
    try:
        configs = part_configs(weights.tensors)
        cfg.check_encoder_depth(configs["whisper"]["encoder_layers"])
        configs["connector"] = mufun.connector_config(cfg, configs["whisper"]["d_model"],
                                                      configs["llm"]["hidden_size"])
        sources = _released_sources(folder, weights, configs, prefixes)
        return write_checkpoint(out, sources, dtype, mufun=cfg.to_dict(), released_config=released)
    except ValueError as e:
        if isinstance(e, ConversionError):
            raise
        raise ConversionError(f"{folder}: {e}") from None
    finally:
        weights.close()


def _released_sources(folder: Path, weights: HFWeights, configs: dict, prefixes: dict) -> list[Source]:
    """The three parts of a released folder, each under its prefix; refuses stray tensors."""
    tensors, sources = weights.tensors, []
    for part in mufun.PARTS:
        prefix = prefixes[part]
        keys = set(k for k in tensors if k.startswith(prefix))
        if part == "llm" and configs[part].get("tie_word_embeddings", False):
            keys.discard(prefix + "lm_head.weight")  # a tied head saved anyway is the embedding table
        sources.append(Source(part, folder, configs[part], weights, prefix,
                              part_leaves(part, configs[part]), frozenset(keys), tokenizer=part == "llm"))
    stray = sorted(k for k in tensors if not k.startswith(tuple(prefixes.values())))
    if stray:
        raise ConversionError(f"{folder}: {len(stray)} unexpected tensor(s), nothing written: "
                              + ", ".join(stray[:20]))
    return sources


def import_qwen2_audio(out, folder, *, glue_config: str | None = None, dtype: str = "float32") -> Stats:
    """Qwen2-Audio folder (`Qwen2AudioForConditionalGeneration`, safetensors) -> jaxmusic checkpoint
    `out`, with the glue settings of `glue_config` (default jaxmusic/configs/qwen2_audio.yaml)."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: no such folder")
    released = read_json(folder / "config.json", "a Qwen2-Audio folder needs its config.json")
    if released.get("model_type") != qwen2_audio.MODEL_TYPE:
        raise ConversionError(f"{folder / 'config.json'}: model_type is {released.get('model_type')!r}, "
                              f"expected {qwen2_audio.MODEL_TYPE!r}")
    try:
        cfg = qwen2_audio.glue_config(glue_config)
    except (OSError, ValueError) as e:
        raise ConversionError(f"--mufun-config: {e}") from None
    return _import_released_layout(out, folder, released, cfg, lambda _: qwen2_audio.part_configs(released),
                                   qwen2_audio.RELEASED_PREFIXES, dtype)


RELEASED_IMPORTERS = {"tinyllava": import_mufun, qwen2_audio.MODEL_TYPE: import_qwen2_audio}


def import_released(out, folder, *, glue_config: str | None = None, dtype: str = "float32") -> Stats:
    """A released folder -> jaxmusic checkpoint, by its config's `model_type`: "tinyllava" (MuFun)
    or "qwen2_audio"; `glue_config` overrides the model's default glue settings."""
    folder = Path(folder)
    model_type = read_json(folder / "config.json", "a released model folder needs its config.json").get("model_type")
    if model_type not in RELEASED_IMPORTERS:
        raise ConversionError(f"{folder / 'config.json'}: model_type {model_type!r} is not a released layout "
                              f"jaxmusic imports ({', '.join(RELEASED_IMPORTERS)})")
    if model_type == "tinyllava":
        return import_mufun(out, folder, mufun_config=glue_config, dtype=dtype)
    return import_qwen2_audio(out, folder, glue_config=glue_config, dtype=dtype)


def _fresh_connector(folder: Path, cfg: mufun.MuFunConfig, d_enc: int, d_llm: int, seed: int) -> None:
    """A freshly initialised connector written as a released-layout safetensors file."""
    import jax

    params = mufun.init_connector(cfg, jax.random.key(seed), d_enc, d_llm)
    prefix = mufun.RELEASED_PREFIXES["connector"]
    tensors = {prefix + spec.hf_key: np.asarray(params[spec.path[0]][spec.path[1]])
               for spec in mufun.connector_hf_tensors()}
    writer = SafetensorsWriter(folder / "model.safetensors",
                               [(k, dtype_code(v.dtype), v.shape) for k, v in tensors.items()])
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()


def assemble(out, *, whisper, llm, mufun_config: str | None = None, dtype: str = "float32",
             seed: int = 0) -> Stats:
    """A new MuFun from a Whisper HF folder and a Qwen3 HF folder; the connector is initialised
    as `connector_init` in the MuFun config says (documented in jaxmusic/configs/mufun.yaml)."""
    cfg = load_mufun_config(mufun_config)
    refuse_existing(Path(out))
    sources = [backbone_source("whisper", whisper), backbone_source("llm", llm)]
    try:
        d_enc = sources[0].hf_config["d_model"]
        d_llm = sources[1].hf_config["hidden_size"]
        try:
            cfg.check_encoder_depth(sources[0].leaves[0].n_layers)
        except ValueError as e:
            raise ConversionError(f"--mufun-config: {e}") from None
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            _fresh_connector(scratch, cfg, d_enc, d_llm, seed)
            conn = HFWeights(scratch)
            prefix = mufun.RELEASED_PREFIXES["connector"]
            config = mufun.connector_config(cfg, d_enc, d_llm)
            sources.append(Source("connector", scratch, config, conn, prefix, part_leaves("connector", config),
                                  frozenset(conn.tensors), tokenizer=False))
            return write_checkpoint(Path(out), sources, dtype, mufun=cfg.to_dict())
    finally:
        _close(sources)
