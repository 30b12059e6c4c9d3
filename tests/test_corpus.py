"""The synthetic demo corpus: determinism, resumability, labels that match the audio, valid manifests."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from jaxmusic import audio, templates
from jaxmusic.evaluation import evaluate
from jaxmusic.demo import corpus

SMALL = dict(n_train=8, n_eval=4, n_grpo=3, max_seconds=40.0, long_fraction=0.3, seed=3)
SR = corpus.SYNTH_RATE


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    corpus.build(root, {**SMALL, "workers": 2}, progress=False)
    return root


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in (".wav", ".flac", ".ogg"))


def _specs(root: Path) -> list[dict]:
    return [json.loads(line) for line in open(root / "clips.jsonl")]


# ------------------------------------------------------------------------ estimators from the audio

def _pitch(x: np.ndarray, sr: int) -> float:
    """MIDI pitch from the autocorrelation: the shortest lag whose peak is within 10% of the best."""
    x = x - x.mean()
    ac = np.fft.irfft(np.abs(np.fft.rfft(x * np.hanning(len(x)), 2 * len(x))) ** 2)[:len(x)]
    lo, hi = int(sr / 1100), int(sr / 50)
    seg = ac[lo:hi] / ac[0]
    i = next(i for i in range(1, len(seg) - 1)
             if seg[i] >= seg[i - 1] and seg[i] >= seg[i + 1] and seg[i] >= 0.9 * seg.max())
    a, b, c = seg[i - 1], seg[i], seg[i + 1]
    lag = lo + i + 0.5 * (a - c) / (a - 2 * b + c)
    return 69 + 12 * np.log2(sr / lag / 440)


def _tempo(x: np.ndarray, sr: int) -> float:
    """BPM from the median interval between onsets of the smoothed RMS envelope (5 ms hop)."""
    hop = sr // 200
    env = np.sqrt((x[: len(x) // hop * hop].reshape(-1, hop) ** 2).mean(1))
    rise = np.maximum(np.diff(np.convolve(env, np.ones(8) / 8, "same")), 0)
    peaks = [i for i in range(1, len(rise) - 1)
             if rise[i] >= rise[i - 1] and rise[i] > rise[i + 1] and rise[i] >= 0.3 * rise.max()]
    onsets = []
    for p in peaks:
        if not onsets or p - onsets[-1] > 24:  # one onset per 0.12 s
            onsets.append(p)
    return 60.0 / (np.median(np.diff(onsets)) / 200)


def _energy_at(x: np.ndarray, sr: int, midi: float) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    f = 440.0 * 2 ** ((midi - 69) / 12)
    k = int(round(f * len(x) / sr))
    return float(spectrum[k - 2:k + 3].max())


def _one_section(instrument, kind, midi=64, quality=None, bpm=60.0, duration=3.0):
    section = {"start": 0.0, "end": duration, "instrument": instrument, "kind": kind, "midi": midi}
    if quality:
        section["quality"] = quality
    return {"duration": duration, "bpm": bpm, "gain": 0.7, "noise_seed": midi, "sections": [section]}


# ------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("instrument", corpus.PITCHED)
def test_held_note_pitch_matches_label(instrument):
    for midi in (60, 66, 71, 77, 83):
        wav = corpus.render(_one_section(instrument, "note", midi))
        # reached: 0.13 semitone (plucked string, whose delay line is a whole number of samples), <0.01 others
        assert abs(_pitch(wav[int(0.05 * SR):int(0.6 * SR)], SR) - midi) < 0.25, (instrument, midi)


@pytest.mark.parametrize("instrument", corpus.INSTRUMENTS)
def test_tempo_matches_label(instrument):
    kind = "beat" if instrument == "drum kit" else "note"
    for name, (slow, fast) in corpus.TEMPI.items():
        for bpm in (slow, fast):
            wav = corpus.render(_one_section(instrument, kind, bpm=float(bpm), duration=12.0))
            # reached: 1.2% (bowed string and brass, whose slow attacks blur the onset)
            assert _tempo(wav, SR) == pytest.approx(bpm, rel=0.03), (instrument, name, bpm)


@pytest.mark.parametrize("quality", list(corpus.CHORDS))
def test_chord_quality_matches_label(quality):
    third, fifth = corpus.CHORDS[quality][1:]
    for instrument in corpus.PITCHED:
        wav = corpus.render(_one_section(instrument, "chord", midi=62, quality=quality, bpm=30.0, duration=2.0))
        x = wav[int(0.05 * SR):int(1.2 * SR)]
        # the fundamentals of the triad's third and fifth are present, the other qualities' are not
        energy = {i: _energy_at(x, SR, 62 + i) for i in (3, 4, 6, 7, 8)}
        assert energy[third] > 5 * max(energy[i] for i in (3, 4) if i != third), (instrument, energy)
        assert energy[fifth] > 5 * max(energy[i] for i in (6, 7, 8) if i != fifth), (instrument, energy)


def test_written_files_match_their_labels(built):
    specs = _specs(built)
    files = _files(built)
    assert {p.suffix for p in files} == {".wav", ".flac", ".ogg"}
    assert {sf.info(str(p)).samplerate for p in files} <= set(corpus.CorpusConfig().sample_rates)
    assert len(files) == len(specs) == SMALL["n_train"] + SMALL["n_eval"] + SMALL["n_grpo"]
    assert any(s["duration"] > 30 for s in specs)  # several Whisper chunks
    checked = 0
    for spec in specs:
        info = sf.info(str(built / spec["file"]))
        assert info.samplerate == spec["rate"] and info.channels == spec["channels"]
        assert abs(info.duration - spec["duration"]) < 0.01
        instruments = [s["instrument"] for s in spec["sections"]]
        assert len(set(instruments)) == len(instruments)  # sections are distinct
        for s in spec["sections"]:
            if s["kind"] == "note" and s["end"] - s["start"] > 2.0:
                # decoded through the real front end (16 kHz, crop), lossy ogg included
                wav = audio.load_audio(built / spec["file"], start=s["start"], end=s["end"])
                beat = 60.0 / spec["bpm"]
                first = np.ceil(s["start"] / beat) * beat - s["start"]   # first beat in the section
                x = wav[int((first + 0.05) * 16000):int((first + 0.05 + min(0.5, 0.8 * beat)) * 16000)]
                assert abs(_pitch(x, 16000) - s["midi"]) < 0.3, spec["id"]
                checked += 1
            # chords beat (partials a few Hz apart), so the tempo is read off notes and drums
            if s["kind"] in ("note", "beat") and s["end"] - s["start"] >= 5.0:
                wav = audio.load_audio(built / spec["file"], start=s["start"], end=s["end"])
                assert _tempo(wav, 16000) == pytest.approx(spec["bpm"], rel=0.03), spec["id"]
                checked += 1
    assert checked >= 3


def test_deterministic_and_resumable(built, tmp_path):
    other = corpus.build(tmp_path / "again", {**SMALL, "workers": 1}, progress=False)
    for name in corpus.MANIFESTS + ("eval", "clips"):
        assert (built / f"{name}.jsonl").read_bytes() == (other / f"{name}.jsonl").read_bytes(), name
    for a, b in zip(_files(built), _files(other)):
        assert a.relative_to(built) == b.relative_to(other)
        assert np.array_equal(sf.read(str(a))[0], sf.read(str(b))[0]), a.name

    stamps = {p: p.stat().st_mtime_ns for p in _files(other)}
    victim = next(iter(stamps))
    victim.unlink()
    corpus.build(other, {**SMALL, "workers": 1}, progress=False)
    assert victim.exists()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != victim)  # the rest is reused

    changed = corpus.clip_spec(corpus.CorpusConfig(**{**SMALL, "seed": 4}), "train", 0)
    assert changed["file"] != _specs(built)[0]["file"]  # other settings never reuse a stale file


def test_manifests_are_valid_mufun_samples(built, tmp_path):
    tok = corpus.build_tokenizer(built, vocab_size=400, out_dir=tmp_path / "tok")
    assert len(tok(templates.END_OF_TURN, add_special_tokens=False)["input_ids"]) == 1
    # The inference prompt (ending in "ASSISTANT: ") is tokenised as in training, so a
    # model trained from scratch on it sees at inference the context it learnt to answer in.
    prompt = templates.encode_prompt(corpus.QUESTIONS["tempo"][0], 1, tok).pieces[-1]
    trained = templates.encode_scoring(corpus.QUESTIONS["tempo"][0], "very fast", 1, tok).pieces[-1]
    assert np.array_equal(trained[:len(prompt)], prompt)
    durations = {s["file"]: s["duration"] for s in _specs(built)}
    for name in corpus.MANIFESTS:
        template = "pretrain" if name == "captions" else "qwen2_instruct"
        records = [json.loads(line) for line in open(built / f"{name}.jsonl")]
        assert len(records) >= (SMALL["n_train"] if name in ("captions", "qa", "mcq_sections") else 1), name
        for rec in records:
            assert (built / rec["audio"]).is_file()
            text = templates.encode_conversation(template, rec["conversations"], 1, tok)
            assert sum(m.sum() for m in text.loss_masks) > 0
            if "time" in rec:
                start, end = rec["time"]
                assert 0 <= start < end <= durations[rec["audio"]]
        # GRPO asks about clips of its own, which no other stage trains on
        assert {rec["audio"].split("/")[0] for rec in records} == {"grpo" if name == "open" else "train"}, name
    notes = {corpus.note_name(m) for m in range(corpus.NOTE_RANGE[0], corpus.NOTE_RANGE[1] + 1)}
    labels = (set(corpus.INSTRUMENTS) | set(corpus.TEMPI) | set(corpus.CHORDS) | set(corpus.SECTION_WORDS)
              | set(corpus.PITCH_CLASSES) | notes)
    opened = [json.loads(line) for line in open(built / "open.jsonl")]
    assert len(opened) >= 2 * SMALL["n_grpo"]  # every clip answers sections and instrument
    for rec in opened:
        (question, answer), = [(q["value"], a["value"]) for q, a in zip(rec["conversations"][::2],
                                                                       rec["conversations"][1::2])]
        assert any(question == "<audio>\n" + q for qs in corpus.QUESTIONS.values() for q in qs), question
        assert answer in labels, answer  # the label alone
    multi = [json.loads(line) for line in open(built / "qa.jsonl") if "-multi" in line]
    assert multi and all(len(r["conversations"]) >= 4 for r in multi)
    for task in corpus.TASKS:
        mcq = [json.loads(line) for line in open(built / f"mcq_{task}.jsonl")]
        for rec in mcq:
            (question, answer), = [(q["value"], a["value"]) for q, a in zip(rec["conversations"][::2],
                                                                           rec["conversations"][1::2])]
            assert question.startswith("<audio>\n" + templates.MUCUE_INSTRUCTION)
            assert any(q in question for q in corpus.QUESTIONS[task]), (task, question)
            assert f". {answer}\n" in question + "\n"  # the answer is one of the lettered options

    items = evaluate.read_benchmark(built / "eval.jsonl")
    assert {it.subset for it in items} <= set(corpus.TASKS) and "sections" in {it.subset for it in items}
    for it in items:
        assert len(it.choices) == 4 and len(set(it.choices)) == 4
        assert all(len(c) > 1 for c in it.choices)  # no option text can be mistaken for a letter
        wav = audio.load_audio(it.audio[0], start=it.segments[0][0] if it.segments else None,
                               end=it.segments[0][1] if it.segments else None)
        assert len(wav) > 0
    summary = json.loads((built / "corpus.json").read_text())
    assert summary["chance"] == {t: 0.25 for t in corpus.TASKS}
    assert summary["open_chance"]["pitch"] == 1 / 24 and summary["open_chance"]["tempo"] == 1 / 4


def test_bad_settings_are_user_errors():
    with pytest.raises(corpus.UserError, match="unknown settings"):
        corpus.CorpusConfig.from_dict({"n_clips": 3})
    with pytest.raises(corpus.UserError, match="min_seconds"):
        corpus.CorpusConfig(min_seconds=10, max_seconds=5)
