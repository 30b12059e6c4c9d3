"""A synthetic, labelled music corpus for the demo: NumPy-synthesised clips with known attributes.

Nothing is downloaded. Every clip is one to four *sections*; each section is played by a
different instrument family, striking a short note (`NOTE_SECONDS`, a quarter second) on
every beat of one tempo shared by the whole clip:

* instrument: plucked string (Karplus-Strong), bowed string (sawtooth with vibrato, slow
  attack), brass (bright formant around 1.2 kHz, fast attack), mallet percussion
  (partials 1, 4, 10 with fast decay), drum kit (kick, snare, hi-hat; unpitched);
* a pitched section repeats either one note (C4-B5, MIDI 60-83) or a root-position triad
  on C4 whose quality is major, minor, diminished or augmented;
* tempo: one of four classes far apart (slow 56-66, moderate 84-96, fast 120-136,
  very fast 168-184 BPM);
* number of distinct sections: 1-4 (consecutive sections never share an instrument).

Clips last `min_seconds`-`max_seconds` (default 1-75 s: log-uniform up to 30 s, and
`long_fraction` of them uniform beyond 30 s, so they span several Whisper chunks) and are
written as wav, flac or ogg at 16, 22.05 or 44.1 kHz, some in stereo. The cues are
deliberately strong (clean synthesis, instruments with very different spectra and
envelopes, a small label set) so that the answers are in what a tiny model sees. Two
choices serve that, measured with a linear probe (standardised logistic regression, 300
training clips) on the demo encoder's pooled features, untrained, per held-out question:

* notes as long as the beat (0.9 of it) made the sound's share of each window the same at
  every tempo: tempo 35% (chance 25%); quarter-second notes make it grow with the tempo: 55%;
* triads on roots spread over an octave left quality in intervals, which those features
  barely carry: 30%; on one root, C4, quality is which notes sound: 99%.

With both, the probe reads instrument 93%, pitch 82% (24 classes), pitch class 86% (12
classes), chord quality 99%, tempo 55% and number of sections 32% (a count across time,
which no linear read-out of the features does). The README's "Demo" section says how much
of that the ten-minute model learns to use.

Files under the corpus root (audio paths in manifests are relative to the root):

* `captions.jsonl` - alignment stage (template `pretrain`): the "gpt" value is a caption.
* `qa.jsonl` - single- and multi-turn open questions (template `qwen2_instruct`).
* `open.jsonl` - the GRPO stage's prompts: one open question per task a clip answers (a random
  section for section tasks), answered by the label alone ("very fast", not "very fast, about
  170 BPM"), an answer a reward can check. They are about clips of their own (`n_grpo`, under
  `grpo/`), which no earlier stage trains on: on clips the supervised stages have learnt by
  heart every sampled answer of a group tends to be right, and such a group carries no signal.
* `mcq_<task>.jsonl`, one per task - MuCUE-style four-option questions rendered with the
  exact MuCUE prompt of `jaxmusic.templates`; the answer is the correct option's text.
  `MCQ_DRAWS` single-question records per crop the task applies to (the whole clip, or one
  section of a multi-section clip), each with its own wording and options. One manifest per
  task lets a schedule weight the tasks: a model trained from scratch learns the loudest cue
  (instrument) first, and with the tasks in their natural proportions (instrument asked of
  every section) the rest stayed at chance (README, "Demo").
* `eval.jsonl` - the held-out split as a MuCUE-style benchmark for `jaxmusic eval`
  (`audio`, optional `time`, `question`, `choices`, `answer` (a letter), `subset`).
* `clips.jsonl` - every clip's attributes (ground truth); `corpus.json` - the settings.

A question about one section of a multi-section clip carries that section's `time` crop.

Chance levels. Every benchmark subset (instrument, pitch, pitch_class, chord, tempo,
sections) is four-way multiple choice with the answer's position uniformly random, so
chance is 25% on each. For the open questions of `qa.jsonl`, a uniform guess over the
label set gets: instrument 1/5 = 20%, pitch 1/24 = 4.2%, pitch class 1/12 = 8.3%, chord
quality 1/4 = 25%, tempo class 1/4 = 25%, number of sections 1/4 = 25%.

Deterministic given `seed` (each clip draws from its own `[seed, split, index]` stream);
synthesis runs on all cores; re-running skips clips whose file exists (each file name
carries a digest of its attributes, so changed settings never reuse stale audio).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import soundfile
import soxr

from jaxmusic.errors import UserError

SYNTH_RATE = 44100  # everything is synthesised here, then resampled to the file's rate
SYNTH_VERSION = 2   # part of every file name's digest: bump when the synthesis changes
INSTRUMENTS = ("plucked string", "bowed string", "brass", "mallet percussion", "drum kit")
PITCHED = INSTRUMENTS[:4]
CHORDS = {"major": (0, 4, 7), "minor": (0, 3, 7), "diminished": (0, 3, 6), "augmented": (0, 4, 8)}
TEMPI = {"slow": (56, 66), "moderate": (84, 96), "fast": (120, 136), "very fast": (168, 184)}
SECTION_WORDS = ("one", "two", "three", "four")
NOTE_RANGE = (60, 83)   # held single notes, C4..B5 inclusive
CHORD_ROOT = 60         # every chord is built on C4 (see the module docstring)
NOTE_SECONDS = 0.25     # each beat strikes a note this long
MIN_SECTION_SECONDS = 2.5
MIN_TEMPO_SECONDS = 4.0  # shorter clips have too few beats for a tempo question
NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
# Pitch classes are spelt out ("A natural", not "A") so no option text can be read as an answer letter.
PITCH_CLASSES = tuple(n[0] + (" sharp" if n.endswith("#") else " natural") for n in NOTE_NAMES)
TASKS = ("instrument", "pitch", "pitch_class", "chord", "tempo", "sections")
MANIFESTS = ("captions", "qa", "open") + tuple(f"mcq_{task}" for task in TASKS)  # training manifests

QUESTIONS = {
    "instrument": ("Which instrument family is playing?", "What kind of instrument plays in this clip?",
                   "Which instrument do you hear?"),
    "pitch": ("What is the pitch of the held note?", "Which note is being held, with its octave?"),
    "pitch_class": ("What is the pitch class of the held note?", "Ignoring the octave, which note is held?"),
    "chord": ("What is the quality of the chord?", "Which kind of triad is played?"),
    "tempo": ("How fast is the tempo?", "What is the tempo of this music?"),
    "sections": ("How many distinct sections does this music have?",
                 "Into how many distinct parts is this piece divided?"),
}
CAPTION_QUESTION = "Describe this music."
MCQ_DRAWS = 4  # multiple-choice records per task and crop, each with its own options


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    n_train: int = 600
    n_eval: int = 120
    n_grpo: int = 150               # clips only the GRPO stage's open questions are about
    min_seconds: float = 1.0
    max_seconds: float = 75.0
    long_fraction: float = 0.1      # share of clips longer than 30 s
    stereo_fraction: float = 0.25
    sample_rates: tuple[int, ...] = (16000, 22050, 44100)
    formats: tuple[str, ...] = ("wav", "flac", "ogg")
    seed: int = 0
    workers: int | None = None      # None: all cores

    def __post_init__(self):
        if min(self.n_train, self.n_eval, self.n_grpo) < 0:
            raise UserError(f"corpus: n_train, n_eval and n_grpo must be >= 0, got "
                            f"{self.n_train}, {self.n_eval}, {self.n_grpo}")
        if not 0.5 <= self.min_seconds <= self.max_seconds:
            raise UserError(f"corpus: need 0.5 <= min_seconds <= max_seconds, got "
                            f"{self.min_seconds}, {self.max_seconds}")
        bad = set(self.formats) - {"wav", "flac", "ogg"}
        if bad or not self.formats or not self.sample_rates:
            raise UserError(f"corpus: formats must be some of wav, flac, ogg (got {self.formats}) "
                            f"and sample_rates non-empty")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CorpusConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise UserError(f"corpus: unknown settings {sorted(unknown)}; known: {sorted(fields)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)


def note_name(midi: int) -> str:
    """Scientific pitch notation, MIDI 60 = C4."""
    return f"{NOTE_NAMES[midi % 12]}{midi // 12 - 1}"


# ------------------------------------------------------------------------------ clip specs

def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


def clip_spec(cfg: CorpusConfig, split: str, index: int) -> dict:
    """The attributes of clip `index` of `split` ("train", "eval" or "grpo"); a pure function of the seed."""
    rng = np.random.default_rng([cfg.seed, ("train", "eval", "grpo").index(split), index])
    n_sections = int(rng.integers(1, 5))
    while n_sections > 1 and n_sections * MIN_SECTION_SECONDS > cfg.max_seconds:
        n_sections -= 1
    lo = max(cfg.min_seconds, MIN_SECTION_SECONDS * n_sections) if n_sections > 1 else cfg.min_seconds
    long = cfg.max_seconds > 30 and (lo >= 30 or rng.random() < cfg.long_fraction)
    if long:
        duration = rng.uniform(max(30.0, lo), cfg.max_seconds)
    else:  # log-uniform: short clips cost the same compute (a chunk is padded to 30 s) and less disk
        duration = np.exp(rng.uniform(np.log(lo), np.log(min(cfg.max_seconds, 30.0))))
    duration = round(float(duration), 2)
    tempo = str(rng.choice(list(TEMPI)))
    bpm = round(float(rng.uniform(*TEMPI[tempo])), 1)

    bounds = np.round(np.linspace(0.0, duration, n_sections + 1), 3)
    sections = []
    for instrument, start, end in zip(rng.permutation(len(INSTRUMENTS))[:n_sections], bounds[:-1], bounds[1:]):
        section = {"start": float(start), "end": float(end), "instrument": INSTRUMENTS[instrument]}
        if section["instrument"] == "drum kit":
            section["kind"] = "beat"
        elif rng.random() < 0.5:
            section.update(kind="note", midi=int(rng.integers(NOTE_RANGE[0], NOTE_RANGE[1] + 1)))
        else:
            section.update(kind="chord", midi=CHORD_ROOT, quality=str(rng.choice(list(CHORDS))))
        sections.append(section)

    spec = {"id": f"{split}-{index:05d}", "split": split, "duration": duration, "tempo": tempo, "bpm": bpm,
            "sections": sections, "rate": int(rng.choice(cfg.sample_rates)),
            "channels": 2 if rng.random() < cfg.stereo_fraction else 1,
            "gain": round(float(rng.uniform(0.5, 0.9)), 3), "noise_seed": int(rng.integers(2**31))}
    fmt = cfg.formats[index % len(cfg.formats)]
    spec["file"] = f"{split}/{index:05d}-{_digest([spec, SYNTH_VERSION])}.{fmt}"
    return spec


# ------------------------------------------------------------------------------ synthesis

def _envelope(n: int, attack: float, release: float) -> np.ndarray:
    env = np.ones(n)
    a, r = min(int(attack * SYNTH_RATE), n // 2), min(int(release * SYNTH_RATE), n // 2)
    env[:a] = np.linspace(0.0, 1.0, a, endpoint=False)
    if r:
        env[n - r:] *= np.linspace(1.0, 0.0, r)
    return env


def _harmonics(f: float, n: int, amps, phase_mod=None) -> np.ndarray:
    t = np.arange(n) / SYNTH_RATE
    phase = 2 * np.pi * f * t if phase_mod is None else phase_mod
    out = np.zeros(n)
    for k, a in enumerate(amps, 1):
        if k * f < 8000:  # Whisper's mel filters stop at 8 kHz
            out += a * np.sin(k * phase)
    return out


def _plucked(f: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Karplus-Strong: a noise burst recirculating through a delay line with a two-tap average."""
    period = max(int(round(SYNTH_RATE / f - 0.5)), 2)  # the two-tap average adds half a sample of delay
    decay = 0.996 ** (440.0 / f)                       # similar ring time across the range
    out = np.zeros(n + period + 1)
    out[:period] = rng.uniform(-1, 1, period)
    # Each period depends only on earlier samples, so it can be computed as one vector op.
    for start in range(period, len(out), period):
        stop = min(start + period, len(out))
        prev = out[start - period:stop - period]
        prev_shift = out[start - period - 1:stop - period - 1] if start > period else np.r_[0.0, prev[:-1]]
        out[start:stop] = decay * 0.5 * (prev + prev_shift)
    return out[:n] * _envelope(n, 0.002, 0.02)


def _bowed(f: float, n: int) -> np.ndarray:
    t = np.arange(n) / SYNTH_RATE
    # vibrato: instantaneous frequency f * (1 + 0.004 sin(2 pi 5.5 t)), about +-0.07 semitone
    phase = 2 * np.pi * f * (t - 0.004 * np.cos(2 * np.pi * 5.5 * t) / (2 * np.pi * 5.5))
    return _harmonics(f, n, [1.0 / k for k in range(1, 40)], phase) * _envelope(n, 0.08, 0.08)


def _brass(f: float, n: int) -> np.ndarray:
    amps = [0.3 / k + np.exp(-(((k * f) - 1200.0) / 700.0) ** 2) for k in range(1, 40)]
    return _harmonics(f, n, amps) * _envelope(n, 0.03, 0.05)


def _mallet(f: float, n: int) -> np.ndarray:
    t = np.arange(n) / SYNTH_RATE
    out = np.zeros(n)
    for ratio, amp, rate in ((1, 1.0, 3.0), (4, 0.5, 9.0), (10, 0.25, 20.0)):
        if ratio * f < 8000:
            out += amp * np.exp(-rate * t) * np.sin(2 * np.pi * ratio * f * t)
    return out * _envelope(n, 0.002, 0.01)


def _drum_hits(rng: np.random.Generator) -> dict[str, np.ndarray]:
    t = np.arange(int(0.4 * SYNTH_RATE)) / SYNTH_RATE
    kick_freq = 50 + 90 * np.exp(-t / 0.03)
    kick = np.sin(2 * np.pi * np.cumsum(kick_freq) / SYNTH_RATE) * np.exp(-t / 0.12)
    snare = (0.7 * np.diff(rng.standard_normal(t.size + 1)) / 2 * np.exp(-t / 0.06)
             + 0.5 * np.sin(2 * np.pi * 190 * t) * np.exp(-t / 0.05))
    th = t[: int(0.08 * SYNTH_RATE)]
    hat = 0.2 * np.diff(rng.standard_normal(th.size + 2), 2) / 4 * np.exp(-th / 0.015)
    return {"kick": kick, "snare": snare, "hat": hat}


def _note(instrument: str, f: float, n: int, rng) -> np.ndarray:
    if instrument == "plucked string":
        return _plucked(f, n, rng)
    if instrument == "bowed string":
        return _bowed(f, n)
    if instrument == "brass":
        return _brass(f, n)
    return _mallet(f, n)


def _add(out: np.ndarray, sound: np.ndarray, at: int, stop: int) -> None:
    end = min(at + len(sound), stop)
    if end > at:
        out[at:end] += sound[: end - at]


def render(spec: dict) -> np.ndarray:
    """The clip's mono waveform at `SYNTH_RATE`, peak-normalised to `spec["gain"]`."""
    rng = np.random.default_rng(spec["noise_seed"])
    beat = 60.0 / spec["bpm"]
    out = np.zeros(int(round(spec["duration"] * SYNTH_RATE)))
    for section in spec["sections"]:
        start, stop = int(section["start"] * SYNTH_RATE), int(section["end"] * SYNTH_RATE)
        # the beat grid is the clip's, so the tempo holds across section boundaries
        beats = [(k, int(round(k * beat * SYNTH_RATE))) for k in range(int(section["end"] / beat) + 1)]
        beats = [(k, b) for k, b in beats if start <= b < stop] or [(0, start)]
        if section["kind"] == "beat":
            hits = _drum_hits(rng)
            for k, b in beats:
                _add(out, hits["kick" if k % 2 == 0 else "snare"], b, stop)
                _add(out, hits["hat"], b, stop)
                _add(out, 0.6 * hits["hat"], b + int(beat * SYNTH_RATE / 2), stop)
            continue
        intervals = CHORDS[section["quality"]] if section["kind"] == "chord" else (0,)
        length = int(NOTE_SECONDS * SYNTH_RATE)
        tone = sum(_note(section["instrument"], 440.0 * 2 ** ((section["midi"] + i - 69) / 12), length, rng)
                   for i in intervals) / len(intervals)
        for _, b in beats:
            _add(out, tone, b, stop)
    peak = np.abs(out).max()
    return (out * (spec["gain"] / peak) if peak > 0 else out).astype(np.float32)


def _write_clip(job: tuple[dict, str]) -> str:
    spec, root = job
    path = Path(root) / spec["file"]
    if path.exists():
        return spec["file"]
    wav = render(spec)
    if spec["rate"] != SYNTH_RATE:
        wav = soxr.resample(wav, SYNTH_RATE, spec["rate"], quality="HQ")
    if spec["channels"] == 2:
        wav = np.stack([wav, 0.8 * wav], axis=1)
    wav = np.clip(wav, -1.0, 1.0)
    fmt = path.suffix[1:]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with soundfile.SoundFile(tmp, "w", spec["rate"], spec["channels"], format=fmt.upper(),
                             subtype="VORBIS" if fmt == "ogg" else "PCM_16") as f:
        # one-second blocks: libsndfile 1.2's Vorbis encoder crashes on one large write
        for i in range(0, len(wav), spec["rate"]):
            f.write(wav[i:i + spec["rate"]])
    os.replace(tmp, path)  # a killed run never leaves a half-written clip under the final name
    return spec["file"]


# ------------------------------------------------------------------------------ questions

def _answerable(spec: dict) -> list[tuple[str, dict | None]]:
    """(task, section or None for the whole clip) pairs this clip can answer."""
    out: list[tuple[str, dict | None]] = [("sections", None)]
    if spec["duration"] >= MIN_TEMPO_SECONDS:
        out.append(("tempo", None))
    for s in spec["sections"]:
        out.append(("instrument", s))
        if s["kind"] == "note":
            out += [("pitch", s), ("pitch_class", s)]
        elif s["kind"] == "chord":
            out.append(("chord", s))
    return out


def _sections_by_task(spec: dict) -> dict[str, list[dict | None]]:
    """The tasks this clip can answer, in `_answerable`'s order, each with the sections it applies to."""
    by_task: dict[str, list] = {}
    for task, section in _answerable(spec):
        by_task.setdefault(task, []).append(section)
    return by_task


def _label(task: str, spec: dict, section: dict | None) -> str:
    if task == "sections":
        return SECTION_WORDS[len(spec["sections"]) - 1]
    if task == "tempo":
        return spec["tempo"]
    if task == "instrument":
        return section["instrument"]
    if task == "pitch":
        return note_name(section["midi"])
    if task == "pitch_class":
        return PITCH_CLASSES[section["midi"] % 12]
    return section["quality"]


def _label_set(task: str) -> list[str]:
    return {"sections": list(SECTION_WORDS), "tempo": list(TEMPI), "instrument": list(INSTRUMENTS),
            "pitch": [note_name(m) for m in range(NOTE_RANGE[0], NOTE_RANGE[1] + 1)],
            "pitch_class": list(PITCH_CLASSES), "chord": list(CHORDS)}[task]


def _choices(task: str, answer: str, rng) -> tuple[list[str], int]:
    """Four options (the answer and three random distractors) in random order."""
    others = [x for x in _label_set(task) if x != answer]
    options = [answer] + [others[i] for i in rng.choice(len(others), 3, replace=False)]
    order = rng.permutation(4)
    options = [options[i] for i in order]
    return options, options.index(answer)


def _time(spec: dict, section: dict | None) -> list[float] | None:
    """The crop for a section question; None when the question is about the whole clip."""
    if section is None or len(spec["sections"]) == 1:
        return None
    return [section["start"], section["end"]]


def _open_answer(task: str, spec: dict, section) -> str:
    label = _label(task, spec, section)
    return f"{label}, about {spec['bpm']:.0f} BPM" if task == "tempo" else label


def _content(section: dict) -> str:
    if section["kind"] == "beat":
        return "a drum kit playing a steady beat"
    what = (f"a held {note_name(section['midi'])} note" if section["kind"] == "note"
            else f"{'an' if NOTE_NAMES[section['midi'] % 12][0] in 'AEF' else 'a'} "
                 f"{NOTE_NAMES[section['midi'] % 12]} {section['quality']} chord")
    player = section["instrument"] + ("" if section["instrument"] == "drum kit" else " instrument")
    return f"{'an' if player[0] in 'aeiou' else 'a'} {player.replace('percussion ', '')} playing {what}"


def caption(spec: dict) -> str:
    tempo = f"The tempo is {spec['tempo']}, about {spec['bpm']:.0f} BPM."
    sections = spec["sections"]
    if len(sections) == 1:
        return f"{_content(sections[0])[0].upper()}{_content(sections[0])[1:]}. {tempo}"
    parts = [_content(s) for s in sections]
    order = ", then ".join(parts)
    return f"This piece has {SECTION_WORDS[len(sections) - 1]} distinct sections: first {order}. {tempo}"


def _record(rid: str, spec: dict, turns: list[tuple[str, str]], time) -> dict:
    """A MuFun-format sample; the audio tag goes in front of the first question only."""
    conversations = []
    for i, (question, answer) in enumerate(turns):
        conversations += [{"from": "human", "value": ("<audio>\n" if i == 0 else "") + question},
                          {"from": "gpt", "value": answer}]
    rec = {"id": rid, "audio": spec["file"], "conversations": conversations}
    if time is not None:
        rec["time"] = time
    return rec


def train_records(spec: dict, seed: int) -> dict[str, list[dict]]:
    """The caption, open QA and multiple-choice records of one training clip."""
    from jaxmusic.templates import mucue_prompt

    rng = np.random.default_rng([seed, 2, int(spec["id"].split("-")[1])])
    tasks = _answerable(spec)
    captions = [_record(f"{spec['id']}-caption", spec, [(CAPTION_QUESTION, caption(spec))], None)]

    task, section = tasks[rng.integers(len(tasks))]
    qa = [_record(f"{spec['id']}-qa", spec, [(str(rng.choice(QUESTIONS[task])), _open_answer(task, spec, section))],
                  _time(spec, section))]
    # A multi-turn conversation shares one crop: the whole clip, or one section of it.
    crop = _time(spec, spec["sections"][rng.integers(len(spec["sections"]))])
    same_crop = [(t, s) for t, s in tasks if _time(spec, s) == crop]
    if len(same_crop) >= 2:
        turns = [same_crop[i] for i in rng.permutation(len(same_crop))[:3]]
        qa.append(_record(f"{spec['id']}-multi", spec,
                          [(str(rng.choice(QUESTIONS[t])), _open_answer(t, spec, s)) for t, s in turns], crop))

    # Multiple choice: MCQ_DRAWS single-question records (fresh wording and options) per task
    # and crop, written to one manifest per task so that a schedule can weight the tasks.
    mcq: dict[str, list[dict]] = {f"mcq_{task}": [] for task in TASKS}
    for task, section in tasks:
        where = "clip" if section is None else f"section{spec['sections'].index(section)}"
        for draw in range(MCQ_DRAWS):
            options, answer = _choices(task, _label(task, spec, section), rng)
            question = mucue_prompt(str(rng.choice(QUESTIONS[task])), options)
            mcq[f"mcq_{task}"].append(_record(f"{spec['id']}-mcq-{task}-{where}-{draw}", spec,
                                              [(question, options[answer])], _time(spec, section)))
    return {"captions": captions, "qa": qa} | mcq


def open_records(spec: dict, seed: int) -> list[dict]:
    """The GRPO stage's records of one of its clips: an open question per task, answered by the label."""
    rng = np.random.default_rng([seed, 4, int(spec["id"].split("-")[1])])
    by_task = _sections_by_task(spec)
    records = []
    for task, sections in by_task.items():
        section = sections[rng.integers(len(sections))]
        records.append(_record(f"{spec['id']}-{task}", spec, [(str(rng.choice(QUESTIONS[task])),
                                                              _label(task, spec, section))], _time(spec, section)))
    return records


def eval_items(spec: dict, seed: int) -> list[dict]:
    """One benchmark item per task this held-out clip can answer (a random section for section tasks)."""
    rng = np.random.default_rng([seed, 3, int(spec["id"].split("-")[1])])
    by_task = _sections_by_task(spec)
    items = []
    for task in TASKS:
        if task not in by_task:
            continue
        section = by_task[task][rng.integers(len(by_task[task]))]
        options, answer = _choices(task, _label(task, spec, section), rng)
        item = {"id": f"{spec['id']}-{task}", "audio": spec["file"], "question": str(rng.choice(QUESTIONS[task])),
                "choices": options, "answer": "ABCD"[answer], "subset": task}
        if _time(spec, section) is not None:
            item["time"] = _time(spec, section)
        items.append(item)
    return items


# ------------------------------------------------------------------------------ building

def _write_jsonl(path: Path, records) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def build(root: str | os.PathLike, cfg: CorpusConfig | dict = CorpusConfig(), *, progress: bool = True) -> Path:
    """Synthesise the clips (skipping existing ones) and (re)write the manifests; returns the root."""
    from tqdm import tqdm

    cfg = CorpusConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    specs = ([clip_spec(cfg, "train", i) for i in range(cfg.n_train)]
             + [clip_spec(cfg, "eval", i) for i in range(cfg.n_eval)]
             + [clip_spec(cfg, "grpo", i) for i in range(cfg.n_grpo)])
    todo = [(s, str(root)) for s in specs if not (root / s["file"]).exists()]
    workers = min(cfg.workers or os.cpu_count() or 1, max(len(todo), 1))
    with tqdm(total=len(todo), desc="synthesising clips", unit="clip", disable=not progress) as bar:
        if workers == 1:
            for job in todo:
                _write_clip(job)
                bar.update()
        else:
            # spawn, not fork: the caller may already run JAX threads, which fork would copy mid-flight.
            # An executor (unlike multiprocessing.Pool) raises if a worker dies instead of hanging.
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for future in as_completed([pool.submit(_write_clip, job) for job in todo]):
                    future.result()
                    bar.update()

    train = [s for s in specs if s["split"] == "train"]
    records: dict[str, list[dict]] = {name: [] for name in MANIFESTS}
    for spec in train:
        for name, recs in train_records(spec, cfg.seed).items():
            records[name] += recs
    records["open"] = [r for s in specs if s["split"] == "grpo" for r in open_records(s, cfg.seed)]
    for name, recs in records.items():
        _write_jsonl(root / f"{name}.jsonl", recs)
    evals = [item for s in specs if s["split"] == "eval" for item in eval_items(s, cfg.seed)]
    _write_jsonl(root / "eval.jsonl", evals)
    _write_jsonl(root / "clips.jsonl", specs)
    summary = {"config": dataclasses.asdict(cfg),
               "clips": {"train": len(train), "eval": cfg.n_eval, "grpo": cfg.n_grpo},
               "records": {k: len(v) for k, v in records.items()} | {"eval": len(evals)},
               "chance": {t: 0.25 for t in TASKS},
               "open_chance": {t: 1 / len(_label_set(t)) for t in TASKS}}  # a uniform guess among the labels
    (root / "corpus.json").write_text(json.dumps(summary, indent=1))
    return root


def texts(root: str | os.PathLike) -> Iterator[str]:
    """Every text the models will see: manifest questions, answers, choices, and the template strings."""
    from jaxmusic import templates

    yield templates.SYSTEM
    yield "USER: ASSISTANT: " + templates.END_OF_TURN
    root = Path(root)
    # open.jsonl's questions and labels are those of qa.jsonl and the mcq manifests: it adds no
    # text, only counts, which would change the merges (and with them the demo's random draws).
    for name in (m for m in MANIFESTS if m != "open"):
        for line in open(root / f"{name}.jsonl", encoding="utf-8"):
            for msg in json.loads(line)["conversations"]:
                yield msg["value"]
    for line in open(root / "eval.jsonl", encoding="utf-8"):
        item = json.loads(line)
        yield item["question"]
        yield from item["choices"]


def build_tokenizer(root: str | os.PathLike, vocab_size: int = 1024, out_dir: str | os.PathLike | None = None):
    """Train (once) the demo's Qwen-style byte-level BPE on the corpus text; saved under `root/tokenizer`."""
    from transformers import AutoTokenizer

    from jaxmusic.demo.tokenizer import train_tokenizer

    out = Path(out_dir) if out_dir is not None else Path(root) / "tokenizer"
    if (out / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(out))
    # spaces end words, so the inference prompt's trailing "ASSISTANT: " matches training (jaxmusic.demo.tokenizer)
    return train_tokenizer(texts(root), vocab_size=vocab_size, out_dir=out, space_joins="previous")
