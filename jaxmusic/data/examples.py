"""One manifest record -> one training example (runs in the data workers).

    parse -> template + tokenize (cheap checks first) -> decode, crop, resample (per file)
      -> truncation check -> chunk count -> fit to the sequence budget -> features

Every defect of a sample is raised as `BadSample(reason, message)` and returned as a *skip
element* instead of an example, so the stream keeps one element per record: the order of the
stream, and hence every batch, is then the same whatever the number of workers, and the main
process counts and logs skips exactly once, in stream order (see `pipeline`).

`max_audio_seconds` keeps only the start of every file, like a `time` crop.

Budget rules: a sample's sequence is `text_0, audio_1, text_1, ..., audio_n, text_n` with
`n_chunks * tokens_per_chunk` positions per file. A sample whose audio does not fit (more
than `chunks_per_row` chunks, or the last audio token beyond `seq_len`) is skipped as
`audio_exceeds_budget`; audio is never cut mid-chunk and text before an audio file is never cut.
Only the text after the last audio file is truncated; if that removes every answer token the
sample is skipped as `no_answer_within_budget` (it would train on nothing).

Prompts for reinforcement learning (`prompt_tokens` set): the conversation up to its last
`"ASSISTANT: "` (`templates.encode_rl_prompt`), with the last answer, the prompt text and the
record kept for the rewards. Text longer than `prompt_tokens` (each audio placeholder counting
one, as in TRL's prompt ids) is cut from the left, as TRL does; a prompt whose audio that cut
would reach, or that does not fit `seq_len` whole, is skipped as `prompt_exceeds_budget`.

This module needs NumPy, soundfile and a tokenizer, not an accelerator: workers never run JAX.
"""

from __future__ import annotations

import json
import os
import struct
import threading

import numpy as np
import soundfile

from jaxmusic import audio as A
from jaxmusic import templates as T
from jaxmusic.data.config import DataConfig
from jaxmusic.data.manifest import BadSample, RawRecord, parse_record

# A file decoding to this much less than its header declares is truncated. Larger than any
# encoder delay or padding an mp3 decoder trims (a few ms), far below a real truncation.
TRUNCATION_TOLERANCE_S = 0.1


# ------------------------------------------------------------------------------------ audio

def _wav_declared_frames(path: str) -> int | None:
    """Frames a RIFF/WAVE header declares. libsndfile quietly shortens a truncated WAV to what
    is there, so the header is the only witness of the missing part."""
    block_align = None
    with open(path, "rb") as f:
        if f.read(12)[8:12] != b"WAVE":
            return None
        while True:
            head = f.read(8)
            if len(head) < 8:
                return None
            chunk_id, size = head[:4], struct.unpack("<I", head[4:])[0]
            if chunk_id == b"fmt ":
                fmt = f.read(size + (size & 1))
                block_align = struct.unpack("<H", fmt[12:14])[0] if len(fmt) >= 14 else None
            elif chunk_id == b"data":
                # 0 and 0xFFFFFFFF mean "unknown length" (streamed writers); no claim to check.
                if not block_align or size in (0, 0xFFFFFFFF):
                    return None
                return size // block_align
            else:
                f.seek(size + (size & 1), os.SEEK_CUR)


def _declared_seconds(path: str) -> float | None:
    try:
        info = soundfile.info(path)
    except Exception:  # not a libsndfile format: nothing declared that we can check against
        return None
    frames = _wav_declared_frames(path) if info.format == "WAV" else info.frames
    return None if not frames or not info.samplerate else frames / info.samplerate


def _classify_audio_error(e: A.AudioError) -> str:
    """Map `load_audio`'s messages to skip reasons (kept in step by tests/test_data_pipeline.py)."""
    text = str(e)
    if text.startswith("audio file not found") or text.startswith("audio path is not a file"):
        return "missing_audio"
    if "contains no samples" in text:
        return "empty_audio"
    if "NaN or Inf" in text:
        return "nonfinite_audio"
    if text.startswith("crop "):
        return "bad_crop"
    return "unreadable_audio"


def load_checked(path: str, crop: tuple[float, float] | None) -> np.ndarray:
    """`load_audio` plus a truncation check; defects raise BadSample."""
    start, end = crop if crop else (None, None)
    try:
        wav = A.load_audio(path, start=start, end=end)
    except A.AudioError as e:
        raise BadSample(_classify_audio_error(e), str(e)) from None
    declared = _declared_seconds(path)
    if declared is not None:
        expected = min(declared if end is None else end, declared) - (start or 0.0)
        got = len(wav) / A.SAMPLE_RATE
        if expected - got > TRUNCATION_TOLERANCE_S:
            raise BadSample("truncated_audio", f"audio file {path} is truncated: its header declares "
                                               f"{declared:.3f} s but only {got:.3f} s of the requested "
                                               f"{expected:.3f} s decode")
    return wav


# ------------------------------------------------------------------------------------ budget

def truncate_prompt(text: T.TokenizedText, max_tokens: int) -> T.TokenizedText:
    """`text` cut from the left to `max_tokens`, each audio placeholder counting one token."""
    excess = sum(len(p) for p in text.pieces) + text.n_audio - max_tokens
    if excess <= 0:
        return text
    if excess > len(text.pieces[0]):
        raise BadSample("prompt_exceeds_budget", f"the prompt is {excess} tokens over grpo.max_prompt_tokens="
                                                 f"{max_tokens} and cutting it from the left would cut its audio")
    return T.TokenizedText((text.pieces[0][excess:],) + text.pieces[1:],
                           (text.loss_masks[0][excess:],) + text.loss_masks[1:])


def fit_to_budget(text: T.TokenizedText, chunk_counts, cfg: DataConfig,
                  tokens_per_chunk: int, *, prompt: bool = False) -> tuple[T.TokenizedText, bool]:
    """Applies the budget rules of the module docstring; returns (text, was_truncated). A
    `prompt`'s end is what its completion follows: it is never cut."""
    total_chunks = int(sum(chunk_counts))
    if total_chunks > cfg.chunks_per_row:
        raise BadSample("audio_exceeds_budget",
                        f"{total_chunks} audio chunks exceed chunks_per_row={cfg.chunks_per_row}")
    audio_end = sum(len(p) for p in text.pieces[:-1]) + total_chunks * tokens_per_chunk
    if audio_end > cfg.seq_len:
        raise BadSample("audio_exceeds_budget",
                        f"the last audio token is at position {audio_end} > seq_len={cfg.seq_len} "
                        f"({total_chunks} chunks of {tokens_per_chunk} tokens plus the text before them)")
    room = cfg.seq_len - audio_end
    if len(text.pieces[-1]) <= room:
        return text, False
    if prompt:
        raise BadSample("prompt_exceeds_budget", f"the prompt does not fit seq_len={cfg.seq_len}")
    pieces = text.pieces[:-1] + (text.pieces[-1][:room],)
    masks = text.loss_masks[:-1] + (text.loss_masks[-1][:room],)
    if not any(m.any() for m in masks):
        raise BadSample("no_answer_within_budget",
                        f"truncating the text to seq_len={cfg.seq_len} leaves no answer token")
    return T.TokenizedText(pieces, masks), True


# ----------------------------------------------------------------------------------- builder

class ExampleBuilder:
    """`RawRecord -> example dict | skip dict`; a picklable callable for grain's `map`.

    Example: `where, pieces [int32], loss_masks [bool], chunks int32 [n_files], length,
    seconds, truncated` and, with `with_audio`, `audio`: per file either the 16 kHz waveform
    (unpadded, only the samples its chunks keep) or `[n, n_mels, frames]` log-mels, as
    `cfg.features` says. Skip: `where, skip (reason), message`.

    `tokens_per_chunk` and `n_mels` are the model's (audio tokens per 30 s chunk, log-mel
    bins); `tokenizer=None` and `with_audio=False` count lengths only (`data check`).
    `prompt_tokens`: build reinforcement-learning prompts (module docstring), which add
    `prompt` (text), `answer` and `record` (the manifest's JSON object) to an example.
    """

    def __init__(self, cfg: DataConfig, tokenizer, *, tokens_per_chunk: int, n_mels: int = A.N_MELS,
                 with_audio: bool = True, prompt_tokens: int | None = None):
        if tokens_per_chunk < 1 or n_mels < 1:
            raise ValueError(f"tokens_per_chunk and n_mels must be >= 1, got {tokens_per_chunk}, {n_mels}")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.tokens_per_chunk, self.n_mels, self.with_audio = tokens_per_chunk, n_mels, with_audio
        self.prompt_tokens = prompt_tokens
        # HF fast tokenizers raise "Already borrowed" when two threads encode at once
        # (grain's read threads); tokenising is a small share of the work, so serialise it.
        self._lock = threading.Lock()

    def __getstate__(self):
        return {k: v for k, v in vars(self).items() if k != "_lock"}

    def __setstate__(self, state):
        vars(self).update(state)
        self._lock = threading.Lock()

    def __call__(self, raw: RawRecord) -> dict:
        try:
            return {"where": raw.where, **self._build(raw)}
        except BadSample as e:
            return {"where": raw.where, "skip": e.reason, "message": str(e)}

    def _tokenize(self, record) -> T.TokenizedText | tuple[T.TokenizedText, str, str]:
        n_audio = len(record.audio)
        if self.tokenizer is not None:
            with self._lock:
                if self.prompt_tokens is not None:
                    return T.encode_rl_prompt(self.cfg.template, record.conversations, n_audio, self.tokenizer)
                return T.encode_conversation(self.cfg.template, record.conversations, n_audio,
                                             self.tokenizer)
        # `data check` without a tokenizer: the same validation, no text tokens counted
        turns = T.split_turns(record.conversations, n_audio)
        if self.cfg.template == "pretrain" and len(turns) != n_audio:
            raise T.TemplateError(f"pretrain renders one <audio> per turn: {len(turns)} turns "
                                  f"but {n_audio} audio files")
        empty = (np.zeros(0, np.int32),) * (n_audio + 1)
        return T.TokenizedText(empty, tuple(np.zeros(0, bool) for _ in empty))

    def _build(self, raw: RawRecord) -> dict:
        cfg = self.cfg
        record = parse_record(raw)
        try:
            text = self._tokenize(record)
        except T.TemplateError as e:
            message = str(e)
            mismatch = "tags in the questions but" in message or "renders one" in message
            raise BadSample("tag_mismatch" if mismatch else "bad_conversation", message) from None
        extra = {}
        if self.prompt_tokens is not None:
            text, prompt, answer = text
            text = truncate_prompt(text, self.prompt_tokens)
            extra = {"prompt": prompt, "answer": answer, "record": json.loads(raw.text)}

        waves = [load_checked(os.path.join(cfg.audio_root or "", path), crop)
                 for path, crop in zip(record.audio, record.crops)]
        if cfg.max_audio_seconds is not None:  # a crop of the audio, before any chunking
            waves = [w[: int(round(cfg.max_audio_seconds * A.SAMPLE_RATE))] for w in waves]
        counts = np.array([A.count_chunks(len(w)) for w in waves], np.int32)
        text, truncated = fit_to_budget(text, counts, cfg, self.tokens_per_chunk, prompt=bool(extra))
        example = {**extra,
            "pieces": list(text.pieces), "loss_masks": list(text.loss_masks), "chunks": counts,
            "length": int(sum(len(p) for p in text.pieces) + counts.sum() * self.tokens_per_chunk),
            "seconds": float(sum(len(w) for w in waves) / A.SAMPLE_RATE), "truncated": truncated,
        }
        if self.with_audio and cfg.features == "waveform":
            example["audio"] = [w[: n * A.CHUNK_SAMPLES] for w, n in zip(waves, counts)]
        elif self.with_audio:
            example["audio"] = [A.log_mel_np(A.chunk_waveform(w), self.n_mels) for w in waves]
        return example


def is_skip(element: dict) -> bool:
    return "skip" in element
