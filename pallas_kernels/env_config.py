"""Kernel settings from the environment: a JSON object of a settings dataclass's fields in an
environment variable (for timing a tiling inside the whole model without changing code)."""

from __future__ import annotations

import dataclasses
import json
import os


def dataclass_from_env(cls, variable: str):
    """``cls()`` with the fields of the JSON object in ``$variable``, e.g. ``'{"prefill_kv_tokens": 128}'``;
    a clear error for anything but an object of ``cls``'s fields."""
    text = os.environ.get(variable)
    if not text:
        return cls()
    fields = json.loads(text)
    known = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(fields, dict) or set(fields) - known:
        raise ValueError(f"{variable} must be a JSON object of {cls.__name__} fields ({sorted(known)}), got {text!r}")
    return cls(**fields)
