"""
QLoRA (Dettmers et al. 2023, arXiv 2305.14314) in one file, in the paper's order:

  1. NF4, the 4-bit NormalFloat data type                      (paper §3, table built in nf4_table.py)
  2. blockwise 4-bit quantization, bit-compatible with bitsandbytes' NF4 format
  3. double quantization of the block constants
  4. Triton kernels: dequantize, and a fused dequantize-matmul for few rows
  5. the LoRA layer on a frozen 4-bit base
  6. paged AdamW: optimizer state in CUDA unified memory

The whole method in one equation (paper eq. 5), for one linear layer with input X:
    Y = X · doubleDequant(c1, c2, W_nf4)ᵀ + s · X L1 L2        (s = α/r, only L1, L2 are trained)
"""
import ctypes
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
DYN8 = dynamic_map()  # (256,) signed 8-bit dynamic map, for the block constants
DYN8_MID = (DYN8[:-1] + DYN8[1:]) * 0.5  # (255,) float32 midpoints, as bitsandbytes' kernel computes them
# (a block constant exactly on one of these midpoints may round the other way in bitsandbytes' binary
# search; with real float data that does not happen, and either byte decodes in the same format)

_tables = {}


def _table(t, device):
    # the lookup tables, cached per device so a forward pass does not copy them every call
    key = (id(t), device)
    if key not in _tables:
        _tables[key] = t.to(device)
    return _tables[key]


# -----------------------------------------------------------------------------------------------
# 2. Blockwise quantization. The flattened row-major weight is cut into blocks of 64; each block is
#    divided by its absmax c = max|w| so it lies in [-1, 1], and each element is stored as the index
#    of the nearest NF4 value:   w ≈ c · NF4[q],   q ∈ {0..15}.
#    Two indices per byte: element 2j in the high nibble of byte j, element 2j+1 in the low one.
# 3. Double quantization (paper §3): the fp32 constants c (32 bits per 64 weights = 0.5 bit/param)
#    are themselves quantized. Subtract their mean (they are all positive, so centring uses the
#    signed 8-bit range fully), then blockwise-quantize them in blocks of 256 with the 8-bit
#    dynamic map:   c ≈ c2 · DYN8[qc] + mean.   Cost: 8/64 + 32/(64·256) = 0.127 bit/param.


class NF4Weight(nn.Module):
    # A frozen 4-bit weight. Its tensors are buffers so that .to(device) and state_dict() carry them.
    def __init__(self, shape, dtype, blocksize, packed, absmax=None, qabsmax=None, absmax2=None, offset=None):
        super().__init__()
        self.shape, self.dtype, self.blocksize = torch.Size(shape), dtype, blocksize
        self.register_buffer("packed", packed)  # (ceil(numel/2),) uint8
        self.register_buffer("absmax", absmax)  # (n_blocks,) fp32, without double quantization
        self.register_buffer("qabsmax", qabsmax)  # (n_blocks,) uint8, with it
        self.register_buffer("absmax2", absmax2)  # (ceil(n_blocks/256),) fp32
        self.register_buffer("offset", offset)  # () fp32, the mean that was subtracted

    @property
    def double_quant(self):
        return self.qabsmax is not None

    def numel(self):
        return self.shape.numel()

    def bits_per_param(self):
        nbytes = sum(b.numel() * b.element_size() for b in self.buffers())
        return 8 * nbytes / self.numel()

    def _apply(self, fn, recurse=True):
        # .to(device) moves every buffer; .to(dtype)/.half() only change the dtype we dequantize to
        # (read off an empty probe tensor): the fp32 statistics keep full precision, bytes stay bytes.
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        for name, t in self._buffers.items():
            if t is not None:
                out = fn(t)
                self._buffers[name] = t.to(out.device) if t.is_floating_point() else out
        return self

    def extra_repr(self):
        return f"shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, double_quant={self.double_quant}"


def _blockwise(x, blocksize, mids):
    # x (n,) fp32 -> indices (n_blocks, blocksize) of the nearest code value, absmax (n_blocks,)
    n_blocks = -(-x.numel() // blocksize)
    x = F.pad(x, (0, n_blocks * blocksize - x.numel())).view(n_blocks, blocksize)  # ragged tail: zeros
    absmax = x.abs().amax(dim=1)
    # multiply by the fp32 reciprocal, as bitsandbytes does (x / c can round differently). An
    # all-zero block gives 0 * inf = NaN: we send it to the code of 0 so it dequantizes to exact zeros
    # whatever its (double-quantized, hence only approximately 0) absmax. bitsandbytes writes index 0
    # there (its zero block then decodes to ±c, not 0); both bytes decode in the same format.
    xn = (x * (1.0 / absmax)[:, None]).nan_to_num(nan=0.0)
    # nearest value; right=False puts a value exactly on a midpoint in the lower bin, like `x > mid`
    return torch.bucketize(xn, mids.to(x.device), out_int32=True).to(torch.uint8), absmax


def quantize_nf4(w, blocksize=64, double_quant=True):
    if not torch.is_tensor(w) or not w.is_floating_point():
        raise ValueError(f"quantize_nf4: expected a floating-point weight tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if w.numel() == 0:
        raise ValueError(f"quantize_nf4: expected a non-empty weight, got shape {tuple(w.shape)}")
    if not isinstance(blocksize, int) or blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"quantize_nf4: blocksize must be a power of two >= 2, got {blocksize}")
    # in chunks of 2^24 elements (whole blocks), so the fp32 temporaries stay ~0.3 GB even for a
    # 65B layer: quantizing while loading must not need more memory than the 16-bit weight itself
    flat, chunk, packed, absmax = w.detach().reshape(-1), max(1 << 24, blocksize), [], []
    for i in range(0, flat.numel(), chunk):
        idx, c = _blockwise(flat[i : i + chunk].float(), blocksize, NF4_MID)
        idx = idx.view(-1)
        packed.append((idx[0::2] << 4) | idx[1::2])
        absmax.append(c)
    packed, absmax = torch.cat(packed)[: (w.numel() + 1) // 2].contiguous(), torch.cat(absmax)
    if not double_quant:
        return NF4Weight(w.shape, w.dtype, blocksize, packed, absmax=absmax)
    offset = absmax.mean()
    qabsmax, absmax2 = _blockwise(absmax - offset, 256, DYN8_MID)
    qabsmax = qabsmax.view(-1)[: absmax.numel()].contiguous()
    return NF4Weight(w.shape, w.dtype, blocksize, packed, qabsmax=qabsmax, absmax2=absmax2, offset=offset)


def _absmax(q):
    # (n_blocks,) fp32 block constants; with double quantization  c = c2 · DYN8[qc] + mean
    if not q.double_quant:
        return q.absmax
    c2 = q.absmax2.repeat_interleave(256)[: q.qabsmax.numel()]
    return _table(DYN8, q.packed.device)[q.qabsmax.long()] * c2 + q.offset


def _dequantize_torch(q, out):
    # reference path (and the CPU path): w = c · NF4[index]
    idx = torch.stack([q.packed >> 4, q.packed & 15], dim=1).view(-1)  # high nibble first
    absmax = _absmax(q)
    idx = F.pad(idx, (0, absmax.numel() * q.blocksize - idx.numel()))
    w = _table(NF4, q.packed.device)[idx.long()].view(-1, q.blocksize) * absmax[:, None]
    out.view(-1).copy_(w.view(-1)[: q.numel()])
    return out


# -----------------------------------------------------------------------------------------------
# 4. Triton kernels. Training is matmul-bound at large M (rows = batch · sequence): there the cheapest
#    route is to dequantize into a reused 16-bit buffer (one pass, ~4.25 bits read + 16 written per
#    weight) and hand it to cuBLAS. At small M (decoding) the matmul is bound by reading the weight,
#    so a fused kernel that reads only the 4-bit weight and dequantizes in registers wins.
#    Both run on CPU tensors too under TRITON_INTERPRET=1, which is how the tests check them.

FUSED_MAX_M = 16  # rows at or below which nf4_matmul takes the fused kernel; bench.py measures the crossover
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton kernels on CPU tensors (slow; for tests)


@triton.jit
def _block_const(blk, mask, absmax, qabsmax, absmax2, offset, code2, DOUBLE: tl.constexpr):
    # the block constant c of block `blk`; with double quantization  c = c2[blk // 256] · DYN8[qc[blk]] + mean
    if DOUBLE:
        qc = tl.load(qabsmax + blk, mask=mask, other=0).to(tl.int32)
        c = tl.load(code2 + qc) * tl.load(absmax2 + blk // 256, mask=mask, other=0.0) + tl.load(offset)
    else:
        c = tl.load(absmax + blk, mask=mask, other=0.0)
    return c


def _stats(q):
    # the four statistics pointers of a quantized weight; the mode not in use gets a stand-in it never reads
    d = q.packed
    return (d, q.qabsmax, q.absmax2, q.offset) if q.double_quant else (q.absmax, d, d, d)


@triton.jit
def _dequant_kernel(packed, absmax, qabsmax, absmax2, offset, code, code2, out, n_bytes, n_out, half_block,
                    DOUBLE: tl.constexpr, BLOCK: tl.constexpr):
    # one program: BLOCK bytes -> 2·BLOCK values. Both nibbles of a byte share a block (blocksize is even).
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = j < n_bytes
    byte = tl.load(packed + j, mask=mask, other=0).to(tl.int32)
    c = _block_const(j // half_block, mask, absmax, qabsmax, absmax2, offset, code2, DOUBLE)
    hi = tl.load(code + (byte >> 4)) * c
    lo = tl.load(code + (byte & 15)) * c
    o = tl.program_id(0) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(out + o, tl.interleave(hi, lo).to(out.dtype.element_ty), mask=o < n_out)


def _dequantize_triton(q, out):
    n_bytes, block = q.packed.numel(), 1024
    _dequant_kernel[(triton.cdiv(n_bytes, block),)](
        q.packed, *_stats(q), _table(NF4, q.packed.device), _table(DYN8, q.packed.device), out, n_bytes, q.numel(), q.blocksize // 2,
        DOUBLE=q.double_quant, BLOCK=block)
    return out


@triton.jit
def _fused_matmul_kernel(x, packed, absmax, qabsmax, absmax2, offset, code, code2, y, M, N, K,
                         sxm, sxk, sym, syn, swn, swk, blocksize,
                         DOUBLE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    # y[m, n] = Σ_k x[m, k] · W'[n, k]  with  W'[n, k] = Ŵ.flat[n·swn + k·swk]
    # forward  y = x Ŵᵀ : (swn, swk) = (K, 1);   backward dx = dy Ŵ : (swn, swk) = (1, in_features)
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(x + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        wmask = (rk[:, None] < K) & (rn[None, :] < N)
        f = rk[:, None] * swk + rn[None, :] * swn  # (BK, BN) flat index into the weight
        byte = tl.load(packed + f // 2, mask=wmask, other=0).to(tl.int32)
        nib = (byte >> ((1 - f % 2) * 4)) & 15
        c = _block_const(f // blocksize, wmask, absmax, qabsmax, absmax2, offset, code2, DOUBLE)
        w = (tl.load(code + nib) * c).to(a.dtype)  # (BK, BN) dequantized in registers, never in memory
        acc += tl.dot(a, w, input_precision=PRECISION)
    tl.store(y + rm[:, None] * sym + rn[None, :] * syn, acc.to(y.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def _fused_matmul(x2, q, transpose):
    # x2 (M, K') -> (M, N'):  x2 Ŵᵀ, or x2 Ŵ when transpose
    M = x2.shape[0]
    n_out, k_in = q.shape
    N, K, swn, swk = (k_in, n_out, 1, k_in) if transpose else (n_out, k_in, k_in, 1)
    y = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    BM, BN, BK = 16, 64, 64
    _fused_matmul_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
        x2, q.packed, *_stats(q), _table(NF4, x2.device), _table(DYN8, x2.device), y, M, N, K,
        x2.stride(0), x2.stride(1), y.stride(0), y.stride(1), swn, swk, q.blocksize,
        DOUBLE=q.double_quant, BM=BM, BN=BN, BK=BK,
        PRECISION="ieee" if x2.dtype == torch.float32 else "tf32")  # fp32 stays fp32 (Triton's default dot is TF32)
    return y


def _use_triton(t):
    return t.is_cuda or (INTERPRET and t.dtype != torch.bfloat16)  # the interpreter mishandles bf16


def dequantize_nf4(q, dtype=None, out=None):
    out = torch.empty(q.shape, dtype=dtype or q.dtype, device=q.packed.device) if out is None else out.view(q.shape)
    return _dequantize_triton(q, out) if _use_triton(out) else _dequantize_torch(q, out)


_scratch = {}


def _dequant_scratch(q, dtype):
    # one dequantization buffer per (device, dtype), reused by every layer: layers run one at a time
    # and nothing keeps the dequantized weight (backward dequantizes again), so 16-bit copies never pile up
    if torch.compiler.is_compiling():  # a compiled graph plans its own buffers, and must not see ours mutate
        return dequantize_nf4(q, dtype)
    key = (q.packed.device, dtype)
    if key not in _scratch or _scratch[key].numel() < q.numel():
        _scratch[key] = torch.empty(q.numel(), dtype=dtype, device=q.packed.device)
    return dequantize_nf4(q, dtype, out=_scratch[key][: q.numel()])


def _matmul(x, q, transpose):
    x2 = x.reshape(-1, x.shape[-1])
    if _use_triton(x2) and x2.shape[0] <= FUSED_MAX_M:
        y = _fused_matmul(x2, q, transpose)
    else:
        w = _dequant_scratch(q, x.dtype)  # (N, K)
        y = x2 @ (w if transpose else w.t())
    return y.view(*x.shape[:-1], y.shape[-1])


class NF4Matmul(torch.autograd.Function):
    # y = x Ŵᵀ, dx = dy Ŵ. The base weight is frozen: no dW, and nothing but x's shape is saved.
    @staticmethod
    def forward(ctx, x, q):
        ctx.q = q
        return _matmul(x, q, transpose=False)

    @staticmethod
    def backward(ctx, dy):
        return _matmul(dy, ctx.q, transpose=True), None


def nf4_matmul(x, q):
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"nf4_matmul: x's last dimension must be the weight's in-features {q.shape[1]} "
                         f"(weight {tuple(q.shape)}), got x of shape {tuple(x.shape)}")
    if torch.is_autocast_enabled(x.device.type):  # custom kernels do not autocast by themselves
        x = x.to(torch.get_autocast_dtype(x.device.type))
    return NF4Matmul.apply(x, q)


# -----------------------------------------------------------------------------------------------
# 5. LoRA (paper eq. 5):  y = x Ŵᵀ + (α/r) · dropout(x) Aᵀ Bᵀ,   A (r, in), B (out, r).
#    B starts at zero, so training starts exactly from the pretrained model; A is kaiming-uniform.
#    Only A and B are parameters: the 4-bit base sits in buffers and receives no gradient.


class LoRALinear(nn.Module):
    def __init__(self, weight, r=64, alpha=16, dropout=0.0):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        if isinstance(weight, NF4Weight):
            self.weight = weight
        else:  # a 16-bit base (quantize=False): frozen, so a buffer
            self.register_buffer("weight", weight.detach())
        self.r, self.scaling = r, (alpha / r if r > 0 else 0.0)
        if r > 0:
            device = weight.packed.device if isinstance(weight, NF4Weight) else weight.device
            self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))  # (r, in) fp32
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))  # (out, r) fp32
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):  # x (..., in) -> (..., out)
        quantized = isinstance(self.weight, NF4Weight)
        y = nf4_matmul(x, self.weight) if quantized else F.linear(x, self.weight.to(x.dtype))
        if self.r > 0:
            # (x Aᵀ) Bᵀ: two thin matmuls through the rank-r bottleneck, never the (out, in) product B A
            h = F.linear(self.dropout(x), self.lora_A.to(x.dtype))  # (..., r)
            y = y + F.linear(h, self.lora_B.to(h.dtype)) * self.scaling
        return y

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling}"


def merge_lora(layer, dtype=None):
    # W' = Ŵ + (α/r) B A as a dense weight, for export or adapter-free inference. Explicit on purpose:
    # merging never happens behind the user's back (e.g. on eval()).
    base = layer.weight
    w = dequantize_nf4(base, torch.float32) if isinstance(base, NF4Weight) else base.float()
    if layer.r > 0:
        w = w + layer.scaling * (layer.lora_B.float() @ layer.lora_A.float())
    return w.to(dtype or base.dtype)


# -----------------------------------------------------------------------------------------------
# 6. Paged AdamW (paper §3, "paged optimizers"). Long sequences make activation memory spike; a
#    normal optimizer then dies with out-of-memory. Here the Adam state lives in CUDA unified memory:
#    the driver pages it to host RAM when the GPU runs short and back on access, and we prefetch it to
#    the GPU right before each update. Where managed memory is not available the state lives in pinned
#    host RAM and is copied in and out around each update; on a CPU it is plain tensors.
#    The update is torch.optim.AdamW's exactly (decoupled weight decay, bias correction):
#       p ← p (1 − lr·λ);  m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²
#       p ← p − lr/(1−β1ᵗ) · m / (√v / √(1−β2ᵗ) + ε)

_libcuda = None


def _cuda():
    global _libcuda
    if _libcuda is None:
        _libcuda = ctypes.CDLL("libcuda.so.1")
    return _libcuda


class _CUmemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _Managed:
    # a unified-memory allocation that torch.as_tensor wraps without a copy (and keeps alive)
    def __init__(self, shape):
        self.ptr, nbytes = 0, 4 * math.prod(shape)
        ptr = ctypes.c_uint64()
        err = _cuda().cuMemAllocManaged(ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 4)), 1)  # 1: attach global
        if err != 0:
            raise RuntimeError(f"cuMemAllocManaged({nbytes} bytes) failed with CUDA error {err}")
        self.ptr, self.nbytes = ptr.value, nbytes
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": "<f4", "data": (self.ptr, False), "version": 3}

    def __del__(self):
        if self.ptr:
            _cuda().cuMemFree_v2(ctypes.c_uint64(self.ptr))


def _prefetch(t, device):
    # a hint: move the pages to the GPU on the current stream before the update kernels touch them
    stream = ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)
    ptr, nbytes = ctypes.c_uint64(t.data_ptr()), ctypes.c_size_t(t.numel() * 4)
    lib = _cuda()
    if hasattr(lib, "cuMemPrefetchAsync_v2"):
        lib.cuMemPrefetchAsync_v2(ptr, nbytes, _CUmemLocation(1, device.index or 0), ctypes.c_uint(0), stream)
    else:
        lib.cuMemPrefetchAsync(ptr, nbytes, ctypes.c_int(device.index or 0), stream)


class PagedAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, paging="auto"):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"PagedAdamW: need lr, eps, weight_decay >= 0 and 0 <= betas < 1, got lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
        if paging not in ("auto", "managed", "pinned"):
            raise ValueError(f"PagedAdamW: paging must be 'auto', 'managed' or 'pinned', got {paging!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.paging = paging

    def _alloc(self, p):
        # fp32 state shaped like p, in the memory paging asks for
        if p.device.type != "cuda":
            return torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        if self.paging in ("auto", "managed"):
            try:
                with torch.cuda.device(p.device):  # makes the device's primary context current for the driver calls
                    if 4 * p.numel() > torch.cuda.mem_get_info()[0]:  # oversubscribing managed memory can hang a GPU
                        raise RuntimeError("not enough free GPU memory for a managed allocation")
                    m = _Managed(p.shape)
                    t = torch.as_tensor(m, device=p.device)
                if t.data_ptr() != m.ptr:  # as_tensor copied (wrong context?): that copy would not be paged
                    raise RuntimeError("managed allocation was not wrapped in place")
                return t.zero_()
            except (OSError, AttributeError, RuntimeError):
                if self.paging == "managed":
                    raise
                self.paging = "pinned"  # no driver library / no managed memory: fall back for good
        return torch.zeros(p.shape, dtype=torch.float32, pin_memory=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"], st["exp_avg_sq"] = self._alloc(p), self._alloc(p)
                m, v = st["exp_avg"], st["exp_avg_sq"]
                pinned = m.device != p.device
                if pinned:  # host-resident state: copy in, update on the GPU, copy back
                    m, v = m.to(p.device, non_blocking=True), v.to(p.device, non_blocking=True)
                elif p.is_cuda:
                    _prefetch(m, p.device), _prefetch(v, p.device)
                st["step"] += 1
                t = st["step"].item()
                g = p.grad.float() if p.dtype != torch.float32 else p.grad
                p.mul_(1 - lr * wd)
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                bias2_sqrt = (1 - beta2 ** t) ** 0.5
                denom = (v.sqrt() / bias2_sqrt).add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
                if pinned:
                    st["exp_avg"].copy_(m, non_blocking=True), st["exp_avg_sq"].copy_(v, non_blocking=True)
        return loss

    def state_dict(self):
        if self.paging == "pinned" and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # pinned state is copied back asynchronously
        return super().state_dict()

    def load_state_dict(self, state_dict):
        # torch's loader would cast the moments to the parameter's dtype (bf16 rounding) in ordinary GPU
        # memory (a spike a full GPU may not have). Let it load only the steps and hyperparameters, and
        # copy the fp32 moments straight into paged memory.
        saved = state_dict["state"]
        steps = {i: {k: v for k, v in s.items() if k == "step"} for i, s in saved.items()}
        super().load_state_dict({**state_dict, "state": steps})
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for i, p in zip(ids, [p for g in self.param_groups for p in g["params"]]):
            for k in ("exp_avg", "exp_avg_sq"):
                if k in saved.get(i, {}):
                    self.state[p][k] = self._alloc(p)
                    self.state[p][k].copy_(saved[i][k])
