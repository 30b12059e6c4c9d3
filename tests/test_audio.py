"""Audio front end: decoding, crop, chunking and Whisper log-mel parity.

References: `transformers.WhisperFeatureExtractor(feature_size=128)` (its torch
float32 path, as torch is installed) fed chunk by chunk as MuFun does, and
`librosa.load(path, sr=16000, mono=True)` for decoding + resampling.
"""

import numpy as np
import pytest
import soundfile
from transformers import WhisperFeatureExtractor

from jaxmusic import audio
from jaxmusic.audio import AudioError

SR = 16000
CHUNK = 480_000

# Reached on this machine (CPU, float32 torch reference), worst case over the
# synthetic signals below: host float64 vs reference 4.0e-05, JAX float32 vs
# reference 4.7e-05, JAX vs host 3.1e-05; decoded files vs reference 5.2e-05.
# The residue is float32 FFT rounding in bins 7-8 decades below the chunk peak
# (both the reference and log_mel_jax compute in float32).
LOG_MEL_TOL = 1e-4


@pytest.fixture(scope="module")
def extractor():
    return WhisperFeatureExtractor(feature_size=128)


def music(n_samples: int, seed: int, sr: int = SR) -> np.ndarray:
    """Music-like test signal: decaying harmonic notes, a noise floor, a silent stretch."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_samples) / sr
    x = np.zeros(n_samples)
    note = sr // 4
    for begin in range(0, n_samples, note):
        f0 = 55.0 * 2 ** (rng.integers(0, 48) / 12)
        span = slice(begin, min(n_samples, begin + note))
        tt = t[span] - t[begin]
        for h in range(1, 9):
            if f0 * h < sr / 2:
                phase = rng.uniform(0, 2 * np.pi)
                x[span] += np.exp(-3 * tt) * 0.3 / h * np.sin(2 * np.pi * f0 * h * tt + phase)
    x += 0.01 * rng.standard_normal(n_samples)
    x[int(0.4 * n_samples) : int(0.5 * n_samples)] = 0.0
    return x.astype(np.float32)


def reference_features(extractor, wav: np.ndarray) -> np.ndarray:
    """MuFun's recipe: cut 16 kHz audio into 30 s pieces (drop a last piece <= 0.5 s),
    then run the extractor on each piece (it zero-pads to 30 s)."""
    if len(wav) <= CHUNK:
        pieces = [wav]
    else:
        pieces = [wav[i : i + CHUNK] for i in range(0, len(wav), CHUNK)]
        pieces = [p for p in pieces if len(p) > SR // 2]
    return np.concatenate(
        [extractor(p, sampling_rate=SR, return_tensors="np").input_features for p in pieces]
    )


def test_mel_filters_match_transformers(extractor):
    # Reached: bit-identical (0.0).
    assert audio.mel_filters().shape == (201, 128)
    np.testing.assert_array_equal(audio.mel_filters(), extractor.mel_filters)


@pytest.mark.parametrize(
    "seconds, n_chunks", [(0.3, 1), (29.99, 1), (30.0, 1), (30.4, 1), (75.0, 3)]
)
def test_log_mel_matches_whisper_extractor(extractor, seconds, n_chunks):
    wav = music(int(round(seconds * SR)), seed=int(seconds * 100))
    reference = reference_features(extractor, wav)
    chunks = audio.chunk_waveform(wav)
    host = audio.log_mel_np(chunks)
    device = np.asarray(audio.log_mel_jax(chunks))
    assert host.shape == device.shape == reference.shape == (n_chunks, 128, 3000)
    assert host.dtype == device.dtype == np.float32
    np.testing.assert_allclose(host, reference, rtol=0, atol=LOG_MEL_TOL)
    np.testing.assert_allclose(device, reference, rtol=0, atol=LOG_MEL_TOL)
    np.testing.assert_allclose(device, host, rtol=0, atol=LOG_MEL_TOL)


@pytest.mark.parametrize(
    "fmt, write_kwargs",
    [
        ("wav", {"subtype": "FLOAT"}),
        ("flac", {}),
        ("ogg", {}),  # vorbis
        ("mp3", {}),  # libsndfile >= 1.1 (bundled in soundfile wheels) writes and reads mp3
    ],
)
def test_stereo_44k_files_match_librosa_and_extractor(tmp_path, extractor, fmt, write_kwargs):
    import librosa

    stereo = np.stack([music(int(32 * 44100), 1, sr=44100), music(int(32 * 44100), 2, sr=44100)], 1)
    path = tmp_path / f"clip.{fmt}"
    soundfile.write(path, 0.5 * stereo, 44100, **write_kwargs)

    wav = audio.load_audio(path)
    expected, _ = librosa.load(path, sr=SR, mono=True)
    # Same decoder, same float32 mix-down, same soxr HQ resampler: bit-identical.
    np.testing.assert_array_equal(wav, expected)

    mel, n_chunks = audio.audio_features(path)
    assert n_chunks == 2 and mel.shape == (2, 128, 3000)
    # Reached: wav 3.1e-05, flac 3.5e-05, ogg 5.2e-05, mp3 3.2e-05.
    reference = reference_features(extractor, expected)
    np.testing.assert_allclose(mel, reference, rtol=0, atol=LOG_MEL_TOL)


def test_16k_file_is_not_resampled(tmp_path):
    wav = music(SR, seed=3)
    path = tmp_path / "clip.wav"
    soundfile.write(path, wav, SR, subtype="FLOAT")
    np.testing.assert_array_equal(audio.load_audio(path), wav)


# --------------------------------------------------------------------------- chunking


@pytest.mark.parametrize(
    "n_samples, n_chunks",
    [
        (1, 1),
        (CHUNK, 1),
        (CHUNK + 8000, 1),  # trailing 0.5 s piece dropped
        (CHUNK + 8001, 2),  # trailing piece just over 0.5 s kept
        (75 * SR, 3),
    ],
)
def test_chunk_rules(n_samples, n_chunks):
    wav = np.random.default_rng(0).standard_normal(n_samples).astype(np.float32)
    chunks = audio.chunk_waveform(wav)
    assert audio.count_chunks(n_samples) == n_chunks
    assert chunks.shape == (n_chunks, CHUNK) and chunks.dtype == np.float32
    flat = chunks.reshape(-1)
    kept = min(n_samples, n_chunks * CHUNK)
    np.testing.assert_array_equal(flat[:kept], wav[:kept])
    assert not flat[kept:].any()  # zero padding


def test_chunk_parameters_and_bad_input():
    assert audio.chunk_waveform(np.ones(25, np.float32), chunk=10, min_last=4).shape == (3, 10)
    assert audio.chunk_waveform(np.ones(24, np.float32), chunk=10, min_last=4).shape == (2, 10)
    with pytest.raises(ValueError, match="empty"):
        audio.chunk_waveform(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="mono"):
        audio.chunk_waveform(np.zeros((2, 100), np.float32))


# --------------------------------------------------------------------------- crop


def test_crop_at_16k_selects_exact_samples(tmp_path):
    ramp = (np.arange(2 * SR) / (2 * SR)).astype(np.float32)  # 2 s, each sample unique
    path = tmp_path / "ramp.wav"
    soundfile.write(path, ramp, SR, subtype="FLOAT")
    np.testing.assert_array_equal(audio.load_audio(path, start=0.5, end=1.25), ramp[8000:20000])
    # 0.29 * 16000 evaluates to 4639.999..., yet the crop starts at sample 4640.
    np.testing.assert_array_equal(audio.load_audio(path, start=0.29), ramp[4640:])
    np.testing.assert_array_equal(audio.load_audio(path, end=0.75), ramp[:12000])
    # An end up to 1 s past the file is clamped to the end of the file.
    np.testing.assert_array_equal(audio.load_audio(path, start=1.0, end=2.9), ramp[16000:])


def test_crop_happens_before_resampling(tmp_path):
    import librosa

    native = np.stack([music(3 * 44100, 4, sr=44100), music(3 * 44100, 5, sr=44100)], 1)
    path = tmp_path / "clip.flac"
    soundfile.write(path, 0.5 * native, 44100)
    decoded, _ = soundfile.read(path, dtype="float32")
    mono = decoded.mean(axis=1, dtype=np.float32)
    expected = librosa.resample(
        mono[int(0.5 * 44100) : int(2.25 * 44100)], orig_sr=44100, target_sr=SR, res_type="soxr_hq"
    )
    assert len(expected) == 28000
    np.testing.assert_array_equal(audio.load_audio(path, start=0.5, end=2.25), expected)


# --------------------------------------------------------------------------- errors


@pytest.fixture
def one_second_wav(tmp_path):
    path = tmp_path / "one_second.wav"
    soundfile.write(path, music(SR, seed=6), SR)
    return path


@pytest.mark.parametrize(
    "start, end, message",
    [
        (-0.1, None, "negative"),
        (0.5, 0.5, "greater than start"),
        (0.6, 0.2, "greater than start"),
        (1.0, None, "beyond the end"),
        (3.0, 4.0, "beyond the end"),
        (0.0, 2.01, "more than 1.0 s beyond"),
        (float("nan"), 0.5, "finite"),
        (0.5, 0.50001, "no samples"),
    ],
)
def test_bad_crop_raises(one_second_wav, start, end, message):
    with pytest.raises(AudioError, match=message) as info:
        audio.load_audio(one_second_wav, start=start, end=end)
    assert str(one_second_wav) in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(AudioError, match="not found") as info:
        audio.load_audio(tmp_path / "nope.mp3")
    assert "nope.mp3" in str(info.value)
    with pytest.raises(AudioError, match="not a file"):
        audio.load_audio(tmp_path)


@pytest.mark.parametrize("name", ["corrupt.wav", "corrupt.mp3", "corrupt.flac", "corrupt.ogg"])
def test_corrupt_bytes_raise(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(AudioError, match="cannot decode") as info:
        audio.load_audio(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("fmt", ["wav", "ogg"])
def test_empty_file_raises(tmp_path, fmt):
    path = tmp_path / f"empty.{fmt}"
    soundfile.write(path, np.zeros(0, np.float32), SR)
    with pytest.raises(AudioError, match="no samples") as info:
        audio.load_audio(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_raise(tmp_path, bad):
    wav = music(SR, seed=7)
    wav[100] = bad
    path = tmp_path / "bad.wav"
    soundfile.write(path, wav, SR, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN or Inf") as info:
        audio.load_audio(path)
    assert str(path) in str(info.value)


def test_audioread_fallback_when_libsndfile_fails(tmp_path, monkeypatch):
    # audioread here has only its stdlib wav/aiff/au backend (no ffmpeg), which is
    # enough to exercise the fallback path on a 16-bit wav.
    stereo = np.stack([music(SR, 8), music(SR, 9)], 1) * 0.5
    path = tmp_path / "pcm16.wav"
    soundfile.write(path, stereo, 22050, subtype="PCM_16")
    expected = audio.load_audio(path)

    def refuse(path):
        raise soundfile.LibsndfileError(1, f"Error opening {path!r}: ")

    monkeypatch.setattr(audio, "_decode_soundfile", refuse)
    # 16-bit PCM scaled by 1/32768 is exact in float32: bit-identical.
    np.testing.assert_array_equal(audio.load_audio(path), expected)


# --------------------------------------------------------------------------- bytes and .npy


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3"])
def test_bytes_decode_like_the_file_with_the_same_crop(tmp_path, fmt):
    """An encoded file held in memory (a Hub `Audio` feature's bytes) is the file."""
    path = tmp_path / f"clip.{fmt}"
    soundfile.write(path, music(3 * 22050, 4, sr=22050), 22050)
    data = path.read_bytes()
    np.testing.assert_array_equal(audio.load_audio(data), audio.load_audio(path))
    np.testing.assert_array_equal(audio.load_audio(data, start=0.5, end=2.25),
                                  audio.load_audio(path, start=0.5, end=2.25))
    with pytest.raises(AudioError, match="start is at or beyond the end") as info:
        audio.load_audio(data, start=5.0, end=6.0, name="gtzan row 7")
    assert "gtzan row 7" in str(info.value)


def test_undecodable_bytes_name_their_origin():
    with pytest.raises(AudioError, match=r"cannot decode audio mucue/x.parquet row 3") as info:
        audio.load_audio(b"RIFF\x00\x00\x00\x00WAVEnot a wave file" * 3, name="mucue/x.parquet row 3")
    assert "\n" not in str(info.value)


def test_npy_waveform_is_16k_samples_cropped_and_resampled_by_the_same_rules(tmp_path):
    wav = music(2 * SR, 5)
    path = tmp_path / "clip.npy"
    np.save(path, wav.astype(np.float64))  # any float dtype; read as float32
    np.testing.assert_array_equal(audio.load_audio(path), wav)
    np.testing.assert_array_equal(audio.load_audio(path, start=0.25, end=1.5), wav[4000:24000])
    # the same samples as a 16 kHz wav file, at another target rate too
    as_wav = tmp_path / "clip.wav"
    soundfile.write(as_wav, wav, SR, subtype="FLOAT")
    np.testing.assert_array_equal(audio.load_audio(path, sr=8000, start=0.1, end=1.9),
                                  audio.load_audio(as_wav, sr=8000, start=0.1, end=1.9))


@pytest.mark.parametrize("array, message", [
    (np.zeros((2, 100), np.float32), "1-D float array"),
    (np.zeros(100, np.int16), "1-D float array"),
    (np.zeros(0, np.float32), "no samples"),
    (np.array([0.0, np.inf], np.float32), "NaN or Inf"),
])
def test_bad_npy_waveforms_raise(tmp_path, array, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(AudioError, match=message) as info:
        audio.load_audio(path)
    assert str(path) in str(info.value)
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(AudioError, match="cannot read waveform file"):
        audio.load_audio(tmp_path / "junk.npy")
