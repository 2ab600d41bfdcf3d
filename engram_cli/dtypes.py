"""One registry of the element types engram reads and writes, under every name each format uses.

A table dtype has one engram name ("float32", "bfloat16", "float16"), which is also its zarr v3
data type name and its torch attribute name; safetensors headers spell it "F32", "BF16", "F16".
In memory, numpy holds bfloat16 as `ml_dtypes.bfloat16` and the fp8 types as their ml_dtypes
counterparts, the dtypes torch and JAX interoperate with. torch is imported only when a torch
dtype is asked for, so that commands which never touch torch do not pay for loading it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import ml_dtypes
import numpy as np

if TYPE_CHECKING:
    import torch

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


@dataclass(frozen=True)
class DType:
    """An element type: engram's name, bytes per element, and its safetensors and numpy forms."""

    name: str  # engram's name; also the torch attribute and, for table dtypes, the zarr v3 name
    itemsize: int
    safetensors: str
    numpy: np.dtype

    @property
    def torch(self) -> torch.dtype:
        """The torch dtype (torch is imported on first use)."""
        import torch

        dtype: torch.dtype = getattr(torch, self.name)
        return dtype


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("float32", 4, "F32", np.dtype(np.float32)),
        DType("bfloat16", 2, "BF16", BFLOAT16),
        DType("float16", 2, "F16", np.dtype(np.float16)),
        DType("float64", 8, "F64", np.dtype(np.float64)),
        DType("float8_e4m3fn", 1, "F8_E4M3", np.dtype(ml_dtypes.float8_e4m3fn)),
        DType("float8_e5m2", 1, "F8_E5M2", np.dtype(ml_dtypes.float8_e5m2)),
        DType("float8_e8m0fnu", 1, "F8_E8M0", np.dtype(ml_dtypes.float8_e8m0fnu)),
        DType("int64", 8, "I64", np.dtype(np.int64)),
        DType("int32", 4, "I32", np.dtype(np.int32)),
        DType("int16", 2, "I16", np.dtype(np.int16)),
        DType("int8", 1, "I8", np.dtype(np.int8)),
        DType("uint8", 1, "U8", np.dtype(np.uint8)),
        DType("bool", 1, "BOOL", np.dtype(np.bool_)),
    )
}
SAFETENSORS: dict[str, DType] = {d.safetensors: d for d in DTYPES.values()}

# What a table store holds, and what its values can be exported as.
StoreDType = Literal["float32", "bfloat16", "float16"]
InferenceDType = Literal["float32", "bfloat16", "float16", "float8_e4m3fn"]
STORE_DTYPES: tuple[StoreDType, ...] = get_args(StoreDType)
INFERENCE_DTYPES: tuple[InferenceDType, ...] = get_args(InferenceDType)
DTYPE_BYTES: dict[str, int] = {name: DTYPES[name].itemsize for name in STORE_DTYPES}


def numpy_dtype(name: str) -> np.dtype:
    """The in-memory numpy dtype of a dtype name ("bfloat16" is `ml_dtypes.bfloat16`)."""
    return DTYPES[name].numpy


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype name."""
    return DTYPES[name].torch


def from_torch(dtype: torch.dtype) -> DType:
    """The registry entry of a torch dtype (`torch.bfloat16` -> "bfloat16")."""
    return DTYPES[str(dtype).removeprefix("torch.")]


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A numpy table block as a torch tensor without copying (ml_dtypes bfloat16 included)."""
    import torch

    if array.dtype == BFLOAT16:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """The inverse of `to_torch`: bfloat16 comes back as ml_dtypes.bfloat16, what stores hold."""
    import torch

    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(BFLOAT16)
    return tensor.numpy()
