"""Everything jaxmusic writes to disk and reads back, and Hugging Face conversion.

* `format`: the jaxmusic checkpoint folder (`jaxmusic.json` + Orbax `params/` + tokenizers),
  `load_params`, and `staged_folder`, the one way anything here is written (a temp folder
  renamed onto the target when complete);
* `hf_import` / `hf_export`: streamed conversion from and to HF folders (backbones, the
  released MuFun layout), through `streaming` (row-block TensorStore I/O) and `safetensors`;
* `training`: a training stage's checkpoints (Orbax's CheckpointManager).

The public names are re-exported here.
"""

from jaxmusic.checkpoints.format import (CKPT_DTYPES, FORMAT_VERSION, META_FILE, PARAMS_DIR,  # noqa: F401
                                         ConversionError, copy_tokenizer_files, load_params, read_meta,
                                         restore_params, staged_folder, stored_shapes, write_meta)
from jaxmusic.checkpoints.hf_export import export_hf, export_mufun, export_qwen2_audio  # noqa: F401
from jaxmusic.checkpoints.hf_import import (Stats, assemble, import_hf, import_mufun,  # noqa: F401
                                            import_qwen2_audio, import_released)
from jaxmusic.checkpoints.safetensors import SafetensorsError, parse_size  # noqa: F401
