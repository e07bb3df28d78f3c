"""The fast PyTorch path: the routed expert FFN as two ``torch.library`` custom ops (forward and a hand-written,
chunked backward) joined by ``register_autograd``.

Legend: T tokens, D model dim, F expert hidden, H = F (plain activations) or 2F (gated), E experts, N routed
pairs, R rows of one chunk.

Optional expert biases ``b_in (E, H)`` and ``b_out (E, D)`` are added per expert segment of a chunk (``b_out``
scaled by the gate, as the rest of the expert's output); their gradients are row sums per segment, and the gate
gradient gains ``<dz_n, b_out[e_n]>``.

Why it is fast on CPUs (measured with ``moezoo bench layer``):

- rows are processed in chunks of a few MiB: the gathered inputs, activations, expert outputs and every
  backward temporary live in small reused workspaces that stay in cache, instead of fresh N-row tensors whose
  first touch costs page faults and memory bandwidth;
- only the pre-activation ``h`` is saved for backward (what a dense FFN saves too); inputs are re-gathered chunk
  by chunk and expert outputs are never kept. ``save="all"`` (backend ``"torch_save_all"``) keeps the gathered
  inputs, the activation output before the gate and, for gated forms, ``act(gate)`` too, written chunk by chunk
  into full-length expert-sorted tensors, so the backward re-gathers and recomputes nothing (the gate then scales
  the expert's output rows in the forward and the output gradients in the backward, since the kept activation must
  stay unchanged); it was slower at every shape measured (fresh full-length tensors cost page faults and memory
  traffic that the re-gather and the recompute in cache-sized chunks do not), so ``save="auto"`` (the default,
  :func:`choose_save`) keeps ``h`` only;
- the gate gradient needs no saved output: ``y_n = g_n * a_n @ W_out`` so
  ``dL/dg_n = <dz_n, a_n @ W_out> = <dz_n @ W_out^T, a_n>``, and ``dz_n @ W_out^T`` is needed anyway; the row dot
  products are one ``bmm`` of ``(R, 1, F) @ (R, F, 1)`` (no ``(R, F)`` product temporary);
- few workspaces, each reused for several roles: the forward gathers inputs into a buffer that then takes the
  expert outputs and computes the activation in place into one more; the backward's output-gradient buffer later
  holds the input gradients and then the re-gathered inputs, and the recomputed activation output lives in the
  ``dh`` buffer until ``dh`` is written (``moezoo.ops.activations`` takes ``out=`` buffers). Fresh multi-MiB
  temporaries cost page faults whenever the allocator has handed their pages back to the OS, which in the layer
  benchmark's mix of candidates happened on most calls (thousands of minor faults per call, about 1.4 us each):
  this cut the op's temporaries from 8 to 4 (backward) and from 4 to 2 (forward), 40 to 24 MiB and 24 to 12 MiB
  at ``(2048, 256, 128, 64, 4)``. Measured in one process against the previous version (layer forward+backward,
  SwiGLU, process CPU time at one thread, 9 interleaved rounds with the dense FFN and both peers, the 2-core CPU
  busy with other jobs), new/old median [IQR]: (2048, 256, 128, 64, 4) 0.97 [0.91-1.02], (4096, 512, 256, 64, 8)
  0.93 [0.93-0.94], (4096, 512, 1024, 8, 2) 0.98 [0.95-0.99]; activation memory unchanged;
- the per-expert loop takes its segments with one ``split`` per operand (and the chunk's weights with one
  ``unbind``) instead of a slice per segment: about 3% off one GEMM role at 128 rows per expert.
- the op's outputs other than ``out`` (``h``, the sort order, the ``save="all"`` tensors) never get a gradient,
  and the autograd function does not materialise one (``ctx.set_materialize_grads(False)``): by default autograd
  hands the backward a fresh zero tensor for each, an ``(N, H)`` one for ``h`` (8 MiB of page faults and a fill
  per step at ``(2048, 256, 128, 64, 4)``, ~1 ms quiet and ~4 ms with the CPU busy, found with ``torch.profiler``).
  Measured in one process against the previous version (expert FFN alone, forward+backward, SwiGLU, process CPU
  time at one thread, old and new interleaved, the 2-core CPU busy with two other one-thread jobs), new/old
  median [IQR]: (2048, 256, 128, 64, 4) four runs, 0.89 [0.85-0.92] (16 rounds, 2 calls each), 0.98 [0.92-1.01]
  (20 rounds), 0.98 [0.96-1.01] (30 rounds), 0.96 [0.93-0.99] (20 rounds, 5 calls each); (4096, 512, 256, 64, 8)
  0.97 [0.96-0.98] and (4096, 512, 1024, 8, 2) 0.97 [0.95-0.99], 15 rounds each.

Rows stay expert-contiguous without padding and each chunk runs its expert GEMMs (chunks cut through experts;
weight gradients accumulate over the chunks an expert spans) in one of two ways, chosen per call by
:func:`choose_gemm` (``gemm="auto"``, the default) or fixed by the caller (``gemm="loop"``/``"grouped_mm"``; the
backends ``"torch_loop"``/``"torch_grouped_mm"`` of ``moezoo.ops``): one ``mm`` per expert segment, or one
``torch._grouped_mm`` per chunk and GEMM role with int32 segment ends as ``offs`` (forward, input gradients, and
weight gradients as ``a^T @ g`` grouped along the rows). ``torch._grouped_mm`` takes float32/bfloat16/float16
only and 16-byte-aligned rows; elsewhere ``auto`` takes the loop and an explicit ``"grouped_mm"`` is a
``ValueError``. Biases, activations, gathers and scatters run the same way in both. Re-measured on the project's
2-core CPU (numbers at :func:`choose_gemm`): ``torch._grouped_mm`` on the CPU is one ``mm`` per group in C++, so
it saves only the per-call Python and dispatch cost, and wins only where experts get very few rows (at most 16); at
64 rows per expert and more it is no faster than the loop, and at one thread slower. An index-space padded ``bmm``
layout was no faster either, and chunks of 16 MiB beat both 4 MiB and 64 MiB chunks. A second layout that padded
buckets of 8 experts to their largest count and ran one ``bmm`` per bucket was measured too (README, layer
benchmark) and removed: never faster, and its padded row count would have made ``h``'s shape depend on the routing.

Why custom ops: the chunk plan is built on the host from the per-expert row counts (one ``tolist``), which
``torch.compile`` cannot trace. As custom ops with fake implementations whose output shapes depend on input
shapes only (``h`` has one row per pair), the whole expert FFN is one opaque node in a compiled graph, forward
and backward, so a model with MoE layers compiles with ``fullgraph=True``; eager calls run the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moezoo.ops.activations import act_backward, act_forward, act_forward_parts, is_gated
from moezoo.ops.permute import Permutation, sort_by_expert

# Elements of the widest chunk buffer (16 MiB in fp32).
CHUNK_ELEMENTS = 1 << 22

# How the expert GEMMs of a chunk run: "loop" (one ``mm`` per expert segment), "grouped_mm" (one
# ``torch._grouped_mm`` per chunk and GEMM role) or "auto" (:func:`choose_gemm`).
GEMMS = ("auto", "loop", "grouped_mm")
# dtypes torch._grouped_mm takes on the CPU; it also wants every row stride and base address 16-byte aligned
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# "auto" takes torch._grouped_mm when the mean rows per routed expert are at most this (see choose_gemm)
GROUPED_MM_MAX_ROWS_PER_EXPERT = 16


# What the forward keeps for backward: "h" (the pre-activations only; the backward re-gathers the inputs and
# recomputes the activation), "all" (also the gathered inputs, the activation output and, for gated forms,
# act(gate), so the backward re-gathers and recomputes nothing) or "auto" (:func:`choose_save`).
SAVES = ("auto", "h", "all")


def check_gemm(gemm: str) -> str:
    if gemm not in GEMMS:
        raise ValueError(f"gemm={gemm!r} is unknown; choose one of {GEMMS}")
    return gemm


def check_save(save: str) -> str:
    if save not in SAVES:
        raise ValueError(f"save={save!r} is unknown; choose one of {SAVES}")
    return save


def choose_save(save: str) -> str:
    """``"h"`` or ``"all"``: an explicit choice wins; ``"auto"`` takes ``"h"`` at every shape, because ``"all"`` was
    slower at every shape measured. (A rule may read only what the fake implementations also see, the input
    shapes, so that ``torch.compile`` agrees with eager calls.)

    ``"all"`` spares the backward its re-gather of the inputs and its activation recompute (about 0.6 + 1.0 ms of a
    ~50 ms step at ``(2048, 256, 128, 64, 4)``), but writes ``N * (D + F)`` (plain) or ``N * (D + 2F)`` (gated) more
    elements into fresh full-length tensors and reads them back from memory in the backward, instead of reusing
    cache-sized chunk workspaces; the fresh pages cost minor faults on every call. Measured with the layer
    benchmark, per interleaved round, median [IQR] of 10 rounds, SwiGLU, one thread, the project's 2-core CPU busy
    with a one-thread training job (load average 1-2.4): ``OMP_NUM_THREADS=1 moezoo bench layer --saves --peers
    --no-naive --no-reference --threads 1 --repeats 10 --shape 2048,256,128,64,4 --shape 4096,512,256,64,8 --shape
    4096,512,1024,8,2`` (``bench_results/layer/saves_busy.json``, wall clock; ``saves_busy_cpu.json`` with
    ``--clock cpu``), save=all over save=h, wall then CPU time:
    (2048, 256, 128, 64, 4): 1.10 [1.08-1.18], 1.07 [0.95-1.21]; (4096, 512, 256, 64, 8): 1.26 [1.17-1.40],
    1.12 [1.09-1.17]; (4096, 512, 1024, 8, 2): 1.12 [1.03-1.16], 1.09 [1.06-1.12]. Over the ``grouped_mm`` peer
    (which keeps its gathered inputs and activations through autograd) save=all was 0.99, 0.92, 1.00 (wall) and
    save=h 0.89 [0.81-0.94], 0.74 [0.71-0.76], 0.91 [0.86-0.93]. Saved for backward (MiB, h / all / peer):
    35 / 51 / 67, 170 / 298 / 426, 120 / 200 / 232. Minor page faults per expert-FFN forward+backward
    (``resource.getrusage``): at (4096, 512, 1024, 8, 2) 43-45 thousand with "h", 80-84 thousand with "all",
    about 1.4 us each: most of the 50-65 ms "all" lost there. A rule on width (all where the activation and gather
    passes are a large share of the GEMMs, small ``D*F/(D+F)``) had no shape to pick: the smallest widths measured
    lost least but did not win.
    """
    return "h" if check_save(save) == "auto" else save


def grouped_mm_supported(dtype: torch.dtype, widths: tuple[int, ...], *tensors: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes this problem on the CPU: its dtypes, every width (D, F, H) a multiple
    of 16 bytes (so that every row slice of a workspace is aligned), and the given tensors (``x``, the weights)
    16-byte aligned with a unit stride in one of their last two dimensions."""
    size = dtype.itemsize
    if dtype not in GROUPED_MM_DTYPES or any(w * size % 16 for w in widths):
        return False
    for t in tensors:
        row, col = t.stride()[-2:]
        if t.data_ptr() % 16 or not ((col == 1 and row * size % 16 == 0) or (row == 1 and col * size % 16 == 0)):
            return False
        if t.dim() == 3 and t.stride(0) * size % 16:
            return False
    return True


def choose_gemm(gemm: str, counts: list[int], supported: bool) -> str:
    """``"loop"`` or ``"grouped_mm"`` for one call: an explicit choice wins (``"grouped_mm"`` where
    :func:`grouped_mm_supported` says no is a ``ValueError``); ``"auto"`` takes ``torch._grouped_mm`` when it is
    supported and the mean row count of the experts that got rows is at most ``GROUPED_MM_MAX_ROWS_PER_EXPERT``.

    On the CPU ``torch._grouped_mm`` runs one ``mm`` per group in C++: it saves the Python and dispatch cost of
    the per-expert calls (about 2 ms per forward+backward at E=64 and K=4, measured with D=16 where the GEMMs cost
    nothing), but returns new tensors (a chunk's products and, for several chunks, weight gradients are copied).
    The threshold comes from the expert FFN alone, forward+backward, gemm="grouped_mm" over gemm="loop" per
    interleaved round, median [IQR] of 14 rounds, process CPU time at one thread on the project's 2-core CPU while
    it was busy (load average 7-11), SwiGLU, ``(T, D, F, E, K)`` and mean rows per expert:
    (256, 256, 128, 64, 4) 16 rows: 0.97 [0.90-1.15]; (1024, 256, 128, 64, 4) 64: 0.96 [0.95-1.01];
    (2048, 256, 128, 64, 4) 128: 1.00 [0.98-1.03]; (8192, 256, 128, 64, 4) 512: 1.03 [1.01-1.04];
    (1024, 512, 256, 64, 8) 128: 1.05 [1.03-1.05]; (512, 512, 1024, 8, 2) 128: 0.99 [0.97-1.00];
    (2048, 512, 1024, 8, 2) 512: 1.03 [1.02-1.04]. That first rule took ``torch._grouped_mm`` up to 64 rows.
    Re-measured on a quiet machine (wall clock, the whole layer over the same round's dense FFN, median [IQR] of 9
    rounds, ``moezoo bench layer --gemms --no-naive --no-reference --threads 1,2 --repeats 9 --shape ...``, two
    runs; ``moezoo[loop]`` vs ``moezoo[grouped_mm]``): at 64 rows per expert, (1024, 256, 128, 64, 4), the loop was
    ahead at one thread in both runs (2.17 [2.09-2.20] vs 2.43 [2.39-2.48]; 2.12 [2.01-2.37] vs 2.38
    [2.30-2.44]) and tied at two; at 128 rows the loop was ahead or tied in all four; at 16 rows,
    (256, 256, 128, 64, 4), the runs disagreed at one thread (4.19 vs 4.48, then 4.06 vs 3.67) and put
    ``torch._grouped_mm`` slightly ahead at two (4.33 vs 4.09, 5.95 vs 5.65, IQRs overlapping). Hence the
    threshold of 16 rows: ``torch._grouped_mm`` only where its saved per-call cost can matter.
    """
    if gemm == "grouped_mm" and not supported:
        raise ValueError(
            "gemm='grouped_mm' needs float32, bfloat16 or float16 operands whose widths (D, F, H) are multiples of "
            "16 bytes and 16-byte aligned weights; use gemm='loop' or 'auto'"
        )
    if gemm != "auto":
        return gemm
    routed = [c for c in counts if c]
    if not supported or not routed:
        return "loop"
    return "grouped_mm" if sum(routed) <= GROUPED_MM_MAX_ROWS_PER_EXPERT * len(routed) else "loop"


@dataclass
class Chunk:
    r0: int  # first row (in expert-sorted order)
    r1: int
    segments: list[tuple[int, int, int, bool]]  # (expert, s0, s1, first segment of that expert)
    offs: Tensor | None = None  # grouped_mm: int32 segment ends (chunk rows) of experts e0..e1-1
    e0: int = 0
    e1: int = 0
    whole: bool = False  # grouped_mm: the only chunk, offs over all experts

    @property
    def sizes(self) -> list[int]:
        """Rows of each segment; the segments tile the chunk, so ``t.split(sizes)`` gives every segment's rows in
        one call (cheaper than a slice per segment)."""
        return [s1 - s0 for _, s0, s1, _ in self.segments]

    def per_expert(self, t_EX: Tensor) -> tuple[Tensor, ...]:
        """``t[e]`` for the experts this chunk's segments span, indexed by ``e - segments[0][0]``."""
        first = self.segments[0][0]
        return t_EX[first : self.segments[-1][0] + 1].unbind(0)


class ChunkPlan:
    """Rows sorted by expert, unpadded, cut into chunks of ``chunk_rows``; each chunk holds segments of
    consecutive experts. ``gemm`` (``"loop"`` or ``"grouped_mm"``): how each chunk's expert GEMMs run."""

    def __init__(self, perm: Permutation, gate_sorted_N: Tensor, widths: tuple[int, int], gemm: str = "loop") -> None:
        self.counts = perm.counts
        self.token_R = perm.token_sorted_N
        self.gate_R1 = gate_sorted_N.unsqueeze(-1)
        self.num_rows = perm.token_sorted_N.shape[0]
        self.chunk_rows = max(64, CHUNK_ELEMENTS // max(widths))
        self.grouped = gemm == "grouped_mm"

    def chunks(self) -> list[Chunk]:
        bounds = []
        start = 0
        for e, count in enumerate(self.counts):
            if count:
                bounds.append((e, start, start + count))
            start += count
        out = []
        b = 0
        for r0 in range(0, self.num_rows, self.chunk_rows):
            r1 = min(self.num_rows, r0 + self.chunk_rows)
            segs = []
            while b < len(bounds) and bounds[b][1] < r1:
                e, e0, e1 = bounds[b]
                s0, s1 = max(e0, r0), min(e1, r1)
                segs.append((e, s0 - r0, s1 - r0, s0 == e0))
                if e1 > r1:
                    break
                b += 1
            out.append(Chunk(r0, r1, segs))
        if self.grouped:
            self._group(out)
        return out

    def _group(self, chunks: list[Chunk]) -> None:
        """The ``offs`` of every chunk: all experts for a single chunk, else the experts its segments span (an
        expert without rows in between gets an empty group)."""
        for chunk in chunks:
            if len(chunks) == 1:
                chunk.e0, chunk.e1, chunk.whole = 0, len(self.counts), True
            else:
                chunk.e0, chunk.e1 = chunk.segments[0][0], chunk.segments[-1][0] + 1
            ends = [0] * (chunk.e1 - chunk.e0)
            for e, _, s1, _ in chunk.segments:
                ends[e - chunk.e0] = s1
            for i in range(1, len(ends)):  # empty experts end where the one before ended
                ends[i] = max(ends[i], ends[i - 1])
            chunk.offs = torch.tensor(ends, dtype=torch.int32)

    def mm(self, a_RK: Tensor, w_EKM: Tensor, chunk: Chunk, out_RM: Tensor, fill: bool = False) -> Tensor:
        """``a[r] @ w[e_r]`` for the chunk's rows; the loop writes ``out``, grouped_mm returns a new tensor
        unless ``fill`` (then ``out`` holds the product)."""
        if chunk.offs is not None:
            product = torch._grouped_mm(a_RK, w_EKM[chunk.e0 : chunk.e1], offs=chunk.offs)
            return out_RM.copy_(product) if fill else product
        first, sizes = chunk.segments[0][0], chunk.sizes
        w_KM = chunk.per_expert(w_EKM)
        for (e, *_), a_SK, out_SM in zip(chunk.segments, a_RK.split(sizes), out_RM.split(sizes), strict=True):
            torch.mm(a_SK, w_KM[e - first], out=out_SM)
        return out_RM

    @staticmethod
    def weight_grad(a_RK: Tensor, g_RM: Tensor, chunk: Chunk, out_EKM: Tensor) -> Tensor:
        """``out[e] (+)= a_e^T @ g_e`` over the chunk's segments (``=`` on an expert's first segment); returns the
        gradient, which is a new tensor for a ``whole`` grouped chunk (``out`` unused)."""
        if chunk.offs is not None:
            grad = torch._grouped_mm(a_RK.t(), g_RM, offs=chunk.offs)  # zero for empty groups
            if chunk.whole:
                return grad
            first = 0 if chunk.segments[0][3] else 1
            if first:
                out_EKM[chunk.e0].add_(grad[0])
            out_EKM[chunk.e0 + first : chunk.e1].copy_(grad[first:])
            return out_EKM
        first, sizes = chunk.segments[0][0], chunk.sizes
        out_KM = chunk.per_expert(out_EKM)
        a_KS, g_SM = a_RK.t().split(sizes, dim=1), g_RM.split(sizes)
        for (e, _, _, first_seg), a_e, g_e in zip(chunk.segments, a_KS, g_SM, strict=True):
            if first_seg:
                torch.mm(a_e, g_e, out=out_KM[e - first])
            else:
                out_KM[e - first].addmm_(a_e, g_e)
        return out_EKM

    @staticmethod
    def add_bias(out_RM: Tensor, b_EM: Tensor, chunk: Chunk, scale_R1: Tensor | None = None) -> Tensor:
        """``out[r] += b[e_r]`` (times ``scale[r]`` when given) on each expert segment of the chunk."""
        for e, s0, s1, _ in chunk.segments:
            if scale_R1 is None:
                out_RM[s0:s1].add_(b_EM[e])
            else:
                out_RM[s0:s1].addcmul_(scale_R1[s0:s1], b_EM[e])
        return out_RM

    @staticmethod
    def bias_grad(g_RM: Tensor, chunk: Chunk, out_EM: Tensor) -> None:
        """``out[e] += sum of the rows of g in expert e's segments`` (``out`` starts at zero)."""
        for e, s0, s1, _ in chunk.segments:
            out_EM[e] += g_RM[s0:s1].sum(0)

    @staticmethod
    def bias_dot(dz_RD: Tensor, b_ED: Tensor, chunk: Chunk, out_R: Tensor) -> None:
        """``out[r] += <dz[r], b[e_r]>`` on each expert segment."""
        for e, s0, s1, _ in chunk.segments:
            out_R[s0:s1] += dz_RD[s0:s1] @ b_ED[e]

    def empty_experts(self) -> list[int]:
        return [e for e, count in enumerate(self.counts) if count == 0]


def _choose(gemm: str, counts: list[int], x_TD: Tensor, w_in_EDH: Tensor, w_out_EFD: Tensor) -> str:
    _, dim, hidden = w_in_EDH.shape
    supported = grouped_mm_supported(x_TD.dtype, (dim, w_out_EFD.shape[1], hidden), w_in_EDH, w_out_EFD)
    return choose_gemm(check_gemm(gemm), counts, supported)


def _weight_grad_buffer(weight_EKM: Tensor, empty_experts: list[int]) -> Tensor:
    """Uninitialised except for experts without rows, which get zero gradient; the rest is written by mm."""
    out = weight_EKM.new_empty(weight_EKM.shape)  # contiguous, as the fake implementation says
    if empty_experts:
        out[empty_experts] = 0
    return out


# ---------------------------------------------------------------------------------------------------- forward


@torch.library.custom_op("moezoo::fused_expert_ffn", mutates_args=())
def fused_expert_ffn_op(
    x_TD: Tensor,
    token_idx_N: Tensor,
    expert_idx_N: Tensor,
    gate_N: Tensor,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    b_in_EH: Tensor | None,
    b_out_ED: Tensor | None,
    activation: str,
    save_h: bool,
    gemm: str = "auto",
    save: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(out (T, D), h (N, H) pre-activations, order_N, x (N, D) gathered inputs, a (N, F) activation output
    before the gate, act(gate) (N, F))``, the per-row tensors in expert-sorted order; ``h`` is empty unless
    ``save_h``, the last three unless also :func:`choose_save` says ``"all"`` (``act(gate)`` also for plain
    activations). ``gemm``: see :func:`choose_gemm`."""
    num_experts, dim, hidden = w_in_EDH.shape
    ffn_dim = w_out_EFD.shape[1]
    perm = sort_by_expert(token_idx_N, expert_idx_N, num_experts)
    choice = _choose(gemm, perm.counts, x_TD, w_in_EDH, w_out_EFD)
    plan = ChunkPlan(perm, gate_N.index_select(0, perm.order_N).to(x_TD.dtype), (dim, hidden), choice)
    chunks = plan.chunks()
    max_rows = max((c.r1 - c.r0 for c in chunks), default=0)
    whole = len(chunks) == 1 and chunks[0].whole  # grouped_mm's product of the only chunk is h itself, no copy
    keep = save_h and choose_save(save) == "all"
    gated = is_gated(activation)
    x_ND, a_NF, act_gate_NF = _kept_buffers(x_TD, plan.num_rows if keep else 0, dim, ffn_dim, gated)
    h_RH = x_TD.new_empty(0 if whole else plan.num_rows if save_h else max_rows, hidden)
    out_TD = x_TD.new_zeros(x_TD.shape)
    xy_buf = x_TD.new_empty(max_rows, dim)  # a chunk's gathered inputs, then (dead after the first GEMM) its outputs
    a_buf = x_TD.new_empty(0 if keep else max_rows, ffn_dim)
    for chunk in chunks:
        r0, r1 = chunk.r0, chunk.r1
        n = r1 - r0
        tok = plan.token_R[r0:r1]
        x_RD = torch.index_select(x_TD, 0, tok, out=x_ND[r0:r1] if keep else xy_buf[:n])
        if whole:
            h_RH = h_chunk = plan.mm(x_RD, w_in_EDH, chunk, h_RH)
        else:
            h_out = h_RH[r0:r1] if save_h else h_RH[:n]
            h_chunk = plan.mm(x_RD, w_in_EDH, chunk, h_out, fill=save_h)
        if b_in_EH is not None:
            plan.add_bias(h_chunk, b_in_EH, chunk)
        g_R1 = plan.gate_R1[r0:r1]
        if keep:  # a is kept before the gate: the gate scales the expert's output rows instead
            gate_out = act_gate_NF[r0:r1] if gated else None
            _, a_RF = act_forward_parts(h_chunk, activation, out=a_NF[r0:r1], gate_out=gate_out)
            y_RD = plan.mm(a_RF, w_out_EFD, chunk, xy_buf[:n])
            if b_out_ED is not None:
                plan.add_bias(y_RD, b_out_ED, chunk)
            y_RD.mul_(g_R1)
        else:
            a_RF = act_forward(h_chunk, activation, out=a_buf[:n]).mul_(g_R1)
            y_RD = plan.mm(a_RF, w_out_EFD, chunk, xy_buf[:n])
            if b_out_ED is not None:
                plan.add_bias(y_RD, b_out_ED, chunk, g_R1)
        out_TD.index_add_(0, tok, y_RD)
    h_NH = h_RH if save_h else x_TD.new_empty(0, hidden)
    return out_TD, h_NH, perm.order_N, x_ND, a_NF, act_gate_NF


def _kept_buffers(x_TD: Tensor, rows: int, dim: int, ffn_dim: int, gated: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The tensors ``save="all"`` keeps: ``x (rows, D), a (rows, F), act(gate) (rows or 0, F)``."""
    return (
        x_TD.new_empty(rows, dim),
        x_TD.new_empty(rows, ffn_dim),
        x_TD.new_empty(rows if gated else 0, ffn_dim),
    )


@fused_expert_ffn_op.register_fake
def _(
    x_TD: Tensor,
    token_idx_N: Tensor,
    expert_idx_N: Tensor,
    gate_N: Tensor,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    b_in_EH: Tensor | None,
    b_out_ED: Tensor | None,
    activation: str,
    save_h: bool,
    gemm: str = "auto",
    save: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    rows = token_idx_N.shape[0]
    dim, ffn_dim = w_in_EDH.shape[1], w_out_EFD.shape[1]
    h_NH = x_TD.new_empty(rows if save_h else 0, w_in_EDH.shape[2])
    keep = save_h and choose_save(save) == "all"
    kept = _kept_buffers(x_TD, rows if keep else 0, dim, ffn_dim, is_gated(activation))
    return x_TD.new_empty(x_TD.shape), h_NH, token_idx_N.new_empty(rows), *kept


# --------------------------------------------------------------------------------------------------- backward


@torch.library.custom_op("moezoo::fused_expert_ffn_bwd", mutates_args=())
def fused_expert_ffn_bwd_op(
    dout_TD: Tensor,
    x_TD: Tensor,
    token_idx_N: Tensor,
    expert_idx_N: Tensor,
    gate_N: Tensor,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    b_out_ED: Tensor | None,
    h_NH: Tensor,
    order_N: Tensor,
    activation: str,
    need_dx: bool,
    need_dgate: bool,
    need_dw_in: bool,
    need_dw_out: bool,
    need_db_in: bool,
    need_db_out: bool,
    gemm: str = "auto",
    x_ND: Tensor | None = None,
    a_NF: Tensor | None = None,
    act_gate_NF: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dgate, dw_in, dw_out, db_in, db_out)`` in the dtypes of their inputs; a gradient not asked for is
    empty. ``x_ND``, ``a_NF``, ``act_gate_NF``: what the forward kept with ``save="all"`` (all three or none;
    ``act_gate_NF`` empty for plain activations); then nothing is re-gathered or recomputed."""
    num_experts, dim, hidden = w_in_EDH.shape
    ffn_dim = w_out_EFD.shape[1]
    perm = sort_by_expert(token_idx_N, expert_idx_N, num_experts, order_N)
    choice = _choose(gemm, perm.counts, x_TD, w_in_EDH, w_out_EFD)
    plan = ChunkPlan(perm, gate_N.index_select(0, order_N).to(x_TD.dtype), (dim, hidden), choice)
    chunks = plan.chunks()
    dout_TD = dout_TD.contiguous()
    empty = plan.empty_experts()
    dx = x_TD.new_zeros(x_TD.shape) if need_dx else None
    dw_in = _weight_grad_buffer(w_in_EDH, empty) if need_dw_in else None
    dw_out = _weight_grad_buffer(w_out_EFD, empty) if need_dw_out else None
    dgate_R = x_TD.new_empty(plan.num_rows) if need_dgate else None
    hidden_grad = need_dx or need_dw_in or need_db_in
    db_in = w_in_EDH.new_zeros(num_experts, hidden) if need_db_in else None
    db_out = w_out_EFD.new_zeros(num_experts, dim) if (need_db_out and b_out_ED is not None) else None
    w_out_t = w_out_EFD.transpose(1, 2)
    w_in_t = w_in_EDH.transpose(1, 2)
    max_rows = max((c.r1 - c.r0 for c in chunks), default=0)
    kept = a_NF is not None
    assert kept == (x_ND is not None) == (act_gate_NF is not None), "x_ND, a_NF and act_gate_NF go together"
    gated = is_gated(activation)
    # Workspaces, each reused across chunks: dz_buf holds a chunk's output gradients, then its input gradients,
    # then its re-gathered inputs; dh_buf holds the activation output a (dead before dh is written), then dh.
    dz_buf = x_TD.new_empty(max_rows, dim)
    da_buf = x_TD.new_empty(max_rows, ffn_dim)
    dh_buf = x_TD.new_empty(max_rows, hidden)
    act_gate_buf = x_TD.new_empty(max_rows, ffn_dim) if gated and not kept else None
    for chunk in chunks:
        r0, r1 = chunk.r0, chunk.r1
        n = r1 - r0
        tok = plan.token_R[r0:r1]
        g_R1 = plan.gate_R1[r0:r1]
        dz_RD = torch.index_select(dout_TD, 0, tok, out=dz_buf[:n])
        da_RF = plan.mm(dz_RD, w_out_t, chunk, da_buf[:n])
        h_chunk = h_NH[r0:r1]
        if kept:
            assert a_NF is not None and act_gate_NF is not None
            a_RF, act_gate_RF = a_NF[r0:r1], (act_gate_NF[r0:r1] if gated else None)
        else:
            a_out = dh_buf.view(-1)[: n * ffn_dim].view(n, ffn_dim)
            act_gate = None if act_gate_buf is None else act_gate_buf[:n]
            act_gate_RF, a_RF = act_forward_parts(h_chunk, activation, out=a_out, gate_out=act_gate)
        if dgate_R is not None:
            # one batched row dot product: no (n, F) temporary
            torch.bmm(da_RF.unsqueeze(1), a_RF.unsqueeze(2), out=dgate_R[r0:r1].view(n, 1, 1))
            if b_out_ED is not None:
                plan.bias_dot(dz_RD, b_out_ED, chunk, dgate_R[r0:r1])
        if kept:  # the kept a must stay unchanged: the gate scales dz instead (dz is dead after this)
            if db_out is not None or dw_out is not None:
                dz_RD.mul_(g_R1)
            if db_out is not None:
                plan.bias_grad(dz_RD, chunk, db_out)
            if dw_out is not None:
                dw_out = plan.weight_grad(a_RF, dz_RD, chunk, dw_out)
        else:
            if db_out is not None:
                plan.bias_grad(dz_RD * g_R1, chunk, db_out)
            if dw_out is not None:
                dw_out = plan.weight_grad(a_RF.mul_(g_R1), dz_RD, chunk, dw_out)
        if not hidden_grad:
            continue
        dh_RH = act_backward(da_RF.mul_(g_R1), h_chunk, activation, act_gate_RF, out=dh_buf[:n])
        if db_in is not None:
            plan.bias_grad(dh_RH, chunk, db_in)
        if dx is not None:
            dx.index_add_(0, tok, plan.mm(dh_RH, w_in_t, chunk, dz_buf[:n]))
        if dw_in is not None:
            if x_ND is not None:
                x_RD = x_ND[r0:r1]
            else:
                x_RD = torch.index_select(x_TD, 0, tok, out=dz_buf[:n])
            dw_in = plan.weight_grad(x_RD, dh_RH, chunk, dw_in)
    dgate = gate_N.new_empty(0)
    if dgate_R is not None:
        dgate = gate_N.new_empty(gate_N.shape)
        dgate[order_N] = dgate_R.to(gate_N.dtype)
    return (
        dx if dx is not None else x_TD.new_empty(0),
        dgate,
        dw_in if dw_in is not None else w_in_EDH.new_empty(0),
        dw_out if dw_out is not None else w_out_EFD.new_empty(0),
        db_in if db_in is not None else w_in_EDH.new_empty(0),
        db_out if db_out is not None else w_out_EFD.new_empty(0),
    )


@fused_expert_ffn_bwd_op.register_fake
def _(
    dout_TD: Tensor,
    x_TD: Tensor,
    token_idx_N: Tensor,
    expert_idx_N: Tensor,
    gate_N: Tensor,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    b_out_ED: Tensor | None,
    h_NH: Tensor,
    order_N: Tensor,
    activation: str,
    need_dx: bool,
    need_dgate: bool,
    need_dw_in: bool,
    need_dw_out: bool,
    need_db_in: bool,
    need_db_out: bool,
    gemm: str = "auto",
    x_ND: Tensor | None = None,
    a_NF: Tensor | None = None,
    act_gate_NF: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    pick = lambda need, t: t.new_empty(t.shape) if need else t.new_empty(0)
    num_experts, dim, hidden = w_in_EDH.shape
    db_in = w_in_EDH.new_empty(num_experts, hidden) if need_db_in else w_in_EDH.new_empty(0)
    db_out = w_out_EFD.new_empty(num_experts, dim) if need_db_out and b_out_ED is not None else w_out_EFD.new_empty(0)
    grads = pick(need_dx, x_TD), pick(need_dgate, gate_N), pick(need_dw_in, w_in_EDH), pick(need_dw_out, w_out_EFD)
    return (*grads, db_in, db_out)


def _setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x_TD, token_idx_N, expert_idx_N, gate_N, w_in_EDH, w_out_EFD, b_in_EH, b_out_ED = inputs[:8]
    ctx.activation, ctx.save_h, ctx.gemm, save = inputs[8:]
    _, h_NH, order_N, *kept = output
    ctx.kept = ctx.save_h and choose_save(save) == "all"
    ctx.has_b_in, ctx.has_b_out = b_in_EH is not None, b_out_ED is not None
    saved = (x_TD, token_idx_N, expert_idx_N, gate_N, w_in_EDH, w_out_EFD, b_out_ED, h_NH, order_N)
    ctx.save_for_backward(*saved, *(kept if ctx.kept else ()))
    ctx.mark_non_differentiable(h_NH, order_N, *kept)
    # the other outputs never get a gradient: without this, autograd would hand backward a zero tensor for each
    # (a fresh (N, H) one for h) only for backward to ignore it
    ctx.set_materialize_grads(False)


def _backward(ctx: Any, dout_TD: Tensor | None, *_: Tensor | None) -> tuple[Tensor | None, ...]:
    if dout_TD is None:  # gradients are not materialised (see _setup): no gradient of out, none of the inputs
        return (None,) * 12
    x_TD, token_idx_N, expert_idx_N, gate_N, w_in_EDH, w_out_EFD, b_out_ED, h_NH, order_N, *kept = ctx.saved_tensors
    if not ctx.save_h:
        raise RuntimeError("moezoo::fused_expert_ffn ran with save_h=False; it cannot be differentiated")
    need_x, need_gate, need_w_in, need_w_out = (ctx.needs_input_grad[i] for i in (0, 3, 4, 5))
    need_b_in = ctx.has_b_in and ctx.needs_input_grad[6]
    need_b_out = ctx.has_b_out and ctx.needs_input_grad[7]
    x_ND, a_NF, act_gate_NF = kept if ctx.kept else (None, None, None)
    dx, dgate, dw_in, dw_out, db_in, db_out = fused_expert_ffn_bwd_op(
        dout_TD,
        x_TD,
        token_idx_N,
        expert_idx_N,
        gate_N,
        w_in_EDH,
        w_out_EFD,
        b_out_ED,
        h_NH,
        order_N,
        ctx.activation,
        need_x,
        need_gate,
        need_w_in,
        need_w_out,
        need_b_in,
        need_b_out,
        ctx.gemm,
        x_ND,
        a_NF,
        act_gate_NF,
    )
    return (
        dx if need_x else None,
        None,
        None,
        dgate if need_gate else None,
        dw_in if need_w_in else None,
        dw_out if need_w_out else None,
        db_in if need_b_in else None,
        db_out if need_b_out else None,
        None,
        None,
        None,
        None,
    )


fused_expert_ffn_op.register_autograd(_backward, setup_context=_setup)


def expert_ffn_fused(
    x_TD: Tensor,
    token_idx_N: Tensor,
    expert_idx_N: Tensor,
    gate_N: Tensor,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    activation: str,
    b_in_EH: Tensor | None = None,
    b_out_ED: Tensor | None = None,
    gemm: str = "auto",
    save: str = "auto",
) -> Tensor:
    """The ``expert_ffn`` contract (see ``moezoo.ops.reference``) on the fused CPU path; ``gemm``: how the expert
    GEMMs run, ``"auto"`` (measured rule, :func:`choose_gemm`), ``"loop"`` or ``"grouped_mm"``; ``save``: what the
    forward keeps for backward, ``"auto"`` (measured rule, :func:`choose_save`), ``"h"`` or ``"all"``."""
    check_gemm(gemm)
    check_save(save)
    params = (x_TD, gate_N, w_in_EDH, w_out_EFD, b_in_EH, b_out_ED)
    save_h = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)
    out_TD, *_ = fused_expert_ffn_op(
        x_TD.contiguous(),
        token_idx_N,
        expert_idx_N,
        gate_N,
        w_in_EDH,
        w_out_EFD,
        b_in_EH,
        b_out_ED,
        activation,
        save_h,
        gemm,
        save,
    )
    return out_TD
