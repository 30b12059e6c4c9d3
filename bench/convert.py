"""Conversion benchmark on a synthetic checkpoint with Qwen3-8B's real shapes.

    python bench/convert.py [--layers 36] [--workdir /tmp] [--keep]

Writes a bfloat16 Qwen3ForCausalLM folder (sharded at 5 GB like the released one) with
random-ish values, then runs, as subprocesses,
`convert/hf_to_jax.py --dtype bfloat16` and `convert/jax_to_hf.py`, and reports wall time,
throughput (HF bytes / wall time) and each child's peak RSS (`wait4`'s ru_maxrss), next
to `cp -r` + `sync` of the same folder as the machine's read+write ceiling at that moment. Then
checks that the exported folder has the source's tensors and that a sample of them came
back bit for bit. `--layers N` shrinks the model, to show that memory does not grow with
depth. Everything is deleted at the end unless --keep.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jaxmusic.checkpoints.safetensors import (HFWeights, SafetensorsWriter, plan_shards,  # noqa: E402
                                     shard_file_names, write_index)

QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
    "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "hidden_act": "silu",
    "tie_word_embeddings": False, "max_position_embeddings": 32768, "attention_bias": False,
    "dtype": "bfloat16",
}
POOL_ELEMS = 64 * 2**20  # 128 MB of random bfloat16 values, sliced at a per-tensor offset
BLOCK_ELEMS = 16 * 2**20


def qwen3_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    d, m, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (q, d)),
                (p + "self_attn.k_proj.weight", (kv, d)), (p + "self_attn.v_proj.weight", (kv, d)),
                (p + "self_attn.o_proj.weight", (d, q)), (p + "self_attn.q_norm.weight", (cfg["head_dim"],)),
                (p + "self_attn.k_norm.weight", (cfg["head_dim"],)),
                (p + "post_attention_layernorm.weight", (d,)), (p + "mlp.gate_proj.weight", (m, d)),
                (p + "mlp.up_proj.weight", (m, d)), (p + "mlp.down_proj.weight", (d, m))]
    return out + [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]


def write_synthetic(folder: Path, cfg: dict) -> int:
    """Stream a sharded bfloat16 checkpoint; each tensor is the random pool read from its own offset."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pool = (0.02 * rng.standard_normal(POOL_ELEMS, np.float32)).astype(ml_dtypes.bfloat16)
    pool = np.concatenate([pool, pool[:BLOCK_ELEMS]])  # so any offset has a full block after it
    specs = qwen3_tensors(cfg)
    shapes = dict(specs)
    sizes = [(n, math.prod(s) * 2) for n, s in specs]
    shards = plan_shards(sizes, 5 * 10**9)
    files = shard_file_names(len(shards))
    for i, (names, file) in enumerate(zip(shards, files)):
        writer = SafetensorsWriter(folder / file, [(n, "BF16", shapes[n]) for n in names])
        for j, name in enumerate(names):
            left, offset = math.prod(shapes[name]), (i * 7919 + j * 104729) % POOL_ELEMS
            while left:
                take = min(left, BLOCK_ELEMS)
                writer.write(name, pool[offset:offset + take])
                left -= take
                offset = (offset + take) % POOL_ELEMS
        writer.close()
    write_index(folder, {n: f for names, f in zip(shards, files) for n in names},
                sum(s for _, s in sizes), sum(math.prod(s) for _, s in specs))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return sum(s for _, s in sizes)


def run_measured(args: list[str]) -> tuple[float, float, float, str]:
    """Run `python args...`: (wall s, CPU s, peak RSS GB, stdout), from wait4 on that very child."""
    start = time.time()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=err,
                                text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.time() - start
        if os.waitstatus_to_exitcode(status):
            err.seek(0)
            sys.exit(f"{' '.join(args)} failed: {err.read()}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024 / 2**30, out.strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--keep", action="store_true", help="keep the generated folders")
    args = parser.parse_args()
    cfg = dict(QWEN3_8B, num_hidden_layers=args.layers)
    root = Path(tempfile.mkdtemp(prefix="jaxmusic-bench-", dir=args.workdir))
    try:
        t = time.time()
        nbytes = write_synthetic(root / "hf", cfg)
        shards = len(list((root / "hf").glob("*.safetensors")))
        print(f"synthetic Qwen3-8B shapes, {args.layers} layers: {nbytes / 1e9:.2f} GB bf16 "
              f"in {shards} shards, written in {time.time() - t:.0f} s")
        rows = []
        for label, cmd in [
            ("hf_to_jax --dtype bfloat16", ["convert/hf_to_jax.py", "--llm", str(root / "hf"),
                                            "--out", str(root / "ckpt"), "--dtype", "bfloat16"]),
            ("jax_to_hf --part llm", ["convert/jax_to_hf.py", str(root / "ckpt"), "--out",
                                      str(root / "export"), "--part", "llm"]),
        ]:
            os.sync()  # each step starts with no other step's writes pending
            wall, cpu, rss, out = run_measured(cmd)
            rows.append((label, wall, nbytes / 1e6 / wall, cpu, rss))
            print(f"  {label}: {out}")
        os.sync()  # last, so that deleting its copy cannot slow the conversions down
        start = time.time()
        subprocess.run(["cp", "-r", str(root / "hf"), str(root / "copy")], check=True)
        os.sync()  # TensorStore syncs its writes too
        wall = time.time() - start
        rows.insert(0, ("cp -r + sync (baseline)", wall, nbytes / 1e6 / wall, None, None))
        shutil.rmtree(root / "copy")
        verify(root / "hf", root / "export")
        print("\n| layers | step | GB | wall s | MB/s | CPU s | peak RSS GB |\n|---|---|---|---|---|---|---|")
        for label, wall, mbs, cpu, rss in rows:
            cpu_text, rss_text = ("-", "-") if cpu is None else (f"{cpu:.1f}", f"{rss:.2f}")
            print(f"| {args.layers} | {label} | {nbytes / 1e9:.2f} | {wall:.1f} | {mbs:.0f} | {cpu_text} "
                  f"| {rss_text} |")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def verify(src: Path, exported: Path) -> None:
    """Same tensor set and headers; first, middle and last layers' and the big tensors' bytes equal."""
    with HFWeights(src) as a, HFWeights(exported) as b:
        assert {(t.name, t.dtype, t.shape) for t in a.tensors.values()} == \
               {(t.name, t.dtype, t.shape) for t in b.tensors.values()}, "tensor sets differ"
        n = max(int(k.split(".")[2]) for k in a.tensors if k.startswith("model.layers.")) + 1
        sample = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"] + [
            f"model.layers.{i}.{t}" for i in sorted({0, n // 2, n - 1})
            for t in ("mlp.down_proj.weight", "mlp.up_proj.weight", "self_attn.q_proj.weight",
                      "self_attn.k_norm.weight")]
        for name in sample:
            assert np.array_equal(a.read(name).view(np.uint16), b.read(name).view(np.uint16)), name
    print(f"  verified: same {len(a.tensors)} tensors, {len(sample)} sampled tensors bit-exact")


if __name__ == "__main__":
    main()
