"""Training data: MuFun manifests -> grain pipeline -> fixed-shape, packable, resumable batches.

See `config` for a stage's data settings, `pipeline` for the stages, determinism, resume and
bad-data rules, `packing` for the batch layout the model consumes, and `check` for
`jaxmusic data check`.
"""

from jaxmusic.data.config import DataConfig
from jaxmusic.data.manifest import BAD_DATA, BUDGET, SKIP_REASONS, ManifestError, ManifestSource
from jaxmusic.data.packing import assemble_batch, segment_attention_mask
from jaxmusic.data.pipeline import (DataError, format_report, iterator_report, make_dataset, report_from_state,
                                    reshard_state)

__all__ = ["DataConfig", "BAD_DATA", "BUDGET", "SKIP_REASONS", "ManifestError",
           "ManifestSource", "assemble_batch", "segment_attention_mask", "DataError", "format_report",
           "iterator_report", "make_dataset", "report_from_state", "reshard_state"]
