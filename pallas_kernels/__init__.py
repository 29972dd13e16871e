"""Attention backends: picks the attention and KV-write functions the model calls.

Owns only the choice between the pure-jnp reference and the Pallas GPU kernel; the
functions themselves live in ``ragged_paged_attention``. Knows nothing of models.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Literal, Optional

import jax

from pallas_kernels.ragged_paged_attention import (
    Tiling,
    default_tiling,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    write_kv,
    write_kv_reference,
)
from pallas_kernels.rope_kv_write import rope_write_kv

Backend = Literal["reference", "pallas", "auto"]
KV_WRITE_BACKENDS = ("auto", "reference", "pallas")


def get_attention_fns(backend: Backend = "auto", kv_write: str = "auto") -> tuple[Callable, Callable]:
    """``(attention_fn, write_kv_fn)`` for ``backend``.

    ``"auto"`` is the Pallas kernel on GPU and the reference elsewhere (the kernel
    only interprets on CPU, which is far slower than the reference). ``kv_write``: the
    reference scatter (XLA updates the donated cache in place), the Pallas KV-write kernel
    (``write_kv``: K and V in one launch), or ``"auto"``: the kernel on GPU, the scatter
    elsewhere. On an H200 (run 13, benchmarks/NOTES.md) the kernel took the 8B's KV write
    from 685 to 95 us a step at 1024 decodes and from 8.4 to 2.4 ms at a 16384-token prompt step.
    """
    if kv_write not in KV_WRITE_BACKENDS:
        raise ValueError(f"unknown KV write backend {kv_write!r}; expected one of {', '.join(KV_WRITE_BACKENDS)}")
    on_gpu = jax.default_backend() == "gpu"
    if kv_write == "auto":
        kv_write = "pallas" if on_gpu else "reference"
    write_kv_fn = write_kv if kv_write == "pallas" else write_kv_reference
    if backend == "auto":
        backend = "pallas" if on_gpu else "reference"
    if backend == "pallas":
        tiling = default_tiling()  # Tiling() unless $PAGEDJAX_ATTENTION_TILING says otherwise
        if tiling == Tiling():
            return ragged_paged_attention, write_kv_fn
        return functools.partial(ragged_paged_attention, tiling=tiling), write_kv_fn
    if backend == "reference":
        return ragged_paged_attention_reference, write_kv_fn
    raise ValueError(f"unknown attention backend {backend!r}; expected 'reference', 'pallas' or 'auto'")


def get_rope_write_kv_fn(write_kv_fn: Callable) -> Optional[Callable]:
    """``rope_kv_write.rope_write_kv`` (the rope and the KV write of a small step in one launch: ``models.llama``'s
    ``rope_write_kv_fn``) where the KV write is the Pallas kernel itself (not a mesh's per-device wrapper: one device
    only), unless ``$PAGEDJAX_FUSE_ROPE_KV=0``; else None."""
    if write_kv_fn is not write_kv or os.environ.get("PAGEDJAX_FUSE_ROPE_KV", "1") == "0":
        return None
    return rope_write_kv
