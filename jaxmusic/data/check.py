"""`jaxmusic data check`: validate manifests before an expensive run.

Runs every record through the training pipeline's own per-sample code (parse, template,
tokenize, decode, crop, resample, truncation check, budget fit; no log-mel) on all cores and
prints, per manifest: usable and skipped samples by reason, hours of audio, histograms of
chunk counts and token lengths, and the share of each batch row that would be padding
without and with packing. Exit status: 0 if no record is bad data, 1 otherwise (samples
that only exceed the budget do not count as bad).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import numpy as np

from jaxmusic.data.examples import ExampleSpec, is_skip
from jaxmusic.data.manifest import BAD_DATA
from jaxmusic.data.packing import BatchShape, Rows, fill_rows
from jaxmusic.data.pipeline import DataConfig, element_dataset, element_stream


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="jaxmusic data check", description=__doc__)
    parser.add_argument("manifests", nargs="+", metavar="MANIFEST", help="JSON list or JSONL files")
    parser.add_argument("--audio-root", required=True, help="folder the manifests' audio paths are relative to")
    parser.add_argument("--template", default="qwen2_instruct", choices=("pretrain", "qwen2_instruct"))
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per row (default 4096)")
    parser.add_argument("--max-chunks", type=int, default=None,
                        help="30 s audio chunks per row (default: seq_len // 300)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch, for the packing estimate")
    parser.add_argument("--tokenizer", default=None,
                        help="local Hugging Face tokenizer folder; without it token lengths count audio only")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    parser.add_argument("--report", default=None, help="also write the statistics to this JSON file")
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


def padding_share(lengths, chunks, shape: BatchShape, packing: bool, lookahead: int = 8, seed: int = 0):
    """(token, chunk-slot) padding shares of the batches the pipeline would build, in a
    shuffled order as in training."""
    if not lengths:
        return 0.0, 0.0
    order = np.random.default_rng(seed).permutation(len(lengths))
    todo = iter([{"length": int(lengths[i]), "chunks": np.array([chunks[i]])} for i in order])
    waiting, n_batches = [], 0
    while True:
        rows = Rows(shape, max_per_row=None if packing else 1)
        waiting = fill_rows(rows, waiting, lambda: next(todo, None), lookahead)
        if rows.empty():
            break
        n_batches += 1
    slots = n_batches * shape.batch_size
    return (1.0 - sum(lengths) / (slots * shape.seq_len),
            1.0 - sum(chunks) / (slots * shape.max_chunks))


def check_manifest(path: str, args, tokenizer) -> dict:
    from tqdm import tqdm

    max_chunks = args.max_chunks or max(1, args.seq_len // 300)
    cfg = DataConfig(manifests=(path,), audio_root=args.audio_root, template=args.template,
                     batch_size=args.batch_size, seq_len=args.seq_len, max_chunks=max_chunks,
                     shuffle=False, num_workers=args.workers if args.workers > 1 else 0)
    spec = ExampleSpec(audio_root=args.audio_root, template=args.template, seq_len=args.seq_len,
                       max_chunks=max_chunks, features=None)
    elements = element_dataset(cfg, tokenizer, spec=spec)
    skipped, examples = collections.Counter(), []
    first_bad = {}
    stream = element_stream(elements, cfg)
    try:
        for element in tqdm(stream, total=len(elements), desc=os.path.basename(path), unit="rec"):
            if is_skip(element):
                skipped[element["skip"]] += 1
                first_bad.setdefault(element["skip"], f"{element['where']}: {element['message']}")
            else:
                examples.append((element["length"], int(element["chunks"].sum()), element["seconds"],
                                 element["truncated"]))
    finally:
        getattr(stream, "close", lambda: None)()
    lengths = [e[0] for e in examples]
    chunks = [e[1] for e in examples]
    shape = BatchShape(args.batch_size, args.seq_len, max_chunks)
    plain = padding_share(lengths, chunks, shape, packing=False)
    packed = padding_share(lengths, chunks, shape, packing=True)
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
    tokenizer = _load_tokenizer(args.tokenizer)
    stats = [check_manifest(path, args, tokenizer) for path in args.manifests]
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
