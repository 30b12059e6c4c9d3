"""jaxmusic checkpoints: streamed conversion from and to Hugging Face folders, and loading.

A checkpoint folder `CKPT/` holds

* `jaxmusic.json`: `{"format": "jaxmusic", "version": 1, "dtype": <checkpoint dtype>,
  "parts": {part: {"hf_config": <the HF config.json dict>, "source_dtype": <dtype of the HF
  weights>, "tokenizer": "tokenizer/<part>"}}}` with `part` in "whisper", "llm";
* `params/`: an Orbax checkpoint (OCDBT + zarr, Orbax's default format) of the pytree
  `{part: nnx.state(model) as a pure dict}`. Plain `orbax.checkpoint` restores it, e.g.
  `ocp.StandardCheckpointer().restore(CKPT/"params", abstract_tree)`; `load_params` does
  it per part and onto given shardings;
* `tokenizer/<part>/`: the tokenizer, generation and preprocessor files of each HF folder
  (one folder per part, since Whisper's and Qwen's files share names).

Both directions stream: one HF tensor (one layer of a stacked parameter) at a time, in row
blocks of at most `BLOCK_BYTES`, so memory stays flat whatever the model size. The Orbax
arrays are written with TensorStore the way Orbax lays them out (zarr v2 arrays in one OCDBT
database plus Orbax's metadata files), with two deliberate departures Orbax reads transparently:

* chunks of one layer and one row block, so that export reads any single layer back
  without touching the others (Orbax's own partial-save API adds whole leaves only, so a
  stacked parameter would have to exist in memory in full);
* no compression, and transposed kernels stored in Fortran order: HF stores the connector's
  Linear weights and Whisper's Conv1d weights as the full axis reversal of our kernels, so
  such a kernel in F order has the very bytes of the HF tensor in C order (other Linear
  weights are `[out, in]` as in HF: plain C-order copies). Conversion then never transposes
  or compresses; on a 2-core machine either one alone capped it at 80-200 MB/s (Orbax's
  default zstd would save disk space, but it also made restoring 1.8x slower there).
  Restoring decodes F-order chunks into C-order arrays, in parallel across chunks,
  transparently for Orbax.

Row blocks map to chunks because every HF<->ours layout is a full axis reversal or the
identity: HF rows (axis 0) are our first axis (SAME) or our last.
"""

from __future__ import annotations

import base64
import collections
import ctypes
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import tensorstore as ts

from jaxmusic.errors import UserError
from jaxmusic.hf_mapping import SAME, HFTensor, hf_shape, to_hf, to_ours
from jaxmusic.safetensors_io import (DTYPES, HFWeights, SafetensorsError, SafetensorsWriter,
                                     TensorInfo, dtype_code, plan_shards, shard_file_names, write_index)

META_FILE = "jaxmusic.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1
PARTS = ("whisper", "llm")
HF_CLASSES = {"whisper": "WhisperForConditionalGeneration", "llm": "Qwen3ForCausalLM"}  # what export writes
CKPT_DTYPES = ("float32", "bfloat16")
SOURCE_DTYPES = ("F32", "BF16", "F16")  # HF weights we convert (other dtypes are refused)
BLOCK_BYTES = 32 * 2**20  # row block = zarr chunk size
INFLIGHT_BYTES = 256 * 2**20  # bytes handed to TensorStore and not yet on disk / not yet consumed
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "normalizer.json",
                   "generation_config.json", "preprocessor_config.json", "processor_config.json",
                   "chat_template.jinja", "chat_template.json")


class ConversionError(UserError, ValueError):
    """A user-facing conversion problem (bad inputs, mismatched tensors); nothing was written."""


# --------------------------------------------------------------------------- model parts

@dataclasses.dataclass(frozen=True)
class Leaf:
    """One parameter array of one part and the HF tensor(s) it comes from."""

    part: str
    spec: HFTensor
    shape: tuple[int, ...]  # ours, with the leading layer axis when stacked
    n_layers: int

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.part,) + self.spec.path

    @property
    def name(self) -> str:  # Orbax's name for the array: the tree path joined by dots
        return ".".join(self.keys)

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.spec.stacked else self.shape

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return hf_shape(self.spec.layout, self.layer_shape)

    def slots(self) -> list[tuple[str, int | None]]:
        """`(hf_key relative to the model root, layer index or None)` for every HF tensor."""
        if self.spec.stacked:
            return [(k, i) for i, k in enumerate(self.spec.hf_keys(self.n_layers))]
        return [(self.spec.hf_key, None)]

    def rows_per_block(self, itemsize: int) -> int:
        row = math.prod(self.hf_shape[1:]) * itemsize
        return max(1, min(self.hf_shape[0], BLOCK_BYTES // row))

    def chunks(self, itemsize: int) -> list[int]:
        chunk = list(self.layer_shape)
        chunk[self.block_axis] = self.rows_per_block(itemsize)
        return [1] + chunk if self.spec.stacked else chunk

    @property
    def order(self) -> str:
        """Memory order of our array whose bytes are the HF tensor's C-order bytes."""
        return "C" if self.spec.layout == SAME else "F"

    @property
    def block_axis(self) -> int:
        """Our axis holding the HF rows (HF axis 0)."""
        return 0 if self.spec.layout == SAME else len(self.layer_shape) - 1

    def index(self, layer: int | None, start: int, stop: int) -> tuple:
        """Our index of HF rows `[start, stop)` of one layer."""
        idx = [slice(None)] * len(self.layer_shape)
        idx[self.block_axis] = slice(start, stop)
        return tuple(idx) if layer is None else (layer, *idx)


def _family(part: str):
    if part == "whisper":
        from jaxmusic.models import whisper as m
        return m.WhisperEncoderConfig, m.WhisperEncoder, m.hf_tensors
    if part == "llm":
        from jaxmusic.models import qwen3 as m
        return m.Qwen3Config, m.Qwen3ForCausalLM, m.hf_tensors
    raise ValueError(f"unknown part {part!r}; expected one of {PARTS}")


def part_leaves(part: str, hf_config: dict) -> list[Leaf]:
    """The part's parameter arrays, from abstract shapes only (nothing is materialised)."""
    import jax.numpy as jnp
    from flax import nnx
    from jaxmusic.nn import ModelOptions

    config_cls, model_cls, hf_tensors = _family(part)
    try:
        cfg = config_cls.from_hf(hf_config)
    except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{part}: unusable config: {e}") from None
    opts = ModelOptions(param_dtype=jnp.float32)
    abstract = nnx.eval_shape(lambda: model_cls(cfg, opts, nnx.Rngs(0)))
    shapes = {tuple(str(k) for k in path): tuple(v.shape)
              for path, v in nnx.to_flat_state(nnx.state(abstract))}
    specs = hf_tensors(cfg)
    unmapped = set(shapes) - {s.path for s in specs}
    if unmapped:  # a model/mapping bug, not a user error
        raise RuntimeError(f"{part}: state entries without an HF tensor: {sorted(unmapped)}")
    return [Leaf(part, s, shapes[s.path], cfg.n_layers) for s in specs]


# --------------------------------------------------------------------------- Orbax layout

def _ts_context(chunk_cache_bytes: int = 0) -> ts.Context:
    """TensorStore context: Orbax's I/O settings, plus an optional cache of decoded chunks."""
    return ts.Context({"file_io_concurrency": {"limit": 128},
                       "cache_pool": {"total_bytes_limit": chunk_cache_bytes},
                       "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000}})


def _kvstore(params_dir: Path, writing: bool = False) -> dict:
    spec = {"driver": "ocdbt", "base": {"driver": "file", "path": str(params_dir.absolute()) + "/"},
            "cache_pool": "cache_pool#ocdbt"}
    if writing:  # Orbax's write settings: small values (zarr metadata) inline, one manifest file
        spec.update(config={"max_inline_value_bytes": 1024, "max_decoded_node_bytes": 100_000_000,
                            "manifest_kind": "single"},
                    assume_config=True, target_data_file_size=2**31)
    return spec


class _Pipeline:
    """A FIFO of TensorStore futures holding at most INFLIGHT_BYTES of data in flight."""

    def __init__(self):
        self._queue: collections.deque = collections.deque()
        self._bytes = 0

    def push(self, future, nbytes: int, payload=None) -> list:
        """Queue `future`; wait for the oldest ones while over budget and return their
        `(result, payload)`s. `payload` also keeps a written buffer alive until committed."""
        self._queue.append((future, nbytes, payload))
        self._bytes += nbytes
        done = []
        while self._bytes > INFLIGHT_BYTES:
            done.append(self._pop())
        return done

    def drain(self) -> list:
        return [self._pop() for _ in range(len(self._queue))]

    def _pop(self):
        future, nbytes, payload = self._queue.popleft()
        self._bytes -= nbytes
        return future.result(), payload


def _write_orbax_metadata(params_dir: Path, leaves: list[Leaf], itemsize: int) -> None:
    """The files Orbax's StandardCheckpointer writes next to the OCDBT database."""
    tree = {str(leaf.keys): {
        "key_metadata": [{"key": k, "key_type": 2} for k in leaf.keys],  # 2: dict key
        "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                           "write_shape": list(leaf.shape)}} for leaf in leaves}
    (params_dir / "_METADATA").write_text(json.dumps({
        "tree_metadata": tree, "use_ocdbt": True, "use_zarr3": False,
        "store_array_data_equal_to_fill_value": True, "custom_metadata": None}))
    (params_dir / "_sharding").write_text(json.dumps({
        base64.b64encode(leaf.name.encode()).decode():
            json.dumps({"sharding_type": "SingleDeviceSharding", "device_str": "cpu:0"})
        for leaf in leaves}))
    (params_dir / "array_metadatas").mkdir()
    arrays = [{"array_metadata": {"param_name": leaf.name, "write_shape": list(leaf.shape),
                                  "chunk_shape": leaf.chunks(itemsize), "ext_metadata": None}}
              for leaf in leaves]
    (params_dir / "array_metadatas" / "process_0").write_text(json.dumps({"array_metadatas": arrays}))
    now = time.time_ns()
    (params_dir / "_CHECKPOINT_METADATA").write_text(json.dumps({
        "item_handlers": "orbax.checkpoint._src.handlers.standard_checkpoint_handler."
                         "StandardCheckpointHandler",
        "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": now,
        "commit_timestamp_nsecs": now, "custom_metadata": {}}))


def _open_array(params_dir: Path, name: str, ctx: ts.Context, create: dict | None = None):
    spec = {"driver": "zarr", "kvstore": {**_kvstore(params_dir, writing=create is not None),
                                          "path": name + "/"},
            "recheck_cached_data": False, "recheck_cached_metadata": False}
    if create is not None:
        spec.update(create=True, store_data_equal_to_fill_value=True, dtype=create["dtype"],
                    metadata={"shape": create["shape"], "chunks": create["chunks"],
                              "order": create["order"], "compressor": None})
    return ts.open(spec, context=ctx).result()


# --------------------------------------------------------------------------- HF -> jaxmusic

@dataclasses.dataclass
class Stats:
    tensors: int = 0
    nbytes: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        mb_s = self.nbytes / 1e6 / max(self.seconds, 1e-9)
        return (f"converted {self.tensors} tensors, {self.nbytes / 1e9:.2f} GB in "
                f"{self.seconds:.1f} s ({mb_s:.0f} MB/s)")


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path}: missing (an HF model folder needs its config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def _whisper_prefix(weights: HFWeights) -> str:
    """Which HF class saved the folder: WhisperForConditionalGeneration, WhisperModel or bare encoder."""
    from jaxmusic.models.whisper import HF_ENCODER_PREFIXES

    for prefix in HF_ENCODER_PREFIXES:
        if prefix + "conv1.weight" in weights.tensors:
            return prefix
    raise ConversionError(f"{weights.folder}: no Whisper encoder tensors (no conv1.weight under any of "
                          f"{[p or '<root>' for p in HF_ENCODER_PREFIXES]})")


def _ignored(part: str, prefix: str, hf_config: dict, key: str) -> bool:
    """HF tensors that are legitimately not ours: Whisper's decoder, a tied LM head."""
    if part == "whisper":
        model_root = prefix[: -len("encoder.")]
        return key.startswith(model_root + "decoder.") or key.startswith("proj_out.")
    return key == "lm_head.weight" and hf_config.get("tie_word_embeddings", False)


@dataclasses.dataclass
class _Source:
    part: str
    folder: Path
    hf_config: dict
    weights: HFWeights
    prefix: str
    leaves: list[Leaf]

    @property
    def source_dtype(self) -> str:
        """The dtype holding most of the part's bytes (HF folders are normally uniform)."""
        counts = collections.Counter()
        for leaf in self.leaves:
            for key, _ in leaf.slots():
                info = self.weights.tensors[self.prefix + key]
                counts[info.np_dtype.name] += info.nbytes
        return counts.most_common(1)[0][0]


def _check(src: _Source) -> list[str]:
    """Every problem between the HF tensors and the model the config describes."""
    problems, expected = [], set()
    for leaf in src.leaves:
        for key, _ in leaf.slots():
            key = src.prefix + key
            expected.add(key)
            info = src.weights.tensors.get(key)
            if info is None:
                problems.append(f"missing {key}")
            elif info.shape != leaf.hf_shape:
                problems.append(f"{key} has shape {list(info.shape)}, "
                                f"the config implies {list(leaf.hf_shape)}")
            elif info.dtype not in SOURCE_DTYPES:
                problems.append(f"{key} has dtype {info.dtype}, expected one of {SOURCE_DTYPES}")
    for key in sorted(set(src.weights.tensors) - expected):
        if not _ignored(src.part, src.prefix, src.hf_config, key):
            problems.append(f"unexpected {key}")
    return [f"{src.part} ({src.folder}): {p}" for p in problems]


def _open_source(part: str, folder: Path) -> _Source:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"--{part} {folder}: no such folder")
    hf_config = _read_config(folder)
    weights = HFWeights(folder)
    prefix = _whisper_prefix(weights) if part == "whisper" else ""
    return _Source(part, folder, hf_config, weights, prefix, part_leaves(part, hf_config))


def _refuse_existing(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out} already exists; remove it or choose another --out")


def _staging_dir(out: Path) -> Path:
    """A fresh temp dir beside `out`, renamed onto it at the very end (atomic on one filesystem)."""
    _refuse_existing(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _commit(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()  # checked empty in _staging_dir
    tmp.rename(out)


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="tensor", disable=None, leave=False)


def import_hf(out: str | os.PathLike, *, whisper: str | None = None, llm: str | None = None,
              dtype: str = "float32") -> Stats:
    """HF folder(s) -> jaxmusic checkpoint `out`. Validates everything before writing anything.

    `dtype` is the checkpoint's parameter dtype: float32 (default; the master weights training
    updates) or bfloat16 (half the size; exact only for bfloat16 sources).
    """
    if dtype not in CKPT_DTYPES:
        raise ConversionError(f"--dtype must be one of {CKPT_DTYPES}, got {dtype!r}")
    folders = {p: f for p, f in (("whisper", whisper), ("llm", llm)) if f is not None}
    if not folders:
        raise ConversionError("nothing to convert: give --whisper and/or --llm")
    out = Path(out)
    _refuse_existing(out)  # before the slow work
    start = time.time()
    sources: list[_Source] = []
    try:
        for part, folder in folders.items():
            sources.append(_open_source(part, Path(folder)))
        problems = [p for src in sources for p in _check(src)]
        if problems:
            raise ConversionError(f"{len(problems)} problem(s) with the HF weights, nothing written: "
                                  + "; ".join(problems))
        tmp = _staging_dir(out)
        try:
            stats = _write_checkpoint(tmp, sources, np.dtype(dtype))
            _commit(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        for src in sources:
            src.weights.close()
    stats.seconds = time.time() - start
    return stats


def _write_checkpoint(tmp: Path, sources: list[_Source], dtype: np.dtype) -> Stats:
    params_dir = tmp / PARAMS_DIR
    params_dir.mkdir()
    ctx, pipeline, stats = _ts_context(), _Pipeline(), Stats()
    n_tensors = sum(len(leaf.slots()) for src in sources for leaf in src.leaves)
    with _progress(n_tensors, "hf->jax") as bar:
        for src in sources:
            for leaf in src.leaves:
                store = _open_array(params_dir, leaf.name, ctx, create={
                    "dtype": dtype.name, "shape": list(leaf.shape), "chunks": leaf.chunks(dtype.itemsize),
                    "order": leaf.order})
                rows = leaf.rows_per_block(dtype.itemsize)
                for key, layer in leaf.slots():
                    info = src.weights.tensors[src.prefix + key]
                    for start in range(0, info.shape[0], rows):
                        stop = min(start + rows, info.shape[0])
                        # to_ours is a view in `leaf.order`; astype keeps that order, so
                        # TensorStore copies bytes straight into the chunk, never transposing.
                        block = to_ours(leaf.spec.layout, src.weights.read(info.name, start, stop))
                        block = block.astype(dtype, copy=False)
                        pipeline.push(store[leaf.index(layer, start, stop)].write(block), block.nbytes, block)
                    stats.tensors += 1
                    stats.nbytes += info.nbytes
                    bar.update()
        pipeline.drain()
    all_leaves = [leaf for src in sources for leaf in src.leaves]
    _write_orbax_metadata(params_dir, all_leaves, dtype.itemsize)
    meta = {"format": "jaxmusic", "version": FORMAT_VERSION, "dtype": dtype.name, "parts": {}}
    for src in sources:
        tokenizer = Path("tokenizer") / src.part
        _copy_tokenizer_files(src.folder, tmp / tokenizer)
        meta["parts"][src.part] = {"hf_config": src.hf_config, "source_dtype": src.source_dtype,
                                   "tokenizer": str(tokenizer)}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return stats


# --------------------------------------------------------------------------- jaxmusic -> HF

def read_meta(ckpt: str | os.PathLike) -> dict:
    """The checkpoint's `jaxmusic.json` (format version, HF configs, dtypes, tokenizer folders)."""
    path = Path(ckpt) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{ckpt}: not a jaxmusic checkpoint (no {META_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if meta.get("format") != "jaxmusic" or meta.get("version") != FORMAT_VERSION:
        raise ConversionError(f"{path}: unsupported checkpoint format "
                              f"{meta.get('format')!r} version {meta.get('version')!r}")
    return meta


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One tensor of the exported folder and where its bytes come from."""

    name: str
    code: str
    shape: tuple[int, ...]
    leaf: Leaf | None = None      # from the checkpoint ...
    layer: int | None = None
    copy: TensorInfo | None = None  # ... or copied unchanged from --whisper-source

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.code].itemsize


def _export_entries(leaves: list[Leaf], prefix: str, code: str) -> list[_Entry]:
    """Our tensors in reading order: stacked ones parameter by parameter, layer by layer."""
    return [_Entry(prefix + key, code, leaf.hf_shape, leaf, layer)
            for leaf in leaves for key, layer in leaf.slots()]


def _whisper_source_entries(folder: Path, stored_config: dict, weights: HFWeights) -> list[_Entry]:
    """The non-encoder tensors of the original Whisper folder, under WhisperForConditionalGeneration names."""
    from jaxmusic.models.whisper import WhisperEncoderConfig

    source_config = _read_config(folder)
    if WhisperEncoderConfig.from_hf(source_config) != WhisperEncoderConfig.from_hf(stored_config):
        raise ConversionError(f"--whisper-source {folder}: its encoder config differs from the checkpoint's")
    prefix = _whisper_prefix(weights)
    if prefix == "":
        raise ConversionError(f"--whisper-source {folder}: holds a bare encoder, no decoder to copy")
    model_root = prefix[: -len("encoder.")]
    entries = []
    for key, info in weights.tensors.items():
        if key.startswith(prefix):
            continue  # the encoder comes from the checkpoint
        name = "model." + key[len(model_root):] if key.startswith(model_root) else key
        entries.append(_Entry(name, info.dtype, info.shape, copy=info))
    return entries


def _blocks(entry: _Entry, stores: dict) -> list[tuple[int, int, int]]:
    """`(start, stop, bytes)` of each piece to stream `entry` in: row ranges of a checkpoint
    array, byte ranges of a tensor copied raw from the source."""
    if entry.copy is not None:
        return [(s, min(s + BLOCK_BYTES, entry.nbytes), min(BLOCK_BYTES, entry.nbytes - s))
                for s in range(0, entry.nbytes, BLOCK_BYTES)]
    rows, row_bytes = entry.shape[0], entry.nbytes // entry.shape[0]
    step = entry.leaf.rows_per_block(stores[entry.leaf.name].dtype.numpy_dtype.itemsize)
    return [(s, min(s + step, rows), (min(s + step, rows) - s) * row_bytes) for s in range(0, rows, step)]


def _start_read(entry: _Entry, start: int, stop: int, stores: dict, source: HFWeights | None):
    """A future of the block's data: a TensorStore read, or an already done raw read."""
    if entry.copy is not None:
        raw = np.empty(stop - start, np.uint8)
        source.read_into(entry.copy, start, raw)
        return _Done(raw)
    leaf = entry.leaf
    # Read in the leaf's order: the HF view of it is then C-contiguous, no transpose needed.
    return stores[leaf.name][leaf.index(entry.layer, start, stop)].read(order=leaf.order)


def _to_hf_block(entry: _Entry, value: np.ndarray) -> np.ndarray:
    if entry.copy is not None:
        return value
    return np.ascontiguousarray(to_hf(entry.leaf.spec.layout, value).astype(DTYPES[entry.code], copy=False))


class _Done:
    """An already finished 'future', so raw reads share the TensorStore read pipeline."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


def export_hf(ckpt: str | os.PathLike, out: str | os.PathLike, part: str, *,
              whisper_source: str | None = None, max_shard_size: int = 5 * 10**9) -> Stats:
    """jaxmusic checkpoint -> HF folder `out` loadable with `from_pretrained`.

    Tensors are written in the part's original source dtype (recorded at import), so an
    import/export round trip reproduces the original files' values bit for bit.
    llm -> Qwen3ForCausalLM; whisper -> WhisperForConditionalGeneration names, with the
    decoder copied from `whisper_source` when given (else an encoder-only folder).
    """
    ckpt, out = Path(ckpt), Path(out)
    start_time = time.time()
    meta = read_meta(ckpt)
    _refuse_existing(out)  # before the slow work
    if part not in meta["parts"]:
        raise ConversionError(f"{ckpt} has no {part!r} part (it has {sorted(meta['parts'])})")
    if whisper_source is not None and part != "whisper":
        raise ConversionError("--whisper-source only applies to --part whisper")
    info = meta["parts"][part]
    code = dtype_code(np.dtype(info["source_dtype"]))
    leaves = part_leaves(part, info["hf_config"])
    stores = _open_for_export(ckpt, leaves)
    prefix = "model.encoder." if part == "whisper" else ""
    entries = _export_entries(leaves, prefix, code)
    source = None
    if whisper_source is not None:
        source = HFWeights(whisper_source)
        entries += _whisper_source_entries(Path(whisper_source), info["hf_config"], source)
    tmp = _staging_dir(out)
    try:
        stats = _write_hf_folder(tmp, entries, stores, source, max_shard_size)
        config = dict(info["hf_config"])
        config["dtype"] = np.dtype(info["source_dtype"]).name
        if "torch_dtype" in config:  # transformers 4.x name of the same field
            config["torch_dtype"] = config["dtype"]
        config["architectures"] = [HF_CLASSES[part]]
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer = ckpt / info.get("tokenizer", f"tokenizer/{part}")
        if tokenizer.is_dir():
            _copy_tokenizer_files(tokenizer, tmp)
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if source is not None:
            source.close()
    stats.seconds = time.time() - start_time
    return stats


def _open_for_export(ckpt: Path, leaves: list[Leaf]) -> dict:
    """The checkpoint's arrays, checked against the config, ready for block reads.

    Arrays chunked more coarsely than our blocks (Orbax's default: whole arrays up to
    2 GiB, e.g. in a training checkpoint) share a cache holding the largest such chunk,
    so that reading one parameter layer by layer decodes each chunk once, not per block.
    """
    ctx, stores, coarse = _ts_context(), {}, {}
    for leaf in leaves:
        try:
            store = _open_array(ckpt / PARAMS_DIR, leaf.name, ctx)
        except ValueError as e:
            raise ConversionError(f"{ckpt}: cannot open array {leaf.name}: {e}") from None
        if tuple(store.shape) != leaf.shape:
            raise ConversionError(f"{ckpt}: {leaf.name} has shape {list(store.shape)}, "
                                  f"the stored config implies {list(leaf.shape)}")
        stores[leaf.name] = store
        chunk = store.chunk_layout.read_chunk.shape
        if any(c > ours for c, ours in zip(chunk, leaf.chunks(store.dtype.numpy_dtype.itemsize))):
            coarse[leaf.name] = math.prod(chunk) * store.dtype.numpy_dtype.itemsize
    if coarse:
        cached = _ts_context(chunk_cache_bytes=max(coarse.values()))
        stores.update({name: _open_array(ckpt / PARAMS_DIR, name, cached) for name in coarse})
    return stores


def _write_hf_folder(tmp: Path, entries: list[_Entry], stores: dict, source: HFWeights | None,
                     max_shard_size: int) -> Stats:
    by_name = {e.name: e for e in entries}
    shards = plan_shards([(e.name, e.nbytes) for e in entries], max_shard_size)
    files = shard_file_names(len(shards))
    stats = Stats(tensors=len(entries), nbytes=sum(e.nbytes for e in entries))
    pipeline = _Pipeline()
    with _progress(len(entries), "jax->hf") as bar:
        for names, file in zip(shards, files):
            writer = SafetensorsWriter(tmp / file, [(n, by_name[n].code, by_name[n].shape) for n in names])

            def emit(done):
                value, (entry, last) = done
                writer.write(entry.name, _to_hf_block(entry, value))
                if last:
                    bar.update()

            # Reads run ahead of writes (bounded by INFLIGHT_BYTES) so disk and decoding overlap.
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


# --------------------------------------------------------------------------- loading

def stored_shapes(ckpt: str | os.PathLike) -> dict[tuple[str, ...], tuple[int, ...]]:
    """`{tree path: shape}` of every array in `CKPT/params`, from Orbax's `_METADATA`."""
    path = Path(ckpt) / PARAMS_DIR / "_METADATA"
    try:
        tree = json.loads(path.read_text())["tree_metadata"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as e:
        raise ConversionError(f"{path}: unreadable Orbax metadata ({type(e).__name__}: {e})") from None
    return {tuple(k["key"] for k in v["key_metadata"]): tuple(v["value_metadata"]["write_shape"])
            for v in tree.values()}


def load_params(ckpt: str | os.PathLike, part: str, abstract, shardings=None) -> dict:
    """Restore one part's parameters from `CKPT/params` with Orbax, straight onto devices.

    `abstract`: the part's state with `jax.ShapeDtypeStruct` leaves, as an `nnx.State` or a
    pure dict, e.g. `nnx.state(nnx.eval_shape(lambda: Model(cfg, opts, nnx.Rngs(0))))`.
    Values are cast to its dtypes while reading. `shardings`: a matching pytree of
    `jax.sharding.Sharding` (default: each leaf's own `.sharding`, else the first device);
    each device reads only its own shard. Returns a pure dict of `jax.Array`s, e.g. for
    `nnx.replace_by_pure_dict(state, params); model = nnx.merge(graphdef, state)`.
    """
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    if isinstance(abstract, nnx.State):
        abstract = nnx.to_pure_dict(abstract)
    stored = stored_shapes(ckpt)
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    wrong = []
    for path, leaf in flat:
        keys = (part,) + tuple(str(getattr(p, "key", p)) for p in path)
        if stored.get(keys) != tuple(leaf.shape):
            wrong.append(f"{'.'.join(keys)}: stored {stored.get(keys, 'nothing')}, "
                         f"expected {tuple(leaf.shape)}")
    if wrong:  # Orbax would silently pad or truncate a mismatched shape
        raise ConversionError(f"{ckpt}: parameters do not match the model: " + "; ".join(wrong))
    if shardings is None:
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda x: getattr(x, "sharding", None) or default, abstract)
    target = {part: abstract}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target, {part: shardings})
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(
            (Path(ckpt) / PARAMS_DIR).absolute(),
            args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
    return restored[part]


def _reuse_block_buffers() -> None:
    """Tune glibc's malloc for streaming same-sized blocks (command-line runs only).

    By default each TensorStore thread gets its own heap, and 32 MiB blocks sit at glibc's
    mmap threshold: some are fresh mappings (page-faulted in, zeroed and unmapped again,
    which took half of the conversion's system time), others fragment the per-thread heaps
    (peak RSS grew by ~1 GB over Qwen3-8B's 36 layers). One heap, a fixed threshold above
    every block and trimming above two blocks make freed blocks simply reused.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    libc.mallopt(m_arena_max, 1)
    libc.mallopt(m_mmap_threshold, 2 * BLOCK_BYTES)
    libc.mallopt(m_trim_threshold, 2 * BLOCK_BYTES)


def run_cli(convert) -> int:
    """Run `convert() -> Stats` for a command-line tool: summary line, or one `error:` line and exit 1."""
    _reuse_block_buffers()
    try:
        stats = convert()
    except (ConversionError, SafetensorsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions, ...
        print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing written", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an unforeseen failure: still one line, traceback on request
        if os.environ.get("JAXMUSIC_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e} (set JAXMUSIC_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    print(stats.summary())
    return 0
