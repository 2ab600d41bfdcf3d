"""The zarr v3 "bfloat16" data type, which zarr-python 3.1 does not ship.

The zarr-extensions registry names it "bfloat16": 2 bytes, the upper half of an
IEEE float32, fill values written as JSON numbers. Registering it under that
name (rather than storing raw uint16) lets tensorstore, zarrs and any later
zarr-python read our tables natively. In memory the values are
`ml_dtypes.bfloat16`, the numpy dtype that torch and JAX interoperate with.
Importing this module registers the type; it is idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import ml_dtypes
import numpy as np
from zarr.core.dtype import data_type_registry
from zarr.core.dtype.common import DataTypeValidationError, HasEndianness, HasItemSize
from zarr.core.dtype.npy.common import check_json_float_v3, float_from_json_v3, float_to_json_v3
from zarr.core.dtype.wrapper import ZDType

from ..dtypes import BFLOAT16


@dataclass(frozen=True, kw_only=True)
class BFloat16(ZDType[Any, Any], HasEndianness, HasItemSize):
    """zarr v3 data type "bfloat16" backed by `ml_dtypes.bfloat16`.

    Only little-endian encodings can be held in memory (ml_dtypes has no byte-swapped
    variant), which is what every writer we know of, this one included, produces.
    """

    dtype_cls: ClassVar[type] = type(BFLOAT16)
    _zarr_v3_name: ClassVar[Literal["bfloat16"]] = "bfloat16"
    endianness: Literal["little", "big"] = "little"

    @classmethod
    def from_native_dtype(cls, dtype: Any) -> BFloat16:
        """zarr's hook: this data type for `ml_dtypes.bfloat16`, and only for it."""
        if dtype == BFLOAT16:
            return cls()
        raise DataTypeValidationError(f"{dtype} is not ml_dtypes.bfloat16")

    def to_native_dtype(self) -> np.dtype:
        """zarr's hook: the in-memory dtype, `ml_dtypes.bfloat16` (little-endian only)."""
        if self.endianness == "big":
            raise ValueError("big-endian bfloat16 chunks cannot be decoded: ml_dtypes has no byte-swapped bfloat16")
        return BFLOAT16

    @classmethod
    def _from_json_v2(cls, data: Any) -> BFloat16:
        raise DataTypeValidationError("bfloat16 is a zarr v3 extension data type only")

    @classmethod
    def _from_json_v3(cls, data: Any) -> BFloat16:
        if data == cls._zarr_v3_name:
            return cls()
        raise DataTypeValidationError(f"{data!r} is not 'bfloat16'")

    def to_json(self, zarr_format: int) -> str:  # type: ignore[override]
        """zarr's hook: the name in array metadata, "bfloat16" (zarr v3 only)."""
        if zarr_format != 3:
            raise ValueError("bfloat16 is a zarr v3 extension data type only")
        return self._zarr_v3_name

    def _check_scalar(self, data: object) -> bool:
        return isinstance(data, (int, float, np.floating, np.integer)) and not isinstance(data, bool)

    def cast_scalar(self, data: object) -> Any:
        """zarr's hook: a Python or numpy number as a bfloat16 scalar."""
        if self._check_scalar(data) or isinstance(data, ml_dtypes.bfloat16):
            return ml_dtypes.bfloat16(data)
        raise TypeError(f"cannot cast {data!r} to bfloat16")

    def default_scalar(self) -> Any:
        """zarr's hook: the default fill value, 0."""
        return ml_dtypes.bfloat16(0)

    def from_json_scalar(self, data: Any, *, zarr_format: int) -> Any:
        """zarr's hook: a fill value read from JSON (a number, or a zarr v3 float string)."""
        if check_json_float_v3(data):
            return ml_dtypes.bfloat16(float_from_json_v3(data))
        raise TypeError(f"invalid bfloat16 fill value {data!r}")

    def to_json_scalar(self, data: object, *, zarr_format: int) -> Any:
        """zarr's hook: a fill value as JSON, written like a float32."""
        return float_to_json_v3(np.float32(self.cast_scalar(data)))

    @property
    def item_size(self) -> int:
        """Bytes per element: 2."""
        return 2


def register() -> None:
    """Register "bfloat16" in zarr's data type registry (done on import; registering again is harmless)."""
    data_type_registry.register(BFloat16._zarr_v3_name, BFloat16)


register()
