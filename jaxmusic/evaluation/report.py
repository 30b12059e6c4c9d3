"""Results in the paper's shape: per-subset table, macro and micro averages, the published rows.

Accuracy per subset is correct / scored (skipped items, whose audio could not be used, are left
out; unparsed answers count as wrong). MuCUE's headline figure, AVG, is the unweighted mean over
subsets (`macro`); `accuracy` overall is the mean over items (micro).

`PUBLISHED`: the MuCUE-Bench leaderboard (github.com/Rickey-CS/MuCUE-Bench, README; the table of
arXiv 2508.01178), accuracy in % on 26 of MuCUE's 27 subsets (gs_key, whose 604 two-minute clips
gs_key_30s covers in 30 s cuts, is not in it). MuFun there is MuFun-Base, greedy, 64 new tokens,
letters extracted by a Qwen3-8B judge. Subsets match by name, ignoring case and `-` vs `_` (the
Hub's split names cannot hold `-`). Beside a run, the published rows are shown for the subsets
it shares with the leaderboard, with their AVG over exactly those subsets: comparable to the
run's own macro average over them, and equal to the paper's AVG when all 26 are there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

PUBLISHED_SOURCE = ("MuCUE-Bench leaderboard / arXiv 2508.01178 (MuFun = MuFun-Base, greedy, 64 tokens, "
                    "Qwen3-8B judge)")
PUBLISHED_AVG = {"MuFun": 65.7, "Qwen2.5-Omni": 50.8, "Kimi-Audio": 49.9, "Gemini-2.0-Flash": 49.8,
                 "Qwen2-Audio": 43.6}
_SUBSETS = ("ly_m163", "ins_cls", "gs_key_30s", "mmau_music", "salami_segd", "salami_overall", "fma_medium",
            "mtg_mood", "nsyn_pitch", "guitarset", "mucho", "salami_pred", "fma_small", "salami_cnt",
            "gtzan_tempo", "nsyn_ins", "mcaps", "mqa_m163", "gtzan_key", "ballroom_genres", "gtzan",
            "ballroom_tempo", "tat", "mtg_genre", "md4q", "mtg_ins")
_FIGURES = {  # in the order of _SUBSETS
    "MuFun": (90.8, 91.2, 50.4, 66.5, 64.8, 48.7, 85.2, 52.8, 77.2, 58.8, 63.9, 64.8, 72.4, 43.2, 40.7, 74.0,
              80.0, 88.4, 34.1, 52.4, 81.3, 29.4, 80.6, 81.4, 65.9, 68.6),
    "Qwen2.5-Omni": (87.4, 66.8, 23.8, 63.8, 18.6, 55.8, 78.0, 43.4, 36.8, 13.2, 66.5, 32.2, 66.2, 36.8, 32.4,
                     40.6, 65.6, 76.0, 28.7, 45.8, 88.6, 28.9, 59.4, 61.6, 47.6, 55.8),
    "Kimi-Audio": (87.0, 79.4, 26.0, 66.2, 27.2, 45.3, 59.8, 39.4, 31.8, 27.2, 69.7, 34.6, 55.8, 37.8, 22.9,
                   44.4, 68.0, 79.0, 28.3, 44.0, 77.8, 24.4, 54.0, 55.8, 61.3, 51.2),
    "Gemini-2.0-Flash": (88.2, 26.0, 33.6, 67.1, 40.6, 62.1, 62.8, 38.2, 30.8, 25.2, 69.6, 37.6, 63.4, 49.8,
                         41.3, 32.4, 62.2, 58.0, 33.7, 57.0, 72.2, 31.7, 61.2, 57.2, 71.9, 19.8),
    "Qwen2-Audio": (60.0, 39.8, 18.2, 57.8, 19.4, 42.6, 77.0, 29.2, 31.2, 19.2, 66.7, 31.2, 65.6, 30.2, 27.1,
                    22.4, 74.0, 60.8, 22.0, 35.2, 83.9, 31.1, 61.4, 46.4, 57.8, 24.0),
}
PUBLISHED = {model: dict(zip(_SUBSETS, figures)) for model, figures in _FIGURES.items()}


def subset_key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def published_beside(subsets: Sequence[str]) -> dict:
    """The published rows for the run's subsets that have them (empty when none do)."""
    matched = [s for s in subsets if subset_key(s) in _SUBSETS]
    if not matched:
        return {}
    models = {model: {s: figures[subset_key(s)] for s in matched} for model, figures in PUBLISHED.items()}
    return {"source": PUBLISHED_SOURCE, "subsets": matched,
            "models": {m: {"subsets": v, "avg": round(float(np.mean(list(v.values()))), 2),
                           "paper_avg_26": PUBLISHED_AVG[m]} for m, v in models.items()}}


def _status_counts() -> dict:
    return {"items": 0, "scored": 0, "correct": 0, "wrong": 0, "unparsed": 0, "skipped": 0}


def summarise(items, records: dict[str, dict]) -> dict:
    """Per-subset and overall counts and accuracies, the published rows beside them, and how
    often each letter extractor could read an answer."""
    subsets: dict[str, dict] = {}
    chance: dict[str, float] = {}
    for it in items:
        rec = records[it.key]
        s = subsets.setdefault(it.subset, _status_counts())
        s["items"] += 1
        s[rec["status"]] += 1
        if rec["status"] != "skipped":
            s["scored"] += 1
            chance[it.subset] = chance.get(it.subset, 0.0) + 1.0 / len(it.choices)
    for name, s in subsets.items():
        s["accuracy"] = s["correct"] / s["scored"] if s["scored"] else None
        s["chance"] = chance[name] / s["scored"] if s["scored"] else None
    overall = {k: sum(s[k] for s in subsets.values()) for k in _status_counts()}
    scored = overall["scored"]
    accs = {n: s["accuracy"] for n, s in subsets.items() if s["accuracy"] is not None}
    overall["accuracy"] = overall["correct"] / scored if scored else None
    overall["chance"] = sum(chance.values()) / scored if scored else None
    overall["macro"] = sum(accs.values()) / len(accs) if accs else None
    published = published_beside(sorted(accs))
    if published:
        published["yours_avg"] = round(100 * float(np.mean([accs[s] for s in published["subsets"]])), 2)
    skipped = [{"id": it.id, "error": records[it.key].get("error")} for it in items
               if records[it.key]["status"] == "skipped"]
    return {"subsets": dict(sorted(subsets.items())), "overall": overall, "published": published,
            "extraction": extraction_rates(items, records), "skipped_items": skipped}


def extraction_rates(items, records: dict[str, dict]) -> dict:
    """Per extractor (`rule`: `extract_choice`; `judge`), how many generated answers it read."""
    answered = [records[it.key] for it in items if "output" in records[it.key]]
    rates = {}
    for name in ("rule", "judge"):
        picks = [r[f"pred_{name}"] for r in answered if f"pred_{name}" in r]
        if picks:
            parsed = sum(p is not None for p in picks)
            rates[name] = {"answers": len(picks), "parsed": parsed, "rate": parsed / len(picks)}
    return rates


def _pct(x) -> str:
    return "    -" if x is None else f"{100 * x:5.1f}"


def format_table(summary: dict) -> str:
    """The per-subset table (accuracy %), published rows beside it, the averages and parse rates."""
    pub = summary.get("published") or {}
    models = list(pub.get("models", {}))
    rows = list(summary["subsets"].items())
    width = max([len(n) for n, _ in rows] + [len("overall (micro)")])
    head = (f"{'subset':<{width}}  {'items':>5}  {'scored':>6}  {'correct':>7}  {'unparsed':>8}  {'skipped':>7}"
            f"  {'acc %':>5}  {'chance':>6}")
    lines = [head + "".join(f"  {m:>{max(len(m), 5)}}" for m in models)]
    for name, s in rows:
        line = (f"{name:<{width}}  {s['items']:5d}  {s['scored']:6d}  {s['correct']:7d}  {s['unparsed']:8d}  "
                f"{s['skipped']:7d}  {_pct(s['accuracy'])}  {_pct(s['chance']):>6}")
        figures = pub.get("models", {})
        line += "".join(f"  {figures[m]['subsets'][name]:>{max(len(m), 5)}.1f}" if name in figures[m]["subsets"]
                        else f"  {'-':>{max(len(m), 5)}}" for m in models)
        lines.append(line)
    o = summary["overall"]
    lines.append(f"{'overall (micro)':<{width}}  {o['items']:5d}  {o['scored']:6d}  {o['correct']:7d}  "
                 f"{o['unparsed']:8d}  {o['skipped']:7d}  {_pct(o['accuracy'])}  {_pct(o['chance']):>6}")
    if o["macro"] is not None:
        lines.append(f"macro average (AVG) over {sum(s['accuracy'] is not None for _, s in rows)} subsets: "
                     f"{100 * o['macro']:.1f}%")
    if pub:
        avgs = ", ".join(f"{m} {v['avg']:.1f}" for m, v in pub["models"].items())
        lines.append(f"AVG over the {len(pub['subsets'])} subsets with published figures: yours "
                     f"{pub['yours_avg']:.1f}; {avgs}")
        lines.append("  published (" + pub["source"] + "), AVG over its 26 subsets: "
                     + ", ".join(f"{m} {v:.1f}" for m, v in PUBLISHED_AVG.items()))
    for name, r in summary.get("extraction", {}).items():
        lines.append(f"letters read by the {name} extractor: {r['parsed']} of {r['answers']} answers "
                     f"({100 * r['rate']:.1f}%)")
    return "\n".join(lines)


def plot(summary: dict, path: Path, title: str) -> None:
    """Bars per subset: the run's accuracy, the published models' beside it, chance marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pub = summary.get("published") or {}
    rows = [(n, s) for n, s in summary["subsets"].items() if s["accuracy"] is not None]
    names = [n for n, _ in rows] + ["AVG", "micro"]
    series = {"this run": [100 * s["accuracy"] for _, s in rows]
              + [100 * (summary["overall"]["macro"] or 0.0), 100 * (summary["overall"]["accuracy"] or 0.0)]}
    for model, v in pub.get("models", {}).items():
        series[model] = [v["subsets"].get(n, np.nan) for n, _ in rows] + [np.nan, np.nan]
    if pub:  # the AVG column compares like with like: every series over the shared subsets
        series["this run"][-2] = pub["yours_avg"]
        names[-2] = f"AVG ({len(pub['subsets'])})"
        for model, v in pub["models"].items():
            series[model][-2] = v["avg"]
    chance = [100 * (s["chance"] or 0.0) for _, s in rows] + [np.nan, 100 * (summary["overall"]["chance"] or 0.0)]
    x = np.arange(len(names))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5.0, (0.35 + 0.18 * len(series)) * len(names) + 2), 4.2))
    for k, (label, values) in enumerate(series.items()):
        bars = ax.bar(x - 0.4 + width * (k + 0.5), values, width, label=label)
        if k == 0:
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.hlines(chance, x - 0.4, x + 0.4, colors="tab:red", linestyles="--", label="chance")
    ax.set_xticks(x, names, rotation=40, ha="right")
    ax.set_ylim(0, 115)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=7, ncols=min(len(series) + 1, 4))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------ several models

def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of `b - a` over paired items and its standard error (0 with fewer than 2 items)."""
    d = np.asarray(b, float) - np.asarray(a, float)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    return float(d.mean()), se


def compare(items, runs: Sequence[tuple[str, dict]]) -> dict:
    """Per-subset accuracy of each model, and each model's difference from the first with its
    standard error, paired over the items both scored (same items, so the per-item differences
    carry the uncertainty, not the two accuracies apart). `runs`: `(label, records by item key)`.

    AVG difference: mean of the per-subset differences, its standard error the per-subset ones
    combined as independent (`sqrt(sum se^2) / n_subsets`); micro: paired over all items.
    """
    correct = {label: {k: r["status"] == "correct" for k, r in recs.items() if r["status"] != "skipped"}
               for label, recs in runs}
    labels = [label for label, _ in runs]
    base = labels[0]
    subsets: dict[str, list] = {}
    for it in items:
        subsets.setdefault(it.subset, []).append(it.key)
    out = {"models": labels, "baseline": base, "subsets": {}, "overall": {}}

    def cell(keys):
        row = {"accuracy": {}, "diff": {}, "se": {}, "paired_items": {}}
        for label in labels:
            scored = [correct[label][k] for k in keys if k in correct[label]]
            row["accuracy"][label] = float(np.mean(scored)) if scored else None
            if label != base:
                both = [k for k in keys if k in correct[label] and k in correct[base]]
                if both:
                    row["diff"][label], row["se"][label] = _paired([correct[base][k] for k in both],
                                                                   [correct[label][k] for k in both])
                row["paired_items"][label] = len(both)
        return row

    for name in sorted(subsets):
        out["subsets"][name] = cell(subsets[name])
    out["overall"]["micro"] = cell([it.key for it in items])
    macro = {"accuracy": {}, "diff": {}, "se": {}}
    for label in labels:
        accs = [s["accuracy"][label] for s in out["subsets"].values() if s["accuracy"][label] is not None]
        macro["accuracy"][label] = float(np.mean(accs)) if accs else None
        if label != base:
            rows = [s for s in out["subsets"].values() if label in s["diff"]]
            if rows:
                macro["diff"][label] = float(np.mean([s["diff"][label] for s in rows]))
                macro["se"][label] = float(np.sqrt(sum(s["se"][label] ** 2 for s in rows)) / len(rows))
    out["overall"]["macro"] = macro
    return out


def format_comparison(cmp: dict) -> str:
    """One table: a column of accuracy (%) per model, then each model's difference from the
    first in points, +- its standard error."""
    labels, base = cmp["models"], cmp["baseline"]
    others = [m for m in labels if m != base]
    rows = list(cmp["subsets"].items()) + [("AVG (macro)", cmp["overall"]["macro"]),
                                           ("overall (micro)", cmp["overall"]["micro"])]
    width = max(len(n) for n, _ in rows)
    cols = [max(len(m), 6) for m in labels]
    diff_heads = [f"{m} - {base}" for m in others]
    dcols = [max(len(h), 13) for h in diff_heads]
    lines = [f"models: " + "; ".join(f"[{i}] {m}" for i, m in enumerate(labels)),
             f"{'subset':<{width}}" + "".join(f"  {m:>{w}}" for m, w in zip(labels, cols))
             + "".join(f"  {h:>{w}}" for h, w in zip(diff_heads, dcols))]
    for name, row in rows:
        line = f"{name:<{width}}" + "".join(f"  {_pct(row['accuracy'][m]):>{w}}" for m, w in zip(labels, cols))
        for m, w in zip(others, dcols):
            text = (f"{100 * row['diff'][m]:+.1f} +- {100 * row['se'][m]:.1f}" if m in row["diff"] else "-")
            line += f"  {text:>{w}}"
        lines.append(line)
    lines.append("differences in accuracy points, +- one standard error, paired over the items both models scored")
    return "\n".join(lines)


def plot_comparison(cmp: dict, path: Path, title: str) -> None:
    """Bars per subset, one column per model; the differences' standard errors as error bars
    on the compared models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, base = cmp["models"], cmp["baseline"]
    rows = list(cmp["subsets"].items()) + [("AVG", cmp["overall"]["macro"]), ("micro", cmp["overall"]["micro"])]
    names = [n for n, _ in rows]
    x = np.arange(len(names))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(5.0, (0.35 + 0.18 * len(labels)) * len(names) + 2), 4.2))
    for k, label in enumerate(labels):
        values = [np.nan if r["accuracy"][label] is None else 100 * r["accuracy"][label] for _, r in rows]
        err = None if label == base else [100 * r["se"].get(label, np.nan) for _, r in rows]
        ax.bar(x - 0.4 + width * (k + 0.5), values, width, yerr=err, capsize=2, label=label)
    ax.set_xticks(x, names, rotation=40, ha="right")
    ax.set_ylim(0, 115)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=7, ncols=min(len(labels), 4))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
