"""Whole-MuFun checkpoints: assemble from backbones, import and export the released layout.

The released layout (brief §6) is one safetensors folder whose `config.json` has
`model_type: "tinyllava"`, `connector_type: "blp_4i_2x"`, `text_config` (Qwen3) and
`vision_config` (Whisper), with tensors under three prefixes:

    vision_tower._vision_tower.*   Whisper encoder names
    language_model.*               Qwen3ForCausalLM names
    connector._connector.linear{1,2}.{weight,bias}

A jaxmusic MuFun checkpoint is an ordinary jaxmusic checkpoint (see `jaxmusic.checkpoint`)
with three parts, `whisper`, `connector` and `llm`, plus the MuFun glue settings under
`"mufun"` in `jaxmusic.json`. Everything streams through `jaxmusic.checkpoint`'s machinery.

Sizes missing from the released config are inferred from the tensors (the released config
file is not public): Whisper's from conv1/fc1/embed_positions and the layer count, with
64-wide attention heads as in every Whisper size; Qwen3's from the embedding, q/k
projections, q_norm and gate_proj. The fusion layers are not in the released config (the
reference hard-codes 0, 7, 15, 32): they come from `configs/mufun.yaml` or `--mufun-config`,
and must match the connector's input width.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxmusic import checkpoint as ck
from jaxmusic import mufun
from jaxmusic.safetensors_io import HFWeights, SafetensorsWriter, dtype_code

PREFIXES = {"whisper": "vision_tower._vision_tower.", "llm": "language_model.", "connector": ""}
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "mufun.yaml"


class _PrefixView:
    """The tensors of one part of a released folder, as `HFWeights` presents a whole folder."""

    def __init__(self, weights: HFWeights, prefix: str, keep):
        self.folder, self._weights = weights.folder, weights
        self.tensors = {k: v for k, v in weights.tensors.items() if keep(k)}
        self.read, self.read_into = weights.read, weights.read_into

    def close(self):
        self._weights.close()


def _mufun_config(path: str | None) -> mufun.MuFunConfig:
    try:
        return mufun.MuFunConfig.from_yaml(path or DEFAULT_CONFIG)
    except (OSError, ValueError) as e:
        raise ck.ConversionError(f"--mufun-config: {e}") from None


def connector_leaves(cfg: mufun.MuFunConfig, d_enc: int, d_llm: int) -> list[ck.Leaf]:
    d_in, d_hidden, d_out = cfg.connector_dims(d_enc, d_llm)
    shapes = {("linear1", "kernel"): (d_in, d_hidden), ("linear1", "bias"): (d_hidden,),
              ("linear2", "kernel"): (d_hidden, d_out), ("linear2", "bias"): (d_out,)}
    return [ck.Leaf("connector", spec, shapes[spec.path], 0) for spec in mufun.connector_hf_tensors()]


def connector_config(cfg: mufun.MuFunConfig, d_enc: int, d_llm: int) -> dict:
    d_in, d_hidden, d_out = cfg.connector_dims(d_enc, d_llm)
    return {"connector_type": f"blp_{len(cfg.fusion_layers)}i_{cfg.connector_hidden_multiple}x",
            "input_size": d_in, "hidden_size": d_hidden, "output_size": d_out}


def _source(part: str, folder: Path, hf_config: dict, view, leaves) -> ck._Source:
    return ck._Source(part, folder, hf_config, view, PREFIXES[part], leaves)


def _finish_meta(tmp: Path, cfg: mufun.MuFunConfig, released_config: dict | None) -> None:
    """Add the glue settings; keep one tokenizer (the LLM's) for the whole model."""
    meta = json.loads((tmp / ck.META_FILE).read_text())
    meta["mufun"] = cfg.to_dict()
    if released_config is not None:
        meta["released_config"] = released_config
    for part in ("whisper", "connector"):
        info = meta["parts"][part]
        if released_config is not None or part == "connector":
            shutil.rmtree(tmp / info.pop("tokenizer"), ignore_errors=True)
    (tmp / ck.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _write(out: Path, sources: list[ck._Source], dtype: str, cfg: mufun.MuFunConfig,
           released_config: dict | None) -> ck.Stats:
    problems = [p for src in sources for p in ck._check(src)]
    if problems:
        raise ck.ConversionError(f"{len(problems)} problem(s) with the HF weights, nothing written: "
                                 + "; ".join(problems))
    if dtype not in ck.CKPT_DTYPES:
        raise ck.ConversionError(f"--dtype must be one of {ck.CKPT_DTYPES}, got {dtype!r}")
    start = time.time()
    tmp = ck._staging_dir(out)
    try:
        stats = ck._write_checkpoint(tmp, sources, np.dtype(dtype))
        _finish_meta(tmp, cfg, released_config)
        ck._commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stats.seconds = time.time() - start
    return stats


# ------------------------------------------------------------------------ released layout -> jaxmusic

def _count_layers(tensors, pattern: str) -> int:
    found = {int(m.group(1)) for k in tensors if (m := re.fullmatch(pattern, k))}
    return max(found) + 1 if found else 0


def infer_whisper_config(config: dict, tensors: dict) -> dict:
    """`vision_config` with missing sizes filled in from the encoder's tensors."""
    p = PREFIXES["whisper"]
    out = dict(config)
    if p + "conv1.weight" in tensors:
        d, n_mels, _ = tensors[p + "conv1.weight"].shape
        out.setdefault("d_model", d)
        out.setdefault("num_mel_bins", n_mels)
        out.setdefault("encoder_attention_heads", d // 64)
    if p + "embed_positions.weight" in tensors:
        out.setdefault("max_source_positions", tensors[p + "embed_positions.weight"].shape[0])
    if p + "layers.0.fc1.weight" in tensors:
        out.setdefault("encoder_ffn_dim", tensors[p + "layers.0.fc1.weight"].shape[0])
    out.setdefault("encoder_layers", _count_layers(tensors, re.escape(p) + r"layers\.(\d+)\.fc1\.weight"))
    return out


def infer_qwen3_config(config: dict, tensors: dict) -> dict:
    """`text_config` with missing sizes filled in from the LLM's tensors."""
    p = PREFIXES["llm"] + "model."
    out = dict(config)
    if p + "embed_tokens.weight" in tensors:
        vocab, hidden = tensors[p + "embed_tokens.weight"].shape
        out.setdefault("vocab_size", vocab)
        out.setdefault("hidden_size", hidden)
    q, k, norm = (tensors.get(p + f"layers.0.self_attn.{n}.weight") for n in ("q_proj", "k_proj", "q_norm"))
    if norm is not None:
        head_dim = norm.shape[0]
        out.setdefault("head_dim", head_dim)
        if q is not None:
            out.setdefault("num_attention_heads", q.shape[0] // head_dim)
        if k is not None:
            out.setdefault("num_key_value_heads", k.shape[0] // head_dim)
    if p + "layers.0.mlp.gate_proj.weight" in tensors:
        out.setdefault("intermediate_size", tensors[p + "layers.0.mlp.gate_proj.weight"].shape[0])
    out.setdefault("num_hidden_layers",
                   _count_layers(tensors, re.escape(p) + r"layers\.(\d+)\.mlp\.gate_proj\.weight"))
    out.setdefault("tie_word_embeddings", PREFIXES["llm"] + "lm_head.weight" not in tensors)
    out.setdefault("rms_norm_eps", 1e-6)
    if "rope_parameters" not in out and "rope_theta" not in out:
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}  # Qwen3's
    return out


def import_mufun(out, folder, *, mufun_config: str | None = None, dtype: str = "float32") -> ck.Stats:
    """Released MuFun folder -> jaxmusic MuFun checkpoint `out`."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise ck.ConversionError(f"--mufun {folder}: no such folder")
    released = ck._read_config(folder)
    if released.get("model_type") != "tinyllava":
        raise ck.ConversionError(f"{folder / 'config.json'}: model_type is {released.get('model_type')!r}, "
                                 "expected 'tinyllava' (the released MuFun layout)")
    cfg = _mufun_config(mufun_config)
    weights = HFWeights(folder)
    try:
        tensors = weights.tensors
        wconf = infer_whisper_config(released.get("vision_config") or {}, tensors)
        lconf = infer_qwen3_config(released.get("text_config") or {}, tensors)
        n_in = re.fullmatch(r"blp_(\d+)i_(\d+)x", released.get("connector_type", ""))
        if n_in is None:
            raise ck.ConversionError(f"{folder}: connector_type {released.get('connector_type')!r} is not "
                                     "the 'blp_<n>i_<m>x' connector jaxmusic implements")
        if int(n_in.group(1)) != len(cfg.fusion_layers) or int(n_in.group(2)) != cfg.connector_hidden_multiple:
            raise ck.ConversionError(
                f"{folder}: connector_type {n_in.group(0)} needs {n_in.group(1)} fusion layers and hidden "
                f"multiple {n_in.group(2)}; the MuFun config has {list(cfg.fusion_layers)} and "
                f"{cfg.connector_hidden_multiple} (pass --mufun-config)")
        sources = []
        for part, conf in (("whisper", wconf), ("llm", lconf)):
            prefix = PREFIXES[part]
            view = _PrefixView(weights, prefix, lambda k, p=prefix: k.startswith(p))
            sources.append(_source(part, folder, conf, view, ck.part_leaves(part, conf)))
        d_enc, d_llm = wconf["d_model"], lconf["hidden_size"]
        cfg.check_encoder_depth(wconf["encoder_layers"])
        view = _PrefixView(weights, "", lambda k: k.startswith("connector."))
        sources.append(_source("connector", folder, connector_config(cfg, d_enc, d_llm), view,
                               connector_leaves(cfg, d_enc, d_llm)))
        stray = sorted(k for k in tensors if not k.startswith(("vision_tower.", "language_model.", "connector.")))
        if stray:
            raise ck.ConversionError(f"{folder}: {len(stray)} unexpected tensor(s), nothing written: "
                                     + ", ".join(stray[:20]))
        return _write(out, sources, dtype, cfg, released)
    except ValueError as e:
        if isinstance(e, ck.ConversionError):
            raise
        raise ck.ConversionError(f"{folder}: {e}") from None
    finally:
        weights.close()


# ------------------------------------------------------------------------ backbones -> new MuFun

def _fresh_connector(folder: Path, cfg: mufun.MuFunConfig, d_enc: int, d_llm: int, seed: int) -> None:
    """A freshly initialised connector written as a released-layout HF folder (torch layout)."""
    import jax

    params = mufun.init_connector(cfg, jax.random.key(seed), d_enc, d_llm)
    tensors = {}
    for lin in ("linear1", "linear2"):
        tensors[f"connector._connector.{lin}.weight"] = np.ascontiguousarray(np.asarray(params[lin]["kernel"]).T)
        tensors[f"connector._connector.{lin}.bias"] = np.asarray(params[lin]["bias"])
    writer = SafetensorsWriter(folder / "model.safetensors",
                               [(k, dtype_code(v.dtype), v.shape) for k, v in tensors.items()])
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()


def assemble(out, *, whisper, llm, mufun_config: str | None = None, dtype: str = "float32",
             seed: int = 0) -> ck.Stats:
    """A new MuFun from a Whisper HF folder and a Qwen3 HF folder; the connector is initialised
    as `connector_init` in the MuFun config says (documented in configs/mufun.yaml)."""
    cfg = _mufun_config(mufun_config)
    sources = [ck._open_source("whisper", Path(whisper)), ck._open_source("llm", Path(llm))]
    try:
        d_enc = sources[0].hf_config["d_model"]
        d_llm = sources[1].hf_config["hidden_size"]
        try:
            cfg.check_encoder_depth(ck.part_leaves("whisper", sources[0].hf_config)[0].n_layers)
        except ValueError as e:
            raise ck.ConversionError(f"--mufun-config: {e}") from None
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            _fresh_connector(scratch, cfg, d_enc, d_llm, seed)
            conn = HFWeights(scratch)
            sources.append(_source("connector", scratch, connector_config(cfg, d_enc, d_llm), conn,
                                   connector_leaves(cfg, d_enc, d_llm)))
            return _write(Path(out), sources, dtype, cfg, None)
    finally:
        for src in sources:
            src.weights.close()


# ------------------------------------------------------------------------ jaxmusic -> released layout

def export_mufun(ckpt, out, *, max_shard_size: int = 5 * 10**9) -> ck.Stats:
    """jaxmusic MuFun checkpoint -> released-layout folder the PyTorch MuFun code loads."""
    ckpt, out = Path(ckpt), Path(out)
    start_time = time.time()
    meta = ck.read_meta(ckpt)
    missing = [p for p in PREFIXES if p not in meta["parts"]]
    if missing or "mufun" not in meta:
        raise ck.ConversionError(f"{ckpt}: not a whole MuFun checkpoint (missing "
                                 f"{', '.join(missing) or 'mufun config'}); use --part llm|whisper")
    cfg = mufun.MuFunConfig.from_dict(meta["mufun"])
    parts = meta["parts"]
    entries, stores = [], {}
    for part in ("whisper", "llm", "connector"):
        info = parts[part]
        if part == "connector":
            leaves = connector_leaves(cfg, parts["whisper"]["hf_config"]["d_model"],
                                      parts["llm"]["hf_config"]["hidden_size"])
        else:
            leaves = ck.part_leaves(part, info["hf_config"])
        stores.update(ck._open_for_export(ckpt, leaves))
        entries += ck._export_entries(leaves, PREFIXES[part], dtype_code(np.dtype(info["source_dtype"])))
    tmp = ck._staging_dir(out)
    try:
        stats = ck._write_hf_folder(tmp, entries, stores, None, max_shard_size)
        config = dict(meta.get("released_config") or {})
        config.update(model_type="tinyllava", connector_type=parts["connector"]["hf_config"]["connector_type"],
                      hidden_size=parts["llm"]["hf_config"]["hidden_size"],
                      vision_hidden_size=parts["whisper"]["hf_config"]["d_model"],
                      text_config=parts["llm"]["hf_config"], vision_config=parts["whisper"]["hf_config"])
        config.setdefault("architectures", ["TinyLlavaForConditionalGeneration"])
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer = ckpt / parts["llm"].get("tokenizer", "tokenizer/llm")
        if tokenizer.is_dir():
            ck._copy_tokenizer_files(tokenizer, tmp)
        ck._commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stats.seconds = time.time() - start_time
    return stats
