"""The `jaxmusic` command line."""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import sys

from jaxmusic.errors import EXIT_USER_ERROR, UserError, run_command


def _smoke(args) -> None:
    from jaxmusic.demo import smoke

    smoke.run(seconds=args.seconds)


def _options(args):
    from jaxmusic.nn import ModelOptions

    return ModelOptions.from_names(param_dtype=args.dtype, dtype=args.dtype)


def _request(args):
    from jaxmusic.inference import Request

    return Request(question=args.question, audio=tuple(args.audio), segments=tuple(map(tuple, args.segment)))


def _read_requests(path: str):
    from jaxmusic.inference import Request

    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            audio = d.get("audio", [])
            audio = [audio] if isinstance(audio, str) else list(audio)
            time = d.get("time")
            segments = [time] if time and not isinstance(time[0], (list, tuple, type(None))) else (time or [])
            out.append((d.get("id", n), Request(question=d["question"], audio=tuple(audio),
                                                segments=tuple(tuple(s) if s else None for s in segments))))
        except (json.JSONDecodeError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise UserError(f"{path}:{n}: not a request ({type(e).__name__}: {e}); expected "
                            '{"id": ..., "audio": ..., "question": ..., "time": [start, end]}') from None
        except UserError as e:
            raise UserError(f"{path}:{n}: {e}") from None
    return out


def _ask(args) -> None:
    from jaxmusic import inference

    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    seed=args.seed)
    if args.batch:
        if not args.out:
            raise UserError("--batch needs --out FILE for the answers")
        requests = _read_requests(args.batch)
        loaded = inference.load(args.checkpoint, _options(args), args.mufun_config)
        from tqdm import tqdm

        with open(args.out, "w", encoding="utf-8") as f, tqdm(total=len(requests), desc="answering") as bar:
            for i in range(0, len(requests), args.batch_size):
                part = requests[i:i + args.batch_size]
                answers = inference.ask(loaded, [r for _, r in part], **sampling)
                for (rid, _), answer in zip(part, answers):
                    f.write(json.dumps({"id": rid, "answer": answer}, ensure_ascii=False) + "\n")
                f.flush()
                bar.update(len(part))
        return
    if args.question is None:
        raise UserError("give a question (or --batch FILE)")
    request = _request(args)
    loaded = inference.load(args.checkpoint, _options(args), args.mufun_config)
    inference.ask(loaded, [request], **sampling, on_text=lambda _row, text: print(text, end="", flush=True))
    print()


def _score(args) -> None:
    from jaxmusic import inference

    request = _request(args)
    loaded = inference.load(args.checkpoint, _options(args), args.mufun_config)
    scores = inference.score(loaded, request, args.option)
    best = max(range(len(scores)), key=lambda i: scores[i].total)
    if args.json:
        print(json.dumps({"best": scores[best].option, "options": [
            {"option": s.option, "total": s.total, "mean": s.mean, "per_token": list(s.per_token),
             "tokens": list(s.tokens)} for s in scores]}, ensure_ascii=False, indent=1))
        return
    width = max(len(s.option) for s in scores)
    print(f"{'option':<{width}}  {'log p':>10}  {'per token':>10}  tokens")
    for i, s in enumerate(scores):
        mark = "  <- best" if i == best else ""
        print(f"{s.option:<{width}}  {s.total:10.4f}  {s.mean:10.4f}  {len(s.per_token)}{mark}")


def _add_model_args(p):
    p.add_argument("checkpoint", help="jaxmusic checkpoint folder, or a released MuFun (HF) folder")
    p.add_argument("--audio", action="append", default=[], metavar="FILE",
                   help="audio file (repeat for several; placed at the question's <audio> tags, in order)")
    p.add_argument("--segment", action="append", nargs=2, type=float, default=[], metavar=("START", "END"),
                   help="crop in seconds for the audio file of the same position (repeatable)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="parameter and compute dtype (bfloat16 halves memory on GPUs)")
    p.add_argument("--mufun-config", metavar="YAML",
                   help="glue settings used when importing a released folder (default jaxmusic/configs/mufun.yaml)")


INTERMIXED = ("ask", "score")  # commands whose positional question may come after options
# Commands whose module parses its own arguments: `jaxmusic CMD ...` runs `module.main(argv)`.
DELEGATED = {
    "demo": ("jaxmusic.demo", "train a tiny MuFun on synthetic music and show it learned (~10 min, CPU)"),
    "train": ("jaxmusic.train", "train a stage or schedule (`train CONFIG --workdir DIR`); resumes from DIR"),
    "eval": ("jaxmusic.evaluation.evaluate", "multiple-choice evaluation: MuCUE as published (Hub snapshot) or JSONL"),
    "data": ("jaxmusic.data.check", "`data check MANIFEST ... --audio-root DIR`: validate a dataset"),
    "plan": ("jaxmusic.plan", "compile a stage or schedule for A100/H100 clusters without a GPU: will it fit?"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxmusic", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("smoke", help="run both backbones on tiny random weights and time them")
    p.add_argument("--seconds", type=float, default=5.0, help="audio length of the smoke input")
    p.set_defaults(func=_smoke)

    p = sub.add_parser("ask", help="ask a question about one or more audio files (streams the answer)")
    _add_model_args(p)
    p.add_argument("question", nargs="?", help="the question; <audio> tags place the files")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", metavar="JSONL", help='requests, one {"id","audio","question","time"} per line')
    p.add_argument("--out", metavar="JSONL", help="answers of --batch, one {\"id\",\"answer\"} per line")
    p.add_argument("--batch-size", type=int, default=4)
    p.set_defaults(func=_ask)

    p = sub.add_parser("score", help="log-likelihood of candidate answers (multiple-choice scoring)")
    _add_model_args(p)
    p.add_argument("question")
    p.add_argument("--option", action="append", default=[], required=True, help="a candidate answer (repeat)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_score)
    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def cpu_without_nvidia_driver() -> None:
    """With JAX's CUDA plugin installed (the plan extra) on a machine without an NVIDIA driver,
    JAX would try CUDA first and log a traceback before falling back to the CPU: go to the CPU
    directly. `JAX_PLATFORMS` set by the user always wins."""
    try:
        if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
            return
        ctypes.CDLL("libcuda.so.1")
    except ModuleNotFoundError:  # no jax_plugins at all
        return
    except OSError:
        os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    from absl import flags

    cpu_without_nvidia_driver()

    if not flags.FLAGS.is_parsed():  # grain's data worker processes read absl flags
        flags.FLAGS.mark_as_parsed()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        rest = argv[1:]
        if argv[0] == "data":  # the only data subcommand so far
            if not rest or rest[0] != "check":
                print("usage: jaxmusic data check MANIFEST [...] --audio-root DIR [options]", file=sys.stderr)
                return EXIT_USER_ERROR
            rest = rest[1:]
        return importlib.import_module(DELEGATED[argv[0]][0]).main(rest)
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if argv and argv[0] in commands and argv[0] in INTERMIXED:
        # the question may follow the options: `ask CKPT --audio a.wav "question"`
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
    else:
        args = parser.parse_args(argv)
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
