"""QLoRA (Dettmers et al. 2023, arXiv 2305.14314) in one file, in the paper's order:

  1. NF4, the 4-bit NormalFloat data type                      (paper §3, table built in nf4_table.py)
  2. blockwise 4-bit quantization, bit-compatible with bitsandbytes' NF4 format
  3. double quantization of the block constants
  4. Triton kernels: dequantize, and a fused dequantize-matmul for few rows (off until it wins: FUSED_MAX_M)
  5. the LoRA layer on a frozen 4-bit base
  6. paged AdamW: optimizer state in CUDA unified memory

Notation (paper §2-3), used throughout. W is a frozen base weight, PyTorch's (out, in) = the paper's (h × o)
transposed, flattened row-major and cut into blocks of `blocksize` (64 below): element i is in block b = i // blocksize.

  paper     here              what                                                    shape, dtype
  W^NF4     packed            the NF4 index of each element, two per byte             (⌈numel/2⌉,) uint8
  c2^FP32   c2                first-level constant of each block: its absmax          (n_blocks,) fp32
  c2^k-bit  c2                with double quantization: c2^8bit, codes into DYN8      (n_blocks,) uint8
  c1^FP32   c1                second-level constant: absmax of each BLOCKSIZE2 = 256  (⌈n_blocks/256⌉,) fp32
                              consecutive centred c2
  mean      c2_mean           mean(c2^FP32), subtracted before quantizing c2          () fp32
  L1, L2    lora_A, lora_B    the LoRA factors (h × r), (r × o), stored transposed: lora_A = L1ᵀ (r, in),
                              lora_B = L2ᵀ (out, r)
  s         scaling           α / r

  doubleDequant(c1, c2, W^NF4) = dequant(dequant(c1, c2), W^NF4) = Ŵ                     (eq. 6)
      dequant(c1, c2)[b]         = c1[b // 256] · DYN8[c2[b]] + c2_mean  ≈ c2^FP32[b]
      dequant(c2^FP32, W^NF4)[i] = c2^FP32[i // 64] · NF4[W^NF4[i]]      = Ŵ[i]
(The paper's constant is the inverse scale, eq. 1; like bitsandbytes we store absmax and multiply.)

The whole method in one equation (eq. 5 with eq. 3's scaling), for one linear layer with input X (…, in):
    Y = X Ŵᵀ + s · X L1 L2  =  X Ŵᵀ + s · (X lora_Aᵀ) lora_Bᵀ        (only L1, L2 are trained)
"""
import ctypes
import functools
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

from nf4_table import dynamic_map, midpoints, nf4_values

# -----------------------------------------------------------------------------------------------
# 1. NF4: 16 values at equal-probability quantiles of N(0, 1), scaled to [-1, 1]; index 7 is 0.

NF4 = nf4_values()  # (16,) float32
NF4_MID = midpoints(NF4)  # (15,) decision boundaries, as in bitsandbytes' decision tree
DYN8 = dynamic_map()  # (256,) signed 8-bit dynamic map, the code of c2^8bit
DYN8_MID = midpoints(DYN8)  # (255,) float32, the values bitsandbytes' kernel computes as (a + b) · 0.5 (one rounding either way)
BLOCKSIZE2 = 256  # second-level block: one c1 per 256 values of c2 (the paper's choice, and bitsandbytes')

# -----------------------------------------------------------------------------------------------
# 2. Blockwise quantization: each block is divided by its absmax c2 (into [-1, 1]) and each element is stored as
#    the index of the nearest NF4 value; element 2j goes in the high nibble of byte j, element 2j+1 in the low one.
# 3. Double quantization: c2^FP32 costs 32 bits per 64 weights = 0.5 bit/param. Quantize it too,
#    blockwise in blocks of BLOCKSIZE2 with the 8-bit map, after subtracting its mean:
#       c2^FP32 ≈ c1 · DYN8[c2^8bit] + c2_mean.    Cost: 8/64 + 32/(64·256) = 0.127 bit/param.

class NF4Weight(nn.Module):  # a frozen 4-bit weight; its tensors are buffers, so .to(device) and state_dict() carry them
    def __init__(self, shape, dtype, blocksize, packed, c2, c1=None, c2_mean=None):
        super().__init__()
        self.shape, self.dtype, self.blocksize, self.double_quant = torch.Size(shape), dtype, blocksize, c1 is not None
        for name, t in dict(packed=packed, c2=c2, c1=c1, c2_mean=c2_mean).items():  # c1, c2_mean: None unless double quant
            self.register_buffer(name, t)
        for name, table in dict(nf4=NF4, dyn8=DYN8).items():  # on this weight's device; not saved: the format's definition
            self.register_buffer(name, table.to(packed.device), persistent=False)

    @property
    def device(self):
        return self.packed.device

    def numel(self):
        return self.shape.numel()

    def bits_per_param(self):
        return 8 * sum(b.numel() * b.element_size() for b in self.state_dict().values()) / self.numel()  # as stored

    def _apply(self, fn, recurse=True):
        # .to(device) moves every buffer; .to(dtype)/.half() only change the dtype we dequantize to
        # (read off an empty probe tensor): fp32 constants and tables keep full precision, bytes stay bytes.
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        for name, t in self._buffers.items():
            if t is not None:
                out = fn(t)
                self._buffers[name] = t.to(out.device) if t.is_floating_point() else out
        return self


def quantize_nf4(w, blocksize=64, double_quant=True):
    if not torch.is_tensor(w) or not w.is_floating_point():
        raise ValueError(f"quantize_nf4: expected a floating-point weight tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if w.numel() == 0:
        raise ValueError(f"quantize_nf4: expected a non-empty weight, got shape {tuple(w.shape)}")
    if not isinstance(blocksize, int) or blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"quantize_nf4: blocksize must be a power of two >= 2, got {blocksize}")
    # in chunks of 2^24 elements (whole blocks): the fp32 temporaries stay under ~0.3 GB whatever the layer's size
    # (a 65B MLP weight alone is 0.36 GB in bf16): quantizing while loading costs a bounded extra, not a multiple of a layer
    flat, chunk, packed, c2 = w.detach().reshape(-1), max(1 << 24, blocksize), [], []
    for i in range(0, flat.numel(), chunk):
        idx, c = _blockwise(flat[i : i + chunk].float(), blocksize, NF4_MID)
        packed.append((idx[0::2] << 4) | idx[1::2])
        c2.append(c)
    packed, c2 = torch.cat(packed)[: (flat.numel() + 1) // 2].contiguous(), torch.cat(c2)  # W^NF4 (⌈numel/2⌉ bytes), c2^FP32
    if not double_quant:
        return NF4Weight(w.shape, w.dtype, blocksize, packed, c2)
    c2_mean = c2.mean()
    c2_8bit, c1 = _blockwise(c2 - c2_mean, BLOCKSIZE2, DYN8_MID, even_ties=True)  # c2 − c2_mean ≈ c1 · DYN8[c2^8bit]
    return NF4Weight(w.shape, w.dtype, blocksize, packed, c2_8bit[: c2.numel()].contiguous(), c1, c2_mean)


def _blockwise(x, blocksize, mids, even_ties=False):  # x (n,) fp32 -> nearest code value's index (n_blocks · blocksize,), absmax (n_blocks,)
    x = F.pad(x, (0, -x.numel() % blocksize)).view(-1, blocksize)  # (n_blocks, blocksize), ragged tail: zeros
    absmax = x.abs().nan_to_num(nan=0.0, posinf=math.inf).amax(dim=1)  # NaN skipped (fmaxf in bitsandbytes), inf kept
    # multiply by the fp32 reciprocal, as bitsandbytes does (x / c can round differently). An all-zero block gives
    # 0 * inf = NaN, and a NaN weight stays NaN: both go to the code of 0 (NF4 has an exact 0), so a zero block dequantizes to exact zeros
    # whatever its (double-quantized, only approximately 0) c2 (bitsandbytes writes index 0 there, decoding to -c2).
    xn = (x * (1.0 / absmax)[:, None]).nan_to_num(nan=0.0)
    # nearest value; right=False puts a value exactly on a midpoint in the lower bin, like `x > mid` in NF4's decision
    # tree. bitsandbytes' 8-bit binary search (127 ± 64 ± ... ± 1) ends on an even index: even_ties sends a tie there.
    mids = mids.to(x.device)
    idx = torch.bucketize(xn, mids, out_int32=True)
    if even_ties:
        idx += (idx % 2 == 1) & (xn == mids[idx.clamp(max=mids.numel() - 1)])
    return idx.to(torch.uint8).view(-1), absmax


def dequantize_nf4(q, dtype=None, out=None):  # Ŵ = doubleDequant(c1, c2, W^NF4) in `dtype` (default: the weight's)
    if out is not None and not out.is_contiguous():  # into `out` if given: Ŵ is written in row-major order
        raise ValueError(f"dequantize_nf4: out must be contiguous, got shape {tuple(out.shape)} with strides {out.stride()}")
    out = torch.empty(q.shape, dtype=dtype or q.dtype, device=q.device) if out is None else out.view(q.shape)
    return _dequantize_triton(q, out) if _use_triton(out) else _dequantize_torch(q, out)


def _dequantize_torch(q, out):
    # reference path (and the CPU path): Ŵ[i] = c2^FP32[i // blocksize] · NF4[W^NF4[i]], c2^FP32 = dequant(c1, c2) with double quantization
    idx = torch.stack([q.packed >> 4, q.packed & 15], dim=1).view(-1)  # high nibble first
    c2_fp32 = (q.dyn8[q.c2.long()] * q.c1.repeat_interleave(BLOCKSIZE2)[: q.c2.numel()] + q.c2_mean) if q.double_quant else q.c2
    idx = F.pad(idx, (0, c2_fp32.numel() * q.blocksize - idx.numel()))  # to whole blocks: an odd or ragged tail padded
    w = q.nf4[idx.long()].view(-1, q.blocksize) * c2_fp32[:, None]
    out.view(-1).copy_(w.view(-1)[: q.numel()])
    return out


# -----------------------------------------------------------------------------------------------
# 4. Triton kernels. Training is matmul-bound at large M (rows = batch · sequence): there the cheapest route is to
#    dequantize into a reused 16-bit buffer (one pass, ~4.13 bits read + 16 written per weight) and hand it to cuBLAS.
#    At small M (decoding) the matmul is bound by reading the weight, so a fused kernel that reads only the 4-bit weight
#    should win; this one does not yet (README's kernel table: slower than dequantize + cuBLAS at every M measured),
#    so FUSED_MAX_M, the rows up to which nf4_matmul takes it, is 0.

FUSED_MAX_M = 0


def _use_triton(t):  # CUDA; CPU while TRITON_INTERPRET=1 (set before import too), but not bf16: the interpreter truncates it
    return t.is_cuda or (os.environ.get("TRITON_INTERPRET") == "1" and t.dtype != torch.bfloat16)


@triton.jit
def _c2_of_block(b, mask, c2, c1, c2_mean, dyn8, DOUBLE: tl.constexpr, BLOCKSIZE2: tl.constexpr):
    if DOUBLE:  # c2^FP32 of block b: dequant(c1, c2) = c1[b // 256] · DYN8[c2[b]] + c2_mean
        code = tl.load(c2 + b, mask=mask, other=0).to(tl.int32)
        return tl.load(dyn8 + code) * tl.load(c1 + b // BLOCKSIZE2, mask=mask, other=0.0) + tl.load(c2_mean)
    else:  # c1, c2_mean are None (a constant to Triton); `else`: code after the `if` would compile in both cases
        return tl.load(c2 + b, mask=mask, other=0.0)


@triton.jit
def _dequant_kernel(packed, c2, c1, c2_mean, nf4, dyn8, out, n_bytes, n_out, half_block,
                    DOUBLE: tl.constexpr, BLOCKSIZE2: tl.constexpr, BLOCK: tl.constexpr):
    # one program: BLOCK bytes -> 2·BLOCK values. Both nibbles of a byte share a block (blocksize is even).
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = j < n_bytes
    byte = tl.load(packed + j, mask=mask, other=0).to(tl.int32)
    c = _c2_of_block(j // half_block, mask, c2, c1, c2_mean, dyn8, DOUBLE, BLOCKSIZE2)
    hi, lo = tl.load(nf4 + (byte >> 4)) * c, tl.load(nf4 + (byte & 15)) * c
    o = tl.program_id(0) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(out + o, tl.interleave(hi, lo).to(out.dtype.element_ty), mask=o < n_out)


def _dequantize_triton(q, out):
    n_bytes = q.packed.numel()
    block = 1024  # bytes per program (2048 values out): wide coalesced accesses, still thousands of programs per weight
    _dequant_kernel[(triton.cdiv(n_bytes, block),)](
        q.packed, q.c2, q.c1, q.c2_mean, q.nf4, q.dyn8, out, n_bytes, q.numel(), q.blocksize // 2,
        DOUBLE=q.double_quant, BLOCKSIZE2=BLOCKSIZE2, BLOCK=block, enable_fp_fusion=False)  # no FMA: bitsandbytes' rounding
    return out


@triton.jit
def _fused_matmul_kernel(x, packed, c2, c1, c2_mean, nf4, dyn8, y, M, N, K,
                         sxm, sxk, sym, syn, swn, swk, blocksize, DOUBLE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    # y[m, n] = Σ_k x[m, k] · V[n, k]  with  V[n, k] = Ŵ.flat[n·swn + k·swk]
    # forward  y = x Ŵᵀ : (swn, swk) = (K, 1);   backward dx = dy Ŵ : (swn, swk) = (1, in_features)
    rm, rn = tl.program_id(0) * BM + tl.arange(0, BM), tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(x + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        wmask = (rk[:, None] < K) & (rn[None, :] < N)
        f = rk[:, None] * swk + rn[None, :] * swn  # (BK, BN) flat index into the weight
        byte = tl.load(packed + f // 2, mask=wmask, other=0).to(tl.int32)
        nib = (byte >> ((1 - f % 2) * 4)) & 15
        c = _c2_of_block(f // blocksize, wmask, c2, c1, c2_mean, dyn8, DOUBLE, BLOCKSIZE2)
        w = (tl.load(nf4 + nib) * c).to(a.dtype)  # (BK, BN) dequantized in registers, never in memory
        acc += tl.dot(a, w, input_precision=PRECISION)
    tl.store(y + rm[:, None] * sym + rn[None, :] * syn, acc.to(y.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def _fused_matmul(x2, q, transpose):  # x2 (M, K') -> (M, N'):  x2 Ŵᵀ, or x2 Ŵ when transpose
    (M, _), (n_out, k_in) = x2.shape, q.shape
    N, K, swn, swk = (k_in, n_out, 1, k_in) if transpose else (n_out, k_in, k_in, 1)
    y = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    # BM = 16: a small-M call's rows fit one tile (tl.dot needs >= 16); BK × BN: the weight tile
    BM, BN, BK = 16, 64, 64  # dequantized in registers per step, 64 × 64 = 4096 values, 32 per thread of 4 warps
    _fused_matmul_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
        x2, q.packed, q.c2, q.c1, q.c2_mean, q.nf4, q.dyn8, y, M, N, K,
        x2.stride(0), x2.stride(1), y.stride(0), y.stride(1), swn, swk, q.blocksize,
        DOUBLE=q.double_quant, BLOCKSIZE2=BLOCKSIZE2, BM=BM, BN=BN, BK=BK,
        PRECISION="ieee" if x2.dtype == torch.float32 else "tf32")  # fp32 stays fp32 (Triton's default dot is TF32)
    return y


class DequantBuffer:
    # The 16-bit buffers the base weights are dequantized into, one per (device, dtype), shared by the layers of a model:
    # layers run one at a time and nothing keeps Ŵ (backward dequantizes again), so 16-bit copies never pile up.
    def __init__(self):
        self.buffers = {}

    def dequantize(self, q, dtype):  # -> Ŵ (out, in), a view of the buffer, valid until the next call
        if torch.compiler.is_compiling():  # a compiled graph plans its own buffers, and must not see ours mutate
            return dequantize_nf4(q, dtype)
        if (key := (q.device, dtype)) not in self.buffers or self.buffers[key].numel() < q.numel():
            self.buffers[key] = torch.empty(q.numel(), dtype=dtype, device=q.device)
        return dequantize_nf4(q, dtype, out=self.buffers[key][: q.numel()])


def _matmul(x, q, transpose, buffer):
    x2 = x.reshape(-1, x.shape[-1])
    if _use_triton(x2) and x2.shape[0] <= FUSED_MAX_M:
        y = _fused_matmul(x2, q, transpose)
    else:
        w = dequantize_nf4(q, x.dtype) if buffer is None else buffer.dequantize(q, x.dtype)  # Ŵ (out, in)
        y = x2 @ (w if transpose else w.t())
    return y.view(*x.shape[:-1], y.shape[-1])


class NF4Matmul(torch.autograd.Function):  # y = x Ŵᵀ, dx = dy Ŵ; a frozen base: no dW, nothing of x saved
    @staticmethod
    def forward(ctx, x, q, buffer):
        ctx.q, ctx.buffer = q, buffer
        return _matmul(x, q, False, buffer)

    @staticmethod
    def backward(ctx, dy):
        return _matmul(dy, ctx.q, True, ctx.buffer), None, None


def nf4_matmul(x, q, buffer=None):  # x (..., in) -> x Ŵᵀ (..., out); a DequantBuffer to dequantize into, else a fresh tensor each call
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"nf4_matmul: x's last dimension must be the weight's in-features {q.shape[1]} "
                         f"(weight {tuple(q.shape)}), got x of shape {tuple(x.shape)}")
    if torch.is_autocast_enabled(x.device.type):  # custom kernels do not autocast by themselves
        x = x.to(torch.get_autocast_dtype(x.device.type))
    return NF4Matmul.apply(x, q, buffer)


# -----------------------------------------------------------------------------------------------
# 5. LoRA:  Y = X Ŵᵀ + s · dropout(X) L1 L2. L2 (lora_B) starts at zero, so training starts exactly from the quantized
#    base model Ŵ; lora_A is kaiming-uniform. Only lora_A, lora_B are parameters: the 4-bit base sits in buffers, no gradient.

class LoRALinear(nn.Module):
    def __init__(self, weight, r, alpha, dropout=0.0, dequant_buffer=None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.quantized = isinstance(weight, NF4Weight)
        if self.quantized:
            self.weight = weight
        else:  # a 16-bit base (quantize=False): frozen, so a buffer
            self.register_buffer("weight", weight.detach())
        self.dequant_buffer = dequant_buffer  # a model passes one for all its layers; None: a fresh Ŵ per call, freed after it
        self.r, self.scaling = r, (alpha / r if r > 0 else 0.0)  # r = 0: no LoRA branch, the frozen base alone
        if r > 0:
            self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=weight.device))  # (r, in) fp32
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=weight.device))  # (out, r) fp32
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's default init, as peft's
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):  # x (..., in) -> (..., out)
        y = nf4_matmul(x, self.weight, self.dequant_buffer) if self.quantized else F.linear(x, self.weight.to(x.dtype))
        if self.r > 0:  # (X L1) L2: two thin matmuls through the rank-r bottleneck, never the (in, out) L1 L2
            h = F.linear(self.dropout(x), self.lora_A.to(x.dtype))  # (..., r)
            y = y + F.linear(h, self.lora_B.to(h.dtype)) * self.scaling
        return y


def merge_lora(layer, dtype=None, base=None):
    # Ŵ + s · (L1 L2)ᵀ = Ŵ + s · lora_B lora_A as a dense (out, in) weight, for export or adapter-free inference;
    # `base` (an export's original W, fp32, any device) in place of Ŵ if given. Explicit on purpose: merging
    # never happens behind the user's back (e.g. on eval()).
    w = base if base is not None else dequantize_nf4(layer.weight, torch.float32) if layer.quantized else layer.weight.float()
    if layer.r > 0:
        w = w.to(layer.lora_A.device) + layer.scaling * (layer.lora_B.float() @ layer.lora_A.float())
    return w.to(dtype or layer.weight.dtype)


# -----------------------------------------------------------------------------------------------
# 6. Paged AdamW (paper §3, "paged optimizers"). Long sequences make activation memory spike; a normal optimizer then
#    dies with out-of-memory. Here the Adam state lives in CUDA unified memory: the driver pages it to host RAM when the
#    GPU runs short and back on access, and we prefetch it to the GPU right before each update. Without managed memory
#    the state lives in pinned host RAM and is copied in and out around each update; on a CPU it is plain tensors.
#    The update and the defaults are torch.optim.AdamW's (decoupled weight decay λ = 0.01; train.py passes the paper's 0):
#       p ← p (1 − lr·λ);  m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²
#       p ← p − lr/(1−β1ᵗ) · m / (√v / √(1−β2ᵗ) + ε)

@functools.cache
def _cuda():
    return ctypes.CDLL("libcuda.so.1")


class _CUmemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _Managed:  # a unified-memory allocation that torch.as_tensor wraps without a copy (and keeps alive)
    def __init__(self, shape):
        self.ptr, nbytes, ptr = 0, 4 * math.prod(shape), ctypes.c_uint64()
        if err := _cuda().cuMemAllocManaged(ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 4)), 1):  # 1: attach global
            raise RuntimeError(f"cuMemAllocManaged({nbytes} bytes) failed with CUDA error {err}")
        self.ptr = ptr.value
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": "<f4", "data": (self.ptr, False), "version": 3}

    def __del__(self):
        if self.ptr:
            _cuda().cuMemFree_v2(ctypes.c_uint64(self.ptr))


def _prefetch(t, device):  # a hint: move the pages to the GPU on the current stream before the update kernels touch them
    stream = ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)
    ptr, nbytes = ctypes.c_uint64(t.data_ptr()), ctypes.c_size_t(t.numel() * 4)
    if hasattr(lib := _cuda(), "cuMemPrefetchAsync_v2"):
        lib.cuMemPrefetchAsync_v2(ptr, nbytes, _CUmemLocation(1, device.index or 0), ctypes.c_uint(0), stream)  # type 1: a device
    else:
        lib.cuMemPrefetchAsync(ptr, nbytes, ctypes.c_int(device.index or 0), stream)


class PagedAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, paging="auto"):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"PagedAdamW: need lr, eps, weight_decay >= 0 and 0 <= betas < 1, got lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
        if paging not in ("auto", "managed", "pinned"):
            raise ValueError(f"PagedAdamW: paging must be 'auto', 'managed' or 'pinned', got {paging!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.paging = paging  # what the caller asked for
        # where the state went: None before the first allocation, then "managed", "pinned" ("auto" falls back
        # to it for good when managed memory fails; state allocated before stays managed) or "device" (CPU)
        self.memory = None

    def _alloc(self, p):  # fp32 state shaped like p, in the memory paging asks for
        if p.device.type != "cuda":
            self.memory = self.memory or "device"
            return torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        if self.paging in ("auto", "managed") and self.memory != "pinned":
            try:
                with torch.cuda.device(p.device):  # makes the device's primary context current for the driver calls
                    if 4 * p.numel() > torch.cuda.mem_get_info()[0]:  # oversubscribing managed memory can hang a GPU
                        raise RuntimeError("not enough free GPU memory for a managed allocation")
                    m = _Managed(p.shape)
                    t = torch.as_tensor(m, device=p.device)
                if t.data_ptr() != m.ptr:  # as_tensor copied (wrong context?): that copy would not be paged
                    raise RuntimeError("managed allocation was not wrapped in place")
                self.memory = "managed"
                return t.zero_()
            except (OSError, AttributeError, RuntimeError):
                if self.paging == "managed":
                    raise
        self.memory = "pinned"  # asked for, or no driver library / no managed memory
        return torch.zeros(p.shape, dtype=torch.float32, pin_memory=True)

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not (st := self.state[p]):
                    st.update(step=torch.tensor(0.0), exp_avg=self._alloc(p), exp_avg_sq=self._alloc(p))
                m, v = st["exp_avg"], st["exp_avg_sq"]
                if pinned := m.device != p.device:  # host-resident state: copy in, update on the GPU, copy back
                    m, v = m.to(p.device, non_blocking=True), v.to(p.device, non_blocking=True)
                elif p.is_cuda:
                    _prefetch(m, p.device), _prefetch(v, p.device)
                t = st["step"].add_(1).item()
                g = p.grad.float()  # the gradient itself when it is fp32 already
                p.mul_(1 - lr * wd)
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                p.addcdiv_(m, (v.sqrt() / (1 - beta2 ** t) ** 0.5).add_(eps), value=-lr / (1 - beta1 ** t))
                if pinned:
                    st["exp_avg"].copy_(m, non_blocking=True), st["exp_avg_sq"].copy_(v, non_blocking=True)
        return loss

    def state_dict(self):
        if self.memory == "pinned" and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # pinned state is copied back asynchronously
        return super().state_dict()

    def load_state_dict(self, state_dict):
        # torch's loader would cast the moments to the parameter's dtype (bf16 rounding) in ordinary GPU
        # memory (a spike a full GPU may not have). Let it load only the steps and hyperparameters, and
        # copy the fp32 moments straight into paged memory.
        saved = state_dict["state"]
        steps = {i: {"step": torch.tensor(float(s["step"]))} for i, s in saved.items()}  # all three, or none (no step yet)
        if not all(st["step"] >= 1 for st in steps.values()):  # NaN or below 1: bias corrections 1 - β^t of 0 or NaN
            raise ValueError("an optimizer step below 1 (or NaN)")
        super().load_state_dict({**state_dict, "state": steps})
        for i, p in zip([i for g in state_dict["param_groups"] for i in g["params"]], [p for g in self.param_groups for p in g["params"]]):
            if i in saved:  # (reshape: a moment of another size is refused, not broadcast)
                self.state[p].update({k: self._alloc(p).copy_(saved[i][k].reshape(p.shape)) for k in ("exp_avg", "exp_avg_sq")})
