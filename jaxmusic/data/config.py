"""A training stage's data settings: the `data:` section of a stage file.

One frozen dataclass, read by the trainer (`jaxmusic.train.config.StageConfig.data`), the
pipeline (`jaxmusic.data.make_dataset`), the example builder, packing and `jaxmusic data
check`. It holds only what a user configures. What comes from the run is passed to those
functions as arguments: rows per process (`batch_size`), the model's audio tokens per chunk
and log-mel shape, the process index and count, how many passes over the data to allow
(`num_epochs`), where to write the skip report, and the tokenizer's pad id.

The defaults are MuFun's longest setting (arXiv 2508.01178; its released instruction-tuning
scripts): 4096-token rows, audio up to 390 s, i.e. 13 chunks of 30 s, whose 13 x 300 = 3900
audio tokens fit a row with the text around them.
"""

from __future__ import annotations

import dataclasses
import os

from jaxmusic import templates as T
from jaxmusic.configs import ConfigError

SOURCES = ("manifests", "synthetic")
FEATURES = ("waveform", "log_mel")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """A stage's data (field names are the keys of its `data:` section)."""

    source: str = "manifests"        # manifests (jaxmusic.data) | synthetic (tests, demos, benchmarks)
    # [{manifest: PATH, weight: W}, ...]; without weights (or with one manifest): the union of
    # all records, each once per epoch; with weights: a mixture drawn in their proportions
    mixture: list = dataclasses.field(default_factory=list)
    audio_root: str | None = None    # the manifests' audio paths are relative to it (None: to the cwd)
    tokenizer: str | None = None     # local HF tokenizer folder; default: the init checkpoint's tokenizer/llm
    template: str = "qwen2_instruct"  # jaxmusic.templates.TEMPLATES
    seq_len: int = 4096              # tokens per row after splicing (fixed: one compilation)
    chunks_per_row: int = 13         # 30 s audio chunk slots per row (fixed shape)
    max_audio_seconds: float | None = 390.0  # keep only the first this many seconds of a file; None: all
    features: str = "waveform"       # waveform (log-mel in the jitted step, on the device) | log_mel (host)
    packing: bool = False            # several samples per row, kept apart by segment masks
    pack_lookahead: int = 8          # examples that may wait for a later batch when packing
    shuffle: bool = True
    seed: int = 0
    # decoding processes per training process (0: decode in the training process); 2 keep a
    # GPU fed at MuFun's step rate (bench/RESULTS.md, "Data pipeline")
    workers: int = 2
    read_threads: int = 1            # threads per worker (or in the training process when workers=0)
    worker_buffer_size: int = 4      # examples each worker prepares ahead
    prefetch_batches: int = 2        # batches assembled ahead in a thread; 0: off
    strict: bool = False             # stop at the first bad sample instead of skipping it

    def __post_init__(self):
        for key, allowed in (("source", SOURCES), ("features", FEATURES), ("template", T.TEMPLATES)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"data.{key}: {getattr(self, key)!r} is not one of {allowed}")
        for key, least in (("seq_len", 1), ("chunks_per_row", 1), ("pack_lookahead", 1),
                           ("worker_buffer_size", 1), ("workers", 0), ("read_threads", 0),
                           ("prefetch_batches", 0)):
            if getattr(self, key) < least:
                raise ConfigError(f"data.{key} must be >= {least}, got {getattr(self, key)}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"data.seed must be in [0, 2**32), got {self.seed}")
        if self.max_audio_seconds is not None and self.max_audio_seconds <= 0:
            raise ConfigError(f"data.max_audio_seconds must be positive or null, got {self.max_audio_seconds}")
        object.__setattr__(self, "mixture", [_mixture_entry(m) for m in self.mixture])
        given = [m["weight"] is not None for m in self.mixture]
        if len(given) > 1 and any(given) and not all(given):
            raise ConfigError("data.mixture: give every manifest a weight, or none")

    @property
    def manifests(self) -> tuple[str, ...]:
        if not self.mixture:
            raise ConfigError("data.mixture: a list of {manifest: PATH, weight: W} entries is required")
        return tuple(m["manifest"] for m in self.mixture)

    @property
    def weights(self) -> tuple[float, ...] | None:
        """The mixture's weights, or None for the union of all records."""
        if len(self.mixture) < 2 or self.mixture[0]["weight"] is None:
            return None
        return tuple(m["weight"] for m in self.mixture)


def _mixture_entry(entry) -> dict:
    if not isinstance(entry, dict) or not entry.get("manifest") or set(entry) - {"manifest", "weight"}:
        raise ConfigError(f"data.mixture: expected entries {{manifest: PATH, weight: W}}, got {entry!r}")
    weight = entry.get("weight")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0):
        raise ConfigError(f"data.mixture: the weight of {entry['manifest']} must be a positive number, "
                              f"got {weight!r}")
    return {"manifest": os.fspath(entry["manifest"]), "weight": None if weight is None else float(weight)}
