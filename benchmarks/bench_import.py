"""engram import of a DCP checkpoint, with the zip CRC-32 of every item checked, against the same
import through DCP's plain `FileSystemReader` (no check), interleaved in the same run.

The store is the demo spec with its head sizes scaled by `--scale` (10: 259 MB of bfloat16),
exported once with `engram export --for training`; each repeat imports it into a fresh store.

    .venv/bin/python benchmarks/bench_import.py [--scale 10] [--repeats 5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engram_cli.checkpoints.dcp_format as dcp_format
from engram_cli.checkpoints.dcp_export import export_training
from engram_cli.checkpoints.importing import import_checkpoint
from engram_cli.spec import load_spec
from engram_cli.store.build import build_tables
from torch.distributed.checkpoint import FileSystemReader

from common import interleaved, markdown_table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-import-", dir=args.workdir))
    try:
        spec = load_spec("demo").scaled(args.scale)
        build_tables(spec, root / "store.zarr")
        export_training(root / "store.zarr", root / "ckpt")
        size = sum(p.stat().st_size for p in (root / "ckpt").iterdir())
        verified = dcp_format._verified_reader
        count = iter(range(1 << 30))

        def run(reader: object) -> None:
            dcp_format._verified_reader = reader  # type: ignore[assignment]
            out = root / f"back-{next(count)}"
            import_checkpoint(root / "ckpt", out, trust_pickle=True)
            shutil.rmtree(out)

        medians = interleaved(
            {
                "DCP's FileSystemReader, no check (baseline)": lambda: run(FileSystemReader),
                "engram import, CRC-32 of every item checked": lambda: run(verified),
            },
            args.repeats,
        )
        base = next(iter(medians.values()))
        rows = [
            [name, f"{size / 1e6:.0f}", f"{s:.3f}", f"{size / 1e6 / s:.0f}", f"{s / base:.2f}x"]
            for name, s in medians.items()
        ]
        print(markdown_table(["import", "checkpoint MB", "median s", "MB/s", "time vs baseline"], rows))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
