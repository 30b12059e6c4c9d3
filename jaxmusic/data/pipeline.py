"""The training data pipeline on grain: manifests in, fixed-shape batches out.

    manifests (JSON list / JSONL)  -> grain.MapDataset.source per manifest
      -> union + seeded shuffle, or weighted mixture        (see `record_dataset`)
      -> repeat(num_epochs) -> this process's shard  ds[process_index::process_count]
      -> map(ExampleBuilder): decode, crop, resample, chunk, features, template, tokenize,
         labels, fit to the budget -- a skip element instead of any bad sample
      -> to_iter_dataset -> mp_prefetch(num_workers)         [worker processes]
      -> MuFunBatches: count/log skips, pack rows, assemble  [this process]
      -> optional thread prefetch of whole batches

Features: `waveform` (the default) ships each row's 16 kHz chunks and leaves the log-mel to
the accelerator (`jaxmusic.audio.log_mel_jax`, a negligible cost next to the encoder), so a
worker only decodes and resamples; `log_mel` computes it on the host (`log_mel_np`), which
bench/data.py measured at well under the speed of waveform workers (see bench/RESULTS.md).

Determinism: every stage up to the workers is a random-access MapDataset that maps stream
index i to one element (an example, or a skip element for a bad record; nothing is filtered
there). grain's mp_prefetch deals indices i::n to its n workers and interleaves them back in
order, so this process sees the same stream whatever the worker count, and everything
stateful (skip counts, packing, batching) happens here, in stream order.

Resume: the iterator state is a small JSON-able dict -- the next stream index, the indices of
examples deferred by packing, and the counters -- not grain's per-worker state. Restoring
rebuilds the stream from that index (`ds[next_index:]`) and recomputes the deferred examples
by random access, so a restored iterator yields exactly the batches the uninterrupted one
would have, even with a different number of workers.

Bad data: skip elements are logged (one line each), counted by reason and written to
`report_path`; with `strict=True` the first bad-data skip raises `DataError` naming the
manifest file and line (budget skips -- samples too long for the batch shape -- are counted
but never raise).

Several hosts: shards differ in length by at most one record, and bad records differ between
shards, so with a finite `num_epochs` the hosts run out of batches at slightly different steps.
A multi-host run should bound training by a step count (or use `num_epochs=None`) rather than
by the end of the data. The last, partial batch of a finite stream is padded with empty rows.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time
from typing import Any

import grain
import numpy as np

from jaxmusic.errors import UserError
from jaxmusic.data.examples import TOKENS_PER_CHUNK, ExampleBuilder, ExampleSpec, is_skip
from jaxmusic.data.manifest import BAD_DATA, ManifestError, ManifestSource
from jaxmusic.data.packing import BatchShape, Rows, assemble_batch, fill_rows

log = logging.getLogger("jaxmusic.data")

SHM_MIN_BYTES = 1 << 16  # arrays from workers smaller than this are pickled, not put in shared memory
REPORT_INTERVAL_S = 10.0  # the report file is rewritten at most this often while skips occur


class DataError(UserError, ValueError):
    """A bad sample in strict mode; the message names the manifest file and line."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """One training stage's data. `batch_size` is rows per process (per host)."""

    manifests: tuple[str, ...]
    audio_root: str
    weights: tuple[float, ...] | None = None  # None: the union of all records, each once per epoch
    template: str = "qwen2_instruct"
    batch_size: int = 8
    seq_len: int = 4096
    max_chunks: int = 13                      # audio chunks per row
    features: str = "waveform"                # "waveform" (log-mel on the device) | "log_mel" (host)
    max_audio_seconds: float | None = None    # keep only the first this many seconds of a file
    tokens_per_chunk: int = TOKENS_PER_CHUNK  # the model's audio tokens per 30 s chunk (after pooling)
    packing: bool = False
    pack_lookahead: int = 8                   # examples that may wait for a later batch
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1                # None: repeat forever
    num_workers: int = 0                      # worker processes; 0 = decode in this process
    read_threads: int = 1                     # threads per worker (or here when num_workers=0)
    worker_buffer_size: int = 4               # examples each worker prepares ahead
    prefetch_batches: int = 2                 # batches assembled ahead in a thread; 0 = off
    strict: bool = False
    report_path: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "manifests", tuple(os.fspath(m) for m in self.manifests))
        if not self.manifests:
            raise ValueError("at least one manifest is required")
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
            if len(self.weights) != len(self.manifests) or min(self.weights) <= 0:
                raise ValueError(f"weights {self.weights} must be positive, one per manifest")
        for name in ("batch_size", "seq_len", "max_chunks", "pack_lookahead", "worker_buffer_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0 or self.read_threads < 0 or self.prefetch_batches < 0:
            raise ValueError("num_workers, read_threads and prefetch_batches must be >= 0")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {self.num_epochs}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        self.example_spec()  # validates template and features

    def example_spec(self) -> ExampleSpec:
        return ExampleSpec(audio_root=self.audio_root, template=self.template, seq_len=self.seq_len,
                           max_chunks=self.max_chunks, features=self.features,
                           max_audio_seconds=self.max_audio_seconds, tokens_per_chunk=self.tokens_per_chunk)

    def batch_shape(self, pad_id: int) -> BatchShape:
        return BatchShape(self.batch_size, self.seq_len, self.max_chunks, self.features, pad_id=pad_id,
                          tokens_per_chunk=self.tokens_per_chunk)


# ------------------------------------------------------------------------------ the stream

def _seed_for(seed: int, index: int) -> int:
    """Independent shuffle seeds per manifest (grain adds the epoch to a shuffle's seed, so
    seeds that are plain neighbours would replay each other's permutations)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def record_dataset(cfg: DataConfig, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """This process's shard of the (shuffled, repeated or mixed) stream of raw records."""
    sources = [ManifestSource(p) for p in cfg.manifests]
    empty = [s.path for s in sources if len(s) == 0]
    if cfg.weights is None:
        if sum(len(s) for s in sources) == 0:
            raise ManifestError(f"the manifests hold no records: {', '.join(cfg.manifests)}")
        ds = grain.MapDataset.concatenate([grain.MapDataset.source(s) for s in sources if len(s)])
        if cfg.shuffle:
            ds = ds.shuffle(seed=cfg.seed)
        ds = ds.repeat(cfg.num_epochs)
    else:
        if empty:
            raise ManifestError(f"a weighted mixture needs records in every manifest; empty: {', '.join(empty)}")
        # Each manifest cycles through its own reshuffled epochs; one epoch of the mixture is as
        # many samples as all manifests hold together, drawn in proportion to the weights.
        parts = []
        for i, s in enumerate(sources):
            part = grain.MapDataset.source(s)
            parts.append((part.shuffle(seed=_seed_for(cfg.seed, i)) if cfg.shuffle else part).repeat())
        ds = grain.MapDataset.mix(parts, list(cfg.weights))
        if cfg.num_epochs is not None:
            ds = ds[: cfg.num_epochs * sum(len(s) for s in sources)]
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for {process_count} processes")
    return ds[process_index::process_count]


def element_dataset(cfg: DataConfig, tokenizer, process_index: int = 0,
                    process_count: int = 1, spec: ExampleSpec | None = None) -> grain.MapDataset:
    """Stream index -> example or skip element (see `ExampleBuilder`)."""
    builder = ExampleBuilder(spec or cfg.example_spec(), tokenizer)
    return record_dataset(cfg, process_index, process_count).map(builder)


def _worker_init(worker_index: int, worker_count: int) -> None:
    # Workers only use NumPy; should anything touch JAX there, keep it off the accelerator
    # (a GPU backend per worker would take most of the device's memory). jax is already
    # imported here (this module imports it), so set the option, not the environment.
    import jax

    jax.config.update("jax_platforms", "cpu")


def element_stream(elements: grain.MapDataset, cfg: DataConfig, start: int = 0):
    """An iterator over `elements[start:]`, decoded by `cfg.num_workers` processes."""
    ds = elements[start:] if start else elements
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                              prefetch_buffer_size=cfg.worker_buffer_size))
    if cfg.num_workers:
        # only audio is worth a shared-memory segment; token arrays travel pickled
        ds = grain.experimental.WithOptionsIterDataset(
            ds, grain.experimental.DatasetOptions(min_shm_size=SHM_MIN_BYTES))
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                                         per_worker_buffer_size=cfg.worker_buffer_size),
                            worker_init_fn=_worker_init)
    return iter(ds)


# ------------------------------------------------------------------------------- batching

class MuFunBatches(grain.IterDataset):
    """Fixed-shape batches (see `jaxmusic.data.packing`) from the element stream."""

    def __init__(self, cfg: DataConfig, tokenizer, *, process_index: int = 0, process_count: int = 1):
        super().__init__()
        self.cfg = cfg
        self.elements = element_dataset(cfg, tokenizer, process_index, process_count)
        pad_id = getattr(tokenizer, "pad_token_id", None)
        self.shape = cfg.batch_shape(0 if pad_id is None else int(pad_id))
        self.report_path = cfg.report_path
        if self.report_path and process_count > 1:
            root, ext = os.path.splitext(self.report_path)
            self.report_path = f"{root}.process{process_index}{ext or '.json'}"

    def __iter__(self) -> "BatchIterator":
        return BatchIterator(self)

    def __str__(self) -> str:
        return f"MuFunBatches(batch_size={self.cfg.batch_size}, seq_len={self.cfg.seq_len})"


class BatchIterator(grain.DatasetIterator):
    """Checkpointable iterator of MuFunBatches; state documented in the module docstring."""

    def __init__(self, owner: MuFunBatches):
        super().__init__()
        self._owner = owner
        self._stream = None
        self._next_index = 0
        self._pending: list[dict] = []
        self._counters = {"batches": 0, "examples": 0, "truncated": 0, "audio_seconds": 0.0}
        self._skipped: collections.Counter = collections.Counter()
        self._last_report = 0.0
        self._ended = False

    def start_prefetch(self) -> None:
        """Start the workers now (e.g. before restoring the model), not at the first batch."""
        if self._stream is None:
            self._stream = element_stream(self._owner.elements, self._owner.cfg, self._next_index)
        getattr(self._stream, "start_prefetch", lambda: None)()

    # -- reading --------------------------------------------------------------------------

    def _read(self) -> dict | None:
        """The next usable example of the stream, or None at its end."""
        while True:
            if self._stream is None:
                self._stream = element_stream(self._owner.elements, self._owner.cfg, self._next_index)
            try:
                element = next(self._stream)
            except StopIteration:
                return None
            index, self._next_index = self._next_index, self._next_index + 1
            if is_skip(element):
                self._skip(element)
                continue
            element["index"] = index
            self._counters["examples"] += 1
            self._counters["truncated"] += int(element["truncated"])
            self._counters["audio_seconds"] += element["seconds"]
            return element

    def _skip(self, element: dict) -> None:
        line = f"{element['where']}: {element['skip']}: {element['message']}"
        if self._owner.cfg.strict and element["skip"] in BAD_DATA:
            raise DataError(f"bad sample at {line} (strict mode)")
        self._skipped[element["skip"]] += 1
        log.warning("skipping %s", line)
        if time.monotonic() - self._last_report > REPORT_INTERVAL_S:
            self.write_report()

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        cfg = self._owner.cfg
        rows = Rows(self._owner.shape, max_per_row=None if cfg.packing else 1)
        self._pending = fill_rows(rows, self._pending, self._read, cfg.pack_lookahead)
        if rows.empty():
            if not self._ended:  # the end of a finite stream: say what it held
                self._ended = True
                self.write_report()
                (log.warning if self._skipped else log.info)("%s", format_report(self.report()))
            raise StopIteration
        self._counters["batches"] += 1
        return assemble_batch(rows.rows, self._owner.shape)

    # -- state ----------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        return {"next_index": self._next_index,
                "pending": [int(ex["index"]) for ex in self._pending],
                "skipped": dict(sorted(self._skipped.items())),
                **self._counters}

    def set_state(self, state: dict[str, Any]) -> None:
        self._close_stream()
        self._ended = False
        self._next_index = int(state["next_index"])
        self._pending = []
        for index in state["pending"]:
            example = self._owner.elements[int(index)]
            if is_skip(example):
                raise ValueError(f"iterator state names example {index}, which is now a skip "
                                 f"({example['skip']}); the data changed since the state was saved")
            self._pending.append({**example, "index": int(index)})
        self._skipped = collections.Counter(state["skipped"])
        self._counters = {k: state[k] for k in self._counters}

    # -- reporting and cleanup ------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        return report_from_state(self.get_state())

    def write_report(self) -> None:
        self._last_report = time.monotonic()
        if self._owner.report_path:
            write_report(self._owner.report_path, self.report())

    def _close_stream(self) -> None:
        if self._stream is not None:
            close = getattr(self._stream, "close", None)
            if close:
                close()
            self._stream = None

    def close(self) -> None:
        if not self._closed:
            self._close_stream()
            self.write_report()
        super().close()


def report_from_state(state: dict[str, Any]) -> dict[str, Any]:
    """What a run has read so far, from an iterator state (also of a thread-prefetched one)."""
    skipped = dict(state["skipped"])
    return {"examples": state["examples"], "batches": state["batches"],
            "truncated_text": state["truncated"],
            "audio_hours": round(state["audio_seconds"] / 3600.0, 4),
            "skipped_total": sum(skipped.values()), "skipped": skipped,
            "records_read": state["next_index"]}


def write_report(path: str, report: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, path)


def format_report(report: dict[str, Any]) -> str:
    """A short human summary for the end of a run."""
    lines = [f"data: {report['examples']} examples in {report['batches']} batches "
             f"({report['audio_hours']:.2f} h of audio), {report['truncated_text']} with text truncated, "
             f"{report['skipped_total']} skipped"]
    lines += [f"  skipped {reason}: {n}" for reason, n in sorted(report["skipped"].items())]
    return "\n".join(lines)


def make_dataset(cfg: DataConfig, tokenizer, *, process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
    """The stage's batches for this process; `iter()` it for a checkpointable iterator.

    `process_index`/`process_count` default to `jax.process_index()`/`jax.process_count()`.
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    ds = MuFunBatches(cfg, tokenizer, process_index=process_index, process_count=process_count)
    if cfg.prefetch_batches:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch_batches)
    return ds


def iterator_report(iterator) -> dict[str, Any]:
    """`report_from_state` of any iterator `make_dataset` gives."""
    return report_from_state(iterator.get_state())

