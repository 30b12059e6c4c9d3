"""Orbax-format arrays written and read in row blocks with TensorStore, for conversion.

Why not Orbax's own save: it takes whole arrays, and a stacked parameter is large (Qwen3-8B's
`gate_proj` is 36 x 12288 x 4096, 7.2 GB in float32), while conversion is held to under
4 GB of memory on the 16 GB model (`bench/convert.py`). So HF -> jaxmusic writes each HF
tensor (one layer of a stacked parameter), in row blocks of at most `BLOCK_BYTES`, straight
into the array Orbax would have written, and jaxmusic -> HF reads it back the same way. The
layout is Orbax's (zarr v2 arrays in one OCDBT database plus its metadata files), with two
departures Orbax reads transparently:

* chunks of one layer and one row block, so that export reads any single layer back
  without touching the others;
* no compression: on a 2-core machine compressing capped conversion at 80-200 MB/s (Orbax's
  default zstd would save disk space, but it also made restoring 1.8x slower there).

Every parameter is stored exactly as its HF tensor is laid out (`jaxmusic.models.hf_mapping`),
so a block is copied byte for byte, never transposed. Everything else (loading a checkpoint,
training checkpoints) uses Orbax's public API.
"""

from __future__ import annotations

import base64
import collections
import ctypes
import dataclasses
import json
import math
import time
from pathlib import Path

import tensorstore as ts

from jaxmusic.models.hf_mapping import HFTensor

BLOCK_BYTES = 32 * 2**20  # row block = zarr chunk size
INFLIGHT_BYTES = 256 * 2**20  # bytes handed to TensorStore and not yet on disk / not yet consumed


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One parameter array of one part and the HF tensor(s) it comes from."""

    part: str
    spec: HFTensor
    shape: tuple[int, ...]  # with the leading layer axis when stacked
    n_layers: int

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.part,) + self.spec.path

    @property
    def name(self) -> str:  # Orbax's name for the array: the tree path joined by dots
        return ".".join(self.keys)

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """The shape of one HF tensor."""
        return self.shape[1:] if self.spec.stacked else self.shape

    def slots(self) -> list[tuple[str, int | None]]:
        """`(hf_key relative to the model root, layer index or None)` for every HF tensor."""
        if self.spec.stacked:
            return [(k, i) for i, k in enumerate(self.spec.hf_keys(self.n_layers))]
        return [(self.spec.hf_key, None)]

    def rows_per_block(self, itemsize: int) -> int:
        row = math.prod(self.layer_shape[1:]) * itemsize
        return max(1, min(self.layer_shape[0], BLOCK_BYTES // row))

    def chunks(self, itemsize: int) -> list[int]:
        chunk = [self.rows_per_block(itemsize), *self.layer_shape[1:]]
        return [1] + chunk if self.spec.stacked else chunk

    def index(self, layer: int | None, start: int, stop: int) -> tuple:
        """The index of rows `[start, stop)` of one HF tensor in our array."""
        rows = slice(start, stop)
        return (rows,) if layer is None else (layer, rows)


def ts_context(chunk_cache_bytes: int = 0) -> ts.Context:
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


def open_array(params_dir: Path, name: str, ctx: ts.Context, create: dict | None = None):
    """An array of an Orbax params folder; `create={"dtype", "shape", "chunks"}` makes a new one."""
    spec = {"driver": "zarr", "kvstore": {**_kvstore(params_dir, writing=create is not None), "path": name + "/"},
            "recheck_cached_data": False, "recheck_cached_metadata": False}
    if create is not None:
        spec.update(create=True, store_data_equal_to_fill_value=True, dtype=create["dtype"],
                    metadata={"shape": create["shape"], "chunks": create["chunks"], "order": "C",
                              "compressor": None})
    return ts.open(spec, context=ctx).result()


class Pipeline:
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


class Done:
    """An already finished 'future', so raw reads share the TensorStore read pipeline."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


def write_orbax_metadata(params_dir: Path, leaves: list[Leaf], itemsize: int) -> None:
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


def tune_malloc_for_streaming() -> None:
    """Tune glibc's malloc for streaming same-sized blocks (command-line conversions only).

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
