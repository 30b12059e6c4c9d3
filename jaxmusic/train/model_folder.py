"""A finished stage's result as a jaxmusic checkpoint folder: `STAGE_DIR/model/`.

`jaxmusic ask/score/eval` and `convert/jax_to_hf.py` take jaxmusic checkpoints (see
`jaxmusic.checkpoints.format`); a stage's Orbax steps hold the same parameter tree but no
`jaxmusic.json` or tokenizer. When a stage ends the trainer writes

    model/jaxmusic.json    complete HF configs of the parts, the MuFun glue settings
    model/tokenizer/llm/   a copy of the stage's tokenizer (data.tokenizer)
    model/params           a relative link to ../checkpoints/STEP/params (the final step,
                           which the keep-last policy never deletes), so nothing is copied

so `jaxmusic ask WORKDIR/STAGE/model ...` works right away.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from jaxmusic.checkpoints import PARAMS_DIR, staged_folder, write_meta
from jaxmusic.models.mufun import MuFunConfig, connector_config
from jaxmusic.train.config import StageConfig

MODEL_DIR = "model"


def _hf_configs(stage: StageConfig) -> dict[str, dict]:
    """Complete HF config dicts (defaults filled in by transformers), as a conversion stores them."""
    from transformers import Qwen2Config, Qwen3Config, WhisperConfig

    llm = dict(stage.model.llm)
    llm_class = Qwen2Config if llm.pop("model_type", "qwen3") == "qwen2" else Qwen3Config
    return {"whisper": WhisperConfig(**stage.model.whisper).to_dict(), "llm": llm_class(**llm).to_dict()}


def write_model_folder(stage_dir: Path, stage: StageConfig, step: int) -> Path:
    """Write (or refresh) `stage_dir/model` for checkpoint `step`; returns the folder."""
    cfg = MuFunConfig.from_dict(stage.model.mufun)
    hf = _hf_configs(stage)
    dtype = stage.model.param_dtype
    parts = {part: {"hf_config": hf[part], "source_dtype": dtype} for part in ("whisper", "llm")}
    parts["connector"] = {"hf_config": connector_config(cfg, hf["whisper"]["d_model"], hf["llm"]["hidden_size"]),
                          "source_dtype": dtype}
    out = stage_dir / MODEL_DIR
    with staged_folder(out, replace=True) as tmp:
        if stage.data.tokenizer:
            shutil.copytree(stage.data.tokenizer, tmp / "tokenizer" / "llm")
            parts["llm"]["tokenizer"] = "tokenizer/llm"
        write_meta(tmp, parts, dtype, mufun=cfg.to_dict(), trained={"stage": stage.name, "step": step})
        os.symlink(Path("..") / "checkpoints" / str(step) / PARAMS_DIR, tmp / PARAMS_DIR)
    return out
