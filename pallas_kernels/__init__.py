"""Attention backends: picks the attention and KV-write functions the model calls.

Owns only the choice between the pure-jnp reference and the Pallas GPU kernel; the
functions themselves live in ``ragged_paged_attention``. Knows nothing of models.
"""

from __future__ import annotations

from typing import Callable, Literal

import jax

from pallas_kernels.ragged_paged_attention import (
    ragged_paged_attention,
    ragged_paged_attention_reference,
    write_kv,
    write_kv_reference,
)

Backend = Literal["reference", "pallas", "auto"]
KV_WRITE_BACKENDS = ("reference", "pallas")


def get_attention_fns(backend: Backend = "auto", kv_write: str = "reference") -> tuple[Callable, Callable]:
    """``(attention_fn, write_kv_fn)`` for ``backend``.

    ``"auto"`` is the Pallas kernel on GPU and the reference elsewhere (the kernel
    only interprets on CPU, which is far slower than the reference). ``kv_write``:
    the reference scatter (XLA updates the donated cache in place; the default) or the
    Pallas KV-write kernel (``write_kv``: one launch for K and V, not measured yet).
    """
    if kv_write not in KV_WRITE_BACKENDS:
        raise ValueError(f"unknown KV write backend {kv_write!r}; expected one of {', '.join(KV_WRITE_BACKENDS)}")
    write_kv_fn = write_kv if kv_write == "pallas" else write_kv_reference
    if backend == "auto":
        backend = "pallas" if jax.default_backend() == "gpu" else "reference"
    if backend == "pallas":
        return ragged_paged_attention, write_kv_fn
    if backend == "reference":
        return ragged_paged_attention_reference, write_kv_fn
    raise ValueError(f"unknown attention backend {backend!r}; expected 'reference', 'pallas' or 'auto'")
