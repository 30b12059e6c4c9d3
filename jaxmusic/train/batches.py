"""Feeding the train step: a stage's data source, and its microbatches as global arrays.

A source is an iterator of process-local microbatches (dicts of NumPy arrays in the layout
of `jaxmusic.data.packing`, fixed shapes) with `get_state() -> JSON-able` and
`set_state(state)`: `jaxmusic.data.make_dataset` for manifests, `SyntheticSource` for
tests and benchmarks. Each process supplies the rows its devices hold
(`sharding.process_rows`); `next_batch` stacks a step's microbatches and assembles the
global arrays.
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
    """This process's iterator of microbatches (`micro_rows` rows in all processes together)."""
    rows = sharding.process_rows(mesh, micro_rows)
    d = stage.data
    if d.source == "synthetic":
        return SyntheticSource(vocab_size=spec.llm.vocab_size, n_mels=spec.whisper.num_mel_bins,
                               frames=2 * spec.whisper.max_source_positions,
                               tokens_per_chunk=spec.tokens_per_chunk, seq_len=d.seq_len,
                               chunks_per_row=d.chunks_per_row, global_rows=micro_rows, rows=rows, seed=d.seed)
    from transformers import AutoTokenizer

    from jaxmusic import data as data_lib

    if (spec.whisper.num_mel_bins, spec.whisper.max_source_positions) != (128, 1500):
        raise ConfigError("data.source manifests makes 128 x 3000 log-mels (Whisper large-v3 input); "
                          f"this encoder takes {spec.whisper.num_mel_bins} x {2 * spec.whisper.max_source_positions}")
    if not d.tokenizer or not Path(d.tokenizer).is_dir():
        raise ConfigError(f"data.tokenizer: no tokenizer folder ({d.tokenizer!r}); set it, or init from "
                          "a converted checkpoint, which carries one")
    manifests, weights = _mixture(d)
    local = rows.stop - rows.start
    try:
        cfg = data_lib.DataConfig(
            manifests=manifests, weights=weights, audio_root=d.audio_root or "", template=d.template,
            batch_size=local, seq_len=d.seq_len, max_chunks=d.chunks_per_row, features=d.features,
            max_audio_seconds=d.max_audio_seconds, tokens_per_chunk=spec.tokens_per_chunk,
            packing=d.packing, seed=d.seed,
            num_epochs=_epochs_bound(stage, manifests),
            num_workers=d.workers, strict=d.strict, report_path=str(stage_dir / "data_report.json"))
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    tokenizer = AutoTokenizer.from_pretrained(d.tokenizer, local_files_only=True)
    # Processes that hold the same rows (tensor parallelism across processes) read the same shard.
    shard, shards = rows.start // local, micro_rows // local
    return iter(data_lib.make_dataset(cfg, tokenizer, process_index=shard, process_count=shards))


def _epochs_bound(stage: StageConfig, manifests: list[str]) -> int:
    """Passes over the data the stage may make: twice what its steps need, plus one.

    The step count ends the stage; the bound only turns data that cannot fill the batches
    (e.g. every sample too long for `seq_len`) into a "data ran out" error instead of an
    endless search through skipped samples.
    """
    from jaxmusic.data import ManifestSource

    records = max(1, sum(len(ManifestSource(m)) for m in manifests))
    return 2 * math.ceil(stage.steps * stage.batch.global_batch / records) + 1


def _mixture(d) -> tuple[list[str], list[float] | None]:
    if not d.mixture or not all(isinstance(m, dict) and m.get("manifest") for m in d.mixture):
        raise ConfigError("data.mixture: a list of {manifest: PATH, weight: W} entries is required")
    weights = [m.get("weight") for m in d.mixture]
    if len(d.mixture) == 1 or all(w is None for w in weights):
        return [m["manifest"] for m in d.mixture], None  # the union, each record once per epoch
    if any(w is None for w in weights):
        raise ConfigError("data.mixture: give every manifest a weight, or none")
    return [m["manifest"] for m in d.mixture], [float(w) for w in weights]


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
    count, states = saved["process_count"], saved["states"]
    if count == jax.process_count():
        source.set_state(states[jax.process_index()])
    elif hasattr(source, "reshard_state"):
        source.set_state(source.reshard_state(states))
    else:
        raise UserError(f"the data iterator state was saved by {count} processes and cannot be "
                        f"resumed by {jax.process_count()}")


def total_steps(stage: StageConfig) -> int:
    """`steps`, or `epochs` x records / global batch (one row per record; packing ends earlier)."""
    if stage.steps is not None:
        return stage.steps
    if stage.data.source != "manifests":
        raise ConfigError("epochs needs manifests (a synthetic stream has no length); set steps instead")
    from jaxmusic.data import ManifestSource

    records = sum(len(ManifestSource(m)) for m in _mixture(stage.data)[0])
    return max(1, math.ceil(stage.epochs * records / stage.batch.global_batch))
