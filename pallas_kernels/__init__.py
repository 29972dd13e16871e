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
    write_kv_reference,
)

Backend = Literal["reference", "pallas", "auto"]


def get_attention_fns(backend: Backend = "auto") -> tuple[Callable, Callable]:
    """``(attention_fn, write_kv_fn)`` for ``backend``.

    ``"auto"`` is the Pallas kernel on GPU and the reference elsewhere (the kernel
    only interprets on CPU, which is far slower than the reference). The KV write is
    the reference scatter for every backend: XLA updates the donated cache in place.
    """
    if backend == "auto":
        backend = "pallas" if jax.default_backend() == "gpu" else "reference"
    if backend == "pallas":
        return ragged_paged_attention, write_kv_reference
    if backend == "reference":
        return ragged_paged_attention_reference, write_kv_reference
    raise ValueError(f"unknown attention backend {backend!r}; expected 'reference', 'pallas' or 'auto'")
