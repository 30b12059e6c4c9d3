"""Train-step benchmark: compile time, step time, tokens/s, MFU; on CPU also against PyTorch.

    python bench/train_step.py CONFIG [KEY=VALUE ...] [--steps 5] [--torch | --no-torch] [--json OUT]

CONFIG is a stage YAML (e.g. configs/stages/bench_cpu.yaml, or on a GPU
configs/stages/bench_gpu_slice.yaml); data are synthetic and weights random whatever the
file says. Measured, each after one warm-up step, as the median of `--steps` timed steps:

1. MuFun: the stage's full train step (encoder, connector, LLM, its trainable set and
   accumulation): compile seconds, step seconds, tokens/s, audio seconds/s, model FLOP/s
   (`jaxmusic.train.metrics` formula) and MFU when the device's peak is known.
2. LLM only (default on CPU): the same jaxmusic step machinery (jit, shardings, AdamW, clipping)
   with the LLM alone trainable and a text-only loss, against transformers' PyTorch
   `Qwen3ForCausalLM` + `torch.optim.AdamW` + `clip_grad_norm_` on the same token batch, with
   the same weights copied over (the first losses are compared, so both time the same work).
   Both run in the stage's compute dtype (float32 on CPU unless the config says otherwise).
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxmusic.models.hf_mapping import hf_weights  # noqa: E402
from jaxmusic.models import qwen3  # noqa: E402
from jaxmusic.train import config as config_lib  # noqa: E402
from jaxmusic.train import metrics as metrics_lib  # noqa: E402
from jaxmusic.train.batches import make_source, next_batch  # noqa: E402
from jaxmusic.losses import next_token_log_probs  # noqa: E402
from jaxmusic.audio import CHUNK_SECONDS  # noqa: E402
from jaxmusic.train.trainer import audio_chunks, setup  # noqa: E402

TEXT_KEYS = ("input_ids", "labels", "positions", "attention_mask", "is_audio")


def text_only_loss(model, batch):
    """Cross-entropy of the LLM on the token ids alone (audio positions hold pad ids)."""
    logits, _ = model.llm(model.llm.embed(batch["input_ids"]), batch["positions"])
    logp, valid = next_token_log_probs(logits, batch["labels"])
    return -logp.sum(), valid.sum().astype(np.float32), {}


def time_steps(runs: dict, n: int) -> tuple[dict, dict]:
    """Warm each `run() -> output` up once, then time `n` rounds, alternating between them so
    that both see the same machine load. Returns ({name: median s}, {name: first output})."""
    first = {name: run() for name, run in runs.items()}
    times = {name: [] for name in runs}
    for _ in range(n):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}, first


def jax_runner(s, batch, loss_fn=None):
    """`(run, compile seconds, init params on the host)` for a setup's train step."""
    params, opt_state = s.init_state()
    init = jax.device_get(params)  # the step donates (deletes) its inputs
    compiled, compile_s = s.compile_step(params, opt_state, batch, loss_fn)
    state = {"params": params, "opt": opt_state}

    def run():
        state["params"], state["opt"], m = compiled(state["params"], state["opt"], batch)
        return jax.device_get(m)

    return run, compile_s, init


def torch_runner(spec, stage, init_params: dict, batch: dict):
    """transformers Qwen3ForCausalLM + AdamW on the same ids/labels/positions and weights."""
    import torch
    from transformers import Qwen3Config as HFQwen3Config
    from transformers import Qwen3ForCausalLM

    c = spec.llm
    hf_cfg = HFQwen3Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                           num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                           num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                           rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                           tie_word_embeddings=c.tie_word_embeddings, attention_bias=False,
                           max_position_embeddings=c.max_position_embeddings)
    model = Qwen3ForCausalLM(hf_cfg)
    weights = hf_weights(_llm_module(spec, init_params), qwen3.hf_tensors(c), c.num_hidden_layers)
    model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in weights.items()}, strict=True)
    model.train()
    opt = stage.optimizer
    adamw = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=(opt.b1, opt.b2), eps=opt.eps,
                              weight_decay=opt.weight_decay)
    # one microbatch = the whole step's rows, flattened like the jaxmusic side
    ids, labels, pos = (torch.from_numpy(np.asarray(batch[k]).reshape(-1, batch[k].shape[-1]).astype(np.int64))
                        for k in ("input_ids", "labels", "positions"))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=stage.model.dtype == "bfloat16")

    def run():
        with autocast:
            loss = model(input_ids=ids, position_ids=pos, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.clip_norm or float("inf"))
        adamw.step()
        adamw.zero_grad(set_to_none=True)
        return loss.item()

    return run, torch.get_num_threads()


def _llm_module(spec, params: dict):
    from flax import nnx

    return nnx.merge(spec.abstract()[0], params).llm


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up)")
    parser.add_argument("--torch", dest="torch", action="store_true", default=None)
    parser.add_argument("--no-torch", dest="torch", action="store_false")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_intermixed_args(argv)

    forced = ["data.source=synthetic", "init.source=random", "steps=1000", "epochs=null"]
    stage = config_lib.load(args.config, args.overrides + forced).stages[0]
    s = setup(stage)
    device = s.mesh.devices.flat[0]
    peak = metrics_lib.peak_flops(device.device_kind, stage.log.peak_tflops)
    print(f"device: {s.mesh.size} x {device.device_kind} ({jax.default_backend()}), mesh {dict(s.mesh.shape)}, "
          f"dtype {stage.model.dtype}, remat {stage.model.remat}")
    source = make_source(stage, s.spec, s.mesh, s.micro_rows, Path("."))
    batch = next_batch(source, stage.accumulation, s.mesh, s.micro_rows, 0, stage.data.packing)
    results = {"config": str(args.config), "overrides": args.overrides, "device": device.device_kind,
               "devices": s.mesh.size}

    run, compile_s, _ = jax_runner(s, batch)
    times, first = time_steps({"mufun": run}, args.steps)
    step_s, m = times["mufun"], first["mufun"]
    flops = s.step_flops(batch)
    tokens = stage.batch.global_batch * batch["input_ids"].shape[2]
    results["mufun"] = {
        "rows": stage.batch.global_batch, "seq_len": int(batch["input_ids"].shape[2]),
        "accumulation": stage.accumulation, "compile_s": compile_s, "step_s": step_s,
        "tokens_per_s": tokens / step_s, "audio_s_per_s": audio_chunks(m, s.spec) * CHUNK_SECONDS / step_s,
        "tflops_per_s": flops / step_s / 1e12, "mfu": flops / (step_s * s.mesh.size * peak) if peak else None}
    r = results["mufun"]
    print(f"MuFun step: compile {r['compile_s']:.1f} s, step {r['step_s'] * 1e3:.1f} ms, "
          f"{r['tokens_per_s']:.0f} tokens/s, {r['audio_s_per_s']:.0f} audio s/s, "
          f"{r['tflops_per_s']:.3f} TFLOP/s" + (f", MFU {r['mfu']:.1%}" if peak else ", MFU n/a (unknown peak)"))

    if args.torch if args.torch is not None else jax.default_backend() == "cpu":
        llm_stage = dataclasses.replace(stage, trainable=["^llm/"],
                                        batch=dataclasses.replace(stage.batch, microbatch=None))
        ls = setup(llm_stage)
        # the step's rows as one microbatch of text only
        text = {k: v.reshape(-1, v.shape[-1]) for k, v in jax.device_get(batch).items() if k in TEXT_KEYS}
        text_batch = next_batch(iter([text]), 1, ls.mesh, ls.micro_rows, 0, False)
        jax_run, jax_compile_s, init = jax_runner(ls, text_batch, text_only_loss)
        torch_run, threads = torch_runner(ls.spec, llm_stage, init, text_batch)
        times, first = time_steps({"jax": jax_run, "torch": torch_run}, args.steps)
        fwd = metrics_lib.forward_flops(ls.spec.whisper, ls.spec.llm, ls.spec.mufun, chunk_rows=0,
                                        rows=ls.micro_rows, length=text_batch["input_ids"].shape[2])
        jax_loss0, torch_loss0 = float(first["jax"]["loss"]), first["torch"]
        results["llm_only"] = {
            "jax_compile_s": jax_compile_s, "jax_step_s": times["jax"], "torch_step_s": times["torch"],
            "torch_threads": threads, "speedup_vs_torch": times["torch"] / times["jax"],
            "jax_tokens_per_s": tokens / times["jax"], "torch_tokens_per_s": tokens / times["torch"],
            "jax_tflops_per_s": 3 * fwd["llm"] / times["jax"] / 1e12,
            "first_loss_jax": jax_loss0, "first_loss_torch": torch_loss0}
        r = results["llm_only"]
        print(f"LLM-only step ({tokens} tokens): jaxmusic {r['jax_step_s'] * 1e3:.1f} ms "
              f"(compile {r['jax_compile_s']:.1f} s), PyTorch {r['torch_step_s'] * 1e3:.1f} ms "
              f"({threads} threads): jaxmusic runs at {r['speedup_vs_torch']:.2f}x PyTorch's speed; "
              f"first losses {jax_loss0:.6f} vs {torch_loss0:.6f}")
        if abs(jax_loss0 - torch_loss0) > 1e-3 * abs(torch_loss0):
            print("error: the two LLM steps disagree on the loss; they are not timing the same work")
            return 1
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
