"""Audio front end: decode -> mono -> crop -> 16 kHz -> 30 s chunks -> Whisper log-mel.

Matches what MuFun feeds its Whisper-large-v3 encoder:

* Decoding uses soundfile (libsndfile). The soundfile>=0.13 wheels bundle
  libsndfile 1.2, which reads wav, flac, ogg (vorbis/opus) *and* mp3, so no
  ffmpeg is needed. Only when libsndfile cannot open a file do we fall back to
  audioread, which needs a system decoder (ffmpeg or GStreamer) for anything
  but wav/aiff/au, and yields 16-bit precision. An encoded file may also come as
  bytes (a Hugging Face `Audio` feature embeds them in parquet); libsndfile reads
  those from memory, with no audioread fallback. A `.npy` file is a waveform already
  decoded at 16 kHz (MuFun's training data stores some clips so).
* The waveform is read as float32, mixed down to mono by the mean of the
  channels, optionally cropped on the native-rate signal, then resampled with
  soxr "HQ" -- exactly what `librosa.load(path, sr=16000, mono=True)` does in
  librosa 0.11 (default `res_type="soxr_hq"`, output length
  `ceil(n * 16000 / sr)`), so uncropped files give bit-identical samples.
  We call soxr directly rather than librosa so data workers skip librosa's
  multi-second import. (MuFun's *training* loader instead decodes with ffmpeg
  and resamples with torchaudio's sinc filter; the two resamplers differ only
  in their anti-aliasing filters. We follow librosa's, the common reference.)
* Chunking and the log-mel follow `WhisperFeatureExtractor(feature_size=128)`
  applied to every 480,000-sample chunk, the way the reference data loader
  does. `log_mel_np` runs on the host in float64; `log_mel_jax` is the same
  math in float32 for the accelerator.

Crop semantics (`start`/`end` in seconds, as in the dataset's `"time"` field):
samples `[floor(start * sr), floor(end * sr))` of the native-rate signal, as in
the reference loader. `start < 0`, `end <= start` and `start` at or beyond the
end of the file are errors. An `end` past the end of the file is clamped when
it overshoots by at most `end_tolerance` seconds (default 1 s: annotations
are often rounded up to whole seconds, and tools disagree by some ms on an
mp3's length);
a larger overshoot means the annotation does not describe this file, so it is
an error rather than a silently shorter clip.
"""

from __future__ import annotations

import functools
import io
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft
import soundfile
import soxr

from jaxmusic.errors import UserError

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 128
MEL_FMAX = 8000.0
CHUNK_SECONDS = 30
CHUNK_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480,000 samples -> 3000 frames
MIN_LAST_SAMPLES = SAMPLE_RATE // 2  # a trailing piece must be longer than 0.5 s
LOG_FLOOR = 1e-10
DYNAMIC_RANGE = 8.0  # log10 units kept below the chunk's maximum

# `start * sr` for a start such as 0.29 s can land a hair below an integer;
# this slack keeps floor() on the intended sample.
_TIME_EPS = 1e-6


class AudioError(UserError, ValueError):
    """A user-facing problem with an audio file or crop; the message names the file."""


# --------------------------------------------------------------------------- decoding


def _decode_soundfile(path: str) -> tuple[np.ndarray, int]:
    data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    return data, rate


def _decode_audioread(path: str) -> tuple[np.ndarray, int]:
    import audioread  # only needed for formats libsndfile cannot read

    with audioread.audio_open(path) as f:
        rate, channels = f.samplerate, f.channels
        pcm = b"".join(f)
    # audioread hands out 16-bit little-endian PCM; scale as librosa does.
    data = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    return data.reshape(-1, channels), rate


def _decode(path: str) -> tuple[np.ndarray, int]:
    """Returns ([n, channels] float32, native sample rate)."""
    try:
        return _decode_soundfile(path)
    except soundfile.LibsndfileError as sf_error:
        try:
            return _decode_audioread(path)
        except Exception:
            # libsndfile's reason is the informative one: audioread only
            # matters on systems with ffmpeg/GStreamer.
            raise AudioError(
                f"cannot decode audio file {path} (unsupported format or corrupt data); "
                f"libsndfile said: {sf_error}"
            ) from sf_error


def _decode_bytes(data: bytes, name: str) -> tuple[np.ndarray, int]:
    """An encoded file held in memory (e.g. a Hub `Audio` feature's `bytes`), by libsndfile only:
    audioread needs a file on disk."""
    try:
        return soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(
            f"cannot decode audio {name} (unsupported format or corrupt data); libsndfile said: {e}"
        ) from None


def _load_npy(path: str) -> tuple[np.ndarray, int]:
    """A precomputed waveform: a 1-D float array of 16 kHz samples, as MuFun's training data
    stores them in `.npy` files. MuFun's loader hands such an array to the feature extractor
    whole, as one chunk (which keeps its first 30 s) and ignores `time`; here it is cropped
    and cut into 30 s chunks like any decoded file, which is the same for clips up to 30 s."""
    try:
        wav = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise AudioError(f"cannot read waveform file {path} ({e})") from None
    if wav.ndim != 1 or not np.issubdtype(wav.dtype, np.floating):
        raise AudioError(
            f"cannot use waveform file {path}: a .npy waveform must be a 1-D float array of "
            f"{SAMPLE_RATE} Hz samples, got a {wav.dtype} array of shape {wav.shape}"
        )
    return wav.astype(np.float32)[:, None], SAMPLE_RATE


def _mono(data: np.ndarray) -> np.ndarray:
    """`[n, channels]` float32 -> `[n]`: the channels' mean, bit-identical to
    `np.mean(data.T, axis=0)` (librosa's mixdown: the rows added in order, then divided), without
    that layout's copy of the whole signal; a mono file costs no copy at all."""
    channels = data.shape[1]
    if channels == 1:
        return data[:, 0]
    wav = data[:, 0].copy()
    for c in range(1, channels):
        wav += data[:, c]
    wav /= np.float32(channels)
    return wav


def _crop(
    wav: np.ndarray,
    rate: int,
    start: float | None,
    end: float | None,
    end_tolerance: float,
    path: str,
) -> np.ndarray:
    duration = len(wav) / rate
    what = f"crop [{start}, {end}] s of {path} (duration {duration:.3f} s)"
    start_s = 0.0 if start is None else float(start)
    end_s = duration if end is None else float(end)
    if not (math.isfinite(start_s) and math.isfinite(end_s)):
        raise AudioError(f"{what}: start and end must be finite numbers")
    if start_s < 0:
        raise AudioError(f"{what}: start is negative")
    if start_s >= duration:
        raise AudioError(f"{what}: start is at or beyond the end of the file")
    if end_s <= start_s:
        raise AudioError(f"{what}: end must be greater than start")
    if end_s > duration + end_tolerance:
        raise AudioError(
            f"{what}: end is more than {end_tolerance} s beyond the end of the file"
        )
    first = int(math.floor(start_s * rate + _TIME_EPS))
    last = min(int(math.floor(end_s * rate + _TIME_EPS)), len(wav))
    cropped = wav[first:last]
    if cropped.size == 0:
        raise AudioError(f"{what}: the crop contains no samples")
    return cropped


def _resample(wav: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    if rate == target_rate:
        return wav
    out = soxr.resample(wav, rate, target_rate, quality="HQ")
    # librosa fixes the length to ceil(n * ratio) (zero-pad or trim); do the same.
    n_out = int(math.ceil(len(wav) * target_rate / rate))
    if len(out) < n_out:
        out = np.pad(out, (0, n_out - len(out)))
    return np.ascontiguousarray(out[:n_out], dtype=np.float32)


def load_audio(
    source: str | os.PathLike | bytes,
    *,
    start: float | None = None,
    end: float | None = None,
    sr: int = SAMPLE_RATE,
    end_tolerance: float = 1.0,
    name: str | None = None,
) -> np.ndarray:
    """Decodes audio to a mono float32 waveform at `sr` Hz, optionally cropped.

    `source` is a file path, or the bytes of an encoded file (wav, flac, ogg, mp3; `name`
    then says where they came from in error messages). A path ending in `.npy` is a
    precomputed 16 kHz waveform (`_load_npy`). The same crop and resample rules apply to
    all three (module docstring). Raises `AudioError` for a missing, undecodable, empty or
    non-finite source and for a crop that does not fit it.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        path = name or f"<{len(source)} bytes>"
        data, rate = _decode_bytes(bytes(source), path)
    else:
        path = os.fspath(source)
        if not os.path.exists(path):
            raise AudioError(f"audio file not found: {path}")
        if not os.path.isfile(path):
            raise AudioError(f"audio path is not a file: {path}")
        data, rate = _load_npy(path) if path.endswith(".npy") else _decode(path)
    if data.size == 0:
        raise AudioError(f"audio file {path} contains no samples")
    wav = _mono(data)
    # Checked on the mix (1/channels of the work): a NaN or Inf sample makes its mix
    # sample NaN or Inf.
    if not np.isfinite(wav).all():
        raise AudioError(f"audio file {path} contains NaN or Inf samples")
    if start is not None or end is not None:
        wav = _crop(wav, rate, start, end, end_tolerance, path)
    return _resample(wav, rate, sr)


# --------------------------------------------------------------------------- chunking


def count_chunks(
    n_samples: int, *, chunk: int = CHUNK_SAMPLES, min_last: int = MIN_LAST_SAMPLES
) -> int:
    """How many chunks `chunk_waveform` makes of `n_samples` samples (without decoding)."""
    if n_samples <= 0:
        raise ValueError(f"cannot chunk an empty waveform (n_samples={n_samples})")
    if n_samples <= chunk:
        return 1
    full, rest = divmod(n_samples, chunk)
    return full + (1 if rest > min_last else 0)


def chunk_waveform(
    wav: np.ndarray, *, chunk: int = CHUNK_SAMPLES, min_last: int = MIN_LAST_SAMPLES
) -> np.ndarray:
    """Cuts a mono waveform into zero-padded `[n_chunks, chunk]` float32 pieces.

    A waveform of at most `chunk` samples is one chunk. A longer one is cut into
    non-overlapping chunks and a trailing piece of `<= min_last` samples is dropped.
    """
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"expected a mono waveform [n], got shape {wav.shape}")
    n_chunks = count_chunks(len(wav), chunk=chunk, min_last=min_last)
    out = np.zeros((n_chunks, chunk), np.float32)
    used = min(len(wav), n_chunks * chunk)
    out.reshape(-1)[:used] = wav[:used]
    return out


# --------------------------------------------------------------------------- log-mel


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear (3 mel per 200 Hz) below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, np.float64)
    log_step = math.log(6.4) / 27.0
    linear = hz * 3.0 / 200.0
    return np.where(hz >= 1000.0, 15.0 + np.log(np.maximum(hz, 1e-12) / 1000.0) / log_step, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, np.float64)
    log_step = math.log(6.4) / 27.0
    return np.where(mel >= 15.0, 1000.0 * np.exp(log_step * (mel - 15.0)), mel * 200.0 / 3.0)


@functools.lru_cache(maxsize=8)
def _mel_filters_cached(n_mels: int) -> np.ndarray:
    fft_hz = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    # n_mels triangles whose corners are n_mels + 2 points evenly spaced in mel.
    corners_hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(MEL_FMAX), n_mels + 2))
    left, centre, right = corners_hz[:-2], corners_hz[1:-1], corners_hz[2:]
    rising = (fft_hz[:, None] - left) / (centre - left)
    falling = (right - fft_hz[:, None]) / (right - centre)
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    # Slaney normalisation: every filter has unit area in Hz (2 / base width).
    filters = triangles * (2.0 / (right - left))
    filters.flags.writeable = False
    return filters


def mel_filters(n_mels: int = N_MELS) -> np.ndarray:
    """`[n_fft // 2 + 1, n_mels]` float64 Slaney mel filter bank, 0 to 8 kHz."""
    return _mel_filters_cached(n_mels)


def _hann_window() -> np.ndarray:
    """Periodic Hann window (the DFT-even one torch.hann_window gives by default)."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)


def _check_chunks(chunks) -> None:
    if chunks.ndim != 2 or chunks.shape[1] <= N_FFT // 2:
        raise ValueError(f"expected chunks [n, samples > {N_FFT // 2}], got shape {chunks.shape}")


def _finish_log_mel(xp, mel_power):
    """log10, clamp to 8 decades below each chunk's maximum, rescale: [n, frames, mels]."""
    log_mel = xp.log10(xp.maximum(mel_power, LOG_FLOOR))
    peak = log_mel.max(axis=(1, 2), keepdims=True)
    log_mel = xp.maximum(log_mel, peak - DYNAMIC_RANGE)
    return xp.swapaxes((log_mel + 4.0) / 4.0, 1, 2)


def log_mel_np(chunks: np.ndarray, n_mels: int = N_MELS) -> np.ndarray:
    """Whisper log-mel of `[n, samples]` chunks -> `[n, n_mels, samples // 160]` float32.

    Computed in float64, so the result is the exact value the float32 reference
    approximates.
    """
    chunks = np.asarray(chunks, np.float64)
    _check_chunks(chunks)
    n_frames = chunks.shape[1] // HOP_LENGTH
    padded = np.pad(chunks, ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")
    # Centred STFT frames; keep the first n_frames, i.e. drop the last one.
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT, axis=1)
    frames = frames[:, : n_frames * HOP_LENGTH : HOP_LENGTH]
    spectrum = scipy.fft.rfft(frames * _hann_window(), axis=-1)  # faster than numpy's, same values
    power = spectrum.real**2 + spectrum.imag**2
    return _finish_log_mel(np, power @ mel_filters(n_mels)).astype(np.float32)


def _frames_jax(padded: jax.Array, n_frames: int) -> jax.Array:
    """`[n, L] -> [n, n_frames, N_FFT]` hop-spaced frames by reshape and slicing.

    The signal is viewed as hop-sized blocks; a frame is `N_FFT // hop` whole
    consecutive blocks plus the head of the next one. Slices, unlike a gather,
    lower to plain copies on every backend.
    """
    whole, rest = divmod(N_FFT, HOP_LENGTH)
    n_blocks = n_frames + whole + (1 if rest else 0)
    pad = n_blocks * HOP_LENGTH - padded.shape[1]
    padded = jnp.pad(padded, ((0, 0), (0, max(pad, 0))))[:, : n_blocks * HOP_LENGTH]
    blocks = padded.reshape(padded.shape[0], n_blocks, HOP_LENGTH)
    pieces = [blocks[:, k : k + n_frames] for k in range(whole)]
    if rest:
        pieces.append(blocks[:, whole : whole + n_frames, :rest])
    return jnp.concatenate(pieces, axis=-1)


@functools.partial(jax.jit, static_argnames="n_mels")
def log_mel_jax(chunks: jax.Array, n_mels: int = N_MELS) -> jax.Array:
    """`log_mel_np` in float32 JAX (jittable), for computing features on the accelerator.

    A float32 FFT is accurate enough: on CPU it stays within 5e-5 of the
    (itself float32) transformers reference. The residue is rounding in bins
    7-8 decades below the chunk peak; a DFT-by-matmul accumulates in float32
    too and would not do better, so we keep the cheaper FFT.
    """
    chunks = jnp.asarray(chunks, jnp.float32)
    _check_chunks(chunks)
    n_frames = chunks.shape[1] // HOP_LENGTH
    padded = jnp.pad(chunks, ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")
    frames = _frames_jax(padded, n_frames) * jnp.asarray(_hann_window(), jnp.float32)
    spectrum = jnp.fft.rfft(frames, axis=-1)
    power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
    # HIGHEST: on GPUs the default f32 matmul is TF32 (10-bit mantissa), which
    # alone would cost ~1e-4 after the log.
    mel_power = jnp.matmul(
        power,
        jnp.asarray(mel_filters(n_mels), jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return _finish_log_mel(jnp, mel_power)


# --------------------------------------------------------------------------- convenience


def audio_features(
    path: str | os.PathLike,
    *,
    start: float | None = None,
    end: float | None = None,
) -> tuple[np.ndarray, int]:
    """load -> chunk -> host log-mel: `([n_chunks, 128, 3000] float32, n_chunks)`."""
    chunks = chunk_waveform(load_audio(path, start=start, end=end))
    return log_mel_np(chunks), len(chunks)
