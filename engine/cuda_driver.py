"""Device memory and count as the CUDA driver reports them, for JAX allocators that keep no pool and report no stats.

JAX's VMM allocator (``XLA_PYTHON_CLIENT_ALLOCATOR=vmm``, see ``engine/__init__``) maps memory as buffers ask for it, so
``Device.memory_stats()`` is None and the KV pool cannot be sized from ``bytes_limit``; the driver's free and total
bytes (what ``torch.cuda.mem_get_info`` reads for vLLM) size it instead. Called through ``ctypes`` on
``libcuda.so.1``: JAX exposes no such query, and the driver is on every CUDA machine.
"""

from __future__ import annotations

import ctypes
from typing import Optional


def device_count() -> Optional[int]:
    """CUDA devices this process sees (``CUDA_VISIBLE_DEVICES`` applies), or None where there is no driver or it
    fails."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count = ctypes.c_int()
    if cuda.cuInit(0) or cuda.cuDeviceGetCount(ctypes.byref(count)):
        return None
    return count.value


def memory_info(ordinal: int) -> Optional[tuple[int, int]]:
    """``(free, total)`` bytes of CUDA device ``ordinal`` (as this process numbers them), or None where there is no
    driver or it fails. Free memory is the device's: other processes' buffers count as used."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    device, context = ctypes.c_int(), ctypes.c_void_p()
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(device), ordinal):
        return None
    # The primary context is the one JAX's runtime uses; retaining it again creates nothing new.
    if cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device):
        return None
    try:
        if cuda.cuCtxPushCurrent_v2(context):
            return None
        try:
            status = cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total))
        finally:
            cuda.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
    finally:
        cuda.cuDevicePrimaryCtxRelease_v2(device)
    return None if status else (free.value, total.value)
