"""Checkpoints of a table store: DCP for training, safetensors for inference, and back.

`sources` puts a store, a DCP checkpoint and a safetensors set behind one `TableSource` interface;
`keys` names tensors per layout (engram, per-head, deepseek-v41); `metadata` writes the hashing
metadata tensors. Each checkpoint format is three modules: `<format>_format` the files on disk,
`<format>_export` the writer (a store into that format, through `engram_cli.output`),
`<format>_source` the reader (a `TableSource`): `dcp_*` the training checkpoint, `safetensors_*`
the inference export, whose two layouts `layouts` states. `fp8_format` is the DeepSeek-V4.1 block
quantization, `fp8` and `fp8_kernels` its quantize and dequantize; `tables` the memory-mapped
`EngramTables` read path; `model_config` a DeepSeek-V4.1 folder's config keys (and a model folder
as a spec); `importing` turns any source into a store; `conversion` measures dtype changes;
`output` says what an export may replace; `reports` holds the export and import reports. GGUF
(llama.cpp): `gguf_file` the container, `gguf_format` the Engram keys, `gguf_quants` ggml's types,
`gguf_export` the writer, `gguf_source` the reader.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what `__getattr__` loads on first use, named for type checkers and IDEs
    from .dcp_export import export_training
    from .importing import import_checkpoint
    from .safetensors_export import export_inference
    from .tables import EngramTables

_LAZY = {
    "EngramTables": "tables",
    "export_gguf": "gguf_export",
    "export_inference": "safetensors_export",
    "export_training": "dcp_export",
    "import_checkpoint": "importing",
    "spec_from_model_config": "model_config",
}

__all__ = [
    "EngramTables",
    "export_gguf",
    "export_inference",
    "export_training",
    "import_checkpoint",
    "spec_from_model_config",
]


def __getattr__(name: str) -> object:
    """Load a submodule on first use of one of its names, so that importing this package (for its
    light modules) does not load torch."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
