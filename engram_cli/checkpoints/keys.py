"""Tensor key names of checkpoints, per layout.

The engram training template names one tensor per layer (default
`model.layers.{layer_id}.engram.multi_head_embedding.embedding.weight`), or with `--per-head` one
per head (`{head}`, or `{order}` and `{order_head}`; default `...embeddings.{head}.weight`);
DeepSeek-V4.1-Flash's names are fixed (`layers.{L}.engram.embed.weight` and `.scale`, which a
model saved by transformers prefixes with `model.` or `model.language_model.`); the E8M0
scales of an fp8 weight sit beside it (`...weight` -> `...scale`); the hashing metadata of a layer
lives under `engram.layers.{L}.head_sizes`, `.offsets` and `.multipliers`.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from typing import Literal

from ..errors import UsageError

# The two inference layouts (`layouts` states them); here, with the key names, so that the CLI
# can offer them as choices without loading torch.
Layout = Literal["engram", "deepseek-v41"]
# What `export --for inference` writes: a safetensors layout, or a GGUF file in one of ggml's types.
ExportLayout = Literal["engram", "deepseek-v41", "gguf"]
GgufQuant = Literal["q8_0", "q4_0", "bf16", "f16", "f32"]

DEFAULT_KEY_TEMPLATE = "model.layers.{layer_id}.engram.multi_head_embedding.embedding.weight"
DEFAULT_HEAD_TEMPLATE = "model.layers.{layer_id}.engram.multi_head_embedding.embeddings.{head}.weight"
_TEMPLATE_FIELDS = {"layer_id", "head", "order", "order_head"}


def check_key_template(template: str, *, per_head: bool) -> list[str]:
    """The field names of a key template, or a one-line error when it cannot name every tensor apart.

    `{layer_id}` is required; `per_head` templates also need `{head}` (or `{order}` and
    `{order_head}`), and only they may use head fields. Fields are plain `{field}`s: a format
    spec or conversion (`{layer_id:>9}`, `{layer_id!r}`) could pad names to any length or make
    two layers' names equal.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise UsageError(f"bad key template {template!r}: {exc}") from None
    for _, name, spec, conversion in parsed:
        if name is not None and (spec or conversion):
            written = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise UsageError(
                f"key template {template!r}: field {written} has a format spec or conversion; write plain {{{name}}}"
            )
    names = [name for _, name, _, _ in parsed if name is not None]
    unknown = sorted(set(names) - _TEMPLATE_FIELDS)
    if unknown or any(not n for n in names):
        raise UsageError(
            f"key template {template!r} has unknown field {{{unknown[0] if unknown else ''}}}; "
            f"allowed: {{layer_id}}, and with --per-head {{head}}, {{order}}, {{order_head}}"
        )
    if "layer_id" not in names:
        raise UsageError(f"key template {template!r} needs {{layer_id}} so that layers get distinct keys")
    if per_head and "head" not in names and not {"order", "order_head"} <= set(names):
        raise UsageError(f"a --per-head key template needs {{head}} (or {{order}} and {{order_head}}): {template!r}")
    if not per_head and set(names) - {"layer_id"}:
        raise UsageError(f"key template {template!r} uses head fields; pass --per-head for one tensor per head")
    return names


def check_distinct_keys(keys: dict[str, str], reserved: Iterable[str], where: str) -> None:
    """Refuse tensor names (`keys`: what it holds -> name) that repeat, or that take the name
    of a metadata tensor (`reserved`): one would silently replace the other in the file."""
    seen: dict[str, str] = {}
    for what, key in keys.items():
        if key in seen:
            raise UsageError(f"{where}: {seen[key]} and {what} would both be named {key!r}")
        seen[key] = what
    taken = sorted(set(seen) & set(reserved))
    if taken:
        raise UsageError(f"{where}: {seen[taken[0]]} would be named {taken[0]!r}, the name of engram's own metadata")


def head_key(template: str, layer_id: int, head: int, heads_per_order: int) -> str:
    """The key of one head's tensor under a per-head template: heads count order-major, and
    `{order}` is the n-gram order (2 for bigrams), `{order_head}` the head within it."""
    order, order_head = divmod(head, heads_per_order)
    return template.format(layer_id=layer_id, head=head, order=order + 2, order_head=order_head)


def piece_names(pieces: Iterable[tuple[int, str, int, int]]) -> dict[str, str]:
    """(layer, key, start, stop) of tensors holding rows of a layer as `check_distinct_keys` takes
    them: `layer L rows A-B` -> key."""
    return {f"layer {layer} rows {start}-{stop - 1}": key for layer, key, start, stop in pieces}


DEEPSEEK_WEIGHT = "layers.{layer_id}.engram.embed.weight"
DEEPSEEK_SCALE = "layers.{layer_id}.engram.embed.scale"
# Where a model folder's writer puts those names: the released checkpoint has none of these
# prefixes; transformers' save_pretrained writes `model.` for a text model and `model.language_model.`
# for a composite (vision-language) one, whose older layout was `language_model.model.`.
DEEPSEEK_PREFIXES = ("", "model.", "model.language_model.", "language_model.model.")


def scale_key(weight_key: str) -> str:
    """Where the E8M0 scales of an fp8 weight live: `...weight` -> `...scale`."""
    return weight_key[: -len("weight")] + "scale" if weight_key.endswith("weight") else weight_key + ".scale"


META_KEY = "engram.meta"  # DCP only: the export's own description, UTF-8 JSON in uint8
LOOKUP_KEY = "engram.projection.lookup"  # int64 (vocab_size,): the projection
TOKENIZER_ZIP_KEY = "engram.projection.tokenizer_zip"  # uint8: the deflated tokenizer.json


def meta_keys(layer_id: int) -> dict[str, str]:
    """The keys of one layer's hashing metadata tensors: head_sizes, offsets and multipliers."""
    return {part: f"engram.layers.{layer_id}.{part}" for part in ("head_sizes", "offsets", "multipliers")}


def metadata_keys(layer_ids: Iterable[int]) -> set[str]:
    """Every name engram's own metadata tensors take in an export of these layers."""
    names = {META_KEY, LOOKUP_KEY, TOKENIZER_ZIP_KEY}
    for layer_id in layer_ids:
        names.update(meta_keys(layer_id).values())
    return names
