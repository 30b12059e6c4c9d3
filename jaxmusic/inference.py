"""Asking MuFun about songs, and scoring candidate answers: the engine behind `jaxmusic ask`/`score`.

A request is some audio files (each with an optional `[start, end]` crop) and a question.
The host decodes and chunks the audio, renders the model's prompt template (MuFun's
`qwen2_instruct`, Qwen2-Audio's `chatml`) and lays the
batch out with `splice_plan.build_splice_plan` (lengths and chunk counts in buckets, so new
inputs rarely compile anew); the device computes the spliced embeddings in one jitted
call and `jaxmusic.generate` runs the KV-cache decode loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmusic import audio, templates
from jaxmusic.errors import UserError
from jaxmusic.generate import Completion, generate
from jaxmusic.losses import next_token_log_probs
from jaxmusic.models import mufun, splice_plan
from jaxmusic.models.mufun import MuFun
from jaxmusic.models.qwen3 import Qwen3Config
from jaxmusic.models.whisper import WhisperEncoderConfig
from jaxmusic.nn import ModelOptions


@dataclasses.dataclass(frozen=True)
class Request:
    question: str
    audio: tuple[str, ...] = ()
    segments: tuple[tuple[float, float] | None, ...] = ()  # one per audio file, None = whole file

    def __post_init__(self):
        if not self.question.strip():
            raise UserError("the question is empty")
        if len(self.segments) > len(self.audio):
            raise UserError(f"{len(self.segments)} segments given for {len(self.audio)} audio files")


@dataclasses.dataclass
class Loaded:
    """A MuFun ready for inference: the model split once, its tokenizer and settings."""

    model: MuFun
    tokenizer: object
    cfg: mufun.MuFunConfig
    stop_ids: tuple[int, ...]

    frames: int = dataclasses.field(init=False)  # log-mel frames per chunk
    n_mels: int = dataclasses.field(init=False)

    def __post_init__(self):
        # Read once, here: while an `nnx.jit` call runs it rewrites the module's attributes, so
        # threads that prepare the next batch (jaxmusic.evaluation.evaluate) must not read them from the model.
        self.frames = 2 * self.model.whisper.cfg.max_source_positions
        self.n_mels = self.model.whisper.cfg.num_mel_bins


# ------------------------------------------------------------------------------ loading

def _released_cache(folder: Path) -> Path:
    """Where an on-the-fly import of a released-layout folder is kept (reused while unchanged)."""
    stamp = [str(folder.resolve())] + sorted(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                             for p in folder.iterdir() if p.is_file())
    digest = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16]
    root = Path(os.environ.get("JAXMUSIC_CACHE", Path.home() / ".cache" / "jaxmusic"))
    return root / "imported" / digest


def resolve_checkpoint(path: str | os.PathLike, mufun_config: str | None = None) -> Path:
    """A jaxmusic checkpoint folder for `path`, importing a released MuFun or Qwen2-Audio folder
    (with the glue settings of `mufun_config`, default jaxmusic/configs/mufun.yaml or
    qwen2_audio.yaml) or a Hugging Face Qwen3
    folder (an LLM-only checkpoint, e.g. `jaxmusic eval --judge`) once if needed."""
    from jaxmusic import checkpoints

    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{path}: no such checkpoint folder")
    if (folder / checkpoints.META_FILE).is_file():
        return folder
    config = folder / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            model_type = None
        if model_type in ("tinyllava", "qwen2_audio", "qwen3"):
            cached = _released_cache(folder)
            if not (cached / checkpoints.META_FILE).is_file():
                what = {"tinyllava": "released MuFun", "qwen2_audio": "Qwen2-Audio"}.get(model_type, "Qwen3")
                print(f"importing {what} folder {folder} into {cached} (once)")
                if model_type == "qwen3":
                    checkpoints.import_hf(cached, llm=str(folder))
                else:
                    checkpoints.import_released(cached, folder, glue_config=mufun_config)
            return cached
    raise UserError(f"{path}: neither a jaxmusic checkpoint ({checkpoints.META_FILE}) nor a released "
                    "MuFun or Qwen2-Audio folder (config.json with model_type 'tinyllava' or 'qwen2_audio') "
                    "nor a Qwen3 folder")


def load(path: str | os.PathLike, opts: ModelOptions = ModelOptions(), mufun_config: str | None = None) -> Loaded:
    """Load a whole MuFun (and its tokenizer) from a jaxmusic checkpoint or a released folder."""
    from transformers import AutoTokenizer

    from jaxmusic import checkpoints

    ckpt = resolve_checkpoint(path, mufun_config)
    meta = checkpoints.read_meta(ckpt)
    parts = meta.get("parts", {})
    missing = [p for p in mufun.PARTS if p not in parts]
    if missing or "mufun" not in meta:
        raise UserError(f"{ckpt}: not a whole MuFun checkpoint (missing {', '.join(missing) or 'mufun config'})")
    cfg = mufun.MuFunConfig.from_dict(meta["mufun"])
    wcfg = WhisperEncoderConfig.from_hf(parts["whisper"]["hf_config"])
    lcfg = Qwen3Config.from_hf(parts["llm"]["hf_config"])

    abstract = nnx.eval_shape(lambda: MuFun(wcfg, lcfg, cfg, opts, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    restored = checkpoints.restore_params(ckpt / checkpoints.PARAMS_DIR, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, restored)
    model = nnx.merge(graphdef, state)

    tokenizer = AutoTokenizer.from_pretrained(ckpt / parts["llm"]["tokenizer"])
    if not tokenizer.is_fast:
        raise UserError(f"{ckpt}: the tokenizer must be a fast (tokenizer.json) tokenizer")
    return Loaded(model, tokenizer, cfg, templates.stop_ids(tokenizer))


# ------------------------------------------------------------------------------ batches

def request_audio(loaded: Loaded, req: Request) -> tuple[list[np.ndarray], list[list[int]]]:
    """Log-mel chunks `[n_chunks, n_mels, frames]` of each audio file of a request, and per file
    each chunk's log-mel frames of audio (the rest is padding): `ceil(samples / hop)`, the
    `attention_mask` of transformers' Whisper feature extractor."""
    chunk = loaded.frames * audio.HOP_LENGTH
    mels, frames = [], []
    for i, path in enumerate(req.audio):
        seg = req.segments[i] if i < len(req.segments) else None
        wav = audio.load_audio(path, start=seg[0] if seg else None, end=seg[1] if seg else None)
        if loaded.cfg.max_chunks_per_file:  # e.g. Qwen2-Audio: only the first 30 s, as its processor
            wav = wav[:loaded.cfg.max_chunks_per_file * chunk]
        mels.append(audio.log_mel_np(audio.chunk_waveform(wav, chunk=chunk), n_mels=loaded.n_mels))
        samples = [min(chunk, len(wav) - c * chunk) for c in range(len(mels[-1]))]
        frames.append([min(loaded.frames, -(-n // audio.HOP_LENGTH)) for n in samples])
    return mels, frames


def request_mels(loaded: Loaded, req: Request) -> list[np.ndarray]:
    """Log-mel chunks `[n_chunks, n_mels, frames]` of each audio file of a request."""
    return request_audio(loaded, req)[0]


@nnx.jit(static_argnames=("groups",))
def embed_batch(model: MuFun, mel, input_ids, audio_index, is_audio, groups=1, chunk_frames=None):
    """The LLM input of a batch laid out by `layout_batch` (`chunk_frames`: its plan's)."""
    return model.inputs_embeds(mel, input_ids, audio_index, is_audio, groups=groups, valid_frames=chunk_frames)


@nnx.jit
def spliced_logits(model: MuFun, mel, input_ids, audio_index, is_audio, positions, valid, chunk_frames=None):
    """Logits `[B, L, vocab]` of a batch laid out by `layout_batch` (`valid`: its attention mask)."""
    embeds = model.inputs_embeds(mel, input_ids, audio_index, is_audio, valid_frames=chunk_frames)
    logits, _ = model.llm(embeds, positions, valid=valid)
    return logits


def padding_layout(loaded: Loaded, mel_frames: Sequence[Sequence[Sequence[int]]] | None) -> dict:
    """`build_splice_plan`'s `chunk_frames` and `chunk_tokens` for rows of files whose chunks hold
    `mel_frames[b][i][c]` log-mel frames of audio, if the model masks padding (else none)."""
    if not loaded.cfg.mask_padding or mel_frames is None:
        return {}
    lengths = [[[loaded.cfg.valid_lengths(m) for m in chunks] for chunks in files] for files in mel_frames]
    return {"chunk_frames": [[[e for e, _ in f] for f in files] for files in lengths],
            "chunk_tokens": [[[t for _, t in f] for f in files] for files in lengths]}


def layout_batch(loaded: Loaded, texts: Sequence[templates.TokenizedText], mels: Sequence[list[np.ndarray]],
                 mel_frames: Sequence[Sequence[Sequence[int]]] | None = None):
    """`(splice plan, chunk batch)` of tokenised texts and their audio files' log-mel chunks
    (`mel_frames`: `request_audio`'s, per row; used by models that mask padding)."""
    cfg = loaded.cfg
    plan = splice_plan.build_splice_plan(
        texts, [[len(m) for m in ms] for ms in mels], tokens_per_chunk=cfg.tokens_per_chunk(loaded.frames // 2),
        length_buckets=cfg.length_buckets, chunk_buckets=cfg.chunk_buckets,
        pad_id=loaded.tokenizer.pad_token_id or 0, **padding_layout(loaded, mel_frames))
    chunks = splice_plan.stack_chunks(mels, plan, (loaded.n_mels, loaded.frames))
    return plan, jnp.asarray(chunks)


def _encode(fn, req: Request, *args, **kw):
    try:
        return fn(*args, **kw)
    except templates.TemplateError as e:
        raise UserError(str(e)) from None


# ------------------------------------------------------------------------------ ask / score

def ask(loaded: Loaded, requests: Sequence[Request], *, max_new_tokens: int = 256, temperature: float = 0.0,
        top_p: float = 1.0, seed: int = 0,
        on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
    """Answer a batch of requests; `on_text(row, new_text)` streams each row's text as it grows.

    Each answer is a string that also says whether it ended on a stop token (`terminated`)
    rather than at `max_new_tokens`."""
    tok = loaded.tokenizer
    texts = [_encode(templates.encode_prompt, r, r.question, len(r.audio), tok, template=loaded.cfg.prompt_template)
             for r in requests]
    mels, frames = zip(*[request_audio(loaded, r) for r in requests])
    plan, chunks = layout_batch(loaded, texts, mels, frames)
    embeds = embed_batch(loaded.model, chunks, jnp.asarray(plan.input_ids), jnp.asarray(plan.audio_index),
                         jnp.asarray(plan.is_audio), chunk_frames=plan.chunk_frames)

    ids: list[list[int]] = [[] for _ in requests]
    shown = [""] * len(requests)
    stopped = [False] * len(requests)

    def stream(_step, new):
        for row, t in enumerate(np.asarray(new)):
            if t < 0:
                continue
            if int(t) in loaded.stop_ids:
                stopped[row] = True
                continue
            ids[row].append(int(t))
            text = tok.decode(ids[row], skip_special_tokens=True)
            if on_text is not None and text.startswith(shown[row]) and len(text) > len(shown[row]):
                on_text(row, text[len(shown[row]):])
            shown[row] = text

    generate(nnx.split(loaded.model.llm), embeds, plan.lengths, max_new_tokens=max_new_tokens,
             temperature=temperature, top_p=top_p, seed=seed, stop_ids=loaded.stop_ids, on_token=stream)
    return [Completion(tok.decode(row, skip_special_tokens=True), done) for row, done in zip(ids, stopped)]


@dataclasses.dataclass(frozen=True)
class OptionScore:
    option: str
    total: float              # sum of log p over the answer's tokens (and <|im_end|>)
    per_token: tuple[float, ...]
    tokens: tuple[str, ...]

    @property
    def mean(self) -> float:
        return self.total / max(len(self.per_token), 1)


def score(loaded: Loaded, request: Request, options: Sequence[str]) -> list[OptionScore]:
    """Log-likelihood of each candidate answer under the model's prompt template."""
    if not options:
        raise UserError("give at least one --option to score")
    tok = loaded.tokenizer
    n_audio = len(request.audio)
    texts = [_encode(templates.encode_scoring, request, request.question, o, n_audio, tok,
                     template=loaded.cfg.prompt_template) for o in options]
    mel, frames = request_audio(loaded, request)
    plan, chunks = layout_batch(loaded, texts, [mel] * len(options), [frames] * len(options))
    logits = spliced_logits(loaded.model, chunks, jnp.asarray(plan.input_ids), jnp.asarray(plan.audio_index),
                            jnp.asarray(plan.is_audio), jnp.asarray(plan.positions), jnp.asarray(plan.attention_mask),
                            plan.chunk_frames)
    logp, valid = jax.device_get(next_token_log_probs(logits, jnp.asarray(plan.labels)))
    out = []
    for row, option in enumerate(options):
        keep = valid[row]
        targets = plan.labels[row, 1:][keep[:-1]]
        out.append(OptionScore(option, float(logp[row][keep].sum()), tuple(float(x) for x in logp[row][keep]),
                               tuple(tok.convert_ids_to_tokens([int(t) for t in targets]))))
    return out
