"""GRPO step benchmark on CPU: one step (rollout + update) in jaxmusic against TRL's GRPOTrainer.

    python bench/grpo.py [--steps 3] [--prompts 4] [--generations 8] [--max-new-tokens 64]
                         [--hidden 256] [--layers 4] [--json OUT]

Both sides train the same small Qwen3 (random weights drawn by jaxmusic and copied into
transformers' `Qwen3ForCausalLM`; the first prompt's logits are compared, so both time the
same model) on the same text prompts (the `qwen2_instruct` prompt of music questions, tokenised
by one tokenizer trained here), with the same reward (`jaxmusic.rewards.exact_once`) and
settings: `--prompts` prompts x `--generations` completions of at most `--max-new-tokens`
tokens, temperature 1, top_p 1, beta 0, clip 0.2, "bnpo", one update per batch of rollouts,
AdamW, float32, one accumulation step. jaxmusic runs its real GRPO stage machinery
(`jaxmusic.train.grpo`: the jitted sampler on a one-device mesh, rewards, the train step with
`loss: grpo`) on a MuFun whose audio path is tiny and whose chunk slots are empty (text prompts);
TRL 1.x runs `GRPOTrainer.train()` with `transformers` generation.

Measured after one warm-up step (compilation), as the median of `--steps` steps: the whole
step, the rollout (sampling, decoding, rewards, advantages) and the update. Completions of a
random model rarely stop early, so both sides generate close to `--max-new-tokens` each; the
completion lengths are reported.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from jaxmusic import rewards, templates  # noqa: E402
from jaxmusic.data.pipeline import PROMPT_FIELDS  # noqa: E402
from jaxmusic.demo.tokenizer import train_tokenizer  # noqa: E402
from jaxmusic.generate import round_up  # noqa: E402
from jaxmusic.models import qwen3  # noqa: E402
from jaxmusic.models.hf_mapping import hf_weights  # noqa: E402
from jaxmusic.models.splice_plan import build_splice_plan  # noqa: E402
from jaxmusic.train import config as config_lib  # noqa: E402
from jaxmusic.train.grpo import GRPO  # noqa: E402
from jaxmusic.train.trainer import setup  # noqa: E402

QUESTIONS = [("Which instrument family is playing?", "B. bowed string"), ("How fast is the tempo?", "very fast"),
             ("What is the quality of the chord?", "minor"), ("How many distinct sections does this music have?",
                                                             "three")]
TINY = REPO / "configs" / "stages" / "tiny.yaml"


def make_tokenizer(out: Path):
    texts = [templates.SYSTEM, "USER: ASSISTANT: " + templates.END_OF_TURN]
    texts += [q + " " + a for q, a in QUESTIONS] * 20
    texts += ["plucked string brass mallet percussion drum kit slow moderate fast major diminished augmented "
              "one two four C4 D5 natural sharp"] * 20
    return train_tokenizer(texts, vocab_size=1024, out_dir=out, space_joins="previous")


def prompt_budget(tokenizer) -> int:
    """`data.seq_len` of the stage: the longest prompt rounded up to 16 positions, as a user sizes
    it for a dataset (TRL pads to the longest prompt of each batch)."""
    longest = max(sum(len(p) for p in templates.encode_prompt(q, 0, tokenizer).pieces) for q, _ in QUESTIONS)
    return round_up(longest, 16)


def make_stage(args, tok_dir: Path, vocab: int, seq_len: int) -> config_lib.StageConfig:
    tiny = yaml.safe_load(TINY.read_text())
    heads = max(args.hidden // 64, 1)
    llm = dict(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
               num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
               head_dim=64, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
               tie_word_embeddings=False)
    stage = {
        "name": "bench", "model": {**tiny["model"], "llm": llm}, "init": {"source": "random", "seed": 0},
        "trainable": ["^connector/", "^llm/"], "loss": "grpo",
        "grpo": {"generations": args.generations, "max_new_tokens": args.max_new_tokens, "temperature": 1.0,
                 "top_p": 1.0, "beta": 0.0, "epsilon": 0.2, "aggregation": "bnpo", "iterations": 1,
                 "rewards": [{"name": "exact_once", "weight": 1.0}]},
        "data": {"source": "manifests", "tokenizer": str(tok_dir), "seq_len": seq_len, "chunks_per_row": 1},
        "batch": {"global_batch": args.prompts * args.generations},
        "optimizer": {"lr": 1e-6, "weight_decay": 0.0, "clip_norm": 1.0, "schedule": "constant", "warmup_steps": 0},
        "steps": 1000, "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "log": {"tensorboard": False, "progress": False}}
    return config_lib.stage_from_dict(stage)


def prompt_batch(s, tokenizer, n: int) -> dict:
    """One microbatch of `n` text prompts in the data pipeline's layout, with their answers."""
    qa = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
    texts = [templates.encode_prompt(q, 0, tokenizer) for q, _ in qa]
    plan = build_splice_plan(texts, [[] for _ in texts], tokens_per_chunk=s.spec.tokens_per_chunk,
                             length_buckets=(s.stage.data.seq_len,), chunk_buckets=(1,), groups=n,
                             pad_id=tokenizer.pad_token_id)
    frames = 2 * s.spec.whisper.max_source_positions
    batch = {k: getattr(plan, k) for k in ("input_ids", "labels", "positions", "attention_mask", "is_audio",
                                           "audio_index")}
    batch |= {"mel": np.zeros((n, s.spec.whisper.num_mel_bins, frames), np.float32),
              "chunk_mask": np.zeros(n, bool)}
    fields = {"prompt": [templates.inference_prompt(q, 0) for q, _ in qa], "answer": [a for _, a in qa],
              "record": [{} for _ in qa]}
    for key in PROMPT_FIELDS:
        batch[key] = np.empty(n, object)
        batch[key][:] = fields[key]
    return batch


class JaxmusicGRPO:
    """jaxmusic's GRPO stage on a one-device mesh, one step per call."""

    def __init__(self, stage, tokenizer, workdir: Path, prompts: int):
        self.s = s = setup(stage)
        self.params, self.opt_state = s.init_state()
        self.init_llm = jax.device_get(self.params["llm"])
        template = prompt_batch(s, tokenizer, prompts)
        source = iter(lambda: {k: v.copy() for k, v in template.items()}, None)
        self.rl = GRPO(s, workdir, source, s.init_params)
        self.compiled, self.step = None, 0
        self.times = {"step": [], "rollout": [], "update": [], "length": []}

    def __call__(self) -> None:
        t0 = time.perf_counter()
        batch = self.rl.batch(self.step, self.params)
        t1 = time.perf_counter()
        if self.compiled is None:
            self.compiled, _ = self.s.compile_step(self.params, self.opt_state, batch, self.rl.loss_fn)
            t1 = time.perf_counter()  # compilation is not the update's time
        self.params, self.opt_state, metrics = self.compiled(self.params, self.opt_state, batch)
        jax.block_until_ready(metrics)
        t2 = time.perf_counter()
        self.step += 1
        record = self.rl.record(self.step, jax.device_get(metrics))
        for key, value in (("step", t2 - t0), ("rollout", t1 - t0), ("update", t2 - t1),
                           ("length", record["completion_length"])):
            self.times[key].append(value)


def run_trl(args, stage, tokenizer, ours: JaxmusicGRPO):
    import torch
    from datasets import Dataset
    from transformers import Qwen3Config, Qwen3ForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    c = ours.s.spec.llm
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    weights = hf_weights(_llm_module(ours.s, ours.init_llm), qwen3.hf_tensors(c), c.num_hidden_layers)
    model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in weights.items()}, strict=True)
    diff = same_model(ours.s, ours.init_llm, model, tokenizer)  # before either side trains it

    rows = [{"prompt": templates.inference_prompt(q, 0), "answer": a} for q, a in QUESTIONS]
    data = Dataset.from_list(rows * (args.prompts * (args.steps + 2)))

    def exact_once(prompts, completions, answer, **_):
        return rewards.exact_once(prompts, completions, answer, [{}] * len(completions))

    g = stage.grpo
    config = GRPOConfig(
        output_dir=str(Path(tempfile.mkdtemp()) / "trl"), per_device_train_batch_size=args.prompts * g.generations,
        num_generations=g.generations, gradient_accumulation_steps=1, steps_per_generation=1,
        max_completion_length=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, top_k=0, beta=g.beta,
        epsilon=g.epsilon, num_iterations=1, loss_type="bnpo", scale_rewards="group",
        learning_rate=stage.optimizer.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=stage.optimizer.clip_norm, max_steps=args.steps + 1, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, dataloader_num_workers=0, seed=0, disable_dropout=True,
        log_completions=False, mask_truncated_completions=False,
        gradient_checkpointing=False)  # TRL 1.x turns it on by default; jaxmusic's side does not recompute
    trainer = GRPOTrainer(model=model, reward_funcs=[exact_once], args=config, train_dataset=data,
                          processing_class=tokenizer)
    times = {"step": [], "rollout": [], "length": []}
    rollout = trainer._generate_and_score_completions  # TRL's rollout: generation, rewards, advantages

    def timed_rollout(batch):
        t0 = time.perf_counter()
        out = rollout(batch)
        times["rollout"].append(time.perf_counter() - t0)
        times["length"].append(float(out["completion_mask"].sum(1).float().mean()))
        return out

    trainer._generate_and_score_completions = timed_rollout

    class StepTimer(TrainerCallback):
        """Times TRL's steps, and runs one jaxmusic step after each: both see the same load."""

        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            times["step"].append(time.perf_counter() - self.t0)
            ours()

    trainer.add_callback(StepTimer())
    trainer.train()
    times["update"] = [a - b for a, b in zip(times["step"], times["rollout"])]
    return median_after_warmup(times), diff, torch.get_num_threads()


def median_after_warmup(times: dict) -> dict:
    return {k: statistics.median(v[1:]) for k, v in times.items()}  # the first step compiles / warms up


def _llm_module(s, llm_params: dict):
    from flax import nnx

    return nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: s.spec.build_part("llm", nnx.Rngs(0)))), llm_params)


def same_model(s, init_llm, hf_model, tokenizer) -> float:
    """Max |logit difference| of the two models on the first prompt."""
    import torch

    ids = tokenizer(templates.inference_prompt(QUESTIONS[0][0], 0), add_special_tokens=False)["input_ids"]
    llm = _llm_module(s, init_llm)
    pos = np.arange(len(ids))[None]
    ours, _ = llm(llm.embed(np.asarray([ids])), pos)
    with torch.no_grad():
        theirs = hf_model(input_ids=torch.tensor([ids])).logits.numpy()
    return float(np.abs(np.asarray(ours) - theirs).max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench_grpo_"))
    tokenizer = make_tokenizer(work / "tok")
    stage = make_stage(args, work / "tok", len(tokenizer), prompt_budget(tokenizer))
    jaxmusic = JaxmusicGRPO(stage, tokenizer, work, args.prompts)
    theirs, diff, threads = run_trl(args, stage, tokenizer, jaxmusic)
    ours = median_after_warmup(jaxmusic.times)
    params = sum(x.size for x in jax.tree.leaves(jaxmusic.init_llm))
    result = {"model": {"hidden": args.hidden, "layers": args.layers, "vocab": len(tokenizer), "parameters": params},
              "prompts": args.prompts, "generations": args.generations, "max_new_tokens": args.max_new_tokens,
              "steps": args.steps, "torch_threads": threads, "max_logit_diff": diff, "jaxmusic": ours, "trl": theirs,
              "speedup": {k: theirs[k] / ours[k] for k in ("step", "rollout", "update")}}
    print(f"Qwen3 {params / 1e6:.1f}M parameters, {args.prompts} prompts x {args.generations} completions of "
          f"<= {args.max_new_tokens} tokens (same weights: max logit difference {diff:.1e})")
    for name, r in (("jaxmusic", ours), ("TRL", theirs)):
        print(f"  {name:8s} step {r['step']:6.2f} s = rollout {r['rollout']:6.2f} s + update {r['update']:6.2f} s"
              f"   (mean completion {r['length']:.1f} tokens)")
    sp = result["speedup"]
    print(f"  jaxmusic runs at {sp['step']:.2f}x TRL's speed per step (rollout {sp['rollout']:.2f}x, "
          f"update {sp['update']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if diff < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
