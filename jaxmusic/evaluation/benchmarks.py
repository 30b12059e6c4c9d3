"""Benchmark files -> `Item`s, in either of two layouts (`read_benchmark` tells them apart).

**jaxmusic's JSONL** (or a JSON list), one item per line:
`{"id": ..., "audio": "a.wav" | [...], "time": [start, end] (optional), "question": "...",
"choices": ["...", ...], "answer": "B" | 1 | "option text", "subset": "tempo" (optional)}`.
`answer` is a letter (A = first choice), a 0-based integer index, or the text of one choice.
Audio paths are relative to `--audio-root` (default: the benchmark file's folder). The
choices are shown as `templates.choices_text` lays them out ("A. first\\nB. second").

**MuCUE as published** (`Yi3852/MuCUE` on the Hugging Face Hub): a snapshot folder, or one of
its parquet files, read as it is. One split per subset, stored as `data/<split>-NNNNN-of-NNNNN.parquet`
(a `README.md` front matter `configs: [{data_files: [{split, path}]}]` maps splits to files when
present; its order is kept). Columns: `audio` (the Hub `Audio` feature, `{bytes, path}` with
the encoded file embedded), `question`, `choices_text` (the lettered options as one string,
shown verbatim: its layout varies between subsets), `correct_choice` (a letter) and `time_seg`
(null or `[start, end]` seconds). The subset is the split name. Only the text columns are read
up front; each item's audio bytes are read from its row group when the item is scored.
The option texts are recovered from `choices_text` (`split_choices`) for the rule-based letter
extraction and for `--mode loglik`; where the layout defeats that, the item keeps four
unnamed options A-D (MuCUE's items are all four-way).

A malformed item or row is a `UserError` naming its file and line (or row).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import re
from pathlib import Path
from typing import Sequence

from jaxmusic import templates
from jaxmusic.errors import UserError

LETTERS = templates.LETTERS
MUCUE_COLUMNS = ("question", "choices_text", "correct_choice", "audio")  # and the optional time_seg
MUCUE_OPTIONS = 4


@dataclasses.dataclass(frozen=True)
class ParquetAudio:
    """An encoded audio file embedded in a parquet row (a Hub `Audio` feature); read on demand."""

    file: str
    row: int                   # row within the file
    name: str = ""             # the feature's `path`: the clip's original file name

    def read(self) -> bytes | None:
        """The encoded file's bytes (None when the row holds none)."""
        return _row_group_audio(self.file, *_row_group_of(self.file, self.row))

    def __str__(self) -> str:
        return f"{self.file} row {self.row}" + (f" ({self.name})" if self.name else "")


@dataclasses.dataclass(frozen=True)
class Item:
    key: str                    # where + content digest: what resume matches on
    id: str
    subset: str
    audio: tuple[str | ParquetAudio, ...]
    segments: tuple[tuple[float, float] | None, ...]
    question: str
    choices: tuple[str, ...]    # option texts ("" where a MuCUE layout hides them)
    answer: int
    choices_text: str           # the options as the prompt shows them

    @property
    def prompt(self) -> str:
        """MuCUE's prompt: `"Choose the correct option for the question based on the audio. "
        + question + " " + choices_text`."""
        return templates.MUCUE_INSTRUCTION + self.question + " " + self.choices_text


def read_benchmark(path: str | Path, audio_root: str | Path | None = None, limit: int | None = None) -> list[Item]:
    """The items of a JSONL/JSON benchmark file, or of a MuCUE snapshot folder or parquet file."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".parquet":
        items = read_mucue(path)
        return items[:limit] if limit is not None else items
    return read_jsonl(path, audio_root, limit)


# ------------------------------------------------------------------------------ JSONL

def answer_index(answer, choices: Sequence[str]) -> int:
    """A letter, a 0-based index or one choice's exact text -> the choice's index."""
    if isinstance(answer, bool):
        raise ValueError(f"answer {answer!r} is neither a letter, an index nor a choice")
    if isinstance(answer, int):
        if not 0 <= answer < len(choices):
            raise ValueError(f"answer index {answer} outside 0..{len(choices) - 1}")
        return answer
    if isinstance(answer, str):
        a = answer.strip()
        if len(a) == 1 and a.upper() in LETTERS[:len(choices)]:
            return LETTERS.index(a.upper())
        matches = [i for i, c in enumerate(choices) if c.strip() == a]
        if len(matches) == 1:
            return matches[0]
    raise ValueError(f"answer {answer!r} is neither a letter, a 0-based index nor one choice's text")


def _segments(time, n_audio: int):
    if time is None:
        return ()
    if len(time) == 2 and all(isinstance(t, (int, float)) for t in time):
        return (tuple(float(t) for t in time),)
    if len(time) != n_audio:
        raise ValueError(f"'time' has {len(time)} entries for {n_audio} audio files")
    return tuple(None if t is None else tuple(float(x) for x in t) for t in time)


def _digest(row: dict) -> str:
    return hashlib.sha1(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()[:12]


def read_jsonl(path: Path, audio_root: str | Path | None = None, limit: int | None = None) -> list[Item]:
    """Parse and validate a JSONL/JSON benchmark file; a malformed item is a UserError naming its line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the benchmark ({e})") from None
    root = Path(audio_root) if audio_root is not None else path.parent
    if text.lstrip().startswith("["):
        try:
            rows = [(i + 1, r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n}: not valid JSON ({e})") from None
    items = []
    for n, d in rows[:limit] if limit is not None else rows:
        try:
            audio = d.get("audio", [])
            audio = [audio] if isinstance(audio, str) else list(audio)
            choices = d["choices"]
            if isinstance(choices, dict):  # {"A": ..., "B": ...}
                choices = [choices[k] for k in sorted(choices)]
            if len(choices) < 2 or not all(isinstance(c, str) for c in choices) or len(choices) > len(LETTERS):
                raise ValueError(f"'choices' must be 2-{len(LETTERS)} strings")
            if not isinstance(d["question"], str) or not d["question"].strip():
                raise ValueError("'question' must be a non-empty string")
            if d["question"].count(templates.AUDIO_PLACEHOLDER) not in (0, len(audio)):
                raise ValueError(f"the question has {d['question'].count(templates.AUDIO_PLACEHOLDER)} "
                                 f"{templates.AUDIO_PLACEHOLDER} tags for {len(audio)} audio files")
            items.append(Item(key=f"{n}:{_digest(d)}", id=str(d.get("id", n)), subset=str(d.get("subset") or "default"),
                              audio=tuple(str(root / a) for a in audio),
                              segments=_segments(d.get("time"), len(audio)), question=d["question"],
                              choices=tuple(choices), answer=answer_index(d["answer"], choices),
                              choices_text=templates.choices_text(choices)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{path}:{n}: not a benchmark item ({type(e).__name__}: {e}); expected "
                            '{"audio", "question", "choices", "answer", optional "time", "subset", "id"}') from None
    return items


# ------------------------------------------------------------------------------ MuCUE

def split_choices(choices_text: str) -> list[str] | None:
    """The option texts of a lettered `choices_text`, or None when its layout is not recognised.

    Options are marked by consecutive capital letters A, B, C, ... each at the start of the text
    or after white space or `,;`, written `A.`, `A)`, `A:`, `(A)` or `[A]`: "A. x\\nB. y",
    "(A) x (B) y", "A: x; B: y". At least two options.
    """
    starts, ends = [], []
    pos = 0
    for letter in LETTERS:
        mark = re.compile(rf"(?:^|(?<=[\s,;]))(?:\({letter}\)|\[{letter}\]|{letter}[.):：])\s*")
        m = mark.search(choices_text, pos)
        if m is None:
            break
        starts.append(m.start())
        ends.append(m.end())
        pos = m.end()
    if len(starts) < 2:
        return None
    texts = [choices_text[a:b].strip().rstrip(",;").strip() for a, b in zip(ends, starts[1:] + [len(choices_text)])]
    return texts if all(texts) else None


def _split_of(parquet: Path) -> str:
    """`gtzan-00000-of-00002.parquet` (the Hub's file names) -> `gtzan`; other names: the stem."""
    m = re.fullmatch(r"(.+?)-\d{5}-of-\d{5}\.parquet", parquet.name)
    return m.group(1) if m else parquet.stem


def _front_matter_files(folder: Path) -> dict[str, list[Path]] | None:
    """`{split: files}` from a dataset card's `configs:` front matter, or None without one."""
    import yaml

    card = folder / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    m = re.match(r"---\s*\n(.*?)\n---\s*\n", text, re.S)
    try:
        meta = yaml.safe_load(m.group(1)) if m else None
    except yaml.YAMLError as e:
        raise UserError(f"{card}: cannot read its front matter ({e})") from None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    configs = [c for c in configs if isinstance(c, dict)] if isinstance(configs, list) else None
    if not configs:
        return None
    config = next((c for c in configs if c.get("config_name") == "default"), configs[0])
    data_files = config.get("data_files")
    if isinstance(data_files, str):
        data_files = [{"split": "train", "path": data_files}]
    splits: dict[str, list[Path]] = {}
    for entry in data_files or []:
        patterns = entry.get("path") if isinstance(entry, dict) else None
        if not patterns:
            raise UserError(f"{card}: a data_files entry without a path: {entry!r}")
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            found = sorted(Path(p) for p in glob.glob(str(folder / pattern)))
            splits.setdefault(str(entry.get("split", "train")), []).extend(found)
    return splits


def mucue_files(path: Path) -> dict[str, list[Path]]:
    """`{split: parquet files}` of a MuCUE snapshot folder or of one parquet file."""
    if path.is_file():
        return {_split_of(path): [path]}
    if not path.is_dir():
        raise UserError(f"{path}: cannot read the benchmark (no such file or folder)")
    splits = _front_matter_files(path)
    if splits is None:
        splits = {}
        for f in sorted(path.glob("**/*.parquet")):
            splits.setdefault(_split_of(f), []).append(f)
    splits = {s: files for s, files in splits.items() if files}
    if not splits:
        raise UserError(f"{path}: no parquet files (expected a Hub snapshot with data/<split>-*.parquet)")
    return splits


@functools.lru_cache(maxsize=64)
def _row_groups(file: str) -> tuple[int, ...]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(file).metadata
    return tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))


def _row_group_of(file: str, row: int) -> tuple[int, int]:
    for group, n in enumerate(_row_groups(file)):
        if row < n:
            return group, row
        row -= n
    raise IndexError(f"{file} has no row {row}")


def _row_group_audio(file: str, group: int, row: int) -> bytes | None:
    return _read_audio_column(file, group)[row]


@functools.lru_cache(maxsize=2)  # items are scored in file order: the current group and the next
def _read_audio_column(file: str, group: int) -> list:
    import pyarrow.parquet as pq

    column = pq.ParquetFile(file).read_row_group(group, columns=["audio"]).column("audio")
    return [value.get("bytes") if isinstance(value, dict) else None for value in column.to_pylist()]


def _text_columns(file: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(file)
    except Exception as e:  # pyarrow raises its own error types for a file that is not parquet
        raise UserError(f"{file}: not a readable parquet file ({e})") from None
    names = set(pf.schema_arrow.names)
    missing = [c for c in MUCUE_COLUMNS if c not in names]
    if missing:
        raise UserError(f"{file}: not a MuCUE file: no column {', '.join(missing)} (has {', '.join(sorted(names))})")
    columns = [c for c in ("question", "choices_text", "correct_choice", "time_seg") if c in names]
    rows = pf.read(columns=columns).to_pylist()
    names = pf.read(columns=["audio.path"]).column(0).to_pylist() if _has_path(pf) else [None] * len(rows)
    for row, name in zip(rows, names):  # the nested column reads as {"path": ...}
        row["audio_path"] = name.get("path") if isinstance(name, dict) else None
    return rows


def _has_path(pf) -> bool:
    import pyarrow as pa

    audio = pf.schema_arrow.field("audio").type
    return pa.types.is_struct(audio) and audio.get_field_index("path") >= 0


def _mucue_item(file: Path, row: int, split: str, index: int, d: dict) -> Item:
    question, text, correct = d["question"], d["choices_text"], d["correct_choice"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError("'question' must be a non-empty string")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("'choices_text' must be a non-empty string")
    options = split_choices(text) or [""] * MUCUE_OPTIONS
    if not isinstance(correct, str) or correct.strip().upper() not in LETTERS[:len(options)]:
        raise ValueError(f"'correct_choice' {correct!r} is not one of the letters {LETTERS[:len(options)]}")
    seg = d.get("time_seg")
    if seg is not None and (not isinstance(seg, (list, tuple)) or len(seg) != 2
                            or not all(isinstance(t, (int, float)) for t in seg)):
        raise ValueError(f"'time_seg' must be null or [start, end] in seconds, got {seg!r}")
    return Item(key=f"{split}/{index}:{_digest(d)}", id=f"{split}/{index}",
                subset=split, audio=(ParquetAudio(str(file), row, d.get("audio_path") or ""),),
                segments=() if seg is None else ((float(seg[0]), float(seg[1])),), question=question,
                choices=tuple(options), answer=LETTERS.index(correct.strip().upper()), choices_text=text)


def read_mucue(path: Path) -> list[Item]:
    """The items of a MuCUE snapshot folder or parquet file, split by split, in file order."""
    items = []
    for split, files in mucue_files(path).items():
        index = 0
        for file in files:
            for row, d in enumerate(_text_columns(file)):
                try:
                    items.append(_mucue_item(file, row, split, index, d))
                except (TypeError, ValueError) as e:
                    raise UserError(f"{file} row {row}: not a MuCUE item ({e})") from None
                index += 1
    return items
