"""MuFun manifests: JSON list or JSONL files of samples, read lazily by record.

A record is one JSON object in the format MuFun's released training code reads::

    {"id": ..., "audio": "a.mp3" | ["a.mp3", "b.wav"],
     "time": [start, end] | [[s, e] | null, ...]   (optional; one pair for every file, or one per file),
     "conversations": [{"from": "human", "value": "<audio>\\n..."}, {"from": "gpt", "value": "..."}, ...]}

`"image"`, the LLaVA key MuFun's loader (TinyLLaVA-Factory) still accepts, is read as an alias
of `"audio"` (a record holding both with different values is bad). An audio path may name a
`.npy` file, a waveform already decoded at 16 kHz (`jaxmusic.audio.load_audio`). `"time"` is one
`[start, end]` pair for every file, or a list with one pair (or null: the whole file) per file.
A record without either key is a text-only sample (LLaVA-style data has those); audio paths are
relative to the audio root (an absolute path is used as is).

Opening a manifest indexes it once: the byte span and line number of every record. Records
are then read on demand with `os.pread`, so a data worker holds a few arrays of offsets
instead of the whole file. In a JSONL file every non-blank line is a record, parsed only when
read: a malformed line becomes a skipped sample (`malformed_json`), it does not stop the run.
A JSON list must parse as a whole (its element boundaries are unknown otherwise), so a broken
list file is an error at start-up, naming the file and position.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import NamedTuple

import numpy as np

from jaxmusic.errors import UserError

# Why a sample was skipped. BAD_DATA reasons are defects of the dataset (strict mode raises on
# them); BUDGET reasons are samples that are fine but do not fit the configured batch shape.
BAD_DATA = ("malformed_json", "bad_record", "bad_conversation", "tag_mismatch", "missing_audio",
            "unreadable_audio", "empty_audio", "nonfinite_audio", "truncated_audio", "bad_crop")
BUDGET = ("audio_exceeds_budget", "no_answer_within_budget", "prompt_exceeds_budget")
SKIP_REASONS = BAD_DATA + BUDGET


class BadSample(Exception):
    """A sample that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str):
        assert reason in SKIP_REASONS, reason
        super().__init__(message)
        self.reason = reason


class ManifestError(UserError, ValueError):
    """A manifest file that cannot be read at all (missing, not JSON/JSONL, broken list)."""


class RawRecord(NamedTuple):
    manifest: str  # path of the manifest file
    line: int      # 1-based line where the record starts
    text: bytes    # the record's JSON text

    @property
    def where(self) -> str:
        return f"{self.manifest}:{self.line}"


@dataclasses.dataclass(frozen=True)
class Record:
    """A parsed, schema-checked sample (the audio itself is not touched yet)."""

    id: str
    audio: tuple[str, ...]                           # paths as written in the manifest
    crops: tuple[tuple[float, float] | None, ...]    # one per audio file
    conversations: list


# ------------------------------------------------------------------------------ indexing

def _index_jsonl(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    starts, ends, lines = [], [], []
    pos = 0
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.strip():
            starts.append(pos)
            ends.append(pos + len(line))
            lines.append(number)
        pos += len(line) + 1
    return np.array(starts, np.int64), np.array(ends, np.int64), np.array(lines, np.int64)


def _index_json_list(path: str, data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte spans of the elements of a top-level JSON array, found with raw_decode."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"manifest {path} is not UTF-8 text ({e})") from None
    decoder = json.JSONDecoder()
    starts, ends, lines = [], [], []
    byte_pos, char_pos, line = 0, 0, 1  # running conversions from character to byte offsets

    def advance(to: int):
        nonlocal byte_pos, char_pos, line
        piece = text[char_pos:to]
        byte_pos += len(piece.encode("utf-8"))
        line += piece.count("\n")
        char_pos = to

    def skip_space(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def fail(i: int, what: str):
        advance(min(i, len(text)))
        raise ManifestError(f"manifest {path}: not a valid JSON list at line {line} ({what})")

    i = skip_space(0) + 1  # past "["
    i = skip_space(i)
    if i < len(text) and text[i] == "]":
        return (np.zeros(0, np.int64),) * 3
    while True:
        try:
            _, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            fail(e.pos, e.msg)
        advance(i)
        starts.append(byte_pos)
        lines.append(line)
        advance(end)
        ends.append(byte_pos)
        i = skip_space(end)
        if i < len(text) and text[i] == ",":
            i = skip_space(i + 1)
        elif i < len(text) and text[i] == "]":
            if skip_space(i + 1) != len(text):
                fail(i + 1, "text after the closing ']'")
            break
        else:
            fail(i, "expected ',' or ']'")
    return np.array(starts, np.int64), np.array(ends, np.int64), np.array(lines, np.int64)


class ManifestSource:
    """Random access to the raw records of one manifest file (a grain data source)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise ManifestError(f"manifest not found: {self.path}")
        with open(self.path, "rb") as f:
            data = f.read()
        first = data.lstrip()[:1]
        if first == b"[":
            self._starts, self._ends, self._lines = _index_json_list(self.path, data)
        elif first in (b"{", b""):
            self._starts, self._ends, self._lines = _index_jsonl(data)
        else:
            raise ManifestError(f"manifest {self.path} is neither a JSON list nor JSONL "
                                f"(starts with {data.lstrip()[:20]!r})")
        self._fd = None

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> RawRecord:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        start, end = int(self._starts[index]), int(self._ends[index])
        return RawRecord(self.path, int(self._lines[index]), os.pread(self._fd, end - start, start))

    def __getstate__(self):  # workers reopen the file themselves
        return {**self.__dict__, "_fd": None}

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __repr__(self) -> str:  # grain shows this in its pipeline summaries
        return f"ManifestSource({self.path!r}, {len(self)} records)"


# ------------------------------------------------------------------------------- parsing

def _crop_pair(value, what: str) -> tuple[float, float] | None:
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise BadSample("bad_record", f"{what} must be [start, end] in seconds, got {value!r}")
    start, end = float(value[0]), float(value[1])
    if not (math.isfinite(start) and math.isfinite(end)):
        raise BadSample("bad_crop", f"{what} {value!r} is not finite")
    return start, end


def parse_record(raw: RawRecord) -> Record:
    """JSON text -> Record, or BadSample (malformed_json / bad_record)."""
    try:
        obj = json.loads(raw.text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadSample("malformed_json", f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise BadSample("malformed_json", f"expected a JSON object, got {type(obj).__name__}")
    audio = obj.get("audio")
    if audio is None:
        audio = obj.get("image")
    elif obj.get("image") not in (None, audio):
        raise BadSample("bad_record", f"'audio' {audio!r} and its alias 'image' {obj['image']!r} disagree")
    if audio is None:
        audio = []
    elif isinstance(audio, str):
        audio = [audio]
    if not isinstance(audio, list) or not all(isinstance(a, str) and a for a in audio):
        raise BadSample("bad_record", f"'audio' must be a path or a list of paths, got {audio!r}")
    conversations = obj.get("conversations")
    if not isinstance(conversations, list):
        raise BadSample("bad_record", "'conversations' is missing or not a list")
    time = obj.get("time")
    if time is None:
        crops = (None,) * len(audio)
    elif len(audio) and isinstance(time, list) and time and all(isinstance(t, list) or t is None for t in time):
        if len(time) != len(audio):
            raise BadSample("bad_record", f"'time' has {len(time)} crops for {len(audio)} audio files")
        crops = tuple(_crop_pair(t, "'time' entry") for t in time)
    else:
        crops = (_crop_pair(time, "'time'"),) * len(audio)
    return Record(id=str(obj.get("id", "")), audio=tuple(audio), crops=crops,
                  conversations=conversations)
