"""Data pipeline throughput: audio seconds per second through `jaxmusic.data` vs a plain loop.

    python bench/data.py [--data /tmp/jaxmusic_bench_data] [--files 24] [--passes 6] [--workers 1 2]

Generates (once) a folder of music-like clips -- wav, flac, ogg, mp3 at 22.05, 44.1 and 48 kHz,
mono and stereo, 5 to 120 s -- and a JSONL manifest that lists every clip `--passes` times.
Then, on the same files in the same run:

* plain loop (one process, one thread): `librosa.load(path, sr=16000)`, cut into 30 s pieces
  as MuFun does, `WhisperFeatureExtractor(feature_size=128)` on each piece;
* the pipeline, `features=log_mel` (log-mel on the host) and `features=waveform` (log-mel
  left to the accelerator), with packing, for each worker count in `--workers`.

Every process is limited to one thread (OMP/MKL/torch). Throughput is audio seconds per CPU
second of the worker processes (start-up CPU, measured on a one-record run, subtracted), so
"per worker" means per busy core and the figure holds on a machine shared with other jobs;
wall-clock rates (from the first batch on) and the main process's CPU are shown beside it.
The tokenizer is a tiny BPE: tokenising is a negligible share of the work with any tokenizer.
A table of per-30 s costs (decode, features) explains the totals.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # before NumPy loads; inherited by the worker processes

import numpy as np  # noqa: E402

FORMATS = [("wav", "WAV", "PCM_16"), ("flac", "FLAC", "PCM_16"), ("ogg", "OGG", "VORBIS"),
           ("mp3", "MP3", "MPEG_LAYER_III")]
RATES = [22050, 44100, 48000]


# --------------------------------------------------------------------------------- the data

def music(seconds: float, sr: int, channels: int, rng) -> np.ndarray:
    """Decaying harmonic notes (4 per second) over a noise floor: `[n, channels]` float32."""
    n = int(seconds * sr)
    note = sr // 4
    t = np.arange(note) / sr
    envelope = np.exp(-3 * t)
    out = np.zeros((n, channels), np.float32)
    for begin in range(0, n, note):
        f0 = 55.0 * 2 ** (rng.integers(0, 48) / 12)
        harmonics = np.arange(1, 9)
        harmonics = harmonics[f0 * harmonics < sr / 2]
        tone = (0.3 / harmonics * np.sin(2 * np.pi * f0 * harmonics * t[:, None]
                                          + rng.uniform(0, 2 * np.pi, len(harmonics)))).sum(axis=1)
        span = min(note, n - begin)
        for c in range(channels):
            out[begin:begin + span, c] = (envelope * tone)[:span] * (1.0 - 0.3 * c)
    out += 0.01 * rng.standard_normal(out.shape).astype(np.float32)
    return out


def generate(folder: Path, n_files: int, passes: int, seed: int = 0) -> Path:
    import soundfile

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    durations = np.linspace(5.0, 120.0, n_files)
    rng.shuffle(durations)
    files = []
    for i, seconds in enumerate(durations):
        ext, fmt, subtype = FORMATS[i % len(FORMATS)]
        sr = RATES[i % len(RATES)]
        channels = 1 + (i // len(FORMATS)) % 2  # every format in mono and stereo
        path = folder / f"clip{i:03d}_{sr}_{channels}ch.{ext}"
        if not path.exists():
            audio = music(float(seconds), sr, channels, rng)
            # write in blocks: libsndfile 1.2's vorbis encoder crashes on very large writes
            with soundfile.SoundFile(path, "w", sr, channels, format=fmt, subtype=subtype) as f:
                for start in range(0, len(audio), sr):
                    f.write(audio[start:start + sr])
        files.append((path.name, float(seconds)))
    manifest = folder / f"bench_{n_files}x{passes}.jsonl"
    with open(manifest, "w") as f:
        for p in range(passes):
            for k, (name, _) in enumerate(files):
                f.write(json.dumps({"id": f"{p}-{k}", "audio": name, "conversations": [
                    {"from": "human", "value": "<audio>\nDescribe the music: genre, tempo, instruments."},
                    {"from": "gpt", "value": "An instrumental piece with plucked notes at a steady tempo."}]})
                        + "\n")
    return manifest


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from jaxmusic.templates import SYSTEM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([SYSTEM, "Describe the music: genre, tempo, instruments."], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")


# ------------------------------------------------------------------------------ the runs

def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def plain_loop(manifest: Path, folder: Path) -> dict:
    """librosa + WhisperFeatureExtractor, one process, one thread."""
    import librosa
    import torch
    from transformers import WhisperFeatureExtractor

    torch.set_num_threads(1)
    fe = WhisperFeatureExtractor(feature_size=128)
    chunk, min_last = 480_000, 8_000
    names = [json.loads(line)["audio"] for line in manifest.read_text().splitlines()]

    def one(name):
        wav, _ = librosa.load(folder / name, sr=16000)
        pieces = [wav[i:i + chunk] for i in range(0, len(wav), chunk)]
        if len(pieces) > 1 and len(pieces[-1]) <= min_last:
            pieces.pop()
        for piece in pieces:
            fe(piece, sampling_rate=16000, return_tensors="np")
        return len(wav) / 16000

    one(names[0])  # librosa's lazy imports and first-call set-up
    wall, cpu = time.perf_counter(), time.process_time()
    seconds = sum(one(name) for name in names)
    return {"audio_s": seconds, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def pipeline(manifest: Path, folder: Path, features: str, workers: int) -> dict:
    """One pass over the manifest; CPU time of the workers (incl. their start-up) and of this
    process, and wall time from the first batch to the end."""
    from jaxmusic.data import DataConfig, make_dataset
    from jaxmusic.data.check import DEFAULT_MODEL, model_settings

    cfg = DataConfig(mixture=[{"manifest": str(manifest)}], audio_root=str(folder), seq_len=4096,
                     chunks_per_row=13, features=features, packing=True, workers=workers,
                     worker_buffer_size=4, prefetch_batches=2, seed=0)
    tokenizer = tiny_tokenizer()
    t0, cpu0, children0 = time.perf_counter(), time.process_time(), _children_cpu()
    it = iter(make_dataset(cfg, tokenizer, batch_size=2, tokens_per_chunk=model_settings(DEFAULT_MODEL)[0],
                           process_index=0, process_count=1))
    next(it)
    t1 = time.perf_counter()
    first_audio = it.get_state()["audio_seconds"]
    for _ in it:
        pass
    t2 = time.perf_counter()
    state = it.get_state()
    it.close()
    return {"audio_s": state["audio_seconds"], "steady_audio_s": state["audio_seconds"] - first_audio,
            "wall_s": t2 - t1, "first_batch_s": t1 - t0, "main_cpu_s": time.process_time() - cpu0,
            "workers_cpu_s": _children_cpu() - children0, "batches": state["batches"]}


def startup_cpu(folder: Path, workers: int) -> float:
    """Workers' CPU seconds spent starting (imports, unpickling) and stopping: a one-record run."""
    one = folder / "one.jsonl"
    one.write_text(next(open(next(folder.glob("bench_*.jsonl")))))
    return pipeline(one, folder, "waveform", workers)["workers_cpu_s"]


def per_chunk_costs(folder: Path) -> dict:
    """Milliseconds per 30 s of audio for the pieces both loaders share or differ in."""
    import librosa
    import torch
    from transformers import WhisperFeatureExtractor

    from jaxmusic import audio as A

    torch.set_num_threads(1)
    paths = sorted(p for p in folder.iterdir() if p.suffix in (".wav", ".flac", ".ogg", ".mp3"))
    waves = [A.load_audio(p) for p in paths]  # for the chunks below; also the first-call set-up
    t = time.process_time()
    for p in paths:  # results dropped, as librosa's below: keeping them all costs page faults
        A.load_audio(p)
    decode = time.process_time() - t
    librosa.load(paths[0], sr=16000)  # lazy imports and first-call set-up
    t = time.process_time()
    for p in paths:
        librosa.load(p, sr=16000)
    librosa_decode = time.process_time() - t
    chunks = np.concatenate([A.chunk_waveform(w) for w in waves])
    t = time.process_time()
    A.log_mel_np(chunks)
    ours = time.process_time() - t
    fe = WhisperFeatureExtractor(feature_size=128)
    t = time.process_time()
    for c in chunks:
        fe(c, sampling_rate=16000, return_tensors="np")
    theirs = time.process_time() - t
    per30 = sum(len(w) for w in waves) / A.CHUNK_SAMPLES
    return {"load_audio (decode, mono, resample), all files": 1000 * decode / per30,
            "librosa.load, all files": 1000 * librosa_decode / per30,
            "log_mel_np, per chunk": 1000 * ours / len(chunks),
            "WhisperFeatureExtractor, per chunk": 1000 * theirs / len(chunks)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/tmp/jaxmusic_bench_data")
    parser.add_argument("--files", type=int, default=24)
    parser.add_argument("--passes", type=int, default=6)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--child", choices=("plain", "costs"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    folder = Path(args.data)
    manifest = generate(folder, args.files, args.passes)
    if args.child:
        result = plain_loop(manifest, folder) if args.child == "plain" else per_chunk_costs(folder)
        print(json.dumps(result))
        return

    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags

    def child(kind):  # in its own process, so torch never loads into the pipeline's workers
        out = subprocess.run([sys.executable, __file__, "--data", str(folder), "--files", str(args.files),
                              "--passes", str(args.passes), "--child", kind],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out.splitlines()[-1])

    costs = child("costs")
    plain = child("plain")
    print(f"{len(manifest.read_text().splitlines())} records, {plain['audio_s'] / 3600:.2f} h of audio "
          f"per pass; load average before the runs: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| per 30 s of audio (one thread, CPU time) | ms |\n|---|---|")
    for name, ms in costs.items():
        print(f"| {name} | {ms:.1f} |")
    print("\n| loader | features | workers | audio s per worker CPU s | vs plain loop (mean of both plain runs) | "
          "this process CPU s per audio h | audio s per wall s | first batch s |")
    print("|---|---|---|---|---|---|---|---|")
    runs = []
    for features in ("log_mel", "waveform"):
        for workers in args.workers:
            start = startup_cpu(folder, workers)
            runs.append((features, workers, start, pipeline(manifest, folder, features, workers)))
    again = child("plain")  # the machine may be shared: bracket the pipeline runs
    plain_rate = (plain["audio_s"] + again["audio_s"]) / (plain["cpu_s"] + again["cpu_s"])
    for r in (plain, again):
        print(f"| plain loop (librosa + WhisperFeatureExtractor) | host | 1 | {r['audio_s'] / r['cpu_s']:.0f} | "
              f"{r['audio_s'] / r['cpu_s'] / plain_rate:.2f}x | - | {r['audio_s'] / r['wall_s']:.0f} | - |")
    for features, workers, start, r in runs:
        per_worker = r["audio_s"] / max(r["workers_cpu_s"] - start, 1e-9)
        print(f"| jaxmusic.data | {features} | {workers} | {per_worker:.0f} | {per_worker / plain_rate:.2f}x | "
              f"{3600 * r['main_cpu_s'] / r['audio_s']:.1f} | {r['steady_audio_s'] / r['wall_s']:.0f} | "
              f"{r['first_batch_s']:.1f} |")


if __name__ == "__main__":
    main()
