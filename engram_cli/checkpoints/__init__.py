"""Checkpoints of a table store: DCP for training, safetensors for inference, and back.

`sources` puts a store, a DCP checkpoint and a safetensors set behind one `TableSource`
interface; `keys` names tensors per layout (engram, per-head, deepseek-v41); `metadata` writes the
hashing metadata tensors; `dcp` is the training checkpoint (its format, the export and the reader);
`layouts` states the two inference layouts, which `safetensors_export` writes; `safetensors_format`
is the file format itself; `fp8_format` the DeepSeek-V4.1 block quantization, `fp8` and
`fp8_kernels` its quantize and dequantize; `tables` the memory-mapped `EngramTables` read path;
`safetensors_source` reads an export back; `importing` turns any source into a store;
`conversion` measures dtype changes; `output` puts finished outputs in place; `reports` holds the
export and import reports.
"""

from .dcp import export_training
from .importing import import_checkpoint
from .safetensors_export import export_inference
from .tables import EngramTables

__all__ = ["EngramTables", "export_inference", "export_training", "import_checkpoint"]
