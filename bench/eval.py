"""`jaxmusic eval` throughput on CPU: items/s on a MuCUE-layout snapshot, per mode and process count.

    python bench/eval.py [--items 96] [--seconds 10] [--batch-size 8] [--workdir /tmp/jm_bench_eval]

Builds, once, in `--workdir`: a MuCUE-layout snapshot (four subsets; wav, flac and mp3 bytes
embedded; `--seconds`-long clips, every other item cropped by `time_seg`; lettered `choices_text`)
and a random MuFun of the demo's size (`configs/stages/demo.yaml`: 1-layer Whisper encoder on
real 128 x 3000 log-mels, 2-layer Qwen3 of width 128) with the demo's byte-level BPE tokenizer
plus Qwen's `<|im_start|>`, so the same checkpoint's LLM can serve as the `--judge`.
Random weights rarely stop early: every answer runs to the 64-token limit (the judge's to 32),
the slowest case.

Times, in this process (model loaded and every case compiled on one batch first; that start-up
is reported apart),
`generate` with the rule extractor, `generate --judge` (the same checkpoint's LLM as judge) at
temperature 0.1 (per item) and 0 (batched), and `loglik`; then the whole command in fresh
processes, 1 and 2 of them (`launch/local.py -n 2`), start-up included. On a machine whose
cores are shared, the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SUBSETS = ("gtzan", "nsyn_pitch", "mtg_mood", "gs_key_30s")
FORMATS = ("WAV", "FLAC", "MP3")
WORDS = ["blues", "jazz", "rock", "pop", "metal", "happy", "sad", "calm", "C major", "A minor", "E4", "G3"]


def build_snapshot(root: Path, n_items: int, seconds: float) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf

    rng = np.random.default_rng(0)
    (root / "data").mkdir(parents=True)
    for s, subset in enumerate(SUBSETS):
        rows = []
        for i in range(s, n_items, len(SUBSETS)):
            sr = (16000, 22050, 44100)[i % 3]
            t = np.arange(int(seconds * sr)) / sr
            wav = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 900) * t) + 0.01 * rng.standard_normal(len(t))
            buf = io.BytesIO()
            sf.write(buf, wav.astype(np.float32), sr, format=FORMATS[i % 3])
            options = rng.choice(WORDS, 4, replace=False)
            rows.append({"audio": {"bytes": buf.getvalue(), "path": f"{subset}_{i}.{FORMATS[i % 3].lower()}"},
                         "question": f"Which label fits clip {i}?",
                         "choices_text": "\n".join(f"{'ABCD'[k]}. {o}" for k, o in enumerate(options)),
                         "correct_choice": "ABCD"[i % 4],
                         "time_seg": [1.0, seconds - 1.0] if i % 2 else None})
        pq.write_table(pa.Table.from_pylist(rows), root / "data" / f"{subset}-00000-of-00001.parquet",
                       row_group_size=16)
    return root


def build_checkpoint(out: Path, texts: list[str]) -> Path:
    """A random demo-sized MuFun, saved as a jaxmusic checkpoint."""
    import orbax.checkpoint as ocp
    from flax import nnx
    from transformers import Qwen3Config, WhisperConfig

    from jaxmusic import checkpoints, configs
    from jaxmusic.demo.tokenizer import train_tokenizer
    from jaxmusic.models.mufun import MuFun, MuFunConfig, connector_config
    from jaxmusic.models.qwen3 import Qwen3Config as JQwen3Config
    from jaxmusic.models.whisper import WhisperEncoderConfig
    from jaxmusic.nn import ModelOptions

    tokenizer = train_tokenizer(texts, vocab_size=1024)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})  # the judge's chat layout

    model = configs.load_yaml(REPO / "configs" / "stages" / "demo.yaml")["model"]
    hf = {"whisper": WhisperConfig(**model["whisper"]).to_dict(),
          "llm": Qwen3Config(**{**model["llm"], "vocab_size": len(tokenizer)}).to_dict()}
    cfg = MuFunConfig.from_dict(model["mufun"])
    mufun = MuFun(WhisperEncoderConfig.from_hf(hf["whisper"]), JQwen3Config.from_hf(hf["llm"]), cfg,
                  ModelOptions(), nnx.Rngs(0))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with ocp.PyTreeCheckpointer() as saver:
        saver.save((tmp / checkpoints.PARAMS_DIR).absolute(), nnx.to_pure_dict(nnx.state(mufun)))
    tokenizer.save_pretrained(str(tmp / "tokenizer" / "llm"))
    parts = {p: {"hf_config": hf[p], "source_dtype": "float32"} for p in ("whisper", "llm")}
    parts["llm"]["tokenizer"] = "tokenizer/llm"
    parts["connector"] = {"hf_config": connector_config(cfg, hf["whisper"]["d_model"], hf["llm"]["hidden_size"]),
                          "source_dtype": "float32"}
    checkpoints.write_meta(tmp, parts, "float32", mufun=cfg.to_dict())
    tmp.rename(out)
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=96)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workdir", default="/tmp/jm_bench_eval")
    args = p.parse_args()

    from jaxmusic import inference
    from jaxmusic.evaluation import evaluate
    from jaxmusic.evaluation import benchmarks, judge

    work = Path(args.workdir)
    snapshot, ckpt = work / f"MuCUE-{args.items}x{args.seconds:g}s", work / "ckpt"
    if not snapshot.is_dir():
        build_snapshot(snapshot, args.items, args.seconds)
    items = benchmarks.read_benchmark(snapshot)
    if not ckpt.is_dir():
        texts = [it.prompt for it in items] + [judge.judge_text(it.choices_text, "blues") for it in items]
        build_checkpoint(ckpt, texts)
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    print(f"{len(items)} items of {args.seconds:g} s ({', '.join(FORMATS)}), batch {args.batch_size}; "
          f"{os.cpu_count()} cores, 1-min load average {os.getloadavg()[0]:.1f}", flush=True)

    start = time.perf_counter()
    loaded = inference.load(ckpt)
    warm = dict(loaded=loaded, batch_size=args.batch_size, progress=False, limit=args.batch_size)
    cases = {"generate, rule extractor": {},
             "generate, --judge (temperature 0.1, per item)": {"judge": str(ckpt)},
             "generate, --judge --judge-temperature 0 (batched)": {"judge": str(ckpt), "judge_temperature": 0.0},
             "loglik": {"mode": "loglik"}}
    for k, kw in enumerate(cases.values()):  # compile every case's programs before timing
        evaluate.run(str(ckpt), str(snapshot), out=str(runs / f"warm{k}"), **warm, **kw)
    print(f"load and compile: {time.perf_counter() - start:.1f} s", flush=True)

    rows = []
    for k, (name, kw) in enumerate(cases.items()):
        common = dict(loaded=loaded, batch_size=args.batch_size, progress=False)
        seconds = timed(lambda: evaluate.run(str(ckpt), str(snapshot), out=str(runs / f"case{k}"), **common, **kw))
        rows.append((name, "1 (in-process, compiled)", seconds))
        print(f"{name}: {len(items) / seconds:.2f} items/s", flush=True)

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-m", "jaxmusic.cli", "eval", str(ckpt), "--benchmark", str(snapshot),
               "--batch-size", str(args.batch_size)]
    for n in (1, 2):
        launch = [sys.executable, str(REPO / "launch" / "local.py"), "-n", str(n), "--"] if n > 1 else []
        seconds = timed(lambda: subprocess.run(launch + command + ["--out", str(runs / f"cli{n}")], env=env,
                                               check=True, capture_output=True))
        rows.append(("generate, rule extractor, whole command", f"{n} (fresh, start-up included)", seconds))
        print(f"{n} process(es), whole command: {len(items) / seconds:.2f} items/s", flush=True)
    assert (json.loads((runs / "cli2" / "results.json").read_text())["subsets"]
            == json.loads((runs / "cli1" / "results.json").read_text())["subsets"])

    print(f"\n1-min load average at the end: {os.getloadavg()[0]:.1f}\n")
    print("| mode | processes | wall s | items/s |")
    print("|---|---|---|---|")
    for name, procs, seconds in rows:
        print(f"| {name} | {procs} | {seconds:.1f} | {len(items) / seconds:.2f} |")


if __name__ == "__main__":
    main()
