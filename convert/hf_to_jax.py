"""Hugging Face safetensors folder(s) -> jaxmusic checkpoint (Orbax), streamed.

    python convert/hf_to_jax.py [--whisper HF_DIR] [--llm HF_DIR] --out CKPT [--dtype float32|bfloat16]
    python convert/hf_to_jax.py --mufun HF_DIR --out CKPT [--mufun-config YAML] [--dtype ...]
    python convert/hf_to_jax.py --qwen2-audio HF_DIR --out CKPT [--mufun-config YAML] [--dtype ...]

--whisper takes a WhisperForConditionalGeneration, WhisperModel or bare WhisperEncoder folder
(only the encoder is kept); --llm a Qwen3ForCausalLM folder. Given both, the result is a new
whole MuFun: the two backbones plus a freshly initialised connector (init and fusion layers
from --mufun-config, default jaxmusic/configs/mufun.yaml); given one, a backbone-only checkpoint.
--mufun imports a released MuFun folder (model_type "tinyllava"); --qwen2-audio a Qwen2-Audio
folder (model_type "qwen2_audio", e.g. Qwen/Qwen2-Audio-7B-Instruct) with the glue settings of
jaxmusic/configs/qwen2_audio.yaml (or --mufun-config). Weights are read from safetensors
only. --dtype is the
checkpoint's parameter dtype: float32 (default, the master weights training updates) or
bfloat16. See `jaxmusic.checkpoints` for the layouts. Exit codes: 0 done, 1 failure
(disk full, ...), 2 bad input (nothing is written).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a source checkout

from jaxmusic.checkpoints import (CKPT_DTYPES, ConversionError, assemble, import_hf, import_mufun,  # noqa: E402
                                  import_qwen2_audio)
from jaxmusic.checkpoints.streaming import tune_malloc_for_streaming  # noqa: E402
from jaxmusic.errors import run_command  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--whisper", metavar="HF_DIR", help="Whisper model folder (encoder kept)")
    parser.add_argument("--llm", metavar="HF_DIR", help="Qwen3ForCausalLM model folder")
    parser.add_argument("--mufun", metavar="HF_DIR", help="released MuFun folder (model_type tinyllava)")
    parser.add_argument("--qwen2-audio", metavar="HF_DIR", help="Qwen2-Audio folder (model_type qwen2_audio)")
    parser.add_argument("--mufun-config", metavar="YAML", help="glue settings (default jaxmusic/configs/mufun.yaml, "
                        "with --qwen2-audio jaxmusic/configs/qwen2_audio.yaml)")
    parser.add_argument("--out", metavar="CKPT", required=True, help="checkpoint folder to create")
    parser.add_argument("--dtype", choices=CKPT_DTYPES, default="float32",
                        help="checkpoint parameter dtype (default float32: training master weights)")
    args = parser.parse_args(argv)

    def convert():
        whole = [name for name in ("mufun", "qwen2_audio") if getattr(args, name)]
        if whole and (args.whisper or args.llm or len(whole) > 1):
            raise ConversionError("--mufun and --qwen2-audio import a whole model; give one, without --whisper/--llm")
        if args.qwen2_audio:
            stats = import_qwen2_audio(args.out, args.qwen2_audio, glue_config=args.mufun_config, dtype=args.dtype)
        elif args.mufun:
            stats = import_mufun(args.out, args.mufun, mufun_config=args.mufun_config, dtype=args.dtype)
        elif args.whisper and args.llm:
            stats = assemble(args.out, whisper=args.whisper, llm=args.llm, mufun_config=args.mufun_config,
                             dtype=args.dtype)
        else:
            stats = import_hf(args.out, whisper=args.whisper, llm=args.llm, dtype=args.dtype)
        print(stats.summary())

    tune_malloc_for_streaming()
    return run_command(convert)


if __name__ == "__main__":
    sys.exit(main())
