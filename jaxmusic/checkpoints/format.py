"""The jaxmusic checkpoint folder: what it holds, reading it, and writing it safely.

A checkpoint folder `CKPT/` holds

* `jaxmusic.json`: `{"format": "jaxmusic", "version": 2, "dtype": <checkpoint dtype>,
  "parts": {part: {"hf_config": <the HF config.json dict>, "source_dtype": <dtype of the HF
  weights>, "tokenizer": "tokenizer/<part>"}}}` with `part` in "whisper", "connector", "llm",
  and for a whole MuFun the glue settings under `"mufun"` (`MuFunConfig.to_dict()`);
* `params/`: an Orbax checkpoint (OCDBT + zarr, Orbax's default format) of the pytree
  `{part: nnx.state(model) as a pure dict}`. Plain `orbax.checkpoint` restores it, e.g.
  `ocp.StandardCheckpointer().restore(CKPT/"params", abstract_tree)`; `load_params` does
  it per part and onto given shardings;
* `tokenizer/<part>/`: the tokenizer, generation and preprocessor files of each HF folder
  (one folder per part, since Whisper's and Qwen's files share names).

Every parameter is laid out as its HF tensor (`jaxmusic.models.hf_mapping`). Version 1
checkpoints stored the connector's Linear weights as `kernel [in, out]` and Whisper's
convolutions as `kernel [width, in, out]`; `load_params` reads them into today's layout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from jaxmusic.errors import UserError
from jaxmusic.models.hf_mapping import HFTensor
from jaxmusic.trees import flatten, unflatten

log = logging.getLogger(__name__)

META_FILE = "jaxmusic.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CKPT_DTYPES = ("float32", "bfloat16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "normalizer.json",
                   "generation_config.json", "preprocessor_config.json", "processor_config.json",
                   "chat_template.jinja", "chat_template.json")
# Version 1 parameter names -> (today's name, the axis order that turns the old array into the new).
LEGACY_LAYOUT = {("connector", lin, "kernel"): (("connector", lin, "weight"), (1, 0))
                 for lin in ("linear1", "linear2")}
LEGACY_LAYOUT.update({("whisper", conv, "kernel"): (("whisper", conv, "weight"), (2, 1, 0))
                      for conv in ("conv1", "conv2")})


class ConversionError(UserError, ValueError):
    """A user-facing checkpoint problem (bad inputs, mismatched tensors); nothing was written."""


# --------------------------------------------------------------------------- the backbones

def backbone(part: str):
    """`(config class, model class, hf_tensors)` of a backbone part: "whisper" or "llm"."""
    if part == "whisper":
        from jaxmusic.models import whisper as m
        return m.WhisperEncoderConfig, m.WhisperEncoder, m.hf_tensors
    if part == "llm":
        from jaxmusic.models import qwen3 as m
        return m.Qwen3Config, m.Qwen3ForCausalLM, m.hf_tensors
    raise ValueError(f"unknown backbone {part!r}; expected whisper or llm")


def backbone_shapes(part: str, hf_config: dict) -> tuple[list[HFTensor], dict, int]:
    """A backbone's HF tensors, its parameter shapes `{path: shape}` and its layer count,
    from abstract shapes only (nothing is materialised)."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxmusic.nn import ModelOptions

    config_cls, model_cls, hf_tensors = backbone(part)
    try:
        cfg = config_cls.from_hf(hf_config)
    except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{part}: unusable config: {e}") from None
    abstract = nnx.eval_shape(lambda: model_cls(cfg, ModelOptions(param_dtype=jnp.float32), nnx.Rngs(0)))
    shapes = {tuple(str(k) for k in path): tuple(v.shape) for path, v in nnx.to_flat_state(nnx.state(abstract))}
    specs = hf_tensors(cfg)
    unmapped = set(shapes) - {s.path for s in specs}
    if unmapped:  # a model/mapping bug, not a user error
        raise RuntimeError(f"{part}: state entries without an HF tensor: {sorted(unmapped)}")
    return specs, shapes, cfg.n_layers


def part_leaves(part: str, hf_config: dict):
    """The part's parameter arrays as `streaming.Leaf`s: a backbone's from its HF config, the
    connector's from its released config entry (`mufun.connector_config`)."""
    from jaxmusic.checkpoints.streaming import Leaf
    from jaxmusic.models.mufun import connector_hf_tensors

    if part == "connector":
        kind = "linear" if hf_config.get("connector_type") == "linear" else "mlp"
        try:
            sizes = ("input_size", "output_size") if kind == "linear" else ("input_size", "hidden_size", "output_size")
            d_in, *d_hidden, d_out = (int(hf_config[k]) for k in sizes)
        except (KeyError, TypeError, ValueError) as e:
            raise ConversionError(f"connector: unusable config {hf_config} ({e})") from None
        if kind == "linear":
            shapes = {("linear", "weight"): (d_out, d_in), ("linear", "bias"): (d_out,)}
        else:
            shapes = {("linear1", "weight"): (d_hidden[0], d_in), ("linear1", "bias"): (d_hidden[0],),
                      ("linear2", "weight"): (d_out, d_hidden[0]), ("linear2", "bias"): (d_out,)}
        return [Leaf(part, spec, shapes[spec.path], 0) for spec in connector_hf_tensors(kind)]
    specs, shapes, n_layers = backbone_shapes(part, hf_config)
    return [Leaf(part, s, shapes[s.path], n_layers) for s in specs]


# --------------------------------------------------------------------------- reading

def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path}: missing ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def read_meta(ckpt: str | os.PathLike) -> dict:
    """The checkpoint's `jaxmusic.json` (format version, HF configs, dtypes, tokenizer folders)."""
    path = Path(ckpt) / META_FILE
    if not path.is_file():
        raise ConversionError(f"{ckpt}: not a jaxmusic checkpoint (no {META_FILE})")
    meta = read_json(path, "a jaxmusic checkpoint's metadata")
    if meta.get("format") != "jaxmusic" or meta.get("version") not in READABLE_VERSIONS:
        raise ConversionError(f"{path}: unsupported checkpoint format "
                              f"{meta.get('format')!r} version {meta.get('version')!r}")
    return meta


def stored_shapes(params_dir: str | os.PathLike) -> dict[tuple[str, ...], tuple[int, ...]]:
    """`{tree path: global shape}` of every array of an Orbax params folder (Orbax's metadata)."""
    import jax
    import orbax.checkpoint as ocp
    from etils import epath

    path = Path(params_dir)
    try:
        tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path.absolute())).tree
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ConversionError(f"{path}: unreadable Orbax checkpoint ({type(e).__name__}: {e})") from None
    return {tuple(str(getattr(k, "key", k)) for k in keys): tuple(leaf.shape)
            for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def restore_params(params_dir: str | os.PathLike, abstract: dict) -> dict:
    """Restore the pure-dict tree `abstract` (`jax.ShapeDtypeStruct`s carrying their target
    shardings) from an Orbax params folder, reading version 1 names into today's layout.

    Values are cast to the abstract dtypes while reading; each device reads only its shard.
    Shapes are checked first (Orbax would silently pad or truncate a mismatched one).
    """
    import jax
    import orbax.checkpoint as ocp

    params_dir = Path(params_dir).absolute()
    stored = stored_shapes(params_dir)
    wanted = flatten(abstract)
    legacy = {old: new for old, new in LEGACY_LAYOUT.items() if old in stored and new[0] in wanted}
    read = dict(wanted)
    for old, (new, axes) in legacy.items():
        target = read.pop(new)
        read[old] = jax.ShapeDtypeStruct(tuple(target.shape[a] for a in np.argsort(axes)), target.dtype)
    wrong = [f"{'.'.join(k)}: stored {stored.get(k, 'nothing')}, expected {tuple(a.shape)}"
             for k, a in read.items() if stored.get(k) != tuple(a.shape)]
    if wrong:
        raise ConversionError(f"{params_dir.parent}: parameters do not match the model: " + "; ".join(wrong))
    if legacy:
        log.warning("%s: version 1 layout (connector and convolution kernels); read into today's layout",
                    params_dir.parent)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = unflatten(read)
    shardings = jax.tree.map(lambda a: getattr(a, "sharding", None) or default, target)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target, shardings)
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = flatten(checkpointer.restore(params_dir, args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True)))
    for old, (new, axes) in legacy.items():
        restored[new] = jax.device_put(restored.pop(old).transpose(axes), wanted[new].sharding or default)
    return unflatten(restored)


def load_params(ckpt: str | os.PathLike, part: str, abstract, shardings=None) -> dict:
    """Restore one part's parameters from `CKPT/params` with Orbax, straight onto devices.

    `abstract`: the part's state with `jax.ShapeDtypeStruct` leaves, as an `nnx.State` or a
    pure dict, e.g. `nnx.state(nnx.eval_shape(lambda: Model(cfg, opts, nnx.Rngs(0))))`.
    `shardings`: a matching pytree of `jax.sharding.Sharding` (default: each leaf's own
    `.sharding`, else the first device). Returns a pure dict of `jax.Array`s, e.g. for
    `nnx.replace_by_pure_dict(state, params); model = nnx.merge(graphdef, state)`.
    """
    import jax
    from flax import nnx

    if isinstance(abstract, nnx.State):
        abstract = nnx.to_pure_dict(abstract)
    if shardings is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return restore_params(Path(ckpt) / PARAMS_DIR, {part: abstract})[part]


# --------------------------------------------------------------------------- writing

def refuse_existing(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out} already exists; remove it or choose another --out")


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike, *, replace: bool = False):
    """Yield a fresh folder beside `out` to write into; on success it is renamed onto `out`
    (atomic on one filesystem), on any failure removed, so `out` is never half written.

    An existing non-empty `out` is refused, unless `replace` (then it is swapped out).
    """
    out = Path(out)
    if not replace:
        refuse_existing(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.is_symlink() or out.is_file():
            out.unlink()
        elif out.exists() and replace:
            shutil.rmtree(out)
        elif out.exists():
            out.rmdir()  # checked empty above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def write_meta(folder: Path, parts: dict, dtype: str, **extra) -> None:
    """`jaxmusic.json` of a checkpoint being written; `extra` adds top-level entries (`mufun`, ...)."""
    meta = {"format": "jaxmusic", "version": FORMAT_VERSION, "dtype": dtype, "parts": parts, **extra}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
