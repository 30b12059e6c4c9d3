"""Greedy decode speed of jaxmusic vs transformers on a Qwen3-0.6B- or Qwen2-0.5B-shaped model, on CPU.

    python bench/generate.py [--model qwen3-shaped|qwen2-audio-shaped] [--runs 5] [--prompt 128]
                             [--new-tokens 64] [--layers N] [--torch-threads N]

Builds transformers' `Qwen3ForCausalLM` with random weights (`qwen3-shaped`, the default:
Qwen3-0.6B's shapes, hidden 1024, 28 layers, 16/8 heads of 128, MLP 3072, vocab 151936, tied
embeddings) or `Qwen2ForCausalLM` (`qwen2-audio-shaped`: the decoder family of Qwen2-Audio at
Qwen2-0.5B's shapes, hidden 896, 24 layers, 14/2 heads of 64, MLP 4864, vocab 151936, tied
embeddings, q/k/v biases); float32. It copies the same weights into jaxmusic with `load_hf_weights`, and times, batch 1, a
128-token prompt and 64 greedy new tokens: `jaxmusic.generate.generate` against
`Qwen3ForCausalLM.generate`, interleaved (the order alternates per run) so that load
from other processes hits both alike; medians over `--runs`. Each implementation's
first call (jaxmusic: tracing + XLA compilation) is timed separately and excluded.

Per run we time the whole call (end to end: 64 tokens / wall time, prefill included)
and, with a per-token callback (jaxmusic's `on_token`, a transformers streamer), the
prefill (time to the first token) and the decode rate (the other 63 tokens); "CPU s" is
the process CPU time of the call (all threads; spinning OpenMP threads count too).

Memory-bandwidth bound: a decode step has to read every weight once (all layers, the
final norm and the tied embedding as the LM head), so tokens/s <= copy bandwidth /
weight bytes. Copy bandwidth is measured with a large NumPy copy (bytes read + written
per second), between runs, and the best is kept: a bound for a quiet machine, so under
load the fraction reached is an underestimate. Torch runs with as many threads as XLA:CPU
uses (one per core) unless `--torch-threads` says otherwise. Both must produce the same
greedy tokens; the script says whether they do. It prints the CPU model first: the bound,
and the ratio between the two implementations, depend on it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                 tie_word_embeddings=True, max_position_embeddings=40960)
QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6,
                 tie_word_embeddings=True, max_position_embeddings=32768)
MODELS = {"qwen3-shaped": ("Qwen3", QWEN3_06B), "qwen2-audio-shaped": ("Qwen2", QWEN2_05B)}


def cpu_model() -> str:
    """The CPU's model name as `lscpu` shows it (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 7) -> float:
    """Bytes read + written per second by a large NumPy copy (best of `repeats`)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / min(times)


class TokenClock:
    """Arrival time of each new token: a transformers streamer and a jaxmusic `on_token`."""

    def __init__(self):
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value):  # transformers streamer: first the prompt, then one token per step
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass

    def __call__(self, step, ids):  # jaxmusic on_token
        self.times.append(time.perf_counter())


def timed(call) -> dict:
    clock = TokenClock()
    cpu = time.process_time()
    start = time.perf_counter()
    tokens = call(clock)
    wall = time.perf_counter() - start
    t = clock.times
    return dict(tokens=tokens, wall=wall, cpu=time.process_time() - cpu, prefill=t[0] - start,
                decode_tps=(len(t) - 1) / (t[-1] - t[0]), e2e_tps=len(t) / wall)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--model", choices=tuple(MODELS), default="qwen3-shaped", help="which decoder family and shape")
    p.add_argument("--layers", type=int, default=None, help="shrink for a quick try (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, default=None,
                   help="default: as many as XLA:CPU uses; 1 shows torch without OpenMP contention")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    import transformers
    from flax import nnx

    from jaxmusic.generate import generate
    from jaxmusic.models.hf_mapping import load_hf_weights
    from jaxmusic.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, hf_tensors
    from jaxmusic.nn import ModelOptions

    xla_threads = len(os.sched_getaffinity(0))  # XLA:CPU's intra-op pool: one thread per core
    torch.set_num_threads(args.torch_threads or xla_threads)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores")
    print(f"jax {jax.__version__} ({jax.default_backend()}, {xla_threads} threads), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")

    family, shape = MODELS[args.model]
    shape = {**shape, "num_hidden_layers": args.layers or shape["num_hidden_layers"]}
    hf_cfg = getattr(transformers, f"{family}Config")(**shape, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    print(f"model: {args.model} ({family}ForCausalLM, random weights, {shape['num_hidden_layers']} layers)")
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    hf = getattr(transformers, f"{family}ForCausalLM")(hf_cfg).eval()
    cfg = Qwen3Config.from_hf(hf_cfg.to_dict())
    ours = nnx.eval_shape(lambda: Qwen3ForCausalLM(cfg, ModelOptions(), nnx.Rngs(0)))  # no init: loaded below
    weights = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    load_hf_weights(ours, hf_tensors(cfg), weights.__getitem__, cfg.n_layers)
    del weights
    graph_state = nnx.split(ours)
    jax.block_until_ready(graph_state[1])
    print(f"built both models in {time.perf_counter() - start:.1f} s")

    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(graph_state[1]))  # tied: the table is the LM head
    ids = np.random.default_rng(args.seed).integers(0, cfg.vocab_size, (1, args.prompt))
    ids_torch = torch.tensor(ids)

    def run_jax(clock):
        embeds = ours.embed(jnp.asarray(ids))
        return generate(graph_state, embeds, [args.prompt], max_new_tokens=args.new_tokens, on_token=clock)[0]

    def run_torch(clock):
        with torch.inference_mode():
            out = hf.generate(ids_torch, do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              eos_token_id=None, pad_token_id=0, streamer=clock)
        return out[0, args.prompt:].tolist()

    impls = {"jaxmusic": run_jax, "transformers": run_torch}
    print(f"1-min load average before timing: {os.getloadavg()[0]:.1f}")
    first = {name: timed(run) for name, run in impls.items()}  # compile / warm-up, excluded
    runs = {name: [] for name in impls}
    bandwidths = [copy_bandwidth()]  # measured between runs too; the best is the machine's
    for r in range(args.runs):
        for name in (list(impls) if r % 2 == 0 else list(impls)[::-1]):
            runs[name].append(timed(impls[name]))
            print(f"run {r} {name:12s} wall {runs[name][-1]['wall']:6.2f} s", flush=True)
        bandwidths.append(copy_bandwidth())

    med = {name: {k: statistics.median(x[k] for x in rs) for k in ("wall", "cpu", "prefill", "decode_tps", "e2e_tps")}
           for name, rs in runs.items()}
    bandwidth = max(bandwidths)
    bound = bandwidth / weight_bytes
    print(f"\n1-min load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          f"(other processes compete for the same cores)")
    print(f"weights read per token {weight_bytes / 1e9:.3f} GB; copy bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"(best; median {statistics.median(bandwidths) / 1e9:.1f}) "
          f"-> bound {bound:.2f} tokens/s")
    print(f"medians of {args.runs} runs; batch 1, {args.prompt}-token prompt, {args.new_tokens} new tokens, greedy, float32\n")
    header = ("", "end-to-end tok/s", "decode tok/s", "prefill s", "wall s", "CPU s", "1st call s", "decode / bound")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, m in med.items():
        cells = (name, f"{m['e2e_tps']:.2f}", f"{m['decode_tps']:.2f}", f"{m['prefill']:.2f}", f"{m['wall']:.2f}", f"{m['cpu']:.1f}",
                 f"{first[name]['wall']:.1f}", f"{m['decode_tps'] / bound:.0%}")
        print("| " + " | ".join(cells) + " |")
    j, t = med["jaxmusic"], med["transformers"]
    print(f"\njaxmusic / transformers: {j['e2e_tps'] / t['e2e_tps']:.2f}x end to end, "
          f"{j['decode_tps'] / t['decode_tps']:.2f}x decode, {t['prefill'] / j['prefill']:.2f}x prefill")
    print(f"compile (jaxmusic first call - median call): {first['jaxmusic']['wall'] - j['wall']:.1f} s")

    ours_tokens = [x["tokens"] for x in [first["jaxmusic"], *runs["jaxmusic"]]]
    theirs = first["transformers"]["tokens"]
    if all(x == theirs for x in ours_tokens) and all(x["tokens"] == theirs for x in runs["transformers"]):
        print(f"greedy tokens: identical ({len(theirs)} of {len(theirs)}) in every run")
    else:
        agree = next((i for i, (a, b) in enumerate(zip(ours_tokens[0], theirs)) if a != b), len(theirs))
        print(f"greedy tokens DIFFER: first {agree} agree; jaxmusic {ours_tokens[0]}, transformers {theirs}")


if __name__ == "__main__":
    main()
