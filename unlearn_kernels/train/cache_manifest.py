"""The reference cache's ``manifest.json``: its schema, and how each field is held to the data.

A manifest is read as untrusted input. It must match :class:`Manifest` exactly (strict types,
no missing and no unknown keys) and hang together (shard ``i`` is ``shard-{i:05d}.safetensors``
in the cache directory — no other path is ever opened — the shards cover the examples in order,
and their counts add up). Every field that changes what the data mean is held to something
outside the manifest:

- the **header** (:data:`HEADER_FIELDS`: format, version, ``build_id``, settings, fingerprints,
  ``hidden_size``, ``vocab_size``, ``n_examples``, ``n_rows``) is also written into every
  shard's safetensors metadata, and the two must be equal (an edited manifest, or a cache
  rebuilt under an open reader — a new random ``build_id`` — is refused, naming the fields);
- each shard entry: ``n_examples``/``n_rows``/``tensor_bytes`` against the shapes in the shard's
  own header, ``bytes`` against the file size, ``sha256`` against the content (first read).

``max_shard_bytes``, ``peak_buffered_bytes`` and ``build_seconds`` describe the build only;
they are type- and range-checked but change nothing that is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

CACHE_FORMAT = "unlearn-kernels/reference-cache"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"
#: The manifest fields mirrored in every shard.
HEADER_FIELDS = (
    "format",
    "version",
    "build_id",
    "settings",
    "fingerprint",
    "hidden_size",
    "vocab_size",
    "n_examples",
    "n_rows",
)

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Count = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(ge=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SettingsRecord(_Strict):
    """:class:`~unlearn_kernels.train.reference_cache.CacheSettings` as stored."""

    topk: Count
    temperature: float
    store_hidden: bool
    store_label_logprob: bool
    hidden_dtype: Literal["float32", "bfloat16", "float16"]


class ModelFingerprint(_Strict):
    structure: Sha256
    weights: Sha256
    weights_hash: Literal["full", "sample"]
    config: Sha256
    n_parameters: Count


class DataFingerprint(_Strict):
    content_sha256: Sha256
    source_sha256: Sha256 | None
    n_examples: Positive


class Fingerprint(_Strict):
    model: ModelFingerprint
    data: DataFingerprint
    tokenizer: Sha256 | None


class ShardRecord(_Strict):
    file: str
    first_example: Count
    n_examples: Positive
    n_rows: Count
    tensor_bytes: Positive
    bytes: Positive
    sha256: Sha256


class Manifest(_Strict):
    format: Literal["unlearn-kernels/reference-cache"]
    version: Literal[2]
    build_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
    settings: SettingsRecord
    fingerprint: Fingerprint
    hidden_size: Positive
    vocab_size: Positive
    n_examples: Positive
    n_rows: Count
    max_shard_bytes: Positive
    peak_buffered_bytes: Positive
    build_seconds: Annotated[float, Field(ge=0)]
    shards: Annotated[list[ShardRecord], Field(min_length=1)]


def header(manifest: dict[str, Any]) -> dict[str, Any]:
    """The :data:`HEADER_FIELDS` of a manifest (as plain JSON values)."""
    return {key: manifest[key] for key in HEADER_FIELDS}


def header_text(manifest: dict[str, Any]) -> str:
    """The header as canonical JSON: what each shard's metadata holds."""
    return json.dumps(header(manifest), sort_keys=True)


def differing_fields(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the leaves where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            path = f"{prefix}.{key}" if prefix else key
            out += (
                differing_fields(a.get(key), b.get(key), path) if key in a and key in b else [path]
            )
        return out
    return [] if a == b and type(a) is type(b) else [prefix or "(whole value)"]


def _field_error(file: Path, err: ValidationError) -> ValueError:
    problems = []
    for item in err.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        problems.append(f"field {where}: {item['msg']}")
    return ValueError(f"{file} is not a valid reference-cache manifest: {'; '.join(problems)}")


def read_manifest(file: Path) -> dict[str, Any]:
    """``file`` parsed and validated against :class:`Manifest`, its shard names checked;
    returns the plain JSON dict. Every failure is a ``ValueError`` naming the field."""
    try:
        payload = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); rebuild the cache") from err
    if isinstance(payload, dict) and payload.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{file} field version: {payload.get('version')!r} is not format version "
            f"{FORMAT_VERSION} of {CACHE_FORMAT}; rebuild the cache"
        )
    try:
        manifest = Manifest.model_validate(payload)
    except ValidationError as err:
        raise _field_error(file, err) from None
    for i, shard in enumerate(manifest.shards):
        if shard.file != SHARD_PATTERN.format(i):
            raise _refuse(
                file,
                f"shards.{i}.file",
                f"{shard.file!r} is not {SHARD_PATTERN.format(i)!r} (shards are named by "
                "position inside the cache directory; no other path is opened)",
            )
    return payload


def _refuse(file: Path, field: str, message: str) -> ValueError:
    return ValueError(f"{file} field {field}: {message}; rebuild the cache")


def check_consistency(file: Path, payload: dict[str, Any]) -> None:
    """The shards of a validated manifest cover its examples in order and add up to its
    counts (run after each shard was checked against its own entry, so that the error names
    the edited field)."""
    m = Manifest.model_validate(payload)

    def refuse(field: str, message: str) -> ValueError:
        return _refuse(file, field, message)

    next_example = 0
    for i, shard in enumerate(m.shards):
        if shard.first_example != next_example:
            raise refuse(
                f"shards.{i}.first_example",
                f"{shard.first_example} does not follow the previous shards ({next_example})",
            )
        next_example += shard.n_examples
    if next_example != m.n_examples:
        raise refuse(
            "shards", f"the shards hold {next_example} examples, n_examples says {m.n_examples}"
        )
    n_rows = sum(s.n_rows for s in m.shards)
    if n_rows != m.n_rows:
        raise refuse("shards", f"the shards hold {n_rows} rows, n_rows says {m.n_rows}")
    if m.fingerprint.data.n_examples != m.n_examples:
        raise refuse(
            "fingerprint.data.n_examples",
            f"{m.fingerprint.data.n_examples} but the cache holds {m.n_examples} examples",
        )
    if m.settings.topk > m.vocab_size:
        raise refuse("settings.topk", f"{m.settings.topk} exceeds vocab_size {m.vocab_size}")
