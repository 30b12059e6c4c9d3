"""`jaxmusic demo [--workdir DIR] [--minutes M] [KEY=VALUE ...]`: the whole system, no downloads.

Trains a tiny MuFun through the staged recipe on synthetic music and shows that it learned:

1. corpus     `WORKDIR/corpus/`: labelled clips and manifests (`jaxmusic.demo.corpus`)
2. tokenizer  `WORKDIR/corpus/tokenizer/`: a small Qwen-style BPE trained on the corpus text
3. training   `WORKDIR/schedule.yaml` (jaxmusic/configs/schedules/demo.yaml with the corpus paths filled
              in and steps scaled to `--minutes`) run by the real trainer into `WORKDIR/train/`
4. eval       held-out split, per task next to chance, for each evaluated stage (`WORKDIR/eval/<stage>/`):
              before and after GRPO. The MuCUE-style four-option questions (`jaxmusic eval`, generated
              answers), and the same questions asked open, without options (`open.json`): an answer
              is right when it is the label itself, and one that never stops is counted as a runaway
5. report     `WORKDIR/report.md`, training curves `WORKDIR/loss_<stage>.png` (a GRPO stage's reward)
              and `loss.png`, and a few of the last evaluated stage's open answers

Every step resumes: rerunning the same command skips clips, stages and eval items already
done. The settings (jaxmusic/configs/demo.yaml plus overrides) are fixed per workdir; a rerun with
different ones is refused rather than mixing two runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import yaml

from jaxmusic.errors import UserError, run_command

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
SETTINGS_FILE = "demo.json"
SIZED_FOR_MINUTES = 10  # the schedule's step counts are for this budget


# ------------------------------------------------------------------------------ settings

def load_settings(path: Path, minutes: float | None, overrides: list[str]) -> tuple[dict, list[str]]:
    """Demo settings with overrides applied, and the overrides that belong to the trainer."""
    from jaxmusic.train import config as config_lib

    settings = config_lib.load_yaml(path)
    train_overrides = []
    for text in overrides:
        keys, value = config_lib.parse_override(text)
        if keys[0] in settings:
            config_lib.apply_override(settings, keys, value)
        else:
            train_overrides.append(text)
    if minutes is not None:
        settings["minutes"] = minutes
    if not settings.get("minutes") or float(settings["minutes"]) <= 0:
        raise UserError(f"--minutes must be > 0, got {settings.get('minutes')}")
    settings["schedule"] = str((path.parent / settings["schedule"]).resolve())
    settings["train_overrides"] = train_overrides
    return settings, train_overrides


def _pin_settings(workdir: Path, settings: dict) -> None:
    """Write the settings on the first run; refuse a rerun that would change them."""
    path = workdir / SETTINGS_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise UserError(f"{workdir} holds a demo run with other settings ({', '.join(changed)} differ); "
                            "rerun it unchanged to resume, or use another --workdir")
        return
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1) + "\n")


def write_schedule(settings: dict, corpus_dir: Path, tokenizer_dir: Path, out: Path) -> Path:
    """The demo schedule with absolute config, manifest, audio and tokenizer paths, steps scaled."""
    from jaxmusic.train import config as config_lib

    src = Path(settings["schedule"])
    raw = config_lib.load_yaml(src)
    scale = float(settings["minutes"]) / SIZED_FOR_MINUTES
    stages = []
    for entry in raw["stages"]:
        entry = copy.deepcopy(entry)
        entry["config"] = str((src.parent / entry["config"]).resolve())
        over = entry.setdefault("overrides", {})
        stage = config_lib.load_yaml(Path(entry["config"]))
        steps = over.get("steps", stage.get("steps"))
        over["steps"] = max(1, round(int(steps) * scale))
        data = over.setdefault("data", {})
        mixture = data.get("mixture", stage.get("data", {}).get("mixture", []))
        data["mixture"] = [{**m, "manifest": str(corpus_dir / m["manifest"])} for m in mixture]
        data["audio_root"] = str(corpus_dir)
        data["tokenizer"] = str(tokenizer_dir)
        stages.append(entry)
    header = (f"# Written by `jaxmusic demo` from {src} ({settings['minutes']} minutes).\n"
              f"# Rerun by hand: jaxmusic train {out} --workdir {out.parent / 'train'}\n")
    out.write_text(header + yaml.safe_dump({"stages": stages}, sort_keys=False))
    return out


# ------------------------------------------------------------------------------ loss curves

def read_losses(stage_dir: Path, key: str = "loss") -> list[tuple[int, float]]:
    """(step, loss) (or another metric) of a stage's metrics.jsonl; a resumed run re-logs steps,
    the last one counts."""
    path = stage_dir / "metrics.jsonl"
    losses = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
                losses[int(r["step"])] = float(r[key])
            except (ValueError, KeyError):
                continue  # a torn last line of a killed run
    return sorted(losses.items())


METRIC_LABELS = {"loss": "training loss", "reward": "mean reward of the rollouts"}


def plot_losses(curves: dict[str, tuple[str, list[tuple[int, float]]]], workdir: Path) -> list[Path]:
    """Each stage's curve `loss_<stage>.png` (`curves[stage] = (metric, points)`: its loss, or a GRPO
    stage's reward), and the losses of the supervised stages end to end in `loss.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, (metric, points) in curves.items():
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(*zip(*points), color="tab:blue")
        ax.set(xlabel="step", ylabel=METRIC_LABELS[metric], title=f"stage {name}")
        fig.tight_layout()
        paths.append(workdir / f"loss_{name}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    offset = 0
    for name, (metric, points) in curves.items():
        if metric != "loss":
            continue
        steps, losses = zip(*points)
        ax.plot([offset + s for s in steps], losses, label=name)
        offset += steps[-1]
        ax.axvline(offset, color="gray", lw=0.5, ls=":")
    ax.set(xlabel="step (all stages)", ylabel="training loss", title="jaxmusic demo: staged training")
    ax.legend()
    fig.tight_layout()
    paths.append(workdir / "loss.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# ------------------------------------------------------------------------------ open questions

def open_questions(loaded, corpus_dir: Path, out: Path, *, batch_size: int, max_new_tokens: int,
                   progress: bool = True) -> dict:
    """The held-out questions asked open (no options), greedy; `out/open.json` (reused when present).

    An answer is correct when it is the right option's text itself (surrounding white space
    aside): "very fast", not "very fast, about 170 BPM". A runaway answer did not stop within
    `max_new_tokens` tokens. Per task: items, accuracy, runaway share; and the same overall.
    """
    from tqdm import tqdm

    from jaxmusic import inference

    path = out / "open.json"
    if path.is_file():
        return json.loads(path.read_text())
    items = [json.loads(line) for line in (corpus_dir / "eval.jsonl").read_text().splitlines()]
    answers = []
    with tqdm(total=len(items), desc="open questions", unit="item", disable=not progress) as bar:
        for i in range(0, len(items), batch_size):
            part = items[i:i + batch_size]
            answers += inference.ask(loaded, [
                inference.Request(question=it["question"], audio=(str(corpus_dir / it["audio"]),),
                                  segments=(tuple(it["time"]),) if it.get("time") else ()) for it in part],
                max_new_tokens=max_new_tokens)
            bar.update(len(part))
    rows = [{"id": it["id"], "subset": it["subset"], "audio": it["audio"], "time": it.get("time"),
             "question": it["question"], "truth": it["choices"]["ABCD".index(it["answer"])],
             "output": str(a), "terminated": a.terminated} for it, a in zip(items, answers)]
    chance = json.loads((corpus_dir / "corpus.json").read_text())["open_chance"]

    def summary(rs):
        return {"items": len(rs), "accuracy": sum(r["output"].strip() == r["truth"] for r in rs) / len(rs),
                "runaway": sum(not r["terminated"] for r in rs) / len(rs)}

    result = {"max_new_tokens": max_new_tokens, "overall": summary(rows),
              "subsets": {t: summary([r for r in rows if r["subset"] == t]) | {"chance": chance[t]}
                          for t in sorted({r["subset"] for r in rows})}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def ask_examples(open_items: Path, n: int) -> list[dict]:
    """The open answers (`open_questions`' `open_items.jsonl`) to the first `n` held-out items of
    distinct tasks."""
    picked, tasks = [], set()
    for line in open_items.read_text().splitlines():
        row = json.loads(line)
        if row["subset"] not in tasks and len(picked) < n:
            tasks.add(row["subset"])
            picked.append(row)
    return [{"audio": r["audio"], "time": r["time"], "question": r["question"], "answer": r["output"].strip(),
             "truth": r["truth"]} for r in picked]


# ------------------------------------------------------------------------------ report

def _accuracy_table(summaries: dict[str, dict]) -> list[str]:
    names = list(summaries)
    tasks = list(next(iter(summaries.values()))["subsets"]) if summaries else []
    lines = ["| task | chance | " + " | ".join(f"after {n}" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for task in tasks + ["overall"]:
        ref = summaries[names[-1]]["subsets"].get(task) or summaries[names[-1]]["overall"]
        cells = []
        for n in names:
            s = summaries[n]["subsets"].get(task) if task != "overall" else summaries[n]["overall"]
            cells.append("-" if not s or s["accuracy"] is None else f"{100 * s['accuracy']:.1f}%")
        lines.append(f"| {task} | {100 * (ref['chance'] or 0):.0f}% | " + " | ".join(cells) + " |")
    return lines


def _open_table(opens: dict[str, dict]) -> list[str]:
    names = list(opens)
    tasks = list(next(iter(opens.values()))["subsets"]) if opens else []
    lines = ["| task | chance | " + " | ".join(f"after {n}" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for task in tasks:
        cells = [f"{100 * opens[n]['subsets'][task]['accuracy']:.1f}%" for n in names]
        chance = opens[names[-1]]["subsets"][task]["chance"]
        lines.append(f"| {task} | {100 * chance:.0f}% | " + " | ".join(cells) + " |")
    lines.append("| overall | | " + " | ".join(f"{100 * opens[n]['overall']['accuracy']:.1f}%" for n in names) + " |")
    lines.append("| runaway answers | | " + " | ".join(f"{100 * opens[n]['overall']['runaway']:.1f}%" for n in names)
                 + " |")
    return lines


def write_report(workdir: Path, settings: dict, timings: dict[str, float], curves: dict, summaries: dict,
                 opens: dict, answers: list[dict]) -> Path:
    from jaxmusic.demo import corpus

    items = next(iter(summaries.values()))["overall"]["items"] if summaries else 0
    lines = ["# jaxmusic demo", "",
             f"A tiny MuFun (`configs/stages/demo.yaml`) trained from scratch through the staged recipe "
             f"(`{Path(settings['schedule']).name}`, {settings['minutes']} minutes) on "
             f"{settings['corpus'].get('n_train', '?')} synthetic clips (GRPO on "
             f"{settings['corpus'].get('n_grpo', corpus.CorpusConfig.n_grpo)} more), "
             f"evaluated on {items} four-option questions "
             f"about {settings['corpus'].get('n_eval', '?')} held-out clips ({settings['eval']['mode']} scoring).", "",
             "## Held-out accuracy", "",
             "Four-option questions, the generated answer read by `jaxmusic eval`'s extractor "
             "(MuCUE's protocol):", ""] + _accuracy_table(summaries) + [
             "", "![accuracy](eval/%s/accuracy.png)" % list(summaries)[-1] if summaries else "",
             "", f"The same questions asked open, without options: right when the answer is the label itself; "
             f"a runaway answer does not stop within "
             f"{next(iter(opens.values()))['max_new_tokens'] if opens else '?'} tokens "
             f"(chance: a uniform guess among the task's labels):", ""] + _open_table(opens) + [
             "", "## Training", "",
             "| stage | steps | curve | first | last |", "|---|---|---|---|---|"]
    for name, (metric, points) in curves.items():
        lines.append(f"| {name} | {points[-1][0]} | {METRIC_LABELS[metric]} | {points[0][1]:.3f} | "
                     f"{points[-1][1]:.3f} |")
    lines += ["", "![loss](loss.png)", "", "## Answers on held-out clips (`jaxmusic ask`)", ""]
    for a in answers:
        crop = f" [{a['time'][0]:.1f}-{a['time'][1]:.1f} s]" if a.get("time") else ""
        lines.append(f"- `{a['audio']}`{crop}: *{a['question']}* -> \"{a['answer']}\" (truth: {a['truth']})")
    lines += ["", "## Time", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    path = workdir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------ the demo

def run(workdir: str | Path, *, minutes: float | None = None, config: str | Path = DEFAULT_CONFIG,
        overrides: list[str] = (), progress: bool = True) -> int:
    """Run (or resume) the demo in `workdir`; returns an exit code (the trainer's, if it fails)."""
    from jaxmusic import inference
    from jaxmusic.evaluation import evaluate
    from jaxmusic.demo import corpus
    from jaxmusic.train import config as config_lib
    from jaxmusic.train import trainer

    workdir = Path(workdir).absolute()
    settings, train_overrides = load_settings(Path(config), minutes, list(overrides))
    _pin_settings(workdir, settings)
    timings: dict[str, float] = {}
    say = lambda text: print(text, flush=True)  # noqa: E731

    t = time.perf_counter()
    say(f"[1/5] synthetic corpus -> {workdir / 'corpus'}")
    corpus_dir = corpus.build(workdir / "corpus", settings["corpus"], progress=progress)
    timings["corpus"] = time.perf_counter() - t

    t = time.perf_counter()
    say("[2/5] tokenizer")
    tok_dir = corpus_dir / "tokenizer"
    tok = corpus.build_tokenizer(corpus_dir, vocab_size=int(settings["tokenizer"]["vocab_size"]), out_dir=tok_dir)
    timings["tokenizer"] = time.perf_counter() - t

    t = time.perf_counter()
    schedule = write_schedule(settings, corpus_dir, tok_dir, workdir / "schedule.yaml")
    resolved = config_lib.load(schedule, train_overrides).stages
    stages = [s.name for s in resolved]
    vocab = resolved[0].model.llm["vocab_size"]
    if len(tok) > vocab:
        raise UserError(f"the tokenizer has {len(tok)} tokens but model.llm.vocab_size is {vocab}")
    say(f"[3/5] training stages {' -> '.join(stages)} (resumable) -> {workdir / 'train'}")
    quiet = [] if progress else ["log.progress=false"]
    code = trainer.run(schedule, workdir / "train", train_overrides + quiet)
    if code != trainer.EXIT_OK:
        return code
    timings["training"] = time.perf_counter() - t

    t = time.perf_counter()
    ev = settings["eval"]
    summaries, opens = {}, {}
    for name in ev.get("stages") or stages[-1:]:
        if name not in stages:
            raise UserError(f"eval.stages: no stage {name!r} in the schedule ({stages})")
        say(f"[4/5] evaluating stage {name} on the held-out split")
        model_dir = workdir / "train" / name / "model"
        loaded = inference.load(model_dir)
        summaries[name] = evaluate.run(str(model_dir), str(corpus_dir / "eval.jsonl"), audio_root=str(corpus_dir),
                                       mode=ev["mode"], batch_size=int(ev["batch_size"]),
                                       out=str(workdir / "eval" / name), loaded=loaded, progress=progress)
        opens[name] = open_questions(loaded, corpus_dir, workdir / "eval" / name, batch_size=int(ev["batch_size"]),
                                     max_new_tokens=int(ev["open_max_new_tokens"]), progress=progress)
    timings["evaluation"] = time.perf_counter() - t

    say("[5/5] report")
    answers = ask_examples(workdir / "eval" / list(opens)[-1] / "open_items.jsonl", int(settings["ask"]["clips"]))
    metrics = {s.name: "reward" if s.loss == "grpo" else "loss" for s in resolved}
    curves = {name: (metrics[name], read_losses(workdir / "train" / name, metrics[name])) for name in stages}
    curves = {k: v for k, v in curves.items() if v[1]}
    plot_losses(curves, workdir)
    report = write_report(workdir, settings, timings, curves, summaries, opens, answers)

    say("")
    say("four-option questions, generated answers:\n" + "\n".join(_accuracy_table(summaries)))
    say("\nopen questions (the answer is the label):\n" + "\n".join(_open_table(opens)))
    say("")
    for a in answers:
        say(f"ask {a['audio']}: {a['question']}\n  -> {a['answer']!r}   (truth: {a['truth']})")
    say(f"\nreport: {report}   loss curves: {workdir / 'loss.png'}   model: {workdir / 'train' / stages[-1] / 'model'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxmusic demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo", help="where everything goes; rerunning resumes")
    parser.add_argument("--minutes", type=float, help=f"training budget (default {SIZED_FOR_MINUTES}); "
                                                      "scales every stage's steps")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="demo settings (jaxmusic/configs/demo.yaml)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="demo settings (corpus.n_train=200) or trainer overrides (stages.full.steps=50)")
    args = parser.parse_intermixed_args(argv)
    return run_command(lambda: run(args.workdir, minutes=args.minutes, config=args.config, overrides=args.overrides,
                                   progress=not args.no_progress), tracebacks=True)


if __name__ == "__main__":
    sys.exit(main())
