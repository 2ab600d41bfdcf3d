"""Training checkpoints (torch.distributed.checkpoint) of a store, and `engram import` back.

`export_training` writes what N training ranks would have written with DCP: every table is one
logical (rows, dim) tensor saved as N row pieces, each piece in its own `__i_0.distcp` file as
chunks of at most 32 MiB, plus a `.metadata` that DCP's resharding reads. It drives DCP's own
`FileSystemWriter` in one process with no process group, one chunk in memory at a time (and the
next one being read), whatever the piece size; any world size then loads it (`dcp.load` into
plain tensors, or into `Shard(0)` DTensors on M ranks).
The hashing metadata rides along as small tensors under `engram.*`, so training code can
rebuild the hasher from the checkpoint alone.

`import_checkpoint` turns such a checkpoint, or an inference export (either layout), back into a
store. DCP metadata is a pickle: it is only read with `trust_pickle`.
"""

from __future__ import annotations

import string

from ..errors import EngramError

DEFAULT_KEY_TEMPLATE = "model.layers.{layer_id}.engram.multi_head_embedding.embedding.weight"
DEFAULT_HEAD_TEMPLATE = "model.layers.{layer_id}.engram.multi_head_embedding.embeddings.{head}.weight"
_TEMPLATE_FIELDS = {"layer_id", "head", "order", "order_head"}


def check_key_template(template: str, *, per_head: bool) -> list[str]:
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise EngramError(f"bad key template {template!r}: {exc}") from None
    unknown = sorted(set(names) - _TEMPLATE_FIELDS)
    if unknown or any(not n for n in names):
        raise EngramError(
            f"key template {template!r} has unknown field {{{unknown[0] if unknown else ''}}}; "
            f"allowed: {{layer_id}}, and with --per-head {{head}}, {{order}}, {{order_head}}"
        )
    if "layer_id" not in names:
        raise EngramError(f"key template {template!r} needs {{layer_id}} so that layers get distinct keys")
    if per_head and "head" not in names and not {"order", "order_head"} <= set(names):
        raise EngramError(f"a --per-head key template needs {{head}} (or {{order}} and {{order_head}}): {template!r}")
    if not per_head and set(names) - {"layer_id"}:
        raise EngramError(f"key template {template!r} uses head fields; pass --per-head for one tensor per head")
    return names


DEEPSEEK_WEIGHT = "layers.{layer_id}.engram.embed.weight"
DEEPSEEK_SCALE = "layers.{layer_id}.engram.embed.scale"


def scale_key(weight_key: str) -> str:
    """Where the E8M0 scales of an fp8 weight live: `...weight` -> `...scale`."""
    return weight_key[: -len("weight")] + "scale" if weight_key.endswith("weight") else weight_key + ".scale"


def meta_keys(layer_id: int) -> dict[str, str]:
    return {part: f"engram.layers.{layer_id}.{part}" for part in ("head_sizes", "offsets", "multipliers")}
