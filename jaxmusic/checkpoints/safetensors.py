"""Streaming safetensors reading and writing, without torch and without the whole file in memory.

A safetensors file is an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}` and the
raw C-order tensor bytes. That layout lets us

* read any tensor, or any range of its leading-axis rows, with one positioned read
  (`HFWeights.read`) into a fresh NumPy buffer: memory holds only what was asked for,
  and it is freed as soon as the caller drops it (a memory map would instead keep every
  touched page in the process's resident set);
* write a file whose header is computed up front from shapes and dtypes, then append
  each tensor's bytes as they are produced (`SafetensorsWriter`).

`HFWeights` opens a Hugging Face model folder (one `model.safetensors`, or shards listed by
`model.safetensors.index.json`), checks every header and the index before anything is read,
and refuses pickle-based weights (`.bin`, `.pt`, ...) instead of unpickling them.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxmusic.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit

# safetensors dtype codes -> NumPy dtypes (bfloat16 and float8 come from ml_dtypes).
DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16), "I16": np.dtype(np.int16), "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32), "U64": np.dtype(np.uint64), "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32), "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_CODES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(UserError, ValueError):
    """A user-facing problem with a safetensors file or HF folder; the message names the file."""


def dtype_code(dtype) -> str:
    """NumPy dtype -> safetensors code, e.g. bfloat16 -> "BF16"."""
    return _CODES[np.dtype(dtype)]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str              # safetensors code
    shape: tuple[int, ...]
    path: Path              # file holding the bytes
    offset: int             # absolute byte offset of the first element in `path`

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.np_dtype.itemsize

    @property
    def row_bytes(self) -> int:
        """Bytes of one index along the leading axis."""
        return math.prod(self.shape[1:]) * self.np_dtype.itemsize


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Parse and validate a safetensors header: `({name: TensorInfo}, metadata)`.

    Checks that the header is well-formed JSON, that every tensor's byte range matches its
    shape and dtype, and that the ranges tile the data section, which must be fully
    present in the file (a truncated download fails here, not halfway through a copy).
    """
    def corrupt(why: str) -> SafetensorsError:
        return SafetensorsError(f"{path}: not a valid safetensors file ({why})")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt(f"only {size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER_BYTES, size - 8):
            raise corrupt(f"header length {n} does not fit the file of {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors, ranges = {}, []
    for name, entry in header.items():
        try:
            code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            valid = (code in DTYPES and all(isinstance(d, int) and d >= 0 for d in shape)
                     and isinstance(begin, int) and isinstance(end, int))
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise corrupt(f"bad header entry for {name!r}: {entry!r}")
        info = TensorInfo(name, code, shape, path, data_start + begin)
        if end - begin != info.nbytes:
            raise corrupt(f"{name!r} spans {end - begin} bytes, but {code}{list(shape)} needs {info.nbytes}")
        tensors[name] = info
        ranges.append((begin, end))
    expected = 0
    for begin, end in sorted(ranges):
        if begin != expected:
            raise corrupt(f"tensor data is not contiguous at byte {begin}")
        expected = end
    if size - data_start < expected:
        raise corrupt(f"truncated: header describes {expected} data bytes, file has {size - data_start}")
    return tensors, metadata


class HFWeights:
    """The safetensors weights of one Hugging Face model folder, read lazily."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = folder = Path(folder)
        if not folder.is_dir():
            raise SafetensorsError(f"{folder}: no such folder")
        if (folder / SINGLE_FILE).is_file():
            files = [folder / SINGLE_FILE]
            index = None
        elif (folder / INDEX_FILE).is_file():
            index = _read_index(folder / INDEX_FILE)
            files = [folder / name for name in sorted(set(index.values()))]
            for f in files:
                if not f.is_file():
                    raise SafetensorsError(f"{folder / INDEX_FILE} lists shard {f.name}, which is missing")
        else:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise SafetensorsError(
                    f"{folder} holds PyTorch pickle weights ({', '.join(pickles)}) and no safetensors; "
                    "jaxmusic never unpickles (it can run arbitrary code): convert them to safetensors "
                    "first, e.g. in a trusted environment `AutoModel.from_pretrained(dir)"
                    ".save_pretrained(out, safe_serialization=True)`")
            raise SafetensorsError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}")
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            found, _ = read_header(f)
            self.tensors.update(found)
        if index is not None:
            for name, shard in index.items():
                info = self.tensors.get(name)
                if info is None or info.path.name != shard:
                    raise SafetensorsError(f"{folder / INDEX_FILE}: tensor {name!r} is not in shard {shard}")
        self._fds: dict[Path, int] = {}

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows `[start, stop)` of tensor `name` (all of it by default) as a new array."""
        info = self.tensors[name]
        stop = info.shape[0] if stop is None else stop
        out = np.empty((stop - start,) + info.shape[1:], info.np_dtype)
        self.read_into(info, start * info.row_bytes, out)
        return out

    def read_into(self, info: TensorInfo, byte_offset: int, out: np.ndarray) -> None:
        """Fill the C-contiguous `out` with `info`'s bytes from `byte_offset` (relative to the tensor)."""
        fd = self._fds.get(info.path)
        if fd is None:
            fd = self._fds[info.path] = os.open(info.path, os.O_RDONLY)
        view = memoryview(out.reshape(-1).view(np.uint8))
        done, pos = 0, info.offset + byte_offset
        while done < len(view):
            got = os.preadv(fd, [view[done:]], pos + done)
            if got == 0:
                raise SafetensorsError(f"{info.path}: truncated while reading {info.name!r}")
            done += got

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not a {tensor: file} object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise SafetensorsError(f"{path}: not a valid safetensors index ({type(e).__name__}: {e})") from None
    for shard in weight_map.values():
        if Path(shard).name != shard:  # never follow paths out of the folder
            raise SafetensorsError(f"{path}: shard name {shard!r} is not a plain file name")
    return weight_map


class SafetensorsWriter:
    """Writes one safetensors file from a precomputed header, tensor bytes appended in order.

    `entries` are `(name, dtype_code, shape)` in file order; `write(name, block)` appends the
    next C-order bytes of tensor `name` (a whole tensor or any run of its rows).
    """

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]]):
        header: dict = {"__metadata__": {"format": "pt"}}  # transformers requires format "pt"
        self._pending = collections.deque()  # (tensor, bytes still to write); empty tensors have none
        offset = 0
        for name, code, shape in entries:
            nbytes = math.prod(shape) * DTYPES[code].itemsize
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            if nbytes:
                self._pending.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # pad so tensor data starts 8-byte aligned, as safetensors does
        self.path = path
        self._file = open(path, "wb", buffering=0)
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block)
        expected, left = self._pending[0] if self._pending else (None, 0)
        if name != expected or block.nbytes > left:
            raise RuntimeError(f"{self.path}: got {block.nbytes} bytes of {name!r}, expected "
                               f"{left} more bytes of {expected!r}")
        view = memoryview(block.reshape(-1).view(np.uint8))
        while view:  # raw file writes may be partial
            view = view[self._file.write(view):]
        if block.nbytes == left:
            self._pending.popleft()
        else:
            self._pending[0] = (name, left - block.nbytes)

    def close(self) -> None:
        self._file.close()
        if self._pending:
            raise RuntimeError(f"{self.path}: closed before all tensors were written")


def parse_size(text: str | int) -> int:
    """"5GB" -> 5_000_000_000, "500MiB" -> 500 * 2**20, as transformers reads `max_shard_size`."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB, 2GiB)")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def plan_shards(sizes: list[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Split tensors (in order) into shards of at most `max_shard_size` bytes, as transformers
    does: greedily, and a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def shard_file_names(n_shards: int) -> list[str]:
    """transformers' names: `model.safetensors` alone, else `model-0000i-of-0000n.safetensors`."""
    if n_shards == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]


def write_index(folder: Path, weight_map: dict[str, str], total_size: int, total_parameters: int) -> None:
    index = {"metadata": {"total_parameters": total_parameters, "total_size": total_size},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
