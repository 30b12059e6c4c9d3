"""One prepared check for a real GPU (under 8 minutes on one H100/H200); `--tiny` runs it on a CPU.

    python bench/gpu.py [--json OUT] [--llm-layers N]      # on one H100 / H200
    python bench/gpu.py --tiny                             # tiny models, any machine (CI)

Measured, each after a warm-up, as the median of `--steps` timed runs:

1. LLM train step (Qwen3-8B width, as many layers as fit one GPU with float32 master weights
   and AdamW state, text-only loss, bf16 compute, remat full): MFU against the GPU's dense
   bf16 peak (`jaxmusic.train.metrics`), and the measured peak memory against what
   `jaxmusic plan` predicts for the same stage (run first, on the CPU, as a subprocess).
2. Whisper-large-v3 encoder forward + backward on 13 chunks (390 s, P4's longest audio): MFU.
3. Batch-1 decode of Qwen3-8B in bf16 (random weights, 512-token prompt): tokens/s, and that
   as a share of the HBM bound (bytes a step must read: LLM weights but the embedding table,
   plus the KV cache, over the memory bandwidth).
4. Batched decode at 8 and 32 rows: tokens/s over all rows.

Goals (bench/RESULTS.md, "GPU"): LLM step >= 50% MFU on H100, encoder >= 45%, batch-1 decode
>= 75% of the HBM bound, plan's peak within 10% of the measured one.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jaxmusic.cli import cpu_without_nvidia_driver  # noqa: E402

cpu_without_nvidia_driver()  # --tiny on a machine with the plan extra but no GPU: straight to the CPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import yaml  # noqa: E402
from flax import nnx  # noqa: E402

from bench.train_step import text_only_loss  # noqa: E402
from jaxmusic.generate import generate  # noqa: E402
from jaxmusic.models.mufun import MuFunConfig  # noqa: E402
from jaxmusic.models.qwen3 import Qwen3Config, Qwen3ForCausalLM  # noqa: E402
from jaxmusic.models.whisper import WhisperEncoder, WhisperEncoderConfig  # noqa: E402
from jaxmusic.nn import ModelOptions  # noqa: E402
from jaxmusic.plan.gpus import load_gpu  # noqa: E402
from jaxmusic.train import config as config_lib  # noqa: E402
from jaxmusic.train import metrics  # noqa: E402
from jaxmusic.train.batches import make_source, next_batch  # noqa: E402
from jaxmusic.train.state import named_model  # noqa: E402
from jaxmusic.train.trainer import setup  # noqa: E402

TINY = config_lib.load_yaml(REPO / "configs" / "stages" / "tiny.yaml")["model"]
BF16 = jnp.dtype(jnp.bfloat16)


def timed(fn, steps: int) -> float:
    """Median seconds of `fn()` (which must block) after one warm-up call."""
    fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gpu_key(kind: str) -> str | None:
    kind = kind.upper()
    return "h200" if "H200" in kind else "h100-80gb" if "H100" in kind else (
        "a100-80gb" if "A100" in kind and "80GB" in kind else "a100-40gb" if "A100" in kind else None)


def llm_layers(pool_bytes: int, llm: dict) -> int:
    """Layers of Qwen3-8B width whose float32 weights, gradients and AdamW moments (16 bytes per
    parameter) fit the pool beside the embedding and output tables and 16 GiB of activations
    and logits (remat full, 2 x 2048 tokens per microbatch)."""
    d, m, h = llm["hidden_size"], llm["intermediate_size"], llm["head_dim"]
    layer = d * h * (2 * llm["num_attention_heads"] + 2 * llm["num_key_value_heads"]) + 3 * d * m
    tables = 2 * llm["vocab_size"] * d
    return max(1, int((pool_bytes - 16 * tables - 16 * 2 ** 30) // (16 * layer)))


def llm_stage(args, device_kind: str) -> dict:
    llm = TINY["llm"] if args.tiny else named_model("qwen3-8b")
    key = gpu_key(device_kind)
    layers = args.llm_layers or (llm["num_hidden_layers"] if args.tiny else llm_layers(load_gpu(key).pool_bytes, llm))
    return {"name": "gpu_llm", "model": {"whisper": TINY["whisper"], "llm": {**llm, "num_hidden_layers": layers},
                                         "mufun": {"fusion_layers": [0, 1, 2]}, "param_dtype": "float32",
                                         "dtype": "float32" if args.tiny else "bfloat16", "remat": "full"},
            "init": {"source": "random"}, "trainable": ["^llm/"],
            "data": {"source": "synthetic", "seq_len": 64 if args.tiny else 2048, "chunks_per_row": 1},
            "batch": {"global_batch": 4, "microbatch": 2}, "steps": 100, "mesh": {"fsdp": -1}}


def plan_peak(stage_file: Path, key: str | None) -> int | None:
    """`jaxmusic plan`'s predicted peak for the stage on one `key` GPU (None: no plan extra / GPU model)."""
    if key is None:
        return None
    r = subprocess.run([sys.executable, "-m", "jaxmusic.cli", "plan", str(stage_file), "--gpu", key, "--nodes", "1",
                        "--gpus-per-node", "1", "--json"], capture_output=True, text=True, cwd=REPO)
    if r.returncode not in (0, 1):
        print(f"plan failed: {r.stderr.strip()[-500:]}")
        return None
    return json.loads(r.stdout)["stages"][0]["peak"]


def bench_llm_step(args, device, peak) -> dict:
    stage_dict = llm_stage(args, device.device_kind)
    with tempfile.TemporaryDirectory() as tmp:
        stage_file = Path(tmp) / "gpu_llm.yaml"
        stage_file.write_text(yaml.safe_dump(stage_dict))
        predicted = plan_peak(stage_file, gpu_key(device.device_kind) or ("h100-80gb" if args.tiny else None))
        stage = config_lib.load(stage_file).stages[0]
    s = setup(stage)
    batch = next_batch(make_source(stage, s.spec, s.mesh, s.micro_rows, Path(".")), stage.accumulation, s.mesh,
                       s.micro_rows, 0, False)
    params, opt = s.init_state()
    compiled, compile_s = s.compile_step(params, opt, batch, text_only_loss)
    state = {"p": params, "o": opt}

    def run():
        state["p"], state["o"], m = compiled(state["p"], state["o"], batch)
        jax.block_until_ready(m)

    step_s = timed(run, args.steps)
    fwd = metrics.forward_flops(s.spec.whisper, s.spec.llm, s.spec.mufun, chunk_rows=0, rows=s.micro_rows,
                                length=batch["input_ids"].shape[2])["llm"]
    flops = 3 * fwd * stage.accumulation
    stats = device.memory_stats() or {}
    measured = stats.get("peak_bytes_in_use")
    return {"layers": s.spec.llm.num_hidden_layers, "tokens": stage.batch.global_batch * batch["input_ids"].shape[2],
            "compile_s": compile_s, "step_s": step_s, "tflops_per_s": flops / step_s / 1e12,
            "mfu": flops / step_s / peak if peak else None, "peak_measured": measured, "peak_planned": predicted,
            "plan_error": (predicted / measured - 1) if predicted and measured else None}


def bench_encoder(args, peak) -> dict:
    cfg = WhisperEncoderConfig.from_hf(TINY["whisper"] if args.tiny else named_model("whisper-large-v3"))
    opts = ModelOptions(dtype=jnp.float32 if args.tiny else BF16, remat="full")
    graphdef, params = nnx.split(WhisperEncoder(cfg, opts, nnx.Rngs(0)))
    mel = jax.random.normal(jax.random.key(1), (13, cfg.num_mel_bins, 2 * cfg.max_source_positions), jnp.float32)

    @jax.jit
    def fwd_bwd(params, mel):
        loss = lambda p: jnp.mean(jnp.square(nnx.merge(graphdef, p)(mel)[-1].astype(jnp.float32)))  # noqa: E731
        return jax.grad(loss)(params)

    step_s = timed(lambda: jax.block_until_ready(fwd_bwd(params, mel)), args.steps)
    llm = Qwen3Config.from_hf(TINY["llm"])  # rows=0: only the encoder's FLOPs are counted
    flops = 3 * metrics.forward_flops(cfg, llm, MuFunConfig(), chunk_rows=13, rows=0, length=1)["whisper"]
    return {"chunks": 13, "step_s": step_s, "tflops_per_s": flops / step_s / 1e12,
            "mfu": flops / step_s / peak if peak else None}


def bench_decode(args, hbm_bytes_per_s) -> dict:
    llm = TINY["llm"] if args.tiny else named_model("qwen3-8b")
    cfg = Qwen3Config.from_hf(llm)
    dtype = jnp.float32 if args.tiny else BF16
    model = Qwen3ForCausalLM(cfg, ModelOptions(param_dtype=dtype, dtype=dtype), nnx.Rngs(0))
    split = nnx.split(model)
    prompt, new = (16, 8) if args.tiny else (512, 128)
    out = {}
    for rows in (1, 8, 32):
        embeds = jax.random.normal(jax.random.key(rows), (rows, prompt, cfg.hidden_size), dtype)
        stamps = []
        run = lambda: generate(split, embeds, [prompt] * rows, max_new_tokens=new,  # noqa: E731
                               on_token=lambda step, ids: stamps.append(time.perf_counter()))
        run()  # compile
        stamps.clear()
        run()
        tokens_per_s = rows * (len(stamps) - 1) / (stamps[-1] - stamps[0])  # decode steps only
        out[f"rows_{rows}_tokens_per_s"] = tokens_per_s
    weights = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(split[1]))
    table = cfg.vocab_size * cfg.hidden_size * jnp.dtype(dtype).itemsize
    cache = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * (prompt + new) * jnp.dtype(dtype).itemsize
    bound = hbm_bytes_per_s / (weights - table + cache) if hbm_bytes_per_s else None
    out.update(batch1_bound_tokens_per_s=bound,
               batch1_share_of_bound=out["rows_1_tokens_per_s"] / bound if bound else None)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models: any device, seconds (CI)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--llm-layers", type=int, help="LLM layers of the train step (default: what fits)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    key = gpu_key(device.device_kind)
    if key is None and not (args.tiny or args.llm_layers):
        parser.error(f"{device.device_kind} is not an A100/H100/H200: give --llm-layers (or --tiny)")
    gpu = load_gpu(key) if key else None
    peak = metrics.peak_flops(device.device_kind)
    t0 = time.perf_counter()
    results = {"device": device.device_kind, "tiny": args.tiny,
               "llm_step": bench_llm_step(args, device, peak), "encoder": bench_encoder(args, peak),
               "decode": bench_decode(args, gpu.hbm_bytes_per_s if gpu else None)}
    results["seconds"] = time.perf_counter() - t0
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
