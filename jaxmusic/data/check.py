"""`jaxmusic data check`: validate manifests before an expensive run.

Runs every record through the training pipeline's own per-sample code (parse, template,
tokenize, decode, crop, resample, truncation check, budget fit; no log-mel) on all cores and
prints, per manifest: usable and skipped samples by reason, hours of audio, histograms of
chunk counts and token lengths, and the share of each batch row that would be padding
without and with packing.

Exit status: 0 if no record is bad data; 1 if any is (samples that only exceed the budget
do not count as bad), after checking everything, or with `--strict` at the first bad record,
whose file and line it names; 2 for a usage error (e.g. a manifest that does not exist).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys

import numpy as np

from jaxmusic import templates as T
from jaxmusic.data.config import DataConfig
from jaxmusic.data.examples import ExampleBuilder, is_skip
from jaxmusic.data.manifest import BAD_DATA
from jaxmusic.data.packing import Rows, fill_rows
from jaxmusic.data.pipeline import element_stream, record_dataset

DEFAULT_MODEL = "mufun"


def model_settings(model: str) -> tuple[int, str]:
    """`(audio tokens per 30 s chunk, prompt template)` of `model`: a jaxmusic checkpoint folder,
    or a glue config in jaxmusic/configs/ by name (`mufun`: 300, `qwen2_audio`: 750) or path,
    with Whisper-large-v3's 1500 encoder frames per chunk."""
    from pathlib import Path

    from jaxmusic.configs import ROOT, load_yaml
    from jaxmusic.errors import UserError
    from jaxmusic.models.mufun import MuFunConfig

    frames = load_yaml(ROOT / "models" / "whisper-large-v3.yaml")["max_source_positions"]
    path = Path(model)
    try:
        if path.is_dir():
            from jaxmusic.checkpoints import read_meta

            meta = read_meta(path)
            cfg = MuFunConfig.from_dict(meta.get("mufun", {}))
            frames = meta["parts"]["whisper"]["hf_config"].get("max_source_positions", frames)
        else:
            cfg = MuFunConfig.from_yaml(path if path.suffix in (".yaml", ".yml") else ROOT / f"{model}.yaml")
    except (KeyError, ValueError) as e:
        raise UserError(f"--model {model}: {e}") from None
    return cfg.tokens_per_chunk(frames), cfg.prompt_template


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    defaults = DataConfig()
    parser = parser or argparse.ArgumentParser(prog="jaxmusic data check", description=__doc__)
    parser.add_argument("manifests", nargs="+", metavar="MANIFEST", help="JSON list or JSONL files")
    parser.add_argument("--audio-root", required=True, help="folder the manifests' audio paths are relative to")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="whose audio tokens per chunk and prompt template: a glue config name "
                             "(mufun, qwen2_audio), a glue YAML, or a jaxmusic checkpoint (default mufun)")
    parser.add_argument("--template", default=None, choices=T.TEMPLATES,
                        help="prompt template (default: the model's, else "
                             f"{defaults.template}); a stage's data.template")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len,
                        help=f"tokens per row, a stage's data.seq_len (default {defaults.seq_len})")
    parser.add_argument("--chunks-per-row", "--max-chunks", type=int, default=None,
                        help="30 s audio chunks per row, a stage's data.chunks_per_row "
                             "(default: as many as fit, seq_len // tokens-per-chunk)")
    parser.add_argument("--max-audio-seconds", type=float, default=defaults.max_audio_seconds,
                        help="keep only the start of every file, a stage's data.max_audio_seconds "
                             f"(default {defaults.max_audio_seconds:g})")
    parser.add_argument("--tokens-per-chunk", type=int, default=None,
                        help="audio tokens per 30 s chunk (default: the --model's, 300 for MuFun: "
                             "1500 encoder frames mean-pooled by 5)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch, for the packing estimate")
    parser.add_argument("--tokenizer", default=None,
                        help="local Hugging Face tokenizer folder; without it token lengths count audio only")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    parser.add_argument("--report", default=None, help="also write the statistics to this JSON file")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first bad record (in file order), name its file and line, exit 1; "
                             "without it every record is checked and the exit status is 1 if any was bad")
    return parser


def _load_tokenizer(path: str | None):
    if path is None:
        return None
    from transformers import AutoTokenizer

    from jaxmusic.errors import UserError

    if not os.path.isdir(path):
        raise UserError(f"tokenizer folder not found: {path}")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _histogram(values, edges) -> dict[str, int]:
    counts, _ = np.histogram(values, bins=edges)
    return {f"{int(a)}-{int(b) - 1}": int(n) for a, b, n in zip(edges[:-1], edges[1:], counts)}


def padding_share(lengths, chunks, cfg: DataConfig, batch_size: int):
    """(token, chunk-slot) padding shares of the batches the pipeline would build (with or
    without `cfg.packing`), in an order shuffled with `cfg.seed` as in training."""
    if not lengths:
        return 0.0, 0.0
    order = np.random.default_rng(cfg.seed).permutation(len(lengths))
    todo = iter([{"length": int(lengths[i]), "chunks": np.array([chunks[i]])} for i in order])
    waiting, n_batches = [], 0
    while True:
        rows = Rows(cfg, batch_size)
        waiting = fill_rows(rows, waiting, lambda: next(todo, None))
        if rows.empty():
            break
        n_batches += 1
    slots = n_batches * batch_size
    return (1.0 - sum(lengths) / (slots * cfg.seq_len),
            1.0 - sum(chunks) / (slots * cfg.chunks_per_row))


class FirstBadRecord(Exception):
    """`--strict`: the first bad record of a manifest (the message names its file and line)."""


def check_manifest(path: str, args, tokenizer) -> dict:
    from tqdm import tqdm

    cfg = DataConfig(mixture=[{"manifest": path}], audio_root=args.audio_root, template=args.template,
                     seq_len=args.seq_len,
                     chunks_per_row=args.chunks_per_row or max(1, args.seq_len // args.tokens_per_chunk),
                     max_audio_seconds=args.max_audio_seconds, shuffle=False,
                     workers=args.workers if args.workers > 1 else 0)
    builder = ExampleBuilder(cfg, tokenizer, tokens_per_chunk=args.tokens_per_chunk, with_audio=False)
    elements = record_dataset(cfg).map(builder)
    skipped, examples = collections.Counter(), []
    first_bad = {}
    stream = element_stream(elements, cfg)
    try:
        for element in tqdm(stream, total=len(elements), desc=os.path.basename(path), unit="rec"):
            if is_skip(element):
                if args.strict and element["skip"] in BAD_DATA:
                    raise FirstBadRecord(f"{element['where']}: {element['skip']}: {element['message']}")
                skipped[element["skip"]] += 1
                first_bad.setdefault(element["skip"], f"{element['where']}: {element['message']}")
            else:
                examples.append((element["length"], int(element["chunks"].sum()), element["seconds"],
                                 element["truncated"]))
    finally:
        getattr(stream, "close", lambda: None)()
    lengths = [e[0] for e in examples]
    chunks = [e[1] for e in examples]
    plain = padding_share(lengths, chunks, dataclasses.replace(cfg, packing=False), args.batch_size)
    packed = padding_share(lengths, chunks, dataclasses.replace(cfg, packing=True), args.batch_size)
    step = max(1, args.seq_len // 8)
    return {
        "manifest": path, "records": len(elements), "usable": len(examples),
        "skipped": dict(sorted(skipped.items())), "first_of_each_skip": first_bad,
        "bad_data": sum(n for r, n in skipped.items() if r in BAD_DATA),
        "audio_hours": sum(e[2] for e in examples) / 3600.0,
        "text_truncated": sum(e[3] for e in examples),
        "chunk_histogram": dict(sorted(collections.Counter(chunks).items())),
        "token_histogram": _histogram(lengths, np.arange(0, args.seq_len + step, step)),
        "token_lengths_include_text": tokenizer is not None,
        "padding_share": {"rows": plain[0], "rows_packed": packed[0],
                          "chunk_slots": plain[1], "chunk_slots_packed": packed[1]},
    }


def format_stats(s: dict) -> str:
    lines = [f"{s['manifest']}: {s['usable']} of {s['records']} records usable, "
             f"{s['audio_hours']:.2f} h of audio, {s['text_truncated']} with text truncated"]
    for reason, n in s["skipped"].items():
        kind = "bad data" if reason in BAD_DATA else "over budget"
        lines.append(f"  skipped {reason} ({kind}): {n}   e.g. {s['first_of_each_skip'][reason]}")
    lines.append("  chunks per sample: " + ", ".join(f"{k}: {v}" for k, v in s["chunk_histogram"].items()))
    what = "tokens per sample" + ("" if s["token_lengths_include_text"] else " (audio only: no --tokenizer)")
    lines.append(f"  {what}: " + ", ".join(f"{k}: {v}" for k, v in s["token_histogram"].items() if v))
    p = s["padding_share"]
    lines.append(f"  padding share of rows: {p['rows']:.1%} unpacked, {p['rows_packed']:.1%} packed; "
                 f"of audio chunk slots: {p['chunk_slots']:.1%} unpacked, {p['chunk_slots_packed']:.1%} packed")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    tokens_per_chunk, template = model_settings(args.model)
    args.tokens_per_chunk = args.tokens_per_chunk or tokens_per_chunk
    args.template = args.template or template
    tokenizer = _load_tokenizer(args.tokenizer)
    try:
        stats = [check_manifest(path, args, tokenizer) for path in args.manifests]
    except FirstBadRecord as e:
        print(f"bad record (--strict): {e}", file=sys.stderr)
        return 1
    for s in stats:
        print(format_stats(s))
    bad = sum(s["bad_data"] for s in stats)
    print(f"total: {sum(s['usable'] for s in stats)} usable, {bad} bad records, "
          f"{sum(s['audio_hours'] for s in stats):.2f} h of audio")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(stats, f, indent=2)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    from jaxmusic.errors import run_command

    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
