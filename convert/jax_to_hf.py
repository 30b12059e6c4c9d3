"""jaxmusic checkpoint -> Hugging Face folder that `from_pretrained` loads, streamed.

    python convert/jax_to_hf.py CKPT --out HF_DIR [--part mufun|qwen2-audio|llm|whisper] [--whisper-source HF_DIR]
                                [--max-shard-size 5GB]

Tensors are written in the part's original HF dtype (recorded at import), in safetensors
shards of at most --max-shard-size (one `model.safetensors` when everything fits, else
shards plus `model.safetensors.index.json`), with config.json and the tokenizer files.
--part mufun (the default for a whole-MuFun checkpoint) gives the released MuFun layout
that the PyTorch MuFun code loads; --part qwen2-audio (the default for a Qwen2-Audio checkpoint)
the folder transformers' Qwen2AudioForConditionalGeneration loads. --part llm gives a
Qwen3ForCausalLM (or Qwen2ForCausalLM) folder. --part whisper gives the encoder under
WhisperForConditionalGeneration names; with --whisper-source (the original Whisper folder)
its decoder is copied in unchanged, making a complete model. Without it the folder holds
the encoder only: transformers loads it as WhisperForConditionalGeneration with a freshly
initialised decoder (and says so in a warning), fine for using `model.model.encoder`.
Exit codes: 0 done, 1 failure (disk full, ...), 2 bad input (nothing is written).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a source checkout

from jaxmusic.checkpoints import export_hf, export_mufun, export_qwen2_audio, parse_size, read_meta  # noqa: E402
from jaxmusic.checkpoints.streaming import tune_malloc_for_streaming  # noqa: E402
from jaxmusic.errors import run_command  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", metavar="CKPT", help="jaxmusic checkpoint folder")
    parser.add_argument("--out", metavar="HF_DIR", required=True, help="folder to create")
    parser.add_argument("--part", choices=("mufun", "qwen2-audio", "whisper", "llm"),
                        help="what to export (default: a whole model's released layout)")
    parser.add_argument("--whisper-source", metavar="HF_DIR",
                        help="original Whisper folder whose decoder is copied in (--part whisper)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    args = parser.parse_args(argv)
    try:
        max_shard = parse_size(args.max_shard_size)
    except ValueError as e:
        parser.error(str(e))

    def convert():
        glue = read_meta(args.ckpt).get("mufun")
        part = args.part or (None if glue is None else glue.get("layout", "mufun"))
        if part is None:
            parser.error("--part llm|whisper is needed for a checkpoint that is not a whole model")
        if part == "mufun":
            stats = export_mufun(args.ckpt, args.out, max_shard_size=max_shard)
        elif part == "qwen2-audio":
            stats = export_qwen2_audio(args.ckpt, args.out, max_shard_size=max_shard)
        else:
            stats = export_hf(args.ckpt, args.out, part, whisper_source=args.whisper_source,
                              max_shard_size=max_shard)
        print(stats.summary())

    tune_malloc_for_streaming()
    return run_command(convert)


if __name__ == "__main__":
    sys.exit(main())
