"""How much memory a configuration needs, counted without allocating it.

* :mod:`.counting`: what autograd keeps for backward (:func:`count_saved`), what is alive at once
  (:class:`LiveBytes`), CUDA's autocast rules on fake tensors, and the GPU margin (:func:`with_margin`);
* :mod:`.estimates`: the autoencoder's and the diffusion UNet's training steps;
* :mod:`.pipeline`: every later phase on whole volumes (validation, latent cache, diffusion, sampling);
* :mod:`.budget`: the configurations that fit a GPU, and the YAML file written for the best one;
* :mod:`.report`: the tables ``estimate_memory.py`` prints.

Measuring a real training step to compare with lives in ``monai_diffusion.training.measure``.
"""

from monai_diffusion.memory.budget import (
    DEFAULT_FACTOR_OPTIONS,
    PATCH_FRACTIONS,
    Candidate,
    candidate_config,
    parse_budget,
    patch_options,
    search_budget,
    write_for_budget,
)
from monai_diffusion.memory.counting import (
    CUDA_CONTEXT_BYTES,
    CUDA_FP32_OPS,
    CUDA_FP32_UNLESS_DTYPE_OPS,
    CUDA_RESERVED_BYTES,
    FRAGMENTATION,
    GB,
    WORKSPACE_BYTES,
    CudaAutocastRules,
    LiveBytes,
    SavedTensors,
    count_saved,
    format_bytes,
    margin_text,
    with_margin,
)
from monai_diffusion.memory.counting import (
    _autocast as _autocast,  # the tests run real tensors under the same rules
)
from monai_diffusion.memory.estimates import (
    DiffusionEstimate,
    LevelRow,
    MemoryEstimate,
    ddp_world_size,
    estimate_autoencoder,
    estimate_diffusion,
    training_batch,
)
from monai_diffusion.memory.pipeline import PhaseEstimate, estimate_autoencoder_inference, estimate_pipeline
from monai_diffusion.memory.report import candidates_table, pipeline_report, report, settings_table

__all__ = [
    "SavedTensors", "count_saved", "LiveBytes", "CudaAutocastRules", "CUDA_FP32_OPS", "CUDA_FP32_UNLESS_DTYPE_OPS",
    "GB", "FRAGMENTATION", "WORKSPACE_BYTES", "CUDA_CONTEXT_BYTES", "CUDA_RESERVED_BYTES", "with_margin",
    "margin_text", "format_bytes",
    "LevelRow", "MemoryEstimate", "estimate_autoencoder", "DiffusionEstimate", "estimate_diffusion", "training_batch",
    "ddp_world_size",
    "PhaseEstimate", "estimate_autoencoder_inference", "estimate_pipeline",
    "Candidate", "DEFAULT_FACTOR_OPTIONS", "PATCH_FRACTIONS", "patch_options", "search_budget", "parse_budget",
    "candidate_config", "write_for_budget",
    "report", "settings_table", "candidates_table", "pipeline_report",
]
