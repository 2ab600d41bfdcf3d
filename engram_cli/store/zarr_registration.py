"""Register engram's zarr data types whenever zarr is loaded in a process that imported engram_cli.

A bfloat16 store (the default dtype) can only be read once zarr knows the data type "bfloat16"
(`zarr_bfloat16`). The store is documented as readable by any zarr reader, so after
`import engram_cli` a plain `zarr.open_array(...)` of a layer must work too, not only engram's own
reads. Importing zarr on `import engram_cli` would do it but costs every CLI start about a second
(`engram plan`, `engram --help` never touch zarr), so instead:

* zarr already loaded: register now.
* zarr not loaded yet: a one-shot finder at the front of `sys.meta_path` waits for the top-level
  `zarr` package; it lets the ordinary finders find it and wraps the loader so that the data type
  is registered right after zarr's own `__init__` has run. Every other loader call (resources,
  `is_package`, ...) goes to zarr's loader unchanged.

Why not a `zarr.data_type` entry point: zarr 3.1 collects those entry points into its data type
registry's lazy-load list but never loads them (nothing calls `DataTypeRegistry._lazy_load`), so
an installed entry point alone leaves "bfloat16" unknown.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

ZARR = "zarr"


def register_data_types() -> None:
    """Register the data types in zarr's registry now (imports zarr; registering again is harmless)."""
    importlib.import_module(".zarr_bfloat16", __package__)


def register_when_zarr_loads() -> None:
    """Register now if zarr is loaded, else as soon as it is; cheap and idempotent."""
    if ZARR in sys.modules:
        register_data_types()
    elif not any(isinstance(finder, _ZarrFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _ZarrFinder())


class _ZarrFinder(MetaPathFinder):
    """Finds nothing itself: hands zarr's own spec back with a loader that registers after loading."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != ZARR:
            return None
        sys.meta_path.remove(self)  # one shot; the finders below find zarr's real spec
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


class _RegisteringLoader(Loader):
    """zarr's loader, registering engram's data types once zarr's `__init__` has run."""

    def __init__(self, loader: Loader) -> None:
        self._loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        register_data_types()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)
