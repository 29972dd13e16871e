"""The prefill launch of ragged paged attention as a Pallas Mosaic GPU kernel (Hopper: TMA and wgmma).

``ragged_paged_attention`` (Triton lowering) serves every GPU; on sm_90 this kernel can take its
prefill launch: the query tiles of the sequences with more than ``max_decode_tokens`` new tokens,
the rows past ``cu_q_lens[num_seqs]`` (zeroed) and nothing else, so the decode launch still fills
the rows of short sequences. Same contract and reference (``ragged_paged_attention_reference``),
except that it takes the query heads alone, ``q [T, Hq, D]`` (its caller slices them out of the
``qkv`` buffer); the kernel is built after JAX's ``pallas/ops/gpu/attention_mgpu.py`` (FlashAttention-3's
structure), with the paging and the raggedness of our layout:

- grid (query head, worker): persistent programs, each taking every ``workers``-th item of the work
  list; an item is 2 x ``block_q`` rows of one sequence (``prefill_work_items`` of the Triton
  launch, sorted by cost).
- three warpgroups: two compute warpgroups, ``block_q`` query rows each, take turns on the tensor
  cores (QK^T and PV by wgmma, online softmax in registers); the memory warpgroup streams K/V blocks
  of ``block_kv`` tokens into a ring of ``max_concurrent_steps`` shared-memory slots, each block as
  ``block_kv / block_size`` TMA copies of one page ``[block_size, D]`` of the ``[L, Hkv, P, bs, D]``
  cache, page ids read from the block table.
- causal by absolute position (context length - query length + row); blocks wholly visible to a
  warpgroup's rows skip the mask.
- the output leaves through an unswizzled shared-memory tile and TMA stores of 2^k rows (the ladder
  of JAX's ``ragged_dot_mgpu``), so rows of the next sequence are never written.

Whole pages are copied: the slots of a sequence's last page past its length are read and multiplied
by an exactly zero probability, so they must hold finite values (the engine's pages do: the cache
starts zeroed and is written with finite K/V; NaN there would leak into the output).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gpu_info import is_hopper

_LOG2E = math.log2(math.e)
SUPPORTED_HEAD_DIMS = (64, 128)
BLOCK_Q = 64  # query rows per compute warpgroup; a work item is 2 x BLOCK_Q rows
BLOCK_KV = 128  # K/V tokens per pipeline step
# JAX 0.11 (the GPU machine's) spells some Mosaic GPU calls differently from 0.10 (the CPU CI's), and only its
# Mosaic GPU interpreter runs this kernel.
JAX_0_11 = tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 11)


def _transposed(ref):
    """``ref`` with its two minor axes swapped, as wgmma's B operand (K^T). JAX 0.11 spells it
    ``ref.transpose``; 0.10's Mosaic GPU lowering wants ``plgpu.transpose_ref``."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if JAX_0_11:
        return ref.transpose((1, 0))
    return plgpu.transpose_ref(ref, (1, 0))


_DUMP_NAME = "mosaic_gpu.dump_basename"


def stable_kernel_modules() -> None:
    """Make a Mosaic GPU kernel's serialized module depend on the kernel only, not on the process's history.

    JAX 0.11's Mosaic GPU lowering names each kernel module ``<name>_<n>`` (the attribute ``_DUMP_NAME``, for the
    names of its dump files), ``n`` counting the kernels lowered so far in the process, and serializes that
    name into the custom call. So the same step program gets another persistent-cache key whenever the process
    lowered a different number of Mosaic kernels before it: a warm start that skips the KV pool's sizing
    compile (its figure kept on disk) recompiled the two programs with this kernel, 11.8 s (run 19a).
    This drops the name just before Mosaic serializes the module (a wrapper around its private
    ``_run_serde_pass``; a JAX without that function or that attribute is left as it is). Dumps, when asked
    for, then get a fresh name at compile time. Idempotent."""
    from jax.experimental.mosaic.gpu import core

    serde = getattr(core, "_run_serde_pass", None)
    if serde is None or getattr(serde, "drops_dump_name", False):
        return

    @functools.wraps(serde)
    def run_serde_pass(module, *args, **kwargs):
        attributes = module.operation.attributes
        if _DUMP_NAME in attributes:
            del attributes[_DUMP_NAME]
        return serde(module, *args, **kwargs)

    run_serde_pass.drops_dump_name = True
    core._run_serde_pass = run_serde_pass


def supported(q_dtype, cache_dtype, head_dim: int, block_size: int, *, soft_cap, sliding_window,
              block_kv: int = BLOCK_KV) -> bool:
    """Whether this kernel serves the call (else the Triton prefill launch does): 16-bit q and pages of the
    same dtype, head_dim 64 or 128, pages that tile a K/V block, no soft cap or sliding window, sm_90, and
    JAX >= 0.11 (the version it was checked and timed under on the GPU; 0.10 only lowers it)."""
    if soft_cap is not None or sliding_window is not None or head_dim not in SUPPORTED_HEAD_DIMS:
        return False
    if jnp.dtype(q_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return False
    if jnp.dtype(cache_dtype) != jnp.dtype(q_dtype) or block_kv % block_size or block_size % 8:
        return False
    return JAX_0_11 and is_hopper()


def ragged_prefill_mgpu(q, k_cache, v_cache, layer, kv_lens, block_tables, items, num_items, *, sm_scale: float,
                        workers_per_head: int, block_q: int = BLOCK_Q, block_kv: int = BLOCK_KV,
                        max_concurrent_steps: int = 2, interpret=None):
    """The prefill launch: ``[T, Hq, D]`` with the rows of the work list written: attended rows, and
    zeros for the padding items. ``items``: ``mosaic_work_list`` with ``tokens_per_tile = 2 * block_q``
    and this ``block_kv`` (its seventh row: each item's K/V blocks); ``num_items`` (int32 ``[1]``): how
    many of them are not empty. The rows of short
    (decode) sequences are left unwritten for the decode launch, which aliases this array.

    Persistent: ``workers_per_head`` programs per query head take the items in turn (the list is
    sorted by cost, longest first: ``mosaic_work_list``), so a step without prompts launches no
    empty programs. Shapes are checked by ``ragged_paged_attention``, the caller. ``interpret``: JAX's
    Mosaic GPU interpreter (``InterpretGPUParams``, JAX >= 0.11: threads, barriers and TMA simulated on
    the CPU), for tests; it has no ``run_state`` and takes wgmma's left operand from memory only, so
    there the PV product goes through a shared-memory tile and a fresh accumulator."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    stable_kernel_modules()
    T, Hq, D = q.shape
    _, Hkv, _, bs, _ = k_cache.shape
    B = block_tables.shape[1]
    group = Hq // Hkv
    pages_per_block = block_kv // bs
    dtype = q.dtype
    scale2 = sm_scale * _LOG2E  # scores in log2 units: exp2 with an FMA
    compute_wgs = 2
    ring = lambda j: lax.rem(j, jnp.int32(max_concurrent_steps))  # noqa: E731 - K/V slot of step j

    # Register layouts for the compiler; the interpreter keeps values in their logical layout (0.10's has no
    # layout casts at all).
    def full(shape, value, dtype, layout):
        x = jnp.full(shape, value, dtype)
        return x if interpret else plgpu.layout_cast(x, layout)

    def iota(shape, axis):
        if interpret:
            return lax.broadcasted_iota(jnp.int32, shape, axis)
        return plgpu.broadcasted_iota(jnp.int32, shape, axis, layout=plgpu.Layout.WGMMA)

    def kernel(layer_ref, count_ref, items_ref, kv_lens_ref, tables_ref, q_ref, k_ref, v_ref, o_ref, scoped):
        (q_smem2, k_smem, v_smem, o_smem2, *scratch_p), (k_ready, v_ready, q_ready), (k_free, v_free), turn = scoped
        scratch_p = scratch_p[0] if scratch_p else None
        h = lax.axis_index("heads")
        worker = lax.axis_index("workers")
        wg = lax.axis_index("wg")
        count = count_ref[0]
        my_items = lax.div(jnp.maximum(count - worker, 0) + (workers_per_head - 1), jnp.int32(workers_per_head))

        def item_info(i):
            """The i-th item of this program: its fields and the K/V blocks it needs."""
            item = worker + i * workers_per_head  # the list is sorted by cost: longest first
            seq, seq_start, seq_end = items_ref[0, item], items_ref[1, item], items_ref[2, item]
            start, end = items_ref[3, item], items_ref[4, item]
            attend = items_ref[5, item] > 0
            ctx_before = kv_lens_ref[seq] - (seq_end - seq_start)  # cached tokens before this step's first
            item_steps = items_ref[6, item]  # K/V blocks up to the item's last row (mosaic_work_list)
            return seq, seq_start, start, end, attend, ctx_before, item_steps

        def take_turn():  # the two compute warpgroups alternate on the tensor cores
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when(wg < compute_wgs)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            q_smem, o_smem = q_smem2.at[wg], o_smem2.at[wg]
            for i in range(max_concurrent_steps):  # every slot starts free: the memory warpgroup always waits
                plgpu.barrier_arrive(k_free.at[i])
                plgpu.barrier_arrive(v_free.at[i])

            @pl.loop(0, my_items)
            def _item(i):
                seq, seq_start, start, end, attend, ctx_before, item_steps = item_info(i)
                row0 = start + wg * block_q
                rows = jnp.clip(end - row0, 0, block_q)  # this warpgroup's rows of the item
                first_pos = ctx_before + (row0 - seq_start)
                steps = jnp.where(attend & (rows > 0), pl.cdiv(first_pos + rows, jnp.int32(block_kv)), 0)
                full_steps = jnp.minimum(lax.div(first_pos + 1, jnp.int32(block_kv)), steps)

                @pl.when(attend)
                def _attend():
                    # A tile's first row is any row of q: a TMA copy into the tiled, swizzled layout wgmma reads
                    # needs a row index that is a multiple of the tile height, so q lands in the untiled output
                    # tile first (free until this item's end) and moves to q_smem through registers.
                    plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(row0, block_q), h], o_smem, q_ready.at[wg])
                    plgpu.barrier_wait(q_ready.at[wg])
                    q_smem[...] = o_smem[...]
                    plgpu.commit_smem()  # the registers' stores before wgmma's reads
                    m_i = full((block_q,), -jnp.inf, jnp.float32, plgpu.Layout.WGMMA.reduce(1))
                    l_i = full((block_q,), 0, jnp.float32, plgpu.Layout.WGMMA.reduce(1))
                    acc = full((block_q, D), 0, jnp.float32, plgpu.Layout.WGMMA)

                    @pl.when(steps > 0)
                    def _():
                        plgpu.barrier_wait(k_ready.at[0])

                    pl.when(wg == 1)(take_turn)

                    def kv_step(j, carry, masked: bool):
                        acc, m_i, l_i = carry
                        slot = ring(j)

                        def qk_scope(acc_ref):
                            plgpu.wgmma(acc_ref, q_smem, _transposed(k_smem.at[slot]))
                            take_turn()
                            return acc_ref[...]

                        s = pl.run_scoped(qk_scope, plgpu.ACC((block_q, block_kv), jnp.float32))
                        plgpu.barrier_arrive(k_free.at[slot])
                        if masked:
                            r, c = (iota((block_q, block_kv), axis) for axis in (0, 1))
                            s = jnp.where(c + j * block_kv <= r + first_pos, s, -jnp.inf)
                        m_new = jnp.maximum(m_i, s.max(axis=1) * scale2)
                        alpha = jnp.exp2(m_i - m_new)
                        p = jnp.exp2(s * scale2 - lax.broadcast_in_dim(m_new, s.shape, [0]))
                        acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
                        l_i = l_i * alpha + p.sum(axis=1)
                        p16 = p.astype(dtype)
                        # As in attention_mgpu: the barrier keeps the softmax's registers from the wgmma.
                        acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                        plgpu.barrier_arrive(turn)
                        plgpu.barrier_wait(v_ready.at[slot])
                        plgpu.barrier_wait(turn)

                        def pv(acc_ref, p=p16):
                            plgpu.wgmma(acc_ref, p, v_smem.at[slot])

                            @pl.when(j + 1 < steps)
                            def _():
                                plgpu.barrier_wait(k_ready.at[ring(j + 1)])

                        if interpret:
                            p_smem = scratch_p.at[wg]
                            p_smem[...] = p16

                            def fresh(acc_ref):
                                pv(acc_ref, p_smem)
                                return acc_ref[...]

                            acc = acc + pl.run_scoped(fresh, plgpu.ACC((block_q, D), jnp.float32))
                        else:
                            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                        plgpu.barrier_arrive(v_free.at[slot])
                        return acc, m_new, l_i

                    def drain(j, _):
                        # Blocks only the other warpgroup needs: wait for them too (each warpgroup's
                        # barrier phases must follow every block), release them, keep the turns.
                        slot = ring(j)
                        plgpu.barrier_wait(k_ready.at[slot])
                        plgpu.barrier_arrive(k_free.at[slot])
                        take_turn()
                        plgpu.barrier_wait(v_ready.at[slot])
                        plgpu.barrier_arrive(v_free.at[slot])
                        take_turn()

                    carry = (acc, m_i, l_i)
                    carry = lax.fori_loop(0, full_steps, functools.partial(kv_step, masked=False), carry)
                    acc, m_i, l_i = lax.fori_loop(full_steps, steps, functools.partial(kv_step, masked=True), carry)
                    lax.fori_loop(steps, item_steps, drain, None)
                    pl.when(wg == 0)(take_turn)
                    l_safe = jnp.where(l_i > 0, l_i, 1.0)
                    o_smem[...] = (acc / lax.broadcast_in_dim(l_safe, (block_q, D), [0])).astype(dtype)

                @pl.when(jnp.logical_not(attend))  # a padding item: zeros
                def _zeros():
                    o_smem[...] = full((block_q, D), 0, dtype, plgpu.Layout.WGMMA)

                plgpu.commit_smem()
                # TMA stores of 2^k rows (as JAX's ragged_dot_mgpu): exactly `rows` rows leave.
                offset = 0
                size = block_q
                while size:
                    @pl.when(rows & size != 0)
                    def _(offset=offset, size=size):
                        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(offset, size)], o_ref.at[pl.ds(row0 + offset, size), h])
                    offset = offset + (rows & size)
                    size //= 2
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # o_smem is free for the next item

        @pl.when(wg == compute_wgs)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")  # always: the compute warpgroups wait for these
            kv_head = lax.div(h, jnp.int32(group))
            lay = layer_ref[0]

            @pl.loop(0, my_items)
            def _item(i):
                seq, *_, item_steps = item_info(i)

                @pl.loop(0, item_steps)
                def _block(j):
                    slot = ring(j)
                    pages = [tables_ref[seq, jnp.minimum(j * pages_per_block + p, B - 1)] for p in range(pages_per_block)]
                    for cache_ref, smem, ready, free in ((k_ref, k_smem, k_ready, k_free),
                                                         (v_ref, v_smem, v_ready, v_free)):
                        plgpu.barrier_wait(free.at[slot])
                        for p, page in enumerate(pages):
                            plgpu.copy_gmem_to_smem(cache_ref.at[lay, kv_head, page], smem.at[slot, pl.ds(p * bs, bs)],
                                                    ready.at[slot])

            # Each slot's last release (the compute warpgroups released every slot once ahead): observed, so no
            # barrier phase is left unobserved at exit (the interpreter checks that).
            for slot in range(max_concurrent_steps):
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])

    def entry(*refs):
        tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = (
            plgpu.SMEM((compute_wgs, block_q, D), dtype, transforms=tiled),
            plgpu.SMEM((max_concurrent_steps, block_kv, D), dtype, transforms=tiled),
            plgpu.SMEM((max_concurrent_steps, block_kv, D), dtype, transforms=tiled),
            plgpu.SMEM((compute_wgs, block_q, D), dtype),  # unswizzled: row slices of any length
        ) + ((plgpu.SMEM((compute_wgs, block_q, block_kv), dtype, transforms=tiled),) if interpret else ())
        ready = (plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=max_concurrent_steps),) * 2 + (
            plgpu.Barrier(num_barriers=compute_wgs),)
        free = (plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=max_concurrent_steps),) * 2
        pl.run_scoped(lambda *scoped: kernel(*refs, scoped), smem, ready, free,
                      plgpu.Barrier(num_arrivals=compute_wgs), collective_axes="wg")

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((T, Hq, D), dtype),
        grid=(Hq, workers_per_head),
        grid_names=("heads", "workers"),
        num_threads=compute_wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **({"interpret": interpret} if interpret else {}),
    )(jnp.asarray(layer, jnp.int32).reshape(1), num_items, items, kv_lens.astype(jnp.int32), block_tables.astype(jnp.int32),
      q, k_cache, v_cache)
