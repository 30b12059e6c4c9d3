"""jaxmusic checkpoints -> Hugging Face folders `from_pretrained` loads, streamed.

* `export_hf`: one backbone, `llm` as `Qwen3ForCausalLM` (or `Qwen2ForCausalLM`), `whisper` under
  `WhisperForConditionalGeneration` names (with the decoder copied from the original
  Whisper folder when given, else an encoder-only folder);
* `export_mufun`: a whole MuFun in the released layout that MuFun's PyTorch code loads;
* `export_qwen2_audio`: a Qwen2-Audio checkpoint as the folder transformers'
  `Qwen2AudioForConditionalGeneration.from_pretrained` loads.

Tensors are written in each part's original HF dtype (recorded at import), so an
import/export round trip reproduces the original files bit for bit, in safetensors shards
of at most `max_shard_size` with transformers' index file. Reads run ahead of writes
(bounded by `streaming.INFLIGHT_BYTES`) so disk and decoding overlap.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from jaxmusic.checkpoints import streaming
from jaxmusic.checkpoints.format import (LEGACY_LAYOUT, PARAMS_DIR, ConversionError, copy_tokenizer_files,
                                         part_leaves, read_json, read_meta, refuse_existing, staged_folder,
                                         stored_shapes)
from jaxmusic.checkpoints.hf_import import Stats, progress, whisper_prefix
from jaxmusic.checkpoints.safetensors import (DTYPES, HFWeights, SafetensorsWriter, TensorInfo, dtype_code,
                                              plan_shards, shard_file_names, write_index)
from jaxmusic.models import mufun, qwen2_audio

HF_CLASSES = {"whisper": "WhisperForConditionalGeneration", "llm": "Qwen3ForCausalLM"}  # what export writes
LLM_CLASSES = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM"}  # by the LLM config's model_type


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of the exported folder and where its bytes come from."""

    name: str
    code: str
    shape: tuple[int, ...]
    leaf: streaming.Leaf | None = None  # from the checkpoint ...
    layer: int | None = None
    copy: TensorInfo | None = None      # ... or copied unchanged from an HF folder

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.code].itemsize


def _entries(leaves: list[streaming.Leaf], prefix: str, code: str) -> list[Entry]:
    """Our tensors in reading order: stacked ones parameter by parameter, layer by layer."""
    return [Entry(prefix + key, code, leaf.layer_shape, leaf, layer) for leaf in leaves for key, layer in leaf.slots()]


def _whisper_decoder_entries(folder: Path, stored_config: dict, weights: HFWeights) -> list[Entry]:
    """The non-encoder tensors of the original Whisper folder, under WhisperForConditionalGeneration names."""
    from jaxmusic.models.whisper import WhisperEncoderConfig

    source_config = read_json(folder / "config.json", "an HF model folder needs its config.json")
    if WhisperEncoderConfig.from_hf(source_config) != WhisperEncoderConfig.from_hf(stored_config):
        raise ConversionError(f"--whisper-source {folder}: its encoder config differs from the checkpoint's")
    try:
        prefix = whisper_prefix(weights.tensors)
    except ConversionError as e:
        raise ConversionError(f"--whisper-source {folder}: {e}") from None
    if prefix == "":
        raise ConversionError(f"--whisper-source {folder}: holds a bare encoder, no decoder to copy")
    model_root = prefix[: -len("encoder.")]
    entries = []
    for key, info in weights.tensors.items():
        if key.startswith(prefix):
            continue  # the encoder comes from the checkpoint
        name = "model." + key[len(model_root):] if key.startswith(model_root) else key
        entries.append(Entry(name, info.dtype, info.shape, copy=info))
    return entries


def _open_stores(ckpt: Path, leaves: list[streaming.Leaf]) -> dict:
    """The checkpoint's arrays, checked against the config, ready for block reads.

    Arrays chunked more coarsely than our blocks (Orbax's default: whole arrays up to
    2 GiB, e.g. in a training checkpoint) share a cache holding the largest such chunk,
    so that reading one parameter layer by layer decodes each chunk once, not per block.
    """
    stored = stored_shapes(ckpt / PARAMS_DIR)
    legacy = {new: old for old, (new, _) in LEGACY_LAYOUT.items() if old in stored}

    def open_leaf(leaf, ctx):
        # a version 1 array is the full axis reversal of today's: read it through a transposed view
        name = ".".join(legacy.get(leaf.keys, leaf.keys))
        try:
            store = streaming.open_array(ckpt / PARAMS_DIR, name, ctx)
        except ValueError as e:
            raise ConversionError(f"{ckpt}: cannot open array {name}: {e}") from None
        return store.T if leaf.keys in legacy else store

    ctx, stores, coarse = streaming.ts_context(), {}, []
    for leaf in leaves:
        store = stores[leaf.name] = open_leaf(leaf, ctx)
        if tuple(store.shape) != leaf.shape:
            raise ConversionError(f"{ckpt}: {leaf.name} has shape {list(store.shape)}, "
                                  f"the stored config implies {list(leaf.shape)}")
        chunk = store.chunk_layout.read_chunk.shape
        if any(c > ours for c, ours in zip(chunk, leaf.chunks(store.dtype.numpy_dtype.itemsize))):
            coarse.append((leaf, math.prod(chunk) * store.dtype.numpy_dtype.itemsize))
    if coarse:
        cached = streaming.ts_context(chunk_cache_bytes=max(n for _, n in coarse))
        stores.update({leaf.name: open_leaf(leaf, cached) for leaf, _ in coarse})
    return stores


def _blocks(entry: Entry, stores: dict) -> list[tuple[int, int, int]]:
    """`(start, stop, bytes)` of each piece to stream `entry` in: row ranges of a checkpoint
    array, byte ranges of a tensor copied raw from an HF folder."""
    if entry.copy is not None:
        return [(s, min(s + streaming.BLOCK_BYTES, entry.nbytes), min(streaming.BLOCK_BYTES, entry.nbytes - s))
                for s in range(0, entry.nbytes, streaming.BLOCK_BYTES)]
    rows, row_bytes = entry.shape[0], entry.nbytes // entry.shape[0]
    step = entry.leaf.rows_per_block(stores[entry.leaf.name].dtype.numpy_dtype.itemsize)
    return [(s, min(s + step, rows), (min(s + step, rows) - s) * row_bytes) for s in range(0, rows, step)]


def _start_read(entry: Entry, start: int, stop: int, stores: dict, source: HFWeights | None):
    """A future of the block's data: a TensorStore read, or an already done raw read."""
    if entry.copy is not None:
        raw = np.empty(stop - start, np.uint8)
        source.read_into(entry.copy, start, raw)
        return streaming.Done(raw)
    return stores[entry.leaf.name][entry.leaf.index(entry.layer, start, stop)].read()


def _write_hf_folder(tmp: Path, entries: list[Entry], stores: dict, source: HFWeights | None,
                     max_shard_size: int) -> Stats:
    by_name = {e.name: e for e in entries}
    shards = plan_shards([(e.name, e.nbytes) for e in entries], max_shard_size)
    files = shard_file_names(len(shards))
    stats = Stats(tensors=len(entries), nbytes=sum(e.nbytes for e in entries))
    pipeline = streaming.Pipeline()
    with progress(len(entries), "jax->hf") as bar:
        for names, file in zip(shards, files):
            writer = SafetensorsWriter(tmp / file, [(n, by_name[n].code, by_name[n].shape) for n in names])

            def emit(done):
                value, (entry, last) = done
                writer.write(entry.name, value if entry.copy is not None else value.astype(DTYPES[entry.code],
                                                                                           copy=False))
                if last:
                    bar.update()

            for name in names:
                entry = by_name[name]
                blocks = _blocks(entry, stores)
                for i, (start, stop, nbytes) in enumerate(blocks):
                    future = _start_read(entry, start, stop, stores, source)
                    for done in pipeline.push(future, nbytes, (entry, i == len(blocks) - 1)):
                        emit(done)
            for done in pipeline.drain():
                emit(done)
            writer.close()
    if len(files) > 1:
        weight_map = {n: f for names, f in zip(shards, files) for n in names}
        write_index(tmp, weight_map, stats.nbytes, sum(math.prod(e.shape) for e in entries))
    return stats


def _write_config(folder: Path, config: dict) -> None:
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_hf(ckpt: str | os.PathLike, out: str | os.PathLike, part: str, *,
              whisper_source: str | None = None, max_shard_size: int = 5 * 10**9) -> Stats:
    """One backbone of a jaxmusic checkpoint -> HF folder `out` (see the module docstring)."""
    ckpt, out = Path(ckpt), Path(out)
    start_time = time.time()
    meta = read_meta(ckpt)
    refuse_existing(out)  # before the slow work
    if part not in HF_CLASSES or part not in meta["parts"]:
        raise ConversionError(f"{ckpt} has no {part!r} part (it has {sorted(meta['parts'])})")
    if whisper_source is not None and part != "whisper":
        raise ConversionError("--whisper-source only applies to --part whisper")
    info = meta["parts"][part]
    leaves = part_leaves(part, info["hf_config"])
    stores = _open_stores(ckpt, leaves)
    entries = _entries(leaves, "model.encoder." if part == "whisper" else "",
                       dtype_code(np.dtype(info["source_dtype"])))
    source = HFWeights(whisper_source) if whisper_source is not None else None
    try:
        if source is not None:
            entries += _whisper_decoder_entries(Path(whisper_source), info["hf_config"], source)
        with staged_folder(out) as tmp:
            stats = _write_hf_folder(tmp, entries, stores, source, max_shard_size)
            config = dict(info["hf_config"])
            config["dtype"] = np.dtype(info["source_dtype"]).name
            if "torch_dtype" in config:  # transformers 4.x name of the same field
                config["torch_dtype"] = config["dtype"]
            config["architectures"] = [LLM_CLASSES.get(config.get("model_type") or "qwen3", HF_CLASSES[part])
                                       if part == "llm" else HF_CLASSES[part]]
            _write_config(tmp, config)
            tokenizer = ckpt / info.get("tokenizer", f"tokenizer/{part}")
            if tokenizer.is_dir():
                copy_tokenizer_files(tokenizer, tmp)
    finally:
        if source is not None:
            source.close()
    stats.seconds = time.time() - start_time
    return stats


def export_mufun(ckpt, out, *, max_shard_size: int = 5 * 10**9) -> Stats:
    """jaxmusic MuFun checkpoint -> released-layout folder the PyTorch MuFun code loads."""
    return _export_released(ckpt, out, "mufun", max_shard_size)


def export_qwen2_audio(ckpt, out, *, max_shard_size: int = 5 * 10**9) -> Stats:
    """jaxmusic Qwen2-Audio checkpoint -> folder `Qwen2AudioForConditionalGeneration` loads."""
    return _export_released(ckpt, out, "qwen2-audio", max_shard_size)


def _export_released(ckpt, out, layout: str, max_shard_size: int) -> Stats:
    ckpt, out = Path(ckpt), Path(out)
    start_time = time.time()
    meta = read_meta(ckpt)
    parts = meta["parts"]
    missing = [p for p in mufun.PARTS if p not in parts]
    if missing or "mufun" not in meta:
        raise ConversionError(f"{ckpt}: not a whole model checkpoint (missing "
                              f"{', '.join(missing) or 'glue config'}); use --part llm|whisper")
    cfg = mufun.MuFunConfig.from_dict(meta["mufun"])
    if cfg.layout != layout:
        raise ConversionError(f"{ckpt}: a {cfg.layout} model cannot be written in the {layout} layout "
                              f"(use --part {cfg.layout})")
    prefixes = qwen2_audio.RELEASED_PREFIXES if layout == "qwen2-audio" else mufun.RELEASED_PREFIXES
    refuse_existing(out)
    entries, stores = [], {}
    for part in ("whisper", "llm", "connector"):  # the released files' order
        leaves = part_leaves(part, parts[part]["hf_config"])
        stores.update(_open_stores(ckpt, leaves))
        entries += _entries(leaves, prefixes[part], dtype_code(np.dtype(parts[part]["source_dtype"])))
    with staged_folder(out) as tmp:
        stats = _write_hf_folder(tmp, entries, stores, None, max_shard_size)
        if layout == "qwen2-audio":
            config = qwen2_audio.released_config(parts["whisper"]["hf_config"], parts["llm"]["hf_config"],
                                                 meta.get("released_config"))
        else:
            config = mufun.released_config(parts["whisper"]["hf_config"], parts["llm"]["hf_config"],
                                           parts["connector"]["hf_config"], meta.get("released_config"))
        _write_config(tmp, config)
        tokenizer = ckpt / parts["llm"].get("tokenizer", "tokenizer/llm")
        if tokenizer.is_dir():
            copy_tokenizer_files(tokenizer, tmp)
    stats.seconds = time.time() - start_time
    return stats
