"""Feeding the train step: a stage's data source, and its microbatches as global arrays.

A source is an iterator of process-local microbatches (dicts of NumPy arrays in the layout
of `jaxmusic.data.packing`, fixed shapes) with `get_state() -> JSON-able` and
`set_state(state)`: `jaxmusic.data.make_dataset` for manifests, `SyntheticSource` for
tests and benchmarks. Each process supplies the rows its devices hold
(`sharding.process_rows`); `next_batch` stacks a step's microbatches and assembles the
global arrays. A checkpoint holds every process's state; `restore_data_state` resumes them on
the same or another number of processes (`jaxmusic.data.reshard_state` re-deals a manifest
stream so that no record is trained twice or left out within its epoch).
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np

from jaxmusic import sharding
from jaxmusic.errors import UserError
from jaxmusic.train.config import ConfigError, StageConfig
from jaxmusic.train.state import ModelSpec
from jaxmusic.train.synthetic import SyntheticSource


def make_source(stage: StageConfig, spec: ModelSpec, mesh, micro_rows: int, stage_dir: Path):
    """This process's iterator of microbatches (`micro_rows` rows in all processes together).

    A GRPO stage reads prompts instead, one per group of completions, with their answers
    (`jaxmusic.data.make_dataset`'s `prompt_tokens`).
    """
    grpo = stage.loss == "grpo"
    if grpo:
        micro_rows //= stage.grpo.generations
    rows = sharding.process_rows(mesh, micro_rows)
    d = stage.data
    if grpo and d.source != "manifests":
        raise ConfigError("loss grpo needs data.source manifests: its rewards read the records' answers")
    if d.source == "synthetic":
        return SyntheticSource(vocab_size=spec.llm.vocab_size, n_mels=spec.whisper.num_mel_bins,
                               frames=2 * spec.whisper.max_source_positions,
                               tokens_per_chunk=spec.tokens_per_chunk, seq_len=d.seq_len,
                               chunks_per_row=d.chunks_per_row, global_rows=micro_rows, rows=rows, seed=d.seed)
    from transformers import AutoTokenizer

    from jaxmusic import data as data_lib

    if not d.tokenizer or not Path(d.tokenizer).is_dir():
        raise ConfigError(f"data.tokenizer: no tokenizer folder ({d.tokenizer!r}); set it, or init from "
                          "a converted checkpoint, which carries one")
    tokenizer = AutoTokenizer.from_pretrained(d.tokenizer, local_files_only=True)
    # Processes that hold the same rows (tensor parallelism across processes) read the same shard.
    local = rows.stop - rows.start
    shard, shards = rows.start // local, micro_rows // local
    dataset = data_lib.make_dataset(
        d, tokenizer, batch_size=local, tokens_per_chunk=spec.tokens_per_chunk,
        mel_shape=(spec.whisper.num_mel_bins, 2 * spec.whisper.max_source_positions),
        num_epochs=_epochs_bound(stage), report_path=str(stage_dir / "data_report.json"),
        process_index=shard, process_count=shards, prompt_tokens=stage.grpo.max_prompt_tokens if grpo else None)
    return ManifestBatches(iter(dataset), shard, shards)


class ManifestBatches:
    """The manifest pipeline's batch iterator, with the data shard it reads (so that states
    saved on another process count can be re-dealt to it)."""

    def __init__(self, iterator, shard: int, shards: int):
        self.iterator, self.shard, self.shards = iterator, shard, shards

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self.iterator)

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, state: dict) -> None:
        self.iterator.set_state(state)

    def reshard_state(self, states: list[dict]) -> dict:
        from jaxmusic import data as data_lib

        return data_lib.reshard_state(states, self.shard, self.shards)

    def close(self) -> None:
        self.iterator.close()


def _epochs_bound(stage: StageConfig) -> int:
    """Passes over the data the stage may make: twice what its steps need, plus one.

    The step count ends the stage; the bound only turns data that cannot fill the batches
    (e.g. every sample too long for `seq_len`) into a "data ran out" error instead of an
    endless search through skipped samples.
    """
    records = max(1, _records(stage))
    return 2 * math.ceil(stage.steps * stage.records_per_step / records) + 1


def _records(stage: StageConfig) -> int:
    from jaxmusic.data import ManifestSource

    return sum(len(ManifestSource(m)) for m in stage.data.manifests)


def next_batch(source, accumulation: int, mesh, micro_rows: int, step: int, packing: bool) -> dict:
    """`accumulation` process-local microbatches, stacked, as global sharded arrays."""
    try:
        micro = [next(source) for _ in range(accumulation)]
    except StopIteration:
        raise UserError(f"the data ran out before step {step + 1} (samples the pipeline skipped are "
                        "counted in the stage's data_report.json); lower steps or epochs, or fix the data") from None
    for m in micro[1:]:
        if {k: v.shape for k, v in m.items()} != {k: v.shape for k, v in micro[0].items()}:
            raise RuntimeError("microbatches of one step differ in shape; the data source must "
                               "produce fixed shapes (data.seq_len, data.chunks_per_row)")
    # Without packing a row holds one sample: no segment mask needed (and cuDNN attention stays usable).
    keys = [k for k in micro[0] if packing or k != "segment_ids"]
    stacked = {k: np.stack([m[k] for m in micro]) for k in keys}
    factor = micro_rows // stacked["input_ids"].shape[1]  # processes' share of the rows
    return sharding.to_global(mesh, stacked, {k: v.shape[1] * factor for k, v in stacked.items()})


def restore_data_state(source, saved: dict) -> None:
    """Set `source` to continue a checkpoint's data states (`saved`: `{"process_count",
    "states"}`, one state per process); a source with `reshard_state` resumes on any process
    count, the others only on the count that saved them."""
    count, states = saved["process_count"], saved["states"]
    if hasattr(source, "reshard_state"):
        source.set_state(source.reshard_state(states))
    elif count == jax.process_count():
        source.set_state(states[jax.process_index()])
    else:
        raise UserError(f"the data iterator state was saved by {count} processes and cannot be "
                        f"resumed by {jax.process_count()}")


def total_steps(stage: StageConfig) -> int:
    """`steps`, or `epochs` x records / records per step (one row, or one GRPO group, per record;
    packing ends earlier)."""
    if stage.steps is not None:
        return stage.steps
    if stage.data.source != "manifests":
        raise ConfigError("epochs needs manifests (a synthetic stream has no length); set steps instead")
    return max(1, math.ceil(stage.epochs * _records(stage) / stage.records_per_step))
