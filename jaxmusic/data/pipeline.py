"""The training data pipeline on grain: manifests in, fixed-shape batches out.

    manifests (JSON list / JSONL)  -> grain.MapDataset.source per manifest
      -> union + seeded shuffle, or weighted mixture        (see `record_dataset`)
      -> repeat(num_epochs)
      -> map(ExampleBuilder): decode, crop, resample, chunk, features, template, tokenize,
         labels, fit to the budget -- a skip element instead of any bad sample
      -> this process's shard  ds[process_index::process_count]
         (after a resume on another process count: see Resume)
      -> to_iter_dataset -> mp_prefetch(workers)             [worker processes]
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

Resume: the iterator state is a small JSON-able dict, not grain's per-worker state. Every
index in it is a position in the whole (unsharded) stream: a shard reads the stream positions
`start + offset + k * stride` (`offset`/`stride`: its shard index and count, `start` 0 in a
fresh run), preceded by an explicit list `extra`; the state holds `next_index` (the next k),
the `extra` positions not read yet, the positions of examples deferred by packing
(`pending`), and the counters. Restoring on the same shards rebuilds the stream from there and
recomputes the deferred examples by random access, so a restored iterator yields exactly the
batches the uninterrupted one would have, even with a different number of workers.

Another process count (`reshard_state`): the saved shards' states are re-dealt. Let `cut` be
the furthest next position of any saved shard; every position from `cut` on is unread by all
of them. The positions below `cut` that some shard has not read yet (its own slots between
its next position and `cut`, and its unread `extra`) and the deferred examples of all shards
are pooled, sorted and dealt round-robin to the new shards (`pool[q::m]` to shard q of m),
which then read the stream from `cut` on as `cut + q + k * m`. Every record is thus read
exactly once per epoch across the resume, though not in the order an uninterrupted run on
either count would have used. The counters (examples, skips, hours) go to the new shard 0, so
the sums over shards stay right.

Bad data: skip elements are logged (one line each), counted by reason and written to
`report_path`; with `strict: true` the first bad-data skip raises `DataError` naming the
manifest file and line (budget skips -- samples too long for the batch shape -- are counted
but never raise).

Several hosts: shards differ in length by at most one record, and bad records differ between
shards, so with a finite `num_epochs` the hosts run out of batches at slightly different steps.
A multi-host run should bound training by a step count (or use `num_epochs=None`) rather than
by the end of the data. The last, partial batch of a finite stream is padded with empty rows.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from typing import Any

import grain
import numpy as np

from jaxmusic import audio as A
from jaxmusic.configs import ConfigError
from jaxmusic.data.config import DataConfig
from jaxmusic.data.examples import ExampleBuilder, is_skip
from jaxmusic.data.manifest import BAD_DATA, ManifestError, ManifestSource
from jaxmusic.data.packing import MEL_FRAMES, Rows, assemble_batch, fill_rows
from jaxmusic.errors import UserError

log = logging.getLogger("jaxmusic.data")

SHM_MIN_BYTES = 1 << 16  # arrays from workers smaller than this are pickled, not put in shared memory
REPORT_INTERVAL_S = 10.0  # the report file is rewritten at most this often while skips occur
WHISPER_MEL_SHAPE = (A.N_MELS, MEL_FRAMES)  # Whisper-large-v3's input: 128 bins x 3000 frames per 30 s


class DataError(UserError, ValueError):
    """A bad sample in strict mode; the message names the manifest file and line."""


def mel_bins(mel_shape: tuple[int, int]) -> int:
    """The log-mel bins to make for an encoder that takes `mel_shape` `(bins, frames)` per chunk.

    Chunks are 30 s (`jaxmusic.audio`), 3000 frames; a waveform becomes the encoder's log-mel
    in the train step (`jaxmusic.losses.log_mels`).
    """
    n_mels, frames = mel_shape
    if frames != MEL_FRAMES:
        raise ConfigError(f"data.source manifests makes {A.CHUNK_SECONDS} s chunks of {MEL_FRAMES} log-mel "
                          f"frames; this encoder takes {frames} (2 x max_source_positions)")
    return n_mels


# ------------------------------------------------------------------------------ the stream

def _seed_for(seed: int, index: int) -> int:
    """Independent shuffle seeds per manifest (grain adds the epoch to a shuffle's seed, so
    seeds that are plain neighbours would replay each other's permutations)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def record_dataset(cfg: DataConfig, *, num_epochs: int | None = 1) -> grain.MapDataset:
    """The whole (shuffled, repeated or mixed) stream of raw records, which every process
    shards as it reads (`BatchIterator`); `num_epochs` passes over the data (None: forever)."""
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    sources = [ManifestSource(p) for p in cfg.manifests]
    empty = [s.path for s in sources if len(s) == 0]
    if cfg.weights is None:
        if sum(len(s) for s in sources) == 0:
            raise ManifestError(f"the manifests hold no records: {', '.join(cfg.manifests)}")
        ds = grain.MapDataset.concatenate([grain.MapDataset.source(s) for s in sources if len(s)])
        if cfg.shuffle:
            ds = ds.shuffle(seed=cfg.seed)
        ds = ds.repeat(num_epochs)
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
        if num_epochs is not None:
            ds = ds[: num_epochs * sum(len(s) for s in sources)]
    return ds


def _worker_init(worker_index: int, worker_count: int) -> None:
    # Workers only use NumPy; should anything touch JAX there, keep it off the accelerator
    # (a GPU backend per worker would take most of the device's memory). jax is already
    # imported here (this module imports it), so set the option, not the environment.
    import jax

    jax.config.update("jax_platforms", "cpu")


def element_stream(elements: grain.MapDataset, cfg: DataConfig, start: int = 0):
    """An iterator over `elements[start:]`, decoded by `cfg.workers` processes."""
    ds = elements[start:] if start else elements
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                              prefetch_buffer_size=cfg.worker_buffer_size))
    if cfg.workers:
        # only audio is worth a shared-memory segment; token arrays travel pickled
        ds = grain.experimental.WithOptionsIterDataset(
            ds, grain.experimental.DatasetOptions(min_shm_size=SHM_MIN_BYTES))
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers,
                                                         per_worker_buffer_size=cfg.worker_buffer_size),
                            worker_init_fn=_worker_init)
    return iter(ds)


# ------------------------------------------------------------------------------- batching

PROMPT_FIELDS = ("prompt", "answer", "record")  # what a reinforcement-learning prompt carries besides tokens


class MuFunBatches(grain.IterDataset):
    """Fixed-shape batches (see `jaxmusic.data.packing`) of stream elements (`ExampleBuilder`'s).

    With `prompts`, a batch also holds `PROMPT_FIELDS` as object arrays `[B]` (None on padding rows).
    """

    def __init__(self, cfg: DataConfig, elements: grain.MapDataset, *, batch_size: int, tokens_per_chunk: int,
                 n_mels: int, pad_id: int, report_path: str | None, shard: int = 0, shards: int = 1,
                 prompts: bool = False):
        """`elements`: the whole stream; this iterator reads shard `shard` of `shards` of it."""
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= shard < shards:
            raise ValueError(f"shard {shard} out of range for {shards} shards")
        self.cfg, self.elements, self.shard, self.shards = cfg, elements, shard, shards
        self.batch_size, self.tokens_per_chunk, self.n_mels, self.pad_id = batch_size, tokens_per_chunk, n_mels, pad_id
        self.report_path, self.prompts = report_path, prompts

    def assemble(self, rows: list[list[dict]]) -> dict[str, np.ndarray]:
        batch = assemble_batch(rows, self.cfg, batch_size=self.batch_size, tokens_per_chunk=self.tokens_per_chunk,
                               pad_id=self.pad_id, n_mels=self.n_mels)
        if self.prompts:
            for key in PROMPT_FIELDS:
                batch[key] = np.empty(self.batch_size, object)
                batch[key][:] = [row[0][key] if row else None for row in rows]
        return batch

    def __iter__(self) -> "BatchIterator":
        return BatchIterator(self)

    def __str__(self) -> str:
        return f"MuFunBatches(batch_size={self.batch_size}, seq_len={self.cfg.seq_len})"


class BatchIterator(grain.DatasetIterator):
    """Checkpointable iterator of MuFunBatches; state documented in the module docstring."""

    def __init__(self, owner: MuFunBatches):
        super().__init__()
        self._owner = owner
        self._stream = None
        self._start, self._stride, self._offset = 0, owner.shards, owner.shard
        self._next_index = 0
        self._extra: list[int] = []
        self._pending: list[dict] = []
        self._counters = {"batches": 0, "examples": 0, "truncated": 0, "audio_seconds": 0.0}
        self._skipped: collections.Counter = collections.Counter()
        self._last_report = 0.0
        self._ended = False

    def _open_stream(self) -> None:
        if self._stream is None:
            shard = self._owner.elements[self._start + self._offset::self._stride]
            self._stream = element_stream(shard, self._owner.cfg, self._next_index)

    def start_prefetch(self) -> None:
        """Start the workers now (e.g. before restoring the model), not at the first batch."""
        self._open_stream()
        getattr(self._stream, "start_prefetch", lambda: None)()

    # -- reading --------------------------------------------------------------------------

    def _read(self) -> dict | None:
        """The next usable example of the stream, or None at its end."""
        while True:
            if self._extra:  # positions dealt to this shard by a resume on another process count
                index = self._extra.pop(0)
                if index >= len(self._owner.elements):  # past the end of a finite stream
                    continue
                element = self._owner.elements[index]
            else:
                self._open_stream()
                try:
                    element = next(self._stream)
                except StopIteration:
                    return None
                index = self._start + self._offset + self._next_index * self._stride
                self._next_index += 1
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
        rows = Rows(self._owner.cfg, self._owner.batch_size)
        self._pending = fill_rows(rows, self._pending, self._read)
        if rows.empty():
            if not self._ended:  # the end of a finite stream: say what it held
                self._ended = True
                self.write_report()
                (log.warning if self._skipped else log.info)("%s", format_report(self.report()))
            raise StopIteration
        self._counters["batches"] += 1
        return self._owner.assemble(rows.rows)

    # -- state ----------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        return {"start": self._start, "stride": self._stride, "offset": self._offset,
                "next_index": self._next_index, "extra": list(self._extra),
                "pending": [int(ex["index"]) for ex in self._pending],
                "skipped": dict(sorted(self._skipped.items())),
                **self._counters}

    def set_state(self, state: dict[str, Any]) -> None:
        state = _with_shard(state, self._owner.shard, self._owner.shards)
        if (state["offset"], state["stride"]) != (self._owner.shard, self._owner.shards):
            raise ValueError(f"the state of data shard {state['offset']} of {state['stride']} cannot be set on shard "
                             f"{self._owner.shard} of {self._owner.shards}; re-deal the saved states with "
                             "reshard_state")
        self._close_stream()
        self._ended = False
        self._start, self._next_index = int(state["start"]), int(state["next_index"])
        self._extra = [int(i) for i in state["extra"]]
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


def _with_shard(state: dict[str, Any], offset: int, stride: int) -> dict[str, Any]:
    """A state saved before states named their shard (indices within shard `offset` of `stride`)
    in today's form."""
    if "stride" in state:
        return state
    return {**state, "start": 0, "stride": stride, "offset": offset, "extra": [],
            "pending": [offset + int(i) * stride for i in state["pending"]]}


def reshard_state(states: list[dict[str, Any]], shard: int, shards: int) -> dict[str, Any]:
    """The state of data shard `shard` of `shards` that continues a run saved as `states`, one
    per process in process order (processes that read the same shard saved the same state).

    On the saved shard count it is that shard's own state (an exact resume); on another, the
    saved positions are re-dealt as the module docstring's "Resume" says.
    """
    saved: dict[int, dict[str, Any]] = {}
    for i, state in enumerate(states):
        state = _with_shard(state, i, len(states))
        saved.setdefault(int(state["offset"]), state)
    layouts = {(int(s["start"]), int(s["stride"])) for s in saved.values()}
    if len(layouts) != 1 or sorted(saved) != list(range(next(iter(layouts))[1])):
        raise ValueError(f"the saved data states do not describe one complete set of shards: "
                         f"{sorted((s['offset'], s['stride'], s['start']) for s in saved.values())}")
    (start, stride), = layouts
    if stride == shards:
        return saved[shard]
    heads = {p: start + p + int(s["next_index"]) * stride for p, s in saved.items()}
    cut = max(heads.values())
    unread = sorted([int(i) for s in saved.values() for i in s["extra"]]
                    + [i for p, head in heads.items() for i in range(head, cut, stride)])
    pending = sorted(int(i) for s in saved.values() for i in s["pending"])
    totals: dict[str, Any] = {k: sum(s[k] for s in saved.values()) if shard == 0 else 0
                              for k in ("batches", "examples", "truncated", "audio_seconds")}
    skipped = collections.Counter()
    if shard == 0:
        for s in saved.values():
            skipped.update(s["skipped"])
    return {"start": cut, "stride": shards, "offset": shard, "next_index": 0,
            "extra": unread[shard::shards], "pending": pending[shard::shards],
            "skipped": dict(sorted(skipped.items())), **totals}


def report_from_state(state: dict[str, Any]) -> dict[str, Any]:
    """What a run has read so far, from an iterator state (also of a thread-prefetched one)."""
    skipped = dict(state["skipped"])
    return {"examples": state["examples"], "batches": state["batches"],
            "truncated_text": state["truncated"],
            "audio_hours": round(state["audio_seconds"] / 3600.0, 4),
            "skipped_total": sum(skipped.values()), "skipped": skipped,
            "records_read": state["examples"] + sum(skipped.values())}


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


def make_dataset(cfg: DataConfig, tokenizer, *, batch_size: int, tokens_per_chunk: int,
                 mel_shape: tuple[int, int] = WHISPER_MEL_SHAPE, num_epochs: int | None = 1,
                 report_path: str | None = None, process_index: int | None = None,
                 process_count: int | None = None, prompt_tokens: int | None = None) -> grain.IterDataset:
    """The stage's batches for this process; `iter()` it for a checkpointable iterator.

    From the run: `batch_size` rows per process; the model's `tokens_per_chunk` (audio tokens
    per 30 s chunk) and `mel_shape` (its encoder's log-mel `(bins, frames)`, see `mel_bins`);
    `num_epochs` passes over the data (None: forever); `report_path` for the skip counts (one
    file per process when there are several). The pad id is the tokenizer's (0 if it has none).
    `process_index`/`process_count` default to `jax.process_index()`/`jax.process_count()`.
    `prompt_tokens`: batches of reinforcement-learning prompts, one per row (`ExampleBuilder`).
    """
    n_mels = mel_bins(mel_shape)
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if prompt_tokens is not None and cfg.packing:
        raise ConfigError("data.packing: prompts for reinforcement learning take one row each")
    builder = ExampleBuilder(cfg, tokenizer, tokens_per_chunk=tokens_per_chunk, n_mels=n_mels,
                             prompt_tokens=prompt_tokens)
    elements = record_dataset(cfg, num_epochs=num_epochs).map(builder)  # the whole stream; sharded when read
    if report_path and process_count > 1:
        root, ext = os.path.splitext(report_path)
        report_path = f"{root}.process{process_index}{ext or '.json'}"
    pad_id = getattr(tokenizer, "pad_token_id", None)
    ds = MuFunBatches(cfg, elements, batch_size=batch_size, tokens_per_chunk=tokens_per_chunk, n_mels=n_mels,
                      pad_id=0 if pad_id is None else int(pad_id), report_path=report_path,
                      shard=process_index, shards=process_count, prompts=prompt_tokens is not None)
    if cfg.prefetch_batches:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch_batches)
    return ds


def iterator_report(iterator) -> dict[str, Any]:
    """`report_from_state` of any iterator `make_dataset` gives."""
    return report_from_state(iterator.get_state())

