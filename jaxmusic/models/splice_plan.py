"""Where every token and audio frame of a MuFun batch goes, decided on the host (NumPy).

Everything on the device has fixed shapes: `build_splice_plan` lays a batch out, rounding
the sequence length and the number of audio chunks up to configured buckets, so a jitted
step compiles once per bucket pair; `stack_chunks` gathers the log-mel chunks in the plan's
order. The device side (`jaxmusic.models.mufun.splice`) is then a single gather and a select.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxmusic.templates import TokenizedText

IGNORE_INDEX = -100  # label of positions without loss (audio, prompt, padding), as in the reference


@dataclasses.dataclass(frozen=True)
class SplicePlan:
    """Where every token and audio frame of a batch goes; NumPy arrays of shape [B, L].

    `labels` follow the Hugging Face convention: `labels[b, t]` is the token at position t
    (or IGNORE_INDEX), so the loss compares logits[:, :-1] with labels[:, 1:].
    """

    input_ids: np.ndarray       # int32: text tokens in their final place, pad_id elsewhere
    audio_index: np.ndarray     # int32: chunk_row * tokens_per_chunk + frame within the group; 0 elsewhere
    is_audio: np.ndarray        # bool
    attention_mask: np.ndarray  # bool: True on real positions (text or audio)
    positions: np.ndarray       # int32: 0..len-1 per row, 0 on padding
    labels: np.ndarray          # int32: targets, IGNORE_INDEX on audio, prompt and padding
    lengths: np.ndarray         # int32 [B]: real length of each row (after any truncation)
    chunk_counts: tuple[tuple[int, ...], ...]  # per row, per audio file
    chunk_rows: int             # chunk rows per group (bucketed); the chunk batch has groups * chunk_rows
    groups: int
    # int32 [groups * chunk_rows]: encoder frames of each chunk row that are audio (the rest is
    # padding to mask), given `chunk_frames`; padding rows repeat the largest. None: all frames.
    chunk_frames: np.ndarray | None = None


def pick_bucket(n: int, buckets: Sequence[int], what: str) -> int:
    """Smallest bucket >= n."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{what} {n} exceeds the largest bucket {buckets[-1]}")


def _row_layout(sample: TokenizedText, counts: Sequence[int], tokens_per_chunk: int,
                first_chunk: int, pad_id: int, chunk_tokens=None):
    """One row's ids, labels, audio indices and audio flags, unpadded. `chunk_tokens[i][c]`:
    the first so many tokens of file i's chunk c are used (default all `tokens_per_chunk`)."""
    parts = []  # (ids, labels, audio_index, is_audio)
    chunk = first_chunk
    for i, (ids, mask) in enumerate(zip(sample.pieces, sample.loss_masks)):
        ids = np.asarray(ids, np.int32)
        parts.append((ids, np.where(mask, ids, IGNORE_INDEX), np.zeros_like(ids), np.zeros(len(ids), bool)))
        if i < sample.n_audio:
            used = [tokens_per_chunk] * counts[i] if chunk_tokens is None else chunk_tokens[i]
            index = np.concatenate([(chunk + c) * tokens_per_chunk + np.arange(n, dtype=np.int32)
                                    for c, n in enumerate(used)] + [np.zeros(0, np.int32)])
            n = len(index)
            parts.append((np.full(n, pad_id, np.int32), np.full(n, IGNORE_INDEX, np.int32), index,
                          np.ones(n, bool)))
            chunk += counts[i]
    return [np.concatenate(col) for col in zip(*parts)]


def build_splice_plan(samples: Sequence[TokenizedText], chunk_counts: Sequence[Sequence[int]], *,
                      tokens_per_chunk: int, length_buckets: Sequence[int],
                      chunk_buckets: Sequence[int], groups: int = 1, pad_id: int = 0,
                      truncate: bool = False, chunk_frames=None, chunk_tokens=None) -> SplicePlan:
    """Lay out a batch: each sample's text pieces with its files' audio tokens in between.

    `chunk_counts[b][i]` is the number of 30 s chunks of sample b's audio file i. Chunk rows
    are numbered per group of `len(samples) // groups` consecutive samples, in sample order,
    then file order, then chunk order (see `stack_chunks`). L is the smallest length bucket
    that fits the longest row; a row longer than the largest bucket is an error, or, with
    `truncate`, is cut there as the reference does at `tokenizer_model_max_length`.

    Clips shorter than their chunks (Qwen2-Audio's `mask_padding`): `chunk_frames[b][i][c]` is
    the number of audio (not padding) encoder frames of sample b's file i's chunk c, kept in
    the plan's `chunk_frames`; `chunk_tokens[b][i][c]` how many of that chunk's tokens are
    spliced in (its first ones).
    """
    if len(samples) != len(chunk_counts):
        raise ValueError(f"{len(samples)} samples but {len(chunk_counts)} chunk-count lists")
    if groups < 1 or len(samples) % groups:
        raise ValueError(f"batch of {len(samples)} does not divide into {groups} groups")
    per_group = len(samples) // groups
    rows, used = [], [0] * groups
    for b, (sample, counts) in enumerate(zip(samples, chunk_counts)):
        counts = tuple(int(c) for c in counts)
        if len(counts) != sample.n_audio:
            raise ValueError(f"sample {b}: {sample.n_audio} audio placeholders but {len(counts)} chunk counts")
        if any(c < 0 for c in counts):
            raise ValueError(f"sample {b}: negative chunk count in {counts}")
        g = b // per_group
        tokens = None if chunk_tokens is None else chunk_tokens[b]
        rows.append((_row_layout(sample, counts, tokens_per_chunk, used[g], pad_id, tokens), counts))
        used[g] += sum(counts)

    longest = max(len(ids) for (ids, *_), _ in rows)
    limit = length_buckets[-1]
    if longest > limit and not truncate:
        raise ValueError(f"sequence length {longest} exceeds the largest length bucket {limit}")
    length = pick_bucket(min(longest, limit), length_buckets, "sequence length")
    chunk_rows = pick_bucket(max(used), chunk_buckets, "audio chunks per group")

    shape = (len(samples), length)
    plan = dict(input_ids=np.full(shape, pad_id, np.int32), labels=np.full(shape, IGNORE_INDEX, np.int32),
                audio_index=np.zeros(shape, np.int32), is_audio=np.zeros(shape, bool),
                attention_mask=np.zeros(shape, bool), positions=np.zeros(shape, np.int32))
    lengths = np.zeros(len(samples), np.int32)
    for b, ((ids, labels, audio_index, is_audio), _) in enumerate(rows):
        n = min(len(ids), length)
        lengths[b] = n
        plan["input_ids"][b, :n] = ids[:n]
        plan["labels"][b, :n] = labels[:n]
        plan["audio_index"][b, :n] = audio_index[:n]
        plan["is_audio"][b, :n] = is_audio[:n]
        plan["attention_mask"][b, :n] = True
        plan["positions"][b, :n] = np.arange(n)
    frames = None
    if chunk_frames is not None:
        flat = [[n for f in files for n in f] for files in chunk_frames]
        frames = np.full(groups * chunk_rows, max([n for row in flat for n in row] + [1]), np.int32)
        filled = [0] * groups
        for b, row in enumerate(flat):
            g = b // per_group
            start = g * chunk_rows + filled[g]
            frames[start:start + len(row)] = row
            filled[g] += len(row)
    return SplicePlan(**plan, lengths=lengths, chunk_counts=tuple(c for _, c in rows),
                      chunk_rows=chunk_rows, groups=groups, chunk_frames=frames)


def stack_chunks(mels: Sequence[Sequence[np.ndarray]], plan: SplicePlan,
                 feature_shape: tuple[int, int]) -> np.ndarray:
    """Per-sample, per-file log-mels `[n_chunks, *feature_shape]` -> the chunk batch of `plan`.

    Returns float32 `[groups * chunk_rows, *feature_shape]`, with zero rows where a group
    has fewer chunks than the bucket (their audio tokens are computed but never gathered).
    """
    if len(mels) != len(plan.chunk_counts):
        raise ValueError(f"{len(mels)} samples of audio but the plan has {len(plan.chunk_counts)}")
    out = np.zeros((plan.groups * plan.chunk_rows, *feature_shape), np.float32)
    per_group = len(mels) // plan.groups
    used = [0] * plan.groups
    for b, (sample, counts) in enumerate(zip(mels, plan.chunk_counts)):
        if tuple(len(m) for m in sample) != counts:
            raise ValueError(f"sample {b}: chunk counts {tuple(len(m) for m in sample)} "
                             f"differ from the plan's {counts}")
        g = b // per_group
        for m in sample:
            if tuple(m.shape[1:]) != tuple(feature_shape):
                raise ValueError(f"sample {b}: log-mel chunks of shape {m.shape[1:]}, expected {feature_shape}")
            start = g * plan.chunk_rows + used[g]
            out[start:start + len(m)] = m
            used[g] += len(m)
    return out
