"""One serialisation of a method's frozen config for file headers, and its reader.

A file's header holds the whole config once, as JSON under ``concept_guard.config`` (field names as in the
dataclass), plus a few ``concept_guard.<field>`` summary keys for people and tools that show flat metadata.
:func:`config_from_metadata` rebuilds the dataclass from a header (lists come back as tuples).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from .errors import ConceptGuardError

CONFIG_KEY = "concept_guard.config"
T = TypeVar("T")


def _flat(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple | list):
        return ", ".join(str(v) for v in value)
    return str(value)


def config_metadata(
    cfg: object, *, summary: Iterable[str] = (), omit: Iterable[str] = (), extra: Mapping[str, object] = ()
) -> dict[str, str]:
    """Header entries for ``cfg``: the JSON config (``omit`` fields left out, ``extra`` entries added) and the
    ``summary`` fields as flat ``concept_guard.<field>`` strings."""
    fields = dataclasses.asdict(cfg)
    omitted = set(omit)
    config = {k: v for k, v in fields.items() if k not in omitted} | dict(extra)
    meta = {f"concept_guard.{k}": _flat(fields[k]) for k in summary}
    meta[CONFIG_KEY] = json.dumps(config, sort_keys=True)
    return meta


def config_from_metadata(cls: type[T], metadata: Mapping[str, str], **overrides: Any) -> T:
    """Rebuild a config dataclass ``cls`` from a header written by :func:`config_metadata`.

    Args:
        cls: the config class (e.g. ``ESDConfig``).
        metadata: the file's header (``safe_open(...).metadata()``).
        overrides: fields to set that the header leaves out (e.g. the secret trigger words).

    Raises:
        ConceptGuardError: the header has no ``concept_guard.config`` entry or it does not fit ``cls``.
    """
    raw = metadata.get(CONFIG_KEY)
    if raw is None:
        raise ConceptGuardError(
            f"The file's metadata has no {CONFIG_KEY!r} entry; it was not written by Concept Guard."
        )
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConceptGuardError(f"The file's {CONFIG_KEY!r} entry is not valid JSON: {e}") from e
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
    try:
        return cls(**{**values, **overrides})
    except TypeError as e:
        raise ConceptGuardError(f"The file's {CONFIG_KEY!r} entry does not fit {cls.__name__}: {e}") from e
