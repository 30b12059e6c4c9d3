"""Qwen2-Audio (Chu et al. 2024, arXiv 2407.10759) as a configuration of `jaxmusic.models.mufun`,
and its released Hugging Face layout.

There is no Qwen2-Audio module: `MuFun` with the settings of `jaxmusic/configs/qwen2_audio.yaml`
(pooling "pool_then_norm" with kernel 2, connector "linear", prompt template "chatml") and a
Qwen2 LLM config (`model_type: qwen2`, which switches the decoder to q/k/v biases without q/k
norms) computes transformers' `Qwen2AudioForConditionalGeneration` on 30 s chunks.

The released layout (`model_type: "qwen2_audio"`; Qwen/Qwen2-Audio-7B(-Instruct), and what
transformers 5's `save_pretrained` writes) keeps every tensor as it is here under three
prefixes: the Whisper-style encoder under `audio_tower.`, the projector's one Linear under
`multi_modal_projector.linear.`, the Qwen2 LM (`model.*`, `lm_head.weight`) under
`language_model.`. Its `config.json` nests the parts' configs as `audio_config` and
`text_config`; sizes it leaves out are transformers' `Qwen2AudioConfig` defaults.
"""

from __future__ import annotations

from pathlib import Path

from jaxmusic.models.mufun import MuFunConfig

MODEL_TYPE = "qwen2_audio"
RELEASED_PREFIXES = {"whisper": "audio_tower.", "connector": "multi_modal_projector.", "llm": "language_model."}
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "qwen2_audio.yaml"


def glue_config(path: str | Path | None = None) -> MuFunConfig:
    """Qwen2-Audio's glue settings (default `jaxmusic/configs/qwen2_audio.yaml`)."""
    return MuFunConfig.from_yaml(path or DEFAULT_CONFIG)


def part_configs(released: dict) -> dict[str, dict]:
    """The complete HF configs of the encoder (`audio_config`) and the LLM (`text_config`,
    `model_type: qwen2`) of a released `config.json`, transformers' defaults filled in."""
    from transformers import Qwen2AudioConfig

    full = Qwen2AudioConfig(**{k: v for k, v in released.items() if k != "model_type"}).to_dict()
    return {"whisper": full["audio_config"], "llm": full["text_config"]}


def released_config(whisper_hf: dict, llm_hf: dict, base: dict | None = None) -> dict:
    """The `config.json` of a released-layout folder, over `base` (the imported folder's, which
    keeps fields such as `audio_token_index`; transformers' defaults without one)."""
    from transformers import Qwen2AudioConfig

    config = dict(base) if base else Qwen2AudioConfig().to_dict()
    config.update(model_type=MODEL_TYPE, audio_config=whisper_hf, text_config=llm_hf)
    config.setdefault("architectures", ["Qwen2AudioForConditionalGeneration"])
    return config
