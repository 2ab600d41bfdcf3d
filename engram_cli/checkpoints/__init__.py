"""Checkpoints of a table store: DCP for training, safetensors for inference, and back.

`sources` puts a store, a DCP checkpoint and a safetensors set behind one `TableSource`
interface; `keys` names tensors per layout (engram, per-head, deepseek-v41); `metadata` writes and
reads the hashing metadata; `dcp` and `safetensors_export` write the two targets;
`safetensors_format` is the file format itself; `fp8*` the DeepSeek-V4.1 block quantization;
`tables` the memory-mapped `EngramTables` read path; `importing` turns any source into a store.
"""

from .dcp import export_training
from .importing import import_checkpoint
from .safetensors_export import export_inference
from .tables import EngramTables

__all__ = ["EngramTables", "export_inference", "export_training", "import_checkpoint"]
