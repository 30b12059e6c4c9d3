"""Synthetic microbatches for tests, demos and benchmarks (`data.source: synthetic`).

Random token pieces around random log-mel chunks, in exactly the layout of the real
pipeline's batches (`jaxmusic.data.packing`: one splice group per row, `chunks_per_row`
chunk slots per row), built with the real `build_splice_plan`. Sample `i` depends only on
`(seed, i)`, so the stream is reproducible, its state is one integer, and every process
builds exactly its own rows of each microbatch.
"""

from __future__ import annotations

import numpy as np

from jaxmusic.models.splice_plan import build_splice_plan, stack_chunks
from jaxmusic.templates import TokenizedText


class SyntheticSource:
    """Iterator of process-local microbatches (numpy dicts) with `get_state`/`set_state`."""

    def __init__(self, *, vocab_size: int, n_mels: int, frames: int, tokens_per_chunk: int,
                 seq_len: int, chunks_per_row: int, global_rows: int, rows: slice, seed: int = 0):
        """`global_rows`: rows of a microbatch over all processes; `rows`: this process's slice.
        A sample has one audio file of 1..chunks_per_row chunks."""
        self.vocab_size, self.n_mels, self.frames = vocab_size, n_mels, frames
        self.tokens_per_chunk, self.seq_len, self.chunks_per_row = tokens_per_chunk, seq_len, chunks_per_row
        self.global_rows, self.rows, self.seed = global_rows, rows, seed
        self.next_microbatch = 0

    def _sample(self, index: int):
        rng = np.random.default_rng([self.seed, index])
        n_chunks = int(rng.integers(1, self.chunks_per_row + 1))
        pieces, masks = [], []
        for _ in range(2):  # text, <audio>, text
            # an arithmetic progression (mod vocab): learnable from the two previous tokens,
            # so a training run shows its loss falling
            n = int(rng.integers(3, 12))
            start, stride = rng.integers(1, self.vocab_size), rng.integers(1, 4)
            pieces.append(((start + stride * np.arange(n)) % (self.vocab_size - 1) + 1).astype(np.int32))
            masks.append(np.arange(n) >= 2)
        mels = [rng.standard_normal((n_chunks, self.n_mels, self.frames), dtype=np.float32)]
        return TokenizedText(tuple(pieces), tuple(masks)), [n_chunks], mels

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        first = self.next_microbatch * self.global_rows
        samples = [self._sample(first + r) for r in range(self.rows.start, self.rows.stop)]
        self.next_microbatch += 1
        plan = build_splice_plan([s[0] for s in samples], [s[1] for s in samples],
                                 tokens_per_chunk=self.tokens_per_chunk, length_buckets=(self.seq_len,),
                                 chunk_buckets=(self.chunks_per_row,), groups=len(samples), truncate=True)
        mel = stack_chunks([s[2] for s in samples], plan, (self.n_mels, self.frames))
        chunk_mask = np.arange(self.chunks_per_row)[None, :] < np.array([s[1][0] for s in samples])[:, None]
        return {"mel": mel, "chunk_mask": chunk_mask.reshape(-1), "input_ids": plan.input_ids,
                "audio_index": plan.audio_index, "is_audio": plan.is_audio, "positions": plan.positions,
                "labels": plan.labels, "attention_mask": plan.attention_mask,
                "segment_ids": plan.attention_mask.astype(np.int32)}

    def get_state(self) -> dict:
        return {"next_microbatch": self.next_microbatch}

    def set_state(self, state: dict) -> None:
        self.next_microbatch = int(state["next_microbatch"])

    def reshard_state(self, states: list[dict]) -> dict:
        """The state is the same on every process, so any process count can resume it."""
        return states[0]
