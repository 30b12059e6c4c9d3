"""Examples -> fixed-shape batches, with optional packing of several samples per row.

A batch holds `batch_size` rows of `seq_len` positions and `chunks_per_row` audio chunk
slots per row, whatever its content, so a jitted train step compiles once:

    input_ids, labels, positions, segment_ids, audio_index  int32 [B, L]
    is_audio, attention_mask (True on real positions)       bool  [B, L]
    mel   float32 [B * C, n_mels, 3000]  (features "log_mel"; n_mels the encoder's) -- or --
    wave  float32 [B * C, 480000]        (features "waveform"; `log_mel_jax(wave)` on the device)
    chunk_mask  bool [B * C]: True on chunk slots that hold audio

(3000 log-mel frames, 480,000 samples: one 30 s chunk, `jaxmusic.audio`.) `batch_size` (rows
per process), `tokens_per_chunk` (the model's audio tokens per chunk), `n_mels` and the pad
id come from the run and are arguments; the rest is the stage's `DataConfig`.

Chunk slots `b * C .. b * C + C - 1` belong to row b, so sharding rows and chunk slots the
same way over devices keeps every row with its audio. The text/audio layout is
`jaxmusic.models.splice_plan.build_splice_plan`'s with one splice group per row (`audio_index`
counts within the row's own C slots), so on the device, with `audio_embeds [B * C,
tokens_per_chunk, D]`:

    mufun.splice(llm.embed(input_ids), audio_embeds, audio_index, is_audio, groups=B)

(`groups` = the number of rows; that is correct under any data-parallel sharding of B.)

`segment_ids` number the samples of a row 1, 2, ... (0 = padding); `positions` restart at 0
with every sample. Attention must stay inside a segment: `segment_attention_mask` gives the
`[B, 1, L, L]` mask for `Qwen3ForCausalLM(..., mask=...)` (same segment AND causal).
`labels` are the plan's (token at t, -100 on audio, prompt and padding), plus -100 on the first
position of every sample: the shifted loss would otherwise score a sample's first token
from the previous sample's last position. (That token is never a target with MuFun's
templates; the rule keeps it so for any data.)

Packing is first-fit in stream order: each example goes into the first row with room for
its tokens and chunks. One that fits no row is deferred to the next batch, which places the
deferred ones first; a batch closes when its rows are full or `pack_lookahead` examples wait.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxmusic import audio as A
from jaxmusic.data.config import DataConfig
from jaxmusic.models.splice_plan import IGNORE_INDEX, build_splice_plan
from jaxmusic.templates import TokenizedText


MEL_FRAMES = A.CHUNK_SAMPLES // A.HOP_LENGTH  # log-mel frames of one 30 s chunk


def audio_key(features: str) -> str:
    """The batch key of the chunk slots' audio."""
    return "wave" if features == "waveform" else "mel"


def chunk_shape(features: str, n_mels: int = A.N_MELS) -> tuple[int, ...]:
    """One chunk slot's audio: a 30 s waveform at 16 kHz, or its `[n_mels, frames]` log-mel."""
    return (A.CHUNK_SAMPLES,) if features == "waveform" else (n_mels, MEL_FRAMES)


class Rows:
    """The rows of one batch being filled, first-fit."""

    def __init__(self, cfg: DataConfig, batch_size: int):
        self.cfg = cfg
        self.max_per_row = None if cfg.packing else 1
        self.rows: list[list[dict]] = [[] for _ in range(batch_size)]
        self.tokens = [0] * batch_size
        self.chunks = [0] * batch_size

    def _fits(self, r: int, example: dict) -> bool:
        if self.max_per_row is not None and len(self.rows[r]) >= self.max_per_row:
            return False
        return (self.tokens[r] + example["length"] <= self.cfg.seq_len
                and self.chunks[r] + int(example["chunks"].sum()) <= self.cfg.chunks_per_row)

    def place(self, example: dict) -> bool:
        for r in range(len(self.rows)):
            if self._fits(r, example):
                self.rows[r].append(example)
                self.tokens[r] += example["length"]
                self.chunks[r] += int(example["chunks"].sum())
                return True
        return False

    def full(self) -> bool:
        """No row can take even a one-token, audio-free sample."""
        return all((self.max_per_row is not None and len(row) >= self.max_per_row)
                   or tokens >= self.cfg.seq_len for row, tokens in zip(self.rows, self.tokens))

    def empty(self) -> bool:
        return not any(self.rows)


def fill_rows(rows: Rows, waiting: list[dict], read) -> list[dict]:
    """Fills `rows` first with the `waiting` examples, then with `read()` ones (None = end of
    data), until the rows are full or `pack_lookahead` examples fit nowhere; returns those."""
    deferred = [ex for ex in waiting if not rows.place(ex)]
    while not rows.full() and len(deferred) < rows.cfg.pack_lookahead:
        example = read()
        if example is None:
            break
        if not rows.place(example):
            deferred.append(example)
    return deferred


def _merge(examples: list[dict]) -> tuple[TokenizedText, tuple[int, ...]]:
    """Several examples as one TokenizedText: the last piece of one joins the first of the next."""
    pieces, masks, counts = [np.zeros(0, np.int32)], [np.zeros(0, bool)], []
    for ex in examples:
        pieces[-1] = np.concatenate([pieces[-1], ex["pieces"][0]])
        masks[-1] = np.concatenate([masks[-1], ex["loss_masks"][0]])
        pieces += list(ex["pieces"][1:])
        masks += list(ex["loss_masks"][1:])
        counts += [int(c) for c in ex["chunks"]]
    return TokenizedText(tuple(pieces), tuple(masks)), tuple(counts)


def assemble_batch(rows: list[list[dict]], cfg: DataConfig, *, batch_size: int, tokens_per_chunk: int,
                   pad_id: int, n_mels: int = A.N_MELS) -> dict[str, np.ndarray]:
    """Rows of examples (at most `batch_size`; missing rows are padding) -> a batch dict."""
    rows = list(rows) + [[] for _ in range(batch_size - len(rows))]
    merged = [_merge(row) for row in rows]
    plan = build_splice_plan([m[0] for m in merged], [m[1] for m in merged],
                             tokens_per_chunk=tokens_per_chunk,
                             length_buckets=(cfg.seq_len,), chunk_buckets=(cfg.chunks_per_row,),
                             groups=batch_size, pad_id=pad_id)
    positions = np.zeros_like(plan.positions)
    segment_ids = np.zeros_like(plan.positions)
    labels = plan.labels.copy()
    audio = np.zeros((batch_size, cfg.chunks_per_row, *chunk_shape(cfg.features, n_mels)), np.float32)
    chunk_mask = np.zeros(audio.shape[:2], bool)
    for b, row in enumerate(rows):
        start, slot = 0, 0
        for k, ex in enumerate(row, start=1):
            n = ex["length"]
            segment_ids[b, start:start + n] = k
            positions[b, start:start + n] = np.arange(n)
            labels[b, start] = IGNORE_INDEX
            start += n
            for feats, n_chunks in zip(ex.get("audio", ()), ex["chunks"]):
                if cfg.features == "waveform":
                    audio[b, slot:slot + n_chunks].reshape(-1)[: len(feats)] = feats
                else:
                    audio[b, slot:slot + n_chunks] = feats
                chunk_mask[b, slot:slot + n_chunks] = True
                slot += n_chunks
        if start != plan.lengths[b]:
            raise AssertionError(f"row {b}: examples say {start} positions, the splice plan {plan.lengths[b]}")
    return {"input_ids": plan.input_ids, "labels": labels, "positions": positions,
            "segment_ids": segment_ids, "attention_mask": plan.attention_mask,
            "is_audio": plan.is_audio, "audio_index": plan.audio_index,
            audio_key(cfg.features): audio.reshape(-1, *audio.shape[2:]), "chunk_mask": chunk_mask.reshape(-1)}


def segment_attention_mask(segment_ids):
    """`[B, L]` segment ids -> `[B, 1, L, L]` bool: query t sees key s iff same segment and s <= t.

    Padding (segment 0) sees only padding, so no query row is empty. Jittable.
    """
    seg = jnp.asarray(segment_ids)
    same = seg[:, :, None] == seg[:, None, :]
    length = seg.shape[1]
    causal = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
    return (same & causal[None])[:, None]
