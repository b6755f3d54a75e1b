import os
import torch  # only to ask about CUDA
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # run the Triton kernels on the CPU

import contextlib
import csv
import ctypes
import datetime
import errno
import fcntl
import inspect
import io
import json
import math
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import sentencepiece as spm
import torch.nn.functional as F

import bench as B
import data.checkpoint as C
import data.mmlu as MM
import data.prepare as P
import model as M
import qlora
from data.files import InputError, atomic_save, atomic_write, atomic_write_bytes, flag_help, locked_dir, parse_flags
from data.files import run as files_run
from data.prepare import convert, read_data
from nf4_table import NF4_OFFSET, dynamic_map, midpoints, nf4_values

# Tests in the order of the sources: nf4_table.py and qlora.py (§1-6), model.py and data/checkpoint.py,
# data/files.py, data/prepare.py, data/mmlu.py, then train.py and bench.py from the command line. Every check
# compares against math written here (a float64 or bit-exact float32 reimplementation of the bitsandbytes NF4
# format), never against the function under test itself.
# The same tests run on a CUDA machine (16-bit activations there, real Triton kernels) and on a CPU
# (float32, Triton kernels under the interpreter).

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DT = torch.float16 if CUDA else torch.float32  # activation dtype of the device tests
D16 = torch.float16 if CUDA else torch.bfloat16  # a 16-bit dtype the device's dense matmul supports
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative Frobenius error
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}

# The Triton CPU interpreter (triton 3.x) cannot do bf16: loads of bf16 tensors read garbage and
# fp32 -> bf16 stores truncate instead of rounding. bf16 kernel checks therefore only run on CUDA.
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
bf16_kernels = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not CUDA, reason="the Triton CPU interpreter mishandles bf16"))

# bitsandbytes' NF4 values (csrc/kernels.cu, dDequantizeNF4), written out literally
BNB_NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)
# the thresholds of bitsandbytes' NF4 decision tree (dQuantizeNF4: `x > t` goes to the upper side)
BNB_NF4_MIDS = torch.tensor(sorted([
    0.03979014977812767, 0.3893125355243683, 0.6427869200706482, 0.8614784181118011,
    0.5016634166240692, 0.2035212516784668, 0.2920137718319893, 0.1202552504837513,
    -0.33967943489551544, -0.13791173323988914, -0.045525018125772476, -0.23460740596055984,
    -0.6106329262256622, -0.4599952697753906, -0.8480964004993439]), dtype=torch.float32)


def ref_dyn8():
    # the signed 8-bit dynamic map from its definition: for exponent i in 0..6 the means of
    # linspace(0.1, 1, 2**i + 1) scaled by 10**(i - 6), both signs, plus 0 and 1.0
    vals = [0.0, 1.0]
    for i in range(7):
        b = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        m = (b[:-1] + b[1:]) / 2 * 10.0 ** (i - 6)
        vals += m.tolist() + (-m).tolist()
    return torch.tensor(sorted(vals), dtype=torch.float32)


REF_DYN8 = ref_dyn8()
REF_DYN8_MIDS = (REF_DYN8[:-1] + REF_DYN8[1:]) * 0.5  # float32, as bitsandbytes' kernel computes them


def ref_codes(x, blocksize, mids=BNB_NF4_MIDS):
    # Blockwise quantization, written independently: pad with zeros, scale each block by the float32
    # reciprocal of its absmax, and count the thresholds the value is strictly above (so a value on a
    # threshold takes the lower code; NaN from an all-zero block is above nothing: code 0).
    x = x.detach().reshape(-1).float().cpu()
    n_blocks = -(-x.numel() // blocksize)
    xp = torch.zeros(n_blocks * blocksize)
    xp[: x.numel()] = x
    xp = xp.view(n_blocks, blocksize)
    absmax = xp.abs().max(dim=1).values
    scale = (1.0 / absmax.double()).float()  # correctly rounded float32 reciprocal
    xn = (xp.double() * scale.double()[:, None]).float()  # exact product, rounded once to float32
    return (xn[..., None] > mids).sum(-1).view(-1), absmax  # (n_blocks * blocksize,), (n_blocks,)


def ref_unpack(packed, numel):
    b = packed.cpu().long()
    codes = torch.empty(2 * b.numel(), dtype=torch.long)
    codes[0::2], codes[1::2] = b // 16, b % 16  # element 2j in the high nibble of byte j
    return codes[:numel]


def ref_c2(q):
    # float32 first-level constants c2^FP32; with double quantization DYN8[c2^8bit[b]] * c1[b // 256] + c2_mean
    if not q.double_quant:
        return q.c2.cpu()
    code = q.c2.cpu().long()
    return REF_DYN8[code] * q.c1.cpu()[torch.arange(code.numel()) // 256] + q.c2_mean.cpu()


def ref_dequant(q, dtype=torch.float64):
    # float64: the exact value of NF4[code] * c2. Other dtypes: the float32 product rounded once.
    codes = ref_unpack(q.packed, q.numel())
    c = ref_c2(q)[torch.arange(q.numel()) // q.blocksize]
    if dtype == torch.float64:
        return (BNB_NF4.double()[codes] * c.double()).view(q.shape)
    return (BNB_NF4[codes] * c).to(dtype).view(q.shape)


def assert_dequant_equal(wh, q):
    assert torch.equal(wh.cpu(), ref_dequant(q, wh.dtype))  # bit for bit, on a GPU too


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()


def weight(shape, std=0.02, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * std).to(dtype)


# ------------------------------------------------------------------------------------------------
# 1. NF4 and the 8-bit dynamic map (nf4_table.py; qlora.NF4, NF4_MID, DYN8)


def test_nf4_table_is_bitsandbytes():
    # guards the code values themselves: any drift breaks compatibility with bitsandbytes checkpoints
    assert torch.equal(nf4_values(), BNB_NF4)
    assert NF4_OFFSET == round(1 - (1 / 30 + 1 / 32) / 2, 7)  # the formula in nf4_table.py
    assert torch.equal(qlora.NF4, BNB_NF4)


def test_nf4_table_script_piped_into_head_ends_quietly():
    # `python nf4_table.py | head`: the reader is gone before the table is written (no traceback on stderr)
    p = subprocess.Popen([sys.executable, str(ROOT / "nf4_table.py")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # long before torch is imported and the first line printed
    assert p.stderr.read() == "" and p.wait() == -signal.SIGPIPE


def test_nf4_table_script_prints_each_code_with_its_index_and_bits():
    # the table a reader checks against bitsandbytes: code i is printed as i, its 4 bits and its value
    r = subprocess.run([sys.executable, str(ROOT / "nf4_table.py")], capture_output=True, text=True, timeout=120)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[0] == "NF4 code (index: value)", r.stderr
    assert lines[1:17] == [f"  {i:2d} 0b{i:04b}  {v:+.10f}" for i, v in enumerate(BNB_NF4.tolist())]
    assert lines[1] == "   0 0b0000  -1.0000000000" and lines[16] == "  15 0b1111  +1.0000000000"


def test_nf4_midpoints_are_bitsandbytes_thresholds():
    # the quantizer's decision boundaries must be exactly the float32 constants of bnb's decision tree
    assert torch.equal(midpoints(BNB_NF4), BNB_NF4_MIDS)
    assert torch.equal(qlora.NF4_MID, BNB_NF4_MIDS)


def test_dynamic_map():
    d = dynamic_map()
    assert d.dtype == torch.float32 and d.shape == (256,)
    assert torch.equal(d, d.sort().values)  # sorted
    assert (d == 0).sum() == 1 and d[-1] == 1.0
    pos, neg = d[d > 0][:-1], d[d < 0]  # positives apart from 1.0
    assert torch.equal(-neg.flip(0), pos)  # symmetric apart from 1.0
    # the smallest magnitude: exponent 10^-6 times the mean of (0.1, 1) = 5.5e-7
    assert d[d > 0].min().item() == pytest.approx(5.5e-7, rel=1e-6)
    assert d[d > 0][1].item() == pytest.approx(1e-5 * (0.1 + 0.55) / 2, rel=1e-6)
    assert d[-2].item() == pytest.approx(1 - 0.9 / 128, rel=1e-6)  # last mean of 65 points, 10^0
    # every entry from the definition: exact in float32, and within float32 rounding of float64 math
    assert torch.equal(d, REF_DYN8)
    f64 = [0.0, 1.0]
    for i in range(7):
        b = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float64)
        m = (b[:-1] + b[1:]) / 2 * 10.0 ** (i - 6)
        f64 += m.tolist() + (-m).tolist()
    torch.testing.assert_close(d.double(), torch.tensor(sorted(f64), dtype=torch.float64), rtol=1e-6, atol=0)
    assert torch.equal(qlora.DYN8, REF_DYN8)


# ------------------------------------------------------------------------------------------------
# 2. Blockwise quantization: W^NF4 packing, c2^FP32, ragged sizes


def test_packing_order_high_nibble_first():
    # block 0: the 16 code values in order (codes 0..15), block 1: reversed and scaled by 3. Every
    # value is its own nearest code, so the bytes are known in advance.
    w = torch.cat([BNB_NF4.repeat(4), (BNB_NF4.flip(0) * 3).repeat(4)])
    q = qlora.quantize_nf4(w.view(8, 16).to(DEV), blocksize=64, double_quant=False)
    assert q.packed.dtype == torch.uint8 and q.packed.dim() == 1 and q.packed.numel() == 64
    up = [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]  # code 2j high nibble, 2j+1 low nibble
    down = [0xFE, 0xDC, 0xBA, 0x98, 0x76, 0x54, 0x32, 0x10]
    assert q.packed.cpu().tolist() == up * 4 + down * 4
    assert q.c2.cpu().tolist() == [1.0, 3.0]
    assert torch.equal(q.nf4.cpu(), BNB_NF4) and q.device.type == DEV  # the weight's own lookup table


@pytest.mark.parametrize("shape", [(3, 21), (1, 1), (7, 65)])
def test_ragged_sizes(shape):
    # numel not a multiple of the block (and odd): the tail block is partial and the last byte half pad
    n = math.prod(shape)
    big = weight((n + 200,), seed=1)
    big[n:] = 100.0  # what follows the weight in memory must not leak into the last block's absmax
    w = big[:n].view(shape)
    q = qlora.quantize_nf4(w.to(DEV), blocksize=64, double_quant=False)
    assert q.packed.dtype == torch.uint8 and q.packed.shape == ((n + 1) // 2,)
    if n % 2:
        assert q.packed[-1].item() & 15 == 7  # the pad nibble is the code of 0.0
    codes, absmax = ref_codes(w, 64)
    assert torch.equal(ref_unpack(q.packed, n), codes[:n])
    last = w.reshape(-1)[(q.c2.numel() - 1) * 64:]
    assert q.c2[-1].item() == last.abs().max().item()  # only the real elements
    assert torch.equal(q.c2.cpu(), absmax)
    wh = qlora.dequantize_nf4(q, torch.float32).cpu()
    assert wh.shape == shape and torch.equal(wh, ref_dequant(q, torch.float32))
    # round trip: every element within half the widest NF4 gap (-1 .. -0.696) times its block's absmax
    half_gap = BNB_NF4.diff().max().item() / 2
    assert ((wh - w).abs().reshape(-1) <= half_gap * absmax.repeat_interleave(64)[:n] + 1e-9).all()


def test_even_ragged_size_packs_without_a_pad_byte():
    # an even number of elements that is no multiple of the block: numel / 2 bytes, two codes in each; the zeros that
    # pad the last block are not stored
    for shape in [(5, 26), (3, 22)]:
        n = math.prod(shape)
        w = weight(shape, seed=7)
        q = qlora.quantize_nf4(w.to(DEV), blocksize=64, double_quant=False)
        assert q.packed.shape == (n // 2,), shape
        assert torch.equal(ref_unpack(q.packed, n), ref_codes(w, 64)[0][:n])
        assert torch.equal(qlora.dequantize_nf4(q, torch.float32).cpu(), ref_dequant(q, torch.float32))


# ------------------------------------------------------------------------------------------------
# 2. Blockwise quantization: codes equal the reference (nearest value, ties, scaling, zero blocks)


@pytest.mark.parametrize("blocksize", [64, 128])
def test_quantize_matches_reference(blocksize):
    w = weight((96, 130), seed=2)
    q = qlora.quantize_nf4(w.to(DEV), blocksize=blocksize, double_quant=False)
    codes, absmax = ref_codes(w, blocksize)
    assert torch.equal(ref_unpack(q.packed, w.numel()), codes[: w.numel()])
    assert torch.equal(q.c2.cpu(), absmax)
    # the same codes as "nearest value by distance" (no random value lands between a float32
    # threshold and the exact midpoint)
    xp = F.pad(w.reshape(-1), (0, absmax.numel() * blocksize - w.numel())).view(-1, blocksize)
    xn = xp.double() / absmax.double()[:, None]
    nearest = (xn[..., None] - BNB_NF4.double()).abs().argmin(-1).view(-1)  # first index on a tie
    assert (nearest == codes).float().mean() > 0.9999


def test_blocksize_two_the_smallest_allowed():
    # blocks of two elements: each pair has its own absmax, on every dequantization path
    w = weight((5, 7), seed=3)
    codes, absmax = ref_codes(w, 2)
    for dq in (False, True):
        q = qlora.quantize_nf4(w.to(DEV), blocksize=2, double_quant=dq)
        assert q.blocksize == 2 and q.c2.numel() == 18
        assert torch.equal(ref_unpack(q.packed, 35), codes[:35])
        assert dq or torch.equal(q.c2.cpu(), absmax)
        for path in (qlora._dequantize_torch, qlora._dequantize_triton):
            assert torch.equal(path(q, torch.empty(5, 7, device=DEV)).cpu(), ref_dequant(q, torch.float32))


def test_ties_go_to_the_lower_code():
    # values exactly on a threshold take the lower code; the next float up takes the upper one.
    # absmax 1 and 0.5 make the scaled values exact, so the ties survive the scaling.
    up = torch.nextafter(BNB_NF4_MIDS, torch.tensor(2.0))
    blk = torch.cat([BNB_NF4_MIDS, up, torch.tensor([1.0])])  # 31 values
    blk = torch.cat([blk, torch.zeros(64 - blk.numel())])
    w = torch.cat([blk, blk * 0.5])
    q = qlora.quantize_nf4(w.to(DEV), blocksize=64, double_quant=False)
    codes = ref_unpack(q.packed, 128).view(2, 64)
    for row in codes:
        assert row[:15].tolist() == list(range(15))  # on threshold i: code i (lower)
        assert row[15:30].tolist() == list(range(1, 16))  # just above: code i + 1
        assert row[30].item() == 15 and (row[31:] == 7).all()
    assert torch.equal(codes.view(-1), ref_codes(w, 64)[0])


def test_scaling_multiplies_by_float32_reciprocal():
    # bitsandbytes scales a block by x * float32(1 / absmax), which can round differently from
    # x / absmax. Collect values next to c * threshold where the two disagree about the side of the
    # threshold; their codes must follow the reciprocal.
    c = torch.tensor(0.0371)
    xs = []
    for m in BNB_NF4_MIDS:
        cand, lo, hi = [m * c], m * c, m * c
        for _ in range(8):
            lo, hi = torch.nextafter(lo, torch.tensor(-1.0)), torch.nextafter(hi, torch.tensor(1.0))
            cand += [lo, hi]
        xs += [x.item() for x in cand if ((x * (1 / c)) > m) != ((x / c) > m)]
    assert len(xs) >= 2  # the test is sensitive: such values exist for this absmax
    w = torch.zeros(64)
    w[0], w[1: 1 + len(xs)] = c, torch.tensor(xs)
    q = qlora.quantize_nf4(w.to(DEV), double_quant=False)
    assert torch.equal(ref_unpack(q.packed, 64), ref_codes(w, 64)[0])


@pytest.mark.parametrize("double_quant", [False, True])
def test_all_zero_block_dequantizes_to_zero(double_quant):
    # absmax 0 gives 0 * inf = NaN when scaling; a zero block among others must come back as zeros
    # (with double quantization its absmax is only approximately 0, so its codes must be the code of 0)
    w = weight((4, 64), seed=3)
    w[1] = 0
    q = qlora.quantize_nf4(w.to(DEV), double_quant=double_quant)
    wh = qlora.dequantize_nf4(q, torch.float32).cpu()
    assert torch.isfinite(wh).all() and (wh[0] != 0).any()
    assert (wh[1] == 0).all(), wh[1, :4]


@pytest.mark.parametrize("double_quant", [False, True])
def test_all_zero_weight_dequantizes_to_zero(double_quant):
    z = qlora.quantize_nf4(torch.zeros(3, 64, device=DEV), double_quant=double_quant)
    wh = qlora.dequantize_nf4(z, torch.float32)
    assert torch.isfinite(wh).all() and (wh == 0).all()


def test_a_nan_weight_spoils_no_other_weight():
    # bitsandbytes' kernel takes the absmax with fmaxf, which skips NaN: one NaN must not make its block's c2, and
    # through c2_mean every weight, NaN. Here it is stored as 0 (bitsandbytes: index 0); all else as if it were 0.
    w = weight((2048, 64), seed=5)
    w[3, 7] = float("nan")
    q, ref = (qlora.quantize_nf4(t.to(DEV)) for t in (w, w.nan_to_num(0.0)))
    assert all(torch.equal(getattr(q, k), getattr(ref, k)) for k in ("packed", "c2", "c1", "c2_mean"))
    wh = qlora.dequantize_nf4(q, torch.float32)
    assert torch.isfinite(wh).all() and wh[3, 7] == 0


def test_an_inf_weight_makes_its_blocks_absmax_inf():
    # bitsandbytes' fmaxf keeps an infinity: a block holding +inf or -inf has absmax inf (not the largest float32);
    # the other blocks keep their own absmax and codes
    w = weight((3, 64), seed=5)
    w[1, 9], w[2, 40] = math.inf, -math.inf
    q = qlora.quantize_nf4(w.to(DEV), double_quant=False)
    assert q.c2.cpu().tolist() == [w[0].abs().max().item(), math.inf, math.inf]
    assert torch.equal(ref_unpack(q.packed, 192)[:64], ref_codes(w[0], 64)[0])


# ------------------------------------------------------------------------------------------------
# 3. Double quantization: c2^8bit, c1, c2_mean; round-trip error; storage cost


@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_error_on_normal_weights(double_quant):
    # NF4 with blocks of 64 on N(0, 0.02) weights: ~9% relative error; a worse code or broken
    # scaling lands well outside [0.08, 0.10]
    w = weight((256, 512), seed=4)
    q = qlora.quantize_nf4(w.to(DEV), double_quant=double_quant)
    wh = qlora.dequantize_nf4(q, torch.float32)
    assert 0.08 < rel_err(wh, w) < 0.10
    assert rel_err(ref_dequant(q), w) == pytest.approx(rel_err(wh, w), rel=1e-4)


def test_double_quant_constants():
    # 300 blocks -> two blocks of 256 constants, the second partial
    w = weight((150, 128), seed=5)
    q = qlora.quantize_nf4(w.to(DEV), blocksize=64, double_quant=True)
    assert q.c2.dtype == torch.uint8 and q.c2.shape == (300,)  # c2^8bit; c2^FP32 is not kept
    assert q.c1.dtype == torch.float32 and q.c1.shape == (2,)
    true_absmax = w.reshape(300, 64).abs().amax(1)
    assert q.c2_mean.item() == pytest.approx(true_absmax.double().mean().item(), rel=1e-6)
    # the 8-bit codes of the centred constants equal the reference quantizer with the dynamic map
    code, c1 = ref_codes(true_absmax - q.c2_mean.cpu(), 256, REF_DYN8_MIDS)
    assert torch.equal(q.c2.cpu().long(), code[:300]) and torch.equal(q.c1.cpu(), c1)
    # dequantized constants are within 1% of the true ones, and the weights come back as well as
    # without double quantization
    assert ((ref_c2(q) - true_absmax).abs() / true_absmax).max() < 0.01
    q0 = qlora.quantize_nf4(w.to(DEV), double_quant=False)
    assert rel_err(ref_dequant(q), w) < 1.01 * rel_err(ref_dequant(q0), w)


def test_double_quant_mean_is_the_float32_mean_of_the_absmaxes():
    # c2_mean is the float32 mean of c2^FP32, as bitsandbytes takes it (absmax.mean()), not a float64 mean rounded to
    # float32; every 8-bit code is relative to it
    w = weight((300, 64), seed=0)
    absmax = w.abs().amax(1)
    assert absmax.mean() != absmax.double().mean().float()  # this weight tells the two apart
    q = qlora.quantize_nf4(w.to(DEV))
    assert torch.equal(q.c2_mean.cpu(), absmax.to(DEV).mean().cpu())


def bnb_dquantize8(code, x):
    # bitsandbytes' dQuantize<0> (csrc/kernels.cu), in float32: a binary search over the 256 code values from 127 in
    # steps 64, 32, ..., 1, then the nearer of the last two probed; a value exactly on their midpoint keeps `pivot`
    f, code, x = np.float32, code.numpy(), np.float32(x)
    pivot, upper_pivot, lower_pivot, lower, upper, i = 127, 255, 0, f(-1), f(1), 64
    val = code[pivot]
    while i > 0:
        if x > val:
            lower_pivot, lower, pivot = pivot, val, pivot + i
        else:
            upper_pivot, upper, pivot = pivot, val, pivot - i
        val, i = code[pivot], i >> 1
    upper, lower = code[255] if upper_pivot == 255 else upper, code[0] if lower_pivot == 0 else lower
    if x > val:
        return upper_pivot if x > (upper + val) * f(0.5) else pivot
    return lower_pivot if x < (lower + val) * f(0.5) else pivot


def test_double_quant_ties_round_as_bitsandbytes():
    # a centred constant exactly on a midpoint of the 8-bit map: bitsandbytes' search ends on an even index, so the tie
    # goes to the even neighbour (for NF4's decision tree it is always the lower code: test_ties_go_to_the_lower_code)
    mids = (REF_DYN8[:-1] + REF_DYN8[1:]) * 0.5
    x = torch.cat([torch.ones(1), mids, mids.nextafter(torch.tensor(2.0)), mids.nextafter(torch.tensor(-2.0))])
    codes, absmax = qlora._blockwise(x, x.numel(), qlora.DYN8_MID, even_ties=True)
    assert absmax.item() == 1.0  # the scale is exactly 1: these are the values searched
    assert codes.tolist() == [bnb_dquantize8(REF_DYN8, v) for v in x.tolist()]
    # through quantize_nf4: block absmaxes 3, 1, 2 ± t centre on 1, -1, ±t with t on the midpoint of codes 249 and 250
    t = REF_DYN8_MIDS[249].item()
    assert t == 0.9296875  # 2 ± t exact in float32
    w = torch.zeros(4, 64)
    w[:, 0] = torch.tensor([3.0, 1.0, 2 + t, 2 - t])
    q = qlora.quantize_nf4(w.to(DEV))
    assert q.c2_mean.item() == 2.0 and q.c2.tolist() == [bnb_dquantize8(REF_DYN8, v) for v in (1.0, -1.0, t, -t)]


def test_bytes_equal_installed_bitsandbytes():
    # against bitsandbytes itself where it is installed (not a dependency: skipped without it). On a CPU its
    # quantize_4bit is a torch port of the CUDA rules (nearest NF4 value, ties low, x * (1 / absmax)) and its 8-bit
    # quantizer a table lookup that, for about 2 in 1000 values, takes the farther of two neighbouring codes (we take
    # the nearer, as CUDA's search does: ported above). So: 4-bit codes and fp32 absmax byte for byte, the 8-bit
    # codes equal or nearer, and bitsandbytes' dequantize_4bit reads our double-quantized weight as we do. (Its CPU
    # dequantize takes blocks within rows: rows here are whole blocks.)
    bf = pytest.importorskip("bitsandbytes.functional")
    # both tables derived the same way (its 256-entry normal map holds the 16 values, padded with zeros)
    assert torch.equal(bf.create_normal_map().unique(), nf4_values())
    assert torch.equal(bf.create_dynamic_map(signed=True), dynamic_map())
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape, bs in (((512, 256), 64), ((300, 77), 64), ((96, 256), 128), ((64, 512), 256)):
            w = (torch.randn(shape) * 0.02).to(dtype)
            q, (packed, state) = qlora.quantize_nf4(w, bs, False), bf.quantize_4bit(w, blocksize=bs, quant_type="nf4")
            assert torch.equal(q.packed, packed.view(-1)) and torch.equal(q.c2, state.absmax) and q.c2.dtype == torch.float32
            assert torch.equal(qlora.dequantize_nf4(q), bf.dequantize_4bit(packed, state)) and torch.equal(qlora.NF4, state.code)
            qd = qlora.quantize_nf4(w, bs)
            _, ds = bf.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=True)
            assert torch.equal(qlora.DYN8, ds.state2.code) and ds.state2.blocksize == qlora.BLOCKSIZE2
            assert torch.equal(qd.c2_mean, ds.offset) and torch.equal(qd.c1, ds.state2.absmax)
            c2 = qlora.quantize_nf4(w, bs, False).c2  # c2^FP32; the 8-bit codes encode (c2 - c2_mean) / c1:
            xn = (c2 - qd.c2_mean) * (1 / qd.c1).repeat_interleave(qlora.BLOCKSIZE2)[: c2.numel()]
            dist = [(qlora.DYN8[c.long()] - xn).abs() for c in (qd.c2, ds.absmax)]
            assert (qd.c2 != ds.absmax).float().mean() < 1e-2 and bool((dist[0] <= dist[1]).all())
            ds.absmax = qd.c2
            assert torch.equal(qlora.dequantize_nf4(qd), bf.dequantize_4bit(packed, ds))


def test_bits_per_param():
    w = torch.randn(4096, 4096, device=DEV)
    n = w.numel()
    assert qlora.quantize_nf4(w, double_quant=False).bits_per_param() == 4 + 32 / 64  # 4.5
    # 4-bit codes + 8-bit c2 per 64 + fp32 c1 per 256 blocks + fp32 c2_mean (the lookup tables are not stored)
    expected = 4 + 8 / 64 + 32 / (64 * 256) + 32 / n
    assert qlora.quantize_nf4(w, double_quant=True).bits_per_param() == expected
    assert expected == pytest.approx(4.127, abs=1e-3)


def test_dequant_with_many_second_level_blocks():
    # 2,048 blocks of 64: eight c1 (one per 256 c2), of different sizes. Block b must use c1[b // 256] on every path.
    w = weight((256, 512), seed=8)
    w[:128] *= 5
    q = qlora.quantize_nf4(w.to(DEV))
    assert q.c1.numel() == 8 and q.c1.unique().numel() == 8
    assert torch.equal(qlora._dequantize_torch(q, torch.empty(q.shape, device=DEV)).cpu(), ref_dequant(q, torch.float32))
    assert_dequant_equal(qlora._dequantize_triton(q, torch.empty(q.shape, device=DEV)), q)


def test_quantize_across_its_internal_chunks():
    # quantize_nf4 works in chunks of 2^24 elements: a weight just longer than one chunk gets every block's absmax
    w = weight(((1 << 24) + 128,), seed=9)
    q = qlora.quantize_nf4(w, double_quant=False)
    assert torch.equal(q.c2, w.view(-1, 64).abs().amax(1))
    assert torch.equal(ref_unpack(q.packed, q.numel())[-128:], ref_codes(w[-128:], 64)[0])


def test_quantize_chunks_hold_whole_blocks_of_any_size():
    # the internal chunks hold whole blocks whatever the block size: blocks of 128 across the first chunk's end, and a
    # single block larger than a chunk (2^25 elements, of which the weight fills 2^24 + 2)
    w = weight(((1 << 24) + 256,), seed=10)
    q = qlora.quantize_nf4(w, blocksize=128, double_quant=False)
    assert torch.equal(q.c2, w.view(-1, 128).abs().amax(1))
    assert torch.equal(ref_unpack(q.packed[-128:], 256), ref_codes(w[-256:], 128)[0])
    w = w[: (1 << 24) + 2].clone()
    w[-1] = 1.0  # the absmax of the whole weight, in its last element
    q = qlora.quantize_nf4(w, blocksize=1 << 25, double_quant=False)
    assert q.c2.tolist() == [1.0] and q.packed.numel() == (1 << 23) + 1
    assert torch.equal(ref_unpack(q.packed[-64:], 128), ref_codes(w[-128:], 128)[0])  # scaled by the same absmax 1


# ------------------------------------------------------------------------------------------------
# 4. Triton dequantization kernel, and dequantize_nf4


@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, bf16_kernels])
def test_triton_dequant_equals_torch_path(dtype, double_quant, blocksize):
    for shape in [(7, 65), (33, 100), (1, 1)]:
        q = qlora.quantize_nf4(weight(shape, seed=6).to(DEV), blocksize, double_quant)
        a = qlora._dequantize_triton(q, torch.empty(shape, dtype=dtype, device=DEV))
        b = qlora._dequantize_torch(q, torch.empty(shape, dtype=dtype, device=DEV))
        assert torch.equal(a, b), (shape, dtype)  # also on a GPU: no FMA in c1 * DYN8[c2] + c2_mean
        assert torch.equal(b.cpu(), ref_dequant(q, dtype))  # and both are the format's value


def test_public_dequantize_uses_weight_dtype():
    q = qlora.quantize_nf4(weight((40, 96), seed=7).to(DT).to(DEV))
    wh = qlora.dequantize_nf4(q)
    assert wh.dtype == DT and wh.shape == (40, 96) and wh.device.type == DEV
    assert_dequant_equal(wh, q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_weight_dequantizes_to_its_own_dtype(dtype):
    # the weight's dtype is the default dequantization dtype, with double quantization or without
    for dq in (False, True):
        q = qlora.quantize_nf4(weight((40, 96), seed=7, dtype=dtype).to(DEV), double_quant=dq)
        assert q.dtype == dtype
        wh = qlora.dequantize_nf4(q)
        assert wh.dtype == dtype and wh.shape == (40, 96)
        assert_dequant_equal(wh, q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_16bit_weight_quantizes_as_its_float32_value(dtype, blocksize):
    # a 16-bit weight (a checkpoint's bf16, as loading reads it) gets the codes and fp32 constants of its exact
    # float32 value, as bitsandbytes quantizes in fp32; against the independent reference, ragged, any blocksize
    w = weight((300, 77), seed=2, dtype=dtype)  # 23,100 elements: a last block cut short
    codes, absmax = ref_codes(w, blocksize)
    for dq in (False, True):
        q = qlora.quantize_nf4(w.to(DEV), blocksize, dq)
        assert torch.equal(ref_unpack(q.packed, w.numel()), codes[: w.numel()])
        if not dq:
            assert q.c2.dtype == torch.float32 and torch.equal(q.c2.cpu(), absmax)
        else:
            assert q.c1.dtype == q.c2_mean.dtype == torch.float32 and torch.equal(q.c2_mean.cpu(), absmax.mean())
            code, c1 = ref_codes(absmax - absmax.mean(), 256, REF_DYN8_MIDS)
            assert torch.equal(q.c2.cpu().long(), code[: absmax.numel()]) and torch.equal(q.c1.cpu(), c1)


def test_dequantize_into_a_view_writes_only_the_weights_elements():
    # `out` may be a view into a larger buffer: an odd number of elements ends in the high nibble of the last byte,
    # and nothing is written before the first element or past the last one
    for shape in [(3, 21), (7, 65), (1, 1)]:
        n = math.prod(shape)
        for dq in (False, True):
            q = qlora.quantize_nf4(weight(shape, seed=4).to(DEV), double_quant=dq)
            for dtype in (torch.float32, torch.float16):
                buf = torch.full((n + 4,), 7.0, dtype=dtype, device=DEV)
                wh = qlora.dequantize_nf4(q, out=buf[1 : 1 + n])
                assert torch.equal(wh.cpu(), ref_dequant(q, dtype))
                assert buf[0].item() == 7.0 and (buf[1 + n :] == 7.0).all(), (shape, dtype)
    # an out that is not contiguous (transposed; a column of a wider buffer) is refused on every path, never filled wrongly
    q, column = qlora.quantize_nf4(weight((40, 96), seed=4).to(DEV)), qlora.quantize_nf4(weight((128, 1), seed=4).to(DEV))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for q, out in ((q, torch.empty(96, 40, dtype=dtype, device=DEV).t()), (column, torch.zeros(128, 2, dtype=dtype, device=DEV)[:, :1])):
            with pytest.raises(ValueError, match=r"out must be contiguous, got shape \(\d+, \d+\) with strides"):
                qlora.dequantize_nf4(q, out=out)


def test_bf16_dequantize_is_exact_on_every_device():
    # on the CPU bf16 takes the torch path (the interpreter mishandles bf16), on a GPU the Triton kernel
    q = qlora.quantize_nf4(weight((40, 96), seed=10).to(DEV))
    assert_dequant_equal(qlora.dequantize_nf4(q, torch.bfloat16), q)


# ------------------------------------------------------------------------------------------------
# 4. Fused dequantize-matmul kernel

SHAPES = [(1, 40, 96), (3, 96, 130), (17, 130, 40), (16, 64, 64)]  # (M, N, K); tiles are 16 / 64 / 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, bf16_kernels])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_fused_matmul_forward(M, N, K, dtype):
    # y = x Ŵᵀ; K = 130 or 40 puts 64-element blocks across row boundaries of the flattened weight.
    # float32 must stay float32 on a GPU too (tl.dot's default there is TF32, ~1e-4 off)
    for dq in (False, True):
        q = qlora.quantize_nf4(weight((N, K), seed=M).to(DEV), double_quant=dq)
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(N)).to(dtype).to(DEV)
        y = qlora._fused_matmul(x, q, transpose=False)
        assert y.shape == (M, N) and y.dtype == dtype
        assert rel_err(y, x.cpu().double() @ ref_dequant(q).T) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, bf16_kernels])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_fused_matmul_transposed(M, N, K, dtype):
    # dx = dy Ŵ, reading the same packed weight along the other axis
    for dq in (False, True):
        q = qlora.quantize_nf4(weight((N, K), seed=M + 1).to(DEV), double_quant=dq)
        dy = torch.randn(M, N, generator=torch.Generator().manual_seed(K)).to(dtype).to(DEV)
        dx = qlora._fused_matmul(dy, q, transpose=True)
        assert dx.shape == (M, K) and dx.dtype == dtype
        assert rel_err(dx, dy.cpu().double() @ ref_dequant(q)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_matmul_with_blocks_of_128(dtype):
    # the kernel takes the weight's own block size: with blocks of 128 one constant covers two 64-wide tiles
    g = torch.Generator().manual_seed(21)
    for dq in (False, True):
        q = qlora.quantize_nf4(weight((40, 130), seed=21).to(DEV), blocksize=128, double_quant=dq)
        W = ref_dequant(q)
        x, dy = (torch.randn(3, n, generator=g).to(dtype).to(DEV) for n in (130, 40))
        assert rel_err(qlora._fused_matmul(x, q, transpose=False), x.cpu().double() @ W.T) < TOL[dtype]
        assert rel_err(qlora._fused_matmul(dy, q, transpose=True), dy.cpu().double() @ W) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_matmul_last_tile_of_a_single_column(dtype):
    # K = 64·j + 1: the reduction ends in a tile holding one column (forward K = 129, backward K = 65)
    g = torch.Generator().manual_seed(22)
    q = qlora.quantize_nf4(weight((65, 129), seed=22).to(DEV))
    W = ref_dequant(q)
    x, dy = (torch.randn(3, n, generator=g).to(dtype).to(DEV) for n in (129, 65))
    assert rel_err(qlora._fused_matmul(x, q, transpose=False), x.cpu().double() @ W.T) < TOL[dtype]
    assert rel_err(qlora._fused_matmul(dy, q, transpose=True), dy.cpu().double() @ W) < TOL[dtype]


# ------------------------------------------------------------------------------------------------
# 4. nf4_matmul: the route taken, autograd, autocast, DequantBuffer


def _spy(monkeypatch, name):
    calls = []
    real = getattr(qlora, name)

    def spy(*a, **k):
        calls.append(name)
        return real(*a, **k)

    monkeypatch.setattr(qlora, name, spy)
    return calls


@pytest.mark.parametrize("route", ["fused", "dequant", "torch"])
def test_nf4_matmul_autograd(route, monkeypatch):
    if route == "torch":
        if CUDA:
            pytest.skip("CUDA tensors always take the Triton kernels")
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # read at each call
    monkeypatch.setattr(qlora, "FUSED_MAX_M", 16)  # the kernel is off by default (too slow yet) but kept correct
    M = qlora.FUSED_MAX_M if route == "fused" else qlora.FUSED_MAX_M + 1  # "up to FUSED_MAX_M rows": either side of it
    fused = _spy(monkeypatch, "_fused_matmul")
    torch_deq = _spy(monkeypatch, "_dequantize_torch")
    q = qlora.quantize_nf4(weight((40, 130), seed=8).to(DEV))
    x = torch.randn(M, 130).to(DT).to(DEV).requires_grad_()
    dy = torch.randn(M, 40).to(DT).to(DEV)
    y = qlora.nf4_matmul(x, q)
    y.backward(dy)
    W = ref_dequant(q)
    assert rel_err(y, x.detach().cpu().double() @ W.T) < TOL[DT]
    assert x.grad.dtype == DT and rel_err(x.grad, dy.cpu().double() @ W) < TOL[DT]
    # the frozen base: nothing in it asks for or receives a gradient
    assert all(not b.requires_grad and b.grad is None for b in q.buffers())
    # the route really taken (forward + backward)
    assert len(fused) == (2 if route == "fused" else 0)
    assert len(torch_deq) == (2 if route == "torch" else 0)


@pytest.mark.parametrize("T", [3, 12])  # M = 6 (fused kernel) and 24 (dequantize + matmul)
def test_nf4_matmul_3d_input(T, monkeypatch):
    monkeypatch.setattr(qlora, "FUSED_MAX_M", 16)
    q = qlora.quantize_nf4(weight((40, 96), seed=9).to(DEV))
    x = torch.randn(2, T, 96).to(DT).to(DEV).requires_grad_()
    y = qlora.nf4_matmul(x, q)
    assert y.shape == (2, T, 40)
    y.sum().backward()  # dy = ones, an expanded (stride 0) gradient
    W = ref_dequant(q)
    assert rel_err(y, x.detach().cpu().double() @ W.T) < TOL[DT]
    assert x.grad.shape == x.shape
    assert rel_err(x.grad, torch.ones(2, T, 40, dtype=torch.float64) @ W) < TOL[DT]


def test_nf4_matmul_under_autocast(monkeypatch):
    # custom kernels do not autocast by themselves: nf4_matmul casts x to the autocast dtype
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the Triton CPU interpreter truncates bf16 (the GPU rounds)
    q = qlora.quantize_nf4(weight((40, 96), seed=10).to(DEV))
    x = torch.randn(20, 96, device=DEV)
    with torch.autocast(DEV, dtype=D16):
        y = qlora.nf4_matmul(x, q)
    assert y.dtype == D16
    assert rel_err(y, x.cpu().double() @ ref_dequant(q).T) < TOL[D16]


def test_autocast_dequantizes_in_the_autocast_dtype():
    # under autocast x is cast before the matmul, so Ŵ is dequantized in 16 bits, not in x's fp32 (twice the memory)
    q, buf = qlora.quantize_nf4(weight((40, 96), seed=10).to(DEV)), qlora.DequantBuffer()
    with torch.autocast(DEV, dtype=D16):
        y = qlora.nf4_matmul(torch.randn(20, 96, device=DEV), q, buf)
    assert y.dtype == D16 and list(buf.buffers) == [(q.device, D16)]


def test_dequant_buffer_is_shared_and_reused():
    # one buffer per (device, dtype) for all the layers given it, sized by the largest weight; a layer
    # built alone keeps no 16-bit Ŵ between calls (a buffer of its own would hold one per layer)
    buf, M = qlora.DequantBuffer(), qlora.FUSED_MAX_M + 3  # above FUSED_MAX_M: the dequantizing route
    big, small = (qlora.quantize_nf4(weight(s, seed=14).to(DEV)) for s in [(40, 130), (24, 96)])
    w = buf.dequantize(big, DT)
    ptr = w.data_ptr()
    assert_dequant_equal(w, big)
    assert buf.dequantize(small, DT).data_ptr() == ptr and len(buf.buffers) == 1
    layers = [qlora.LoRALinear(q, r=4, alpha=16, dequant_buffer=buf) for q in (small, big)]
    for layer, q in zip(layers, (small, big)):
        x = torch.randn(M, q.shape[1]).to(DT).to(DEV)
        assert rel_err(layer(x), x.cpu().double() @ ref_dequant(q).T) < TOL[DT]  # B = 0: the base
    assert len(buf.buffers) == 1 and buf.buffers[(big.device, DT)].data_ptr() == ptr
    alone = make_layer()
    x = torch.randn(M, 96).to(DT).to(DEV)
    assert rel_err(alone(x), x.cpu().double() @ ref_dequant(alone.weight).T) < TOL[DT] and alone.dequant_buffer is None


# ------------------------------------------------------------------------------------------------
# 2, 4. Bad input to quantize_nf4 and nf4_matmul


@pytest.mark.parametrize("call,expected,got", [
    (lambda: qlora.quantize_nf4(torch.arange(64)), "floating-point", "torch.int64"),
    (lambda: qlora.quantize_nf4(torch.empty(0, 8)), "non-empty", "(0, 8)"),
    (lambda: qlora.quantize_nf4(torch.randn(64), blocksize=48), "power of two", "got 48"),
    (lambda: qlora.quantize_nf4(torch.randn(64), blocksize=0), "power of two", "got 0"),
    (lambda: qlora.quantize_nf4(torch.randn(64), blocksize=1), "power of two", "got 1"),
    (lambda: qlora.nf4_matmul(torch.randn(2, 33), qlora.quantize_nf4(torch.randn(8, 32))), "32", "(2, 33)"),
], ids=["int", "empty", "blocksize48", "blocksize0", "blocksize1", "x_last_dim"])
def test_bad_input_raises(call, expected, got):
    with pytest.raises(ValueError) as e:
        call()
    assert expected in str(e.value) and got in str(e.value), str(e.value)


# ------------------------------------------------------------------------------------------------
# 5. LoRALinear


def make_layer(r=8, alpha=16, dropout=0.0, double_quant=True, seed=11):
    torch.manual_seed(seed)
    q = qlora.quantize_nf4(weight((40, 96), seed=seed).to(DEV), double_quant=double_quant)
    return qlora.LoRALinear(q, r=r, alpha=alpha, dropout=dropout)


def randomize_B(layer, seed=12):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def ref_lora(layer, x, W, alpha=16, r=8):
    # float64: y = x Ŵᵀ + s · x L1 L2,  L1 = Aᵀ, L2 = Bᵀ, s = α / r
    A, B = layer.lora_A.detach().double().cpu(), layer.lora_B.detach().double().cpu()
    x = x.detach().double().cpu()
    return x @ W.T + alpha / r * (x @ A.T) @ B.T


def test_lora_init():
    layer = make_layer()
    A, B = layer.lora_A, layer.lora_B
    assert A.shape == (8, 96) and B.shape == (40, 8) and A.dtype == B.dtype == torch.float32
    bound = 1 / math.sqrt(96)  # kaiming_uniform(a=√5) on (r, in)
    assert A.abs().max() <= bound and A.abs().max() > 0.99 * bound  # 768 draws reach the bound (a=√6 would not)
    assert A.unique().numel() > A.numel() // 2  # random, not constant
    assert (B == 0).all()
    x = torch.randn(5, 96).to(DT).to(DEV)
    y = layer(x)
    assert torch.equal(y, qlora.nf4_matmul(x, layer.weight))  # B = 0: exactly the base output
    assert rel_err(y, x.cpu().double() @ ref_dequant(layer.weight).T) < TOL[DT]
    # dropout (training mode) acts on the adapter input only: with B = 0 the output is still the base
    drop = make_layer(dropout=0.5).train()
    assert torch.equal(drop(x), qlora.nf4_matmul(x, drop.weight))


@pytest.mark.parametrize("M", [5, 24])
def test_lora_forward_matches_reference(M):
    layer = make_layer(dropout=0.3).eval()  # eval: dropout off
    randomize_B(layer)
    x = torch.randn(M, 96).to(DT).to(DEV)
    y = layer(x)
    assert y.shape == (M, 40) and y.dtype == DT
    assert rel_err(y, ref_lora(layer, x, ref_dequant(layer.weight))) < TOL[DT]


def test_lora_scaling_is_alpha_over_r_as_a_fraction():
    # the paper's r = 64, α = 16: s = α / r = 0.25, in the forward pass and in the merge
    torch.manual_seed(11)
    q = qlora.quantize_nf4(weight((40, 96), seed=11).to(DEV))
    layer = qlora.LoRALinear(q, r=64, alpha=16)
    randomize_B(layer)
    assert layer.scaling == 0.25
    x = torch.randn(5, 96).to(DT).to(DEV)
    assert rel_err(layer(x), ref_lora(layer, x, ref_dequant(q), alpha=16, r=64)) < TOL[DT]
    A, B = layer.lora_A.detach().double().cpu(), layer.lora_B.detach().double().cpu()
    assert rel_err(qlora.merge_lora(layer), ref_dequant(q) + 0.25 * B @ A) < 1e-6


def test_lora_gradients_match_float64_autograd():
    layer = make_layer()
    randomize_B(layer)
    x = torch.randn(6, 96).to(DT).to(DEV).requires_grad_()
    dy = torch.randn(6, 40).to(DT).to(DEV)
    layer(x).backward(dy)
    # the same layer reimplemented in float64 and differentiated by autograd
    A = layer.lora_A.detach().double().cpu().requires_grad_()
    B = layer.lora_B.detach().double().cpu().requires_grad_()
    x64 = x.detach().double().cpu().requires_grad_()
    y64 = x64 @ ref_dequant(layer.weight).T + 16 / 8 * (x64 @ A.T) @ B.T  # α = 16, r = 8
    y64.backward(dy.double().cpu())
    assert rel_err(layer.lora_A.grad, A.grad) < GRAD_TOL[DT]
    assert rel_err(layer.lora_B.grad, B.grad) < GRAD_TOL[DT]
    assert rel_err(x.grad, x64.grad) < GRAD_TOL[DT]


def test_lora_only_adapters_are_trainable():
    # a base weight handed over asking for gradients (an nn.Linear's, say), 4-bit or 16-bit, stays frozen: buffers only
    w = weight((40, 96), seed=3).to(DEV).requires_grad_()
    for layer in (make_layer(), qlora.LoRALinear(w, r=8, alpha=16), qlora.LoRALinear(qlora.quantize_nf4(w), r=8, alpha=16)):
        assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
        assert len(list(layer.parameters())) == 2
        assert all(not b.requires_grad for b in layer.buffers())


def test_lora_dense_16bit_base():
    w = weight((40, 96), seed=13, dtype=D16).to(DEV)
    torch.manual_seed(13)
    layer = qlora.LoRALinear(w, r=4, alpha=12)
    randomize_B(layer)
    assert [n for n, _ in layer.named_parameters()] == ["lora_A", "lora_B"]
    x = torch.randn(7, 96).to(D16).to(DEV).requires_grad_()
    y = layer(x)
    assert y.dtype == D16
    assert rel_err(y, ref_lora(layer, x, w.double().cpu(), alpha=12, r=4)) < TOL[D16]
    y.sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_lora_dense_16bit_base_follows_a_float32_input():
    # a 16-bit base fed float32 activations is cast to float32 for the matmul: the output is float32
    w = weight((40, 96), seed=13, dtype=D16).to(DEV)
    torch.manual_seed(13)
    layer = qlora.LoRALinear(w, r=4, alpha=12)
    randomize_B(layer)
    x = torch.randn(7, 96, device=DEV)
    y = layer(x)
    assert y.dtype == torch.float32 and layer.weight.dtype == D16
    assert rel_err(y, ref_lora(layer, x, w.double().cpu(), alpha=12, r=4)) < TOL[torch.float32]


@pytest.mark.parametrize("double_quant", [False, True])
def test_merge_lora(double_quant):
    layer = make_layer(double_quant=double_quant)
    randomize_B(layer)
    merged = qlora.merge_lora(layer)
    A, B = layer.lora_A.detach().double().cpu(), layer.lora_B.detach().double().cpu()
    expected = ref_dequant(layer.weight) + 16 / 8 * B @ A  # α = 16, r = 8
    assert merged.shape == (40, 96) and merged.dtype == layer.weight.dtype
    assert rel_err(merged, expected) < 1e-6
    x = torch.randn(5, 96).to(DT).to(DEV)
    assert rel_err(F.linear(x, merged.to(DT)), layer(x)) < TOL[DT]


@pytest.mark.parametrize("double_quant", [False, True])
def test_to_dtype_keeps_statistics_fp32(double_quant):
    # .to(float16) must change only the dequantization dtype; the block constants stay fp32 (rounding
    # them to 16 bits would be lossy, and a later .to(float32) could not undo it)
    layer = make_layer(double_quant=double_quant)
    q = layer.weight
    before = {n: b.clone() for n, b in q.named_buffers()}
    layer.to(torch.float16)
    assert q.dtype == torch.float16 and layer.lora_A.dtype == torch.float16
    assert q.packed.dtype == torch.uint8
    for n, b in q.named_buffers():
        assert b.dtype == before[n].dtype and torch.equal(b, before[n]), n
    wh = qlora.dequantize_nf4(q)
    assert wh.dtype == torch.float16
    assert_dequant_equal(wh, q)
    x = torch.randn(5, 96).half().to(DEV)
    assert rel_err(layer(x), ref_lora(layer, x, ref_dequant(q))) < TOL[torch.float16]


def test_to_float32_after_half_restores_dtype():
    layer = make_layer()
    q = layer.weight
    layer.half()
    layer.float()
    assert layer.lora_A.dtype == torch.float32 and q.c1.dtype == torch.float32
    assert q.dtype == torch.float32  # the dequantization dtype follows the module back
    assert qlora.dequantize_nf4(q).dtype == torch.float32


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_holds_quantized_weight(double_quant):
    layer = make_layer(double_quant=double_quant)
    randomize_B(layer)
    sd = layer.state_dict()
    stats = {"weight.c2", "weight.c1", "weight.c2_mean"} if double_quant else {"weight.c2"}
    assert set(sd) == {"weight.packed", "lora_A", "lora_B"} | stats
    assert sd["weight.packed"].dtype == torch.uint8 and sd["weight.packed"].numel() == 40 * 96 // 2
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    other = make_layer(double_quant=double_quant, seed=99)  # different weight and adapters
    other.load_state_dict(torch.load(buf))
    x = torch.randn(5, 96).to(DT).to(DEV)
    assert torch.equal(other(x), layer(x))


def test_lora_dropout_acts_on_the_adapter_input():
    # training mode: y = x Ŵᵀ + s · (dropout(x) Aᵀ) Bᵀ, with dropout's mask and its 1/(1-p) scaling; the base sees x whole
    layer = make_layer(dropout=0.5).train()
    randomize_B(layer)
    x = torch.randn(5, 96, device=DEV)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    mask = F.dropout(torch.ones_like(x), 0.5, True)  # the same draw nn.Dropout makes: zeros and 2s
    assert set(mask.unique().tolist()) == {0.0, 2.0}
    A, B = layer.lora_A.detach().double().cpu(), layer.lora_B.detach().double().cpu()
    x64, xm64 = x.double().cpu(), (x * mask).double().cpu()
    assert rel_err(y, x64 @ ref_dequant(layer.weight).T + 16 / 8 * (xm64 @ A.T) @ B.T) < 1e-5


def test_merge_lora_dtype_and_rank_zero():
    layer = make_layer()
    randomize_B(layer)
    assert qlora.merge_lora(layer, torch.float16).dtype == torch.float16 and qlora.merge_lora(layer).dtype == torch.float32
    plain = qlora.LoRALinear(layer.weight, r=0, alpha=16)  # no adapter: the merge is the dequantized base
    assert not list(plain.parameters())
    assert torch.equal(qlora.merge_lora(plain).cpu(), ref_dequant(layer.weight, torch.float32))
    x = torch.randn(3, 96, device=DEV)
    assert torch.equal(plain(x), qlora.nf4_matmul(x, layer.weight))


def test_merge_lora_of_a_16bit_base_keeps_its_dtype():
    # W0 + s · B A in float32, returned in the base's own 16-bit dtype unless another one is asked for
    w = weight((40, 96), seed=13, dtype=D16).to(DEV)
    torch.manual_seed(13)
    layer = qlora.LoRALinear(w, r=4, alpha=12)
    randomize_B(layer)
    merged = qlora.merge_lora(layer)
    A, B = layer.lora_A.detach().double().cpu(), layer.lora_B.detach().double().cpu()
    assert merged.dtype == D16 and merged.shape == (40, 96)
    assert rel_err(merged, w.double().cpu() + 12 / 4 * B @ A) < TOL[D16]
    assert qlora.merge_lora(layer, torch.float32).dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# 6. PagedAdamW

HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)
SHAPES_P = [(5, 7), (13,), (2, 3, 4)]


def make_params(seed=0, device=DEV, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype).to(device)) for s in SHAPES_P]


def set_grads(groups, step):
    # the same random gradients for every copy of the parameters
    g = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(p.shape, generator=g) for p in groups[0]]
    for params in groups:
        for p, gr in zip(params, grads):
            p.grad = gr.to(p.dtype).to(p.device)


def stepped(ps):  # a PagedAdamW over ps after three steps on set_grads' gradients
    opt = qlora.PagedAdamW(ps, **HP)
    for step in range(3):
        set_grads([ps], step)
        opt.step()
    return opt


def assert_same(ps, qs):
    for p, q in zip(ps, qs):
        if DEV == "cpu":
            assert torch.equal(p, q)  # identical arithmetic: bit for bit
        else:
            torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_paged_adamw_matches_torch_adamw():
    ps, rs = make_params(), make_params()
    opt, ref = qlora.PagedAdamW(ps, **HP), torch.optim.AdamW(rs, foreach=False, **HP)
    assert opt.memory is None  # decided at the first allocation
    for step in range(12):
        set_grads([ps, rs], step)
        opt.step(), ref.step()
        assert_same(ps, rs)
    assert opt.paging == "auto" and opt.memory == ("managed" if CUDA else "device")
    for p, r in zip(ps, rs):
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert_same([opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]],
                    [ref.state[r]["exp_avg"], ref.state[r]["exp_avg_sq"]])


def test_paged_adamw_matches_installed_bitsandbytes():
    # the paper's optimizer, bitsandbytes' paged_adamw_32bit, where it is installed (skipped without it); its fused
    # kernel rounds differently from torch's ops: the same update to a few float32 ulps, here and in its moments
    bnb = pytest.importorskip("bitsandbytes")
    ps, bs = make_params(), make_params()
    opt, ref = qlora.PagedAdamW(ps, **HP), bnb.optim.PagedAdamW32bit(bs, **HP)
    for step in range(12):
        set_grads([ps, bs], step)
        opt.step(), ref.step()
    for p, b in zip(ps, bs):
        torch.testing.assert_close(p, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref.state[b]["state1"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[b]["state2"], rtol=1e-6, atol=1e-7)


def test_paged_adamw_skips_params_without_grad():
    ps, rs = make_params(), make_params()
    frozen = torch.nn.Parameter(torch.ones(4, device=DEV))
    opt = qlora.PagedAdamW(ps + [frozen], **HP)
    ref = torch.optim.AdamW(rs, foreach=False, **HP)
    for step in range(3):
        set_grads([ps, rs], step)
        opt.step(), ref.step()
    assert (frozen == 1).all() and frozen not in opt.state  # no weight decay, no state
    assert_same(ps, rs)
    fresh = _round_trip(opt, qlora.PagedAdamW(ps + [frozen], **HP))  # its state_dict has no entry for it: it loads as none
    assert frozen not in fresh.state and all(torch.equal(fresh.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"]) for p in ps)


def _round_trip(opt, fresh):
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    return fresh


def test_paged_adamw_state_dict_round_trip():
    ps, rs = make_params(), make_params()
    opt, ref = qlora.PagedAdamW(ps, **HP), torch.optim.AdamW(rs, foreach=False, **HP)
    for step in range(7):
        set_grads([ps, rs], step)
        opt.step(), ref.step()
    opt = _round_trip(opt, qlora.PagedAdamW(ps, lr=0.5))  # the saved groups replace the new ones
    ref = _round_trip(ref, torch.optim.AdamW(rs, foreach=False, lr=0.5))
    assert opt.param_groups[0]["lr"] == HP["lr"]
    for p in ps:
        st = opt.state[p]
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg"].device == p.device
    for step in range(7, 12):
        set_grads([ps, rs], step)
        opt.step(), ref.step()
        assert_same(ps, rs)


def test_paged_adamw_resumes_from_a_state_saved_after_one_step():
    # step 1 is the first valid step (bias corrections 1 - β): a state saved then loads and goes on as torch's AdamW
    ps, rs = make_params(), make_params()
    opt, ref = qlora.PagedAdamW(ps, **HP), torch.optim.AdamW(rs, foreach=False, **HP)
    set_grads([ps, rs], 0)
    opt.step(), ref.step()
    opt = _round_trip(opt, qlora.PagedAdamW(ps, **HP))
    assert all(opt.state[p]["step"].item() == 1 for p in ps)
    for step in range(1, 4):
        set_grads([ps, rs], step)
        opt.step(), ref.step()
        assert_same(ps, rs)


def two_groups(params):  # the first parameter with the optimizer's defaults, the others with hyperparameters of their own
    return [dict(params=params[:1]), dict(params=params[1:], lr=3e-2, betas=(0.5, 0.9), eps=1e-4, weight_decay=0.0)]


def test_paged_adamw_param_groups_keep_their_own_hyperparameters():
    # every group is stepped with its own lr, betas, eps and weight decay, as torch's AdamW does
    ps, rs = make_params(), make_params()
    opt, ref = qlora.PagedAdamW(two_groups(ps), **HP), torch.optim.AdamW(two_groups(rs), foreach=False, **HP)
    for step in range(4):
        set_grads([ps, rs], step)
        opt.step(), ref.step()
        assert_same(ps, rs)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 2] and all(p in opt.state for p in ps)


def test_paged_adamw_state_dict_round_trip_with_param_groups():
    # saved and loaded with two groups, each parameter gets its own moments back: steps then go on as torch's AdamW
    ps, rs = make_params(), make_params()
    opt, ref = qlora.PagedAdamW(two_groups(ps), **HP), torch.optim.AdamW(two_groups(rs), foreach=False, **HP)
    for step in range(3):
        set_grads([ps, rs], step)
        opt.step(), ref.step()
    opt = _round_trip(opt, qlora.PagedAdamW(two_groups(ps), **HP))
    for step in range(3, 6):
        set_grads([ps, rs], step)
        opt.step(), ref.step()
        assert_same(ps, rs)


def test_paged_adamw_step_runs_the_closure_with_gradients_and_returns_its_loss():
    # step(closure): the closure computes the loss and its gradients (autograd on, though step itself runs without)
    # and step returns that loss; loss = Σ p², so the gradient is 2p
    ps, rs = make_params(), make_params()
    opt, ref = qlora.PagedAdamW(ps, **HP), torch.optim.AdamW(rs, foreach=False, **HP)

    def closure(params, optimizer):
        def f():
            optimizer.zero_grad()
            loss = sum((p * p).sum() for p in params)
            loss.backward()
            return loss
        return f

    for _ in range(3):
        before = [p.detach().clone() for p in ps]
        loss = opt.step(closure(ps, opt))
        ref.step(closure(rs, ref))
        assert torch.is_tensor(loss) and loss.item() == pytest.approx(sum((b.double() ** 2).sum() for b in before).item(), rel=1e-6)
        assert all(torch.equal(p.grad, 2 * b) for p, b in zip(ps, before))
        assert_same(ps, rs)


def test_paged_adamw_load_state_dict_refuses_a_moment_of_another_size():
    # a moment that would broadcast into its parameter (one row of the (5, 7) one, or a single value) is refused
    ps = make_params()
    sd = stepped(ps).state_dict()
    first = min(sd["state"])  # the (5, 7) parameter
    assert sd["state"][first]["exp_avg"].shape == (5, 7)
    for bad in (torch.zeros(7), torch.zeros(1)):
        edited = {**sd, "state": {i: {**st, "exp_avg": bad} if i == first else st for i, st in sd["state"].items()}}
        with pytest.raises(RuntimeError, match="invalid for input of size"):
            qlora.PagedAdamW(ps, **HP).load_state_dict(edited)


def test_paged_adamw_load_state_dict_copies_the_moments():
    # the loaded state is the optimizer's own memory: stepping it must not write into the dict it came from
    ps = make_params()
    opt = stepped(ps)
    sd = opt.state_dict()
    before = [opt.state[p]["exp_avg"].clone() for p in ps]
    fresh = qlora.PagedAdamW(ps, **HP)
    fresh.load_state_dict(sd)
    set_grads([ps], 3)
    fresh.step()
    assert all(torch.equal(opt.state[p]["exp_avg"], b) for p, b in zip(ps, before))
    assert fresh.memory == opt.memory


def test_paged_adamw_load_state_dict_refuses_any_step_below_1():
    # each parameter's step is checked, not just one of them: a step of 0 among good ones would divide by 1 - β^0 = 0
    ps = make_params()
    opt = stepped(ps)
    sd = opt.state_dict()
    assert len(sd["state"]) > 1
    for bad in (torch.tensor(0.0), torch.tensor(float("nan"))):
        first = min(sd["state"])
        edited = {**sd, "state": {i: {**st, "step": bad} if i == first else st for i, st in sd["state"].items()}}
        with pytest.raises(ValueError, match=re.escape("an optimizer step below 1 (or NaN)")):
            qlora.PagedAdamW(ps, **HP).load_state_dict(edited)


def test_paged_adamw_resume_keeps_fp32_state_for_bf16_params():
    ps = make_params(dtype=torch.bfloat16)
    opt = stepped(ps)
    saved = {id(p): (opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()) for p in ps}
    opt2 = _round_trip(opt, qlora.PagedAdamW(ps, **HP))
    for p in ps:
        m, v = saved[id(p)]
        assert opt2.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(opt2.state[p]["exp_avg"], m) and torch.equal(opt2.state[p]["exp_avg_sq"], v)


@pytest.mark.parametrize("kw,bad", [
    (dict(lr=-1e-3), "lr=-0.001"), (dict(eps=-1e-8), "eps=-1e-08"),
    (dict(weight_decay=-0.1), "weight_decay=-0.1"), (dict(betas=(1.0, 0.999)), "(1.0, 0.999)"),
    (dict(betas=(0.9, -0.1)), "(0.9, -0.1)"), (dict(paging="swap"), "'swap'"),
])
def test_paged_adamw_invalid_hyperparameters(kw, bad):
    with pytest.raises(ValueError) as e:
        qlora.PagedAdamW([torch.nn.Parameter(torch.zeros(2))], **{"lr": 1e-3, **kw})
    assert bad in str(e.value), str(e.value)


def test_paged_adamw_defaults_are_torch_adamws():
    # a drop-in for torch.optim.AdamW(params): the same lr, betas, eps and weight decay (0.01) when none is given
    want = {k: v.default for k, v in inspect.signature(torch.optim.AdamW).parameters.items() if k in ("lr", "betas", "eps", "weight_decay")}
    got = {k: v.default for k, v in inspect.signature(qlora.PagedAdamW).parameters.items() if k in want}
    assert got == want and want["weight_decay"] == 0.01
    ps, rs = make_params(), make_params()
    opt, ref = qlora.PagedAdamW(ps), torch.optim.AdamW(rs, foreach=False)
    for step in range(3):
        set_grads([ps, rs], step)
        opt.step(), ref.step()
        assert_same(ps, rs)


def test_paged_adamw_hyperparameter_bounds():
    # each beta lies in [0, 1); lr, eps and weight_decay may be 0, as torch's AdamW allows
    for betas in [(-0.1, 0.999), (0.9, 1.0)]:
        with pytest.raises(ValueError, match=re.escape(f"betas={betas}")):
            qlora.PagedAdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, betas=betas)
    for hp in (dict(lr=0.0, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0), dict(lr=1e-2, betas=(0.0, 0.0), eps=0.0, weight_decay=0.1)):
        ps, rs = make_params(), make_params()
        opt, ref = qlora.PagedAdamW(ps, **hp), torch.optim.AdamW(rs, foreach=False, **hp)
        for step in range(3):
            set_grads([ps, rs], step)
            opt.step(), ref.step()
            assert_same(ps, rs)


# ------------------------------------------------------------------------------------------------
# 6. PagedAdamW on CUDA: managed and pinned memory


def _is_managed(t):
    flag = ctypes.c_uint64(0)
    err = ctypes.CDLL("libcuda.so.1").cuPointerGetAttribute(
        ctypes.byref(flag), 8, ctypes.c_uint64(t.data_ptr()))  # 8: CU_POINTER_ATTRIBUTE_IS_MANAGED
    return err == 0 and flag.value == 1


@needs_cuda
def test_paged_state_is_managed_memory():
    # the state lives in unified memory, outside PyTorch's allocator: memory_allocated does not grow
    p = torch.nn.Parameter(torch.randn(1 << 20, device="cuda"))
    p.grad = torch.randn_like(p)
    opt = qlora.PagedAdamW([p], 1e-3, paging="managed")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    opt.step()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < 4 * p.numel()  # 8 MiB of state not counted
    st = opt.state[p]
    assert st["exp_avg"].is_cuda and _is_managed(st["exp_avg"]) and _is_managed(st["exp_avg_sq"])
    assert opt.memory == "managed"


@needs_cuda
def test_paged_step_when_gpu_memory_is_almost_full():
    # 16 parameters of 16 MiB: 512 MiB of optimizer state while only 256 MiB of the GPU stay free;
    # unified memory pages the state in and out. (The managed total stays far below the card's memory.)
    n, size, leave = 16, 4 << 20, 256 << 20
    ps = [torch.nn.Parameter(torch.randn(size, device="cuda")) for _ in range(n)]
    for p in ps:
        p.grad = torch.randn_like(p)
    cpu = [torch.nn.Parameter(p.detach().cpu()) for p in ps]
    for c, p in zip(cpu, ps):
        c.grad = p.grad.cpu()
    ref = torch.optim.AdamW(cpu, foreach=False, **HP)
    warm = [torch.empty(size, device="cuda") for _ in range(2)]  # the update's temporaries, cached
    del warm
    free, _ = torch.cuda.mem_get_info()
    assert 8 * n * size > leave
    filler = torch.empty(max(free - leave, 0), dtype=torch.uint8, device="cuda")
    try:
        opt = qlora.PagedAdamW(ps, paging="managed", **HP)
        for _ in range(2):
            opt.step(), ref.step()
        torch.cuda.synchronize()
    finally:
        del filler
        torch.cuda.empty_cache()
    for p, c in zip(ps, cpu):
        torch.testing.assert_close(p.cpu(), c.detach(), rtol=1e-6, atol=1e-6)


@needs_cuda
def test_paged_state_makes_room_for_activations():
    # the case paged optimizers exist for (paper §3): after a step the state is resident on the GPU, then a later
    # step's activations need more than is free. The state must give way to them (managed pages evicted to the
    # host) instead of the allocation failing. The managed memory asked for stays far below what is free.
    GiB = 1 << 30
    ps = [torch.nn.Parameter(torch.randn(64 << 20, device="cuda")) for _ in range(4)]  # 1 GiB: 2 GiB of state
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = qlora.PagedAdamW(ps, 1e-3, paging="managed")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # earlier tests' cached blocks: not counted in the difference below
    before = torch.cuda.mem_get_info()[0]
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the update's temporaries go back to the device
    free = torch.cuda.mem_get_info()[0]
    assert opt.memory == "managed" and before - free >= 1.9 * GiB  # the state is resident on the GPU
    filler = torch.empty(free - GiB // 2, dtype=torch.uint8, device="cuda")  # half a GiB stays free
    try:
        act = torch.empty(GiB, dtype=torch.uint8, device="cuda").fill_(1)  # more than is free, less than free + state
        torch.cuda.synchronize()
        del act
    finally:
        del filler
        torch.cuda.empty_cache()


@needs_cuda
def test_pinned_fallback_matches_torch_adamw():
    ps, rs = make_params(device="cuda"), make_params(device="cuda")
    opt = qlora.PagedAdamW(ps, paging="pinned", **HP)
    ref = torch.optim.AdamW(rs, foreach=False, **HP)
    for step in range(6):
        set_grads([ps, rs], step)
        opt.step(), ref.step()
    torch.cuda.synchronize()  # the state is copied back to the host asynchronously
    for p, r in zip(ps, rs):
        assert torch.equal(p, r)
        st = opt.state[p]
        assert st["exp_avg"].device.type == "cpu" and st["exp_avg"].is_pinned()
        assert torch.equal(st["exp_avg_sq"].cuda(), ref.state[r]["exp_avg_sq"])
    assert opt.memory == "pinned"


def test_managed_allocation_reports_cuda_errors_and_frees_what_it_got(monkeypatch):
    # on any machine, against a stand-in for libcuda: a failed cuMemAllocManaged (error 2, out of memory) is the
    # RuntimeError that "auto" falls back on, a successful one (0) is kept, wrapped and freed once
    calls = []

    class Lib:
        err = 2

        def cuMemAllocManaged(self, ptr, size, flags):
            calls.append((size.value, flags))
            ptr._obj.value = 4096
            return self.err

        def cuMemFree_v2(self, ptr):
            calls.append(("free", ptr.value))
    lib = Lib()
    monkeypatch.setattr(qlora, "_cuda", lambda: lib)
    with pytest.raises(RuntimeError, match=re.escape("cuMemAllocManaged(24 bytes) failed with CUDA error 2")):
        qlora._Managed((2, 3))
    lib.err = 0
    m = qlora._Managed((2, 3))
    assert m.ptr == 4096 and m.__cuda_array_interface__ == {"shape": (2, 3), "typestr": "<f4", "data": (4096, False), "version": 3}
    del m
    assert calls == [(24, 1), (24, 1), ("free", 4096)]


@needs_cuda
def test_auto_falls_back_to_pinned_and_says_so(monkeypatch):
    # no managed memory: "auto" takes pinned memory for good, reports it, and leaves `paging` as given
    def fail(shape):
        raise RuntimeError("cuMemAllocManaged failed")
    monkeypatch.setattr(qlora, "_Managed", fail)
    ps, rs = make_params(device="cuda"), make_params(device="cuda")
    opt, ref = qlora.PagedAdamW(ps, **HP), torch.optim.AdamW(rs, foreach=False, **HP)
    for step in range(3):
        set_grads([ps, rs], step)
        opt.step(), ref.step()
    torch.cuda.synchronize()
    assert opt.paging == "auto" and opt.memory == "pinned"
    assert all(opt.state[p]["exp_avg"].is_pinned() for p in ps)
    assert_same(ps, rs)


# ---------------------------------------------------------------------------------------------------
# model.py: a tiny LLaMA written in Meta's raw layout (2 shards, grouped-query attention) and a tiny
# sentencepiece tokenizer, checked against a float64 reference forward written here from the paper's
# equations (complex-number RoPE as in Meta's code, explicit softmax attention, repeated k/v heads).


ROOT = Path(__file__).resolve().parent
SMALL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-5)
WORDS = ("the quick brown fox jumps over the lazy dog while seven small birds sing about rivers "
         "mountains and the long quiet evening light over old stone bridges").split()


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (12,), generator=g)) for _ in range(200)]
    C.train_tokenizer(texts, path, vocab_size=120)
    return path


def meta_weights(cfg, seed=0):
    # full (unsharded) tensors with Meta's names and shapes
    g = torch.Generator().manual_seed(seed)
    hd, h = cfg.dim // cfg.n_heads, cfg.hidden_dim
    shapes = {"tok_embeddings.weight": (cfg.vocab_size, cfg.dim), "norm.weight": (cfg.dim,), "output.weight": (cfg.vocab_size, cfg.dim)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attention.wq.weight": (cfg.n_heads * hd, cfg.dim), p + "attention.wk.weight": (cfg.n_kv_heads * hd, cfg.dim),
                       p + "attention.wv.weight": (cfg.n_kv_heads * hd, cfg.dim), p + "attention.wo.weight": (cfg.dim, cfg.n_heads * hd),
                       p + "feed_forward.w1.weight": (h, cfg.dim), p + "feed_forward.w2.weight": (cfg.dim, h),
                       p + "feed_forward.w3.weight": (h, cfg.dim), p + "attention_norm.weight": (cfg.dim,), p + "ffn_norm.weight": (cfg.dim,)})
    return {k: (1 + 0.1 * torch.randn(s, generator=g)) if len(s) == 1 else torch.randn(s, generator=g) / s[-1] ** 0.5
            for k, s in shapes.items()}


def write_meta_checkpoint(d, cfg, weights, n_shards=2, vocab_in_params=-1):
    # Meta's model-parallel split: column-parallel rows, row-parallel columns, embedding on dim 1
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    shards = [{} for _ in range(n_shards)]
    for k, w in weights.items():
        dim = None if k.endswith("norm.weight") else 1 if k == "tok_embeddings.weight" or k.endswith(("wo.weight", "w2.weight")) else 0
        for s, part in enumerate([w] * n_shards if dim is None else w.chunk(n_shards, dim)):
            shards[s][k] = part.clone()
    for s, sd in enumerate(shards):
        sd["rope.freqs"] = torch.zeros(cfg.head_dim // 2)  # present in real LLaMA-1 files, ignored
        torch.save(sd, d / f"consolidated.{s:02d}.pth")
    params = dict(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                  multiple_of=cfg.multiple_of, norm_eps=cfg.norm_eps, vocab_size=vocab_in_params)
    (d / "params.json").write_text(json.dumps(params))
    return d


def reference_forward(w, cfg, idx):
    # float64 LLaMA from the equations, independent of model.py
    w = {k: v.double() for k, v in w.items()}
    B, T = idx.shape
    hd, nh, nkv = cfg.dim // cfg.n_heads, cfg.n_heads, cfg.n_kv_heads

    def rms(x, g):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * g

    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    cis = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64), torch.outer(torch.arange(T, dtype=torch.float64), freqs))

    def rope(x):  # (B, T, H, hd): rotate interleaved pairs as complex numbers
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2).contiguous())
        return torch.view_as_real(xc * cis[None, :, None, :]).flatten(-2)

    x = w["tok_embeddings.weight"][idx]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        h = rms(x, w[p + "attention_norm.weight"])
        q = rope((h @ w[p + "attention.wq.weight"].T).view(B, T, nh, hd))
        k = rope((h @ w[p + "attention.wk.weight"].T).view(B, T, nkv, hd)).repeat_interleave(nh // nkv, dim=2)
        v = (h @ w[p + "attention.wv.weight"].T).view(B, T, nkv, hd).repeat_interleave(nh // nkv, dim=2)
        att = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd) + mask
        y = torch.einsum("bhts,bshd->bthd", att.softmax(-1), v).reshape(B, T, -1)
        x = x + y @ w[p + "attention.wo.weight"].T
        h = rms(x, w[p + "ffn_norm.weight"])
        a, b = h @ w[p + "feed_forward.w1.weight"].T, h @ w[p + "feed_forward.w3.weight"].T
        x = x + (a * torch.sigmoid(a) * b) @ w[p + "feed_forward.w2.weight"].T
    return rms(x, w["norm.weight"]) @ w["output.weight"].T


@pytest.fixture(scope="session")
def meta_ckpt(tmp_path_factory, tokenizer_file):
    cfg = M.LLaMAConfig(**SMALL, vocab_size=C.Tokenizer(tokenizer_file).n_words)
    weights = meta_weights(cfg)
    d = write_meta_checkpoint(tmp_path_factory.mktemp("llama") / "tiny", cfg, weights)
    shutil.copy(tokenizer_file, d.parent / "tokenizer.model")  # Meta's layout: one level up
    return d, cfg, weights


def test_hidden_dims_of_published_configs():
    # SwiGLU widths as in Meta's params: 7B 11008, 13B 13824, 65B 22016, Llama-2-70B 28672
    for name, h in [("7B", 11008), ("13B", 13824), ("33B", 17920), ("65B", 22016), ("2-70B", 28672)]:
        assert M.LLaMAConfig(**M.CONFIGS[name]).hidden_dim == h


def test_16bit_load_matches_float64_reference(meta_ckpt):
    d, cfg, weights = meta_ckpt
    net = M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=0)
    assert net.config.vocab_size == cfg.vocab_size  # -1 in params.json: taken from the embedding
    idx = torch.randint(cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    logits, loss = net(idx)
    assert loss is None and logits.shape == (2, 11, cfg.vocab_size)
    assert rel_err(logits, reference_forward(weights, cfg, idx)) < 1e-5  # fp32 against fp64: ~5e-7


def test_forward_is_causal_at_every_length_even_two_tokens(meta_ckpt):
    # position t attends to positions 0..t only, however short the sequence: each length against the float64 reference
    d, cfg, weights = meta_ckpt
    net = M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=0, progress=False)
    idx = torch.randint(cfg.vocab_size, (2, 4), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        for T in (1, 2, 3, 4):
            assert rel_err(net(idx[:, :T])[0], reference_forward(weights, cfg, idx[:, :T])) < 1e-4, T


def test_meta_shards_in_bfloat16_are_read(tmp_path, meta_ckpt):
    # Meta's own downloads (Llama 2's consolidated.NN.pth) hold bfloat16 weights: read as the float ones are, each
    # weight its bfloat16 value (only other dtypes, FP8 or int8, are refused)
    src, cfg, weights = meta_ckpt
    d = shutil.copytree(src, tmp_path / "bf16")
    for f in sorted(d.glob("consolidated.*.pth")):
        torch.save({k: t.to(torch.bfloat16) for k, t in torch.load(f, weights_only=True).items()}, f)
    net = M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=0, progress=False)
    rounded = {k: w.to(torch.bfloat16).float() for k, w in weights.items()}
    assert torch.equal(net.tok_embeddings.weight, rounded["tok_embeddings.weight"])
    idx = torch.randint(cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    assert rel_err(net(idx)[0], reference_forward(rounded, cfg, idx)) < 1e-4


def test_4bit_load_matches_reference_on_nf4_roundtripped_weights(meta_ckpt, monkeypatch):
    d, cfg, weights = meta_ckpt
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # torch path here; the kernels have their own tests
    net = M.LLaMA.from_checkpoint(d, quantize=True, dtype=torch.float32)
    assert len({id(m.dequant_buffer) for m in net.modules() if isinstance(m, qlora.LoRALinear)}) == 1
    rt = {k: qlora.dequantize_nf4(qlora.quantize_nf4(v)) if v.dim() == 2 and k.startswith("layers.") else v for k, v in weights.items()}
    idx = torch.randint(cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    ref = reference_forward(rt, cfg, idx)
    assert rel_err(net(idx)[0], ref) < 1e-5  # fp32 against fp64: ~5e-7 (without double quantization: 6e-3)
    assert rel_err(reference_forward(weights, cfg, idx), ref) > 1e-3  # the 4-bit model really is different
    assert all(isinstance(m.weight, qlora.NF4Weight) for m in net.modules() if isinstance(m, qlora.LoRALinear))
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert len(trainable) == 2 * 7 * cfg.n_layers  # LoRA on wq wk wv wo w1 w2 w3 of every block


def test_loss_equals_cross_entropy_and_chunks_agree(meta_ckpt):
    d, cfg, _ = meta_ckpt
    net = M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=0)
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(cfg.vocab_size, (3, 10), generator=g)
    tgt = torch.randint(cfg.vocab_size, (3, 10), generator=g)
    tgt[0, :4] = -100
    logits, _ = net(idx)
    ref = F.cross_entropy(logits.view(-1, cfg.vocab_size), tgt.view(-1), ignore_index=-100)
    for chunk in (7, 2048):  # chunk boundaries inside a row, and a single chunk
        net.ce_chunk = chunk
        _, loss = net(idx, tgt)
        assert abs(loss.item() - ref.item()) < 1e-5


def test_gradient_checkpointing_gives_same_gradients(meta_ckpt):
    d, cfg, _ = meta_ckpt
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        net = M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_dropout=0.0)
        for n, p in net.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
        net.train()
        net.grad_checkpoint = ckpt
        idx = torch.arange(16).view(2, 8) % cfg.vocab_size
        net(idx, idx)[1].backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.requires_grad]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_greedy_generate_with_kv_cache_equals_full_recompute(meta_ckpt):
    d, cfg, _ = meta_ckpt
    net = M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32).eval()
    idx = torch.randint(cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(4))
    out = net.generate(idx, 12, temperature=0)
    ref = idx
    for _ in range(12):  # no cache: the whole sequence again each step
        ref = torch.cat([ref, net(ref)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)


def test_generate_stops_at_eos_and_sampling_filters(meta_ckpt):
    d, cfg, _ = meta_ckpt
    net = M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32).eval()
    idx = torch.randint(cfg.vocab_size, (1, 4), generator=torch.Generator().manual_seed(5))
    first = net.generate(idx, 1, temperature=0)[0, -1].item()
    assert net.generate(idx, 20, temperature=0, eos_id=first).shape[1] == 5  # stops right after eos
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]])
    torch.manual_seed(0)
    draws = torch.stack([M.sample(logits, 1.0, top_k=2) for _ in range(200)])
    assert set(draws.flatten().tolist()) == {1, 2}
    draws = torch.stack([M.sample(logits, 1.0, top_p=0.5) for _ in range(200)])
    assert set(draws.flatten().tolist()) == {1}  # token 1 alone has p = 0.64 > 0.5
    for t in (1e-300, 5e-324):  # logits / t would overflow to inf - inf = nan: a near-zero temperature is greedy
        assert all(M.sample(logits, t, top_k=3, top_p=0.9).item() == 1 for _ in range(20))


def test_random_init_named_config_builds_quantized():
    cfg = M.LLaMAConfig(**{**M.CONFIGS["tiny"], "n_layers": 1})
    net = M.LLaMA.from_config(cfg, dtype=torch.float32)
    q = net.layers[0].feed_forward.w1.weight
    assert isinstance(q, qlora.NF4Weight) and q.shape == (cfg.hidden_dim, cfg.dim)
    assert net(torch.zeros(1, 3, dtype=torch.long))[0].isfinite().all()


def small_net(**kw):
    # a 16-bit fp32 LLaMA with random weights and (unless kw says otherwise) no LoRA: the network alone
    cfg = M.LLaMAConfig(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=32, max_seq_len=64, lora_r=0), **kw})
    return M.LLaMA.from_config(cfg, quantize=False, dtype=torch.float32).eval()


def test_model_gives_every_layer_its_lora_config():
    # r, α/r and the dropout of the config reach every one of the seven linears of every block
    lins = [m for m in small_net(lora_r=4, lora_alpha=12, lora_dropout=0.3).modules() if isinstance(m, qlora.LoRALinear)]
    assert len(lins) == 7 * 2 and all((m.r, m.scaling, m.dropout.p) == (4, 3.0, 0.3) for m in lins)


def test_config_defaults_and_ffn_width():
    assert M.LLaMAConfig(dim=64, n_heads=4).n_kv_heads == 4  # no n_kv_heads in params.json: no grouped-query attention
    assert M.LLaMAConfig(dim=48, multiple_of=32).hidden_dim == 128  # int(8·48/3) = 128, a multiple already: kept
    assert M.LLaMAConfig(dim=64, multiple_of=32, ffn_dim_multiplier=1.3).hidden_dim == 224  # int(1.3 · 170) = 221 -> 224
    assert M.paper_hparams(6656) == dict(learning_rate=1e-4, lora_dropout=0.05)  # 33B is "big" (App. B.2)
    assert M.paper_hparams(5120) == dict(learning_rate=2e-4, lora_dropout=0.1)


def test_paper_recipe_switches_at_the_width_of_33b():
    # App. B.2: lr 2e-4 and dropout 0.1 up to 13B, lr 1e-4 and dropout 0.05 from 33B (width 6656) up
    small, big = dict(learning_rate=2e-4, lora_dropout=0.1), dict(learning_rate=1e-4, lora_dropout=0.05)
    for dim, want in ((2048, small), (4096, small), (5120, small), (5121, small), (6655, small), (6656, big), (8192, big)):
        assert M.paper_hparams(dim) == want, dim


def test_mfu_counts_four_flops_per_parameter_and_token():
    # forward 2N, input-gradient backward 2N per token, over 989 TFLOP/s; recomputation is not model FLOPs (PaLM's MFU)
    assert M.mfu(1e9, 1e4, "NVIDIA H100 80GB HBM3") == f"{100 * 4e13 / 989e12:.1f}%" == "4.0%"
    assert M.mfu(1e9, 1e4, "NVIDIA A100-SXM4-80GB") == f"{100 * 4e13 / 312e12:.1f}%"
    assert M.mfu(1e9, 1e4, "") == "-"


def test_rmsnorm_rounds_before_the_weight_as_meta_does():
    # Meta: self._norm(x.float()).type_as(x) * self.weight: in bf16 the normalised x is rounded, then multiplied
    g = torch.Generator().manual_seed(5)
    w, x = (1 + 0.1 * torch.randn(64, generator=g)).bfloat16(), torch.randn(8, 64, generator=g).bfloat16()
    x32 = x.float()
    assert torch.equal(M.RMSNorm(w, 1e-5)(x), (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16() * w)


def test_rope_theta_sets_the_rotation_frequencies():
    # CodeLlama's θ = 1e6: angle of pair i at position t is t · θ^(-2i/d)
    net = small_net(rope_theta=1e6)
    angles = torch.arange(10, dtype=torch.float64)[:, None] * 1e6 ** -(torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    assert torch.allclose(net.rope[0, :10].double(), angles.cos(), atol=1e-6)
    assert torch.allclose(net.rope[1, :10].double(), angles.sin(), atol=1e-6)


def test_tied_embeddings_share_one_tensor():
    net = small_net(tie_embeddings=True)
    assert net.output.data_ptr() == net.tok_embeddings.weight.data_ptr()


def test_prefill_in_two_chunks_equals_one_pass():
    # the KV cache with start_pos > 0 and several new tokens: query i of the chunk sees keys up to start_pos + i
    net = small_net()
    idx = torch.randint(50, (2, 9), generator=torch.Generator().manual_seed(0))
    for layer in net.layers:
        layer.attention.cache = (torch.zeros(2, 9, 2, 16), torch.zeros(2, 9, 2, 16))
    with torch.no_grad():
        a, b, full = net(idx[:, :4], start_pos=0)[0], net(idx[:, 4:], start_pos=4)[0], net(idx)[0]
    assert torch.allclose(torch.cat([a, b], 1), full, atol=1e-5)


def test_loss_with_every_target_ignored_is_zero():
    _, loss = small_net()(torch.zeros(1, 5, dtype=torch.long), torch.full((1, 5), -100))
    assert loss.item() == 0.0  # not 0/0


def test_generate_batch_with_eos_and_the_context_limit():
    net = small_net()
    g = torch.Generator().manual_seed(1)
    while True:  # a batch of two prompts whose first greedy tokens differ
        idx = torch.randint(50, (2, 4), generator=g)
        first = net.generate(idx, 1, temperature=0)[:, -1]
        if first[0] != first[1]:
            break
    eos = first[0].item()  # row 0 ends at once, row 1 goes on
    out = net.generate(idx, 6, temperature=0, eos_id=eos)
    alone = net.generate(idx[1:], 6, temperature=0, eos_id=eos)
    assert (out[0, 4:] == eos).all()  # a finished row is padded with eos
    assert out.shape[1] == alone.shape[1] and torch.equal(out[1], alone[0])  # the other row as if alone
    net.config.max_seq_len = 12
    assert net.generate(torch.zeros(1, 5, dtype=torch.long), 20, temperature=0).shape == (1, 12)  # prompt + new <= context
    full = torch.zeros(1, 12, dtype=torch.long)
    assert torch.equal(net.generate(full, 20, temperature=0), full)  # a prompt that fills the context is all there is
    with pytest.raises(ValueError, match=re.escape("generate: the prompt has 13 tokens, more than the model's max_seq_len 12")):
        net.generate(torch.zeros(1, 13, dtype=torch.long), 20, temperature=0)


def test_generate_stops_at_an_eos_whose_id_is_0():
    # id 0 is an eos like any other (a vocabulary may put it first), not "no eos"
    net = small_net()
    prompt = torch.randint(50, (1, 4), generator=torch.Generator().manual_seed(2))
    first = greedy(net, prompt[0].tolist(), 1, None)[0]
    net.output[[0, first]] = net.output[[first, 0]]  # the head's rows swapped: the likeliest first token is now id 0
    assert greedy(net, prompt[0].tolist(), 1, None) == [0]
    out = net.generate(prompt, 8, temperature=0, eos_id=0)
    assert out.shape == (1, 5) and out[0, -1] == 0  # stops right after it
    two = net.generate(torch.cat([prompt, prompt]), 8, temperature=0, eos_id=0)
    assert torch.equal(two, torch.cat([out, out]))


def test_sample_temperature_top_k_top_p(monkeypatch):
    seen, multinomial = [], torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda p, n: seen.append(p.clone()) or multinomial(p, n))
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]])
    M.sample(logits, 0.5)
    M.sample(logits, 1.0, top_k=10)  # more than the vocabulary: all of it
    M.sample(logits, 1.0, top_k=2)
    M.sample(torch.tensor([[0.5, 0.3, 0.2]]).log(), 1.0, top_p=0.85)  # 0.5 + 0.3 < 0.85: the third token is needed
    M.sample(torch.tensor([[0.5, 0.3, 0.2]]).log(), 1.0, top_p=0.75)  # 0.5 + 0.3 reaches it
    assert torch.allclose(seen[0], (logits.double() / 0.5).softmax(-1))
    assert torch.allclose(seen[1], logits.double().softmax(-1))
    e = torch.tensor([3.0, 2.0]).double().exp()
    assert torch.allclose(seen[2], torch.tensor([[0, e[0] / e.sum(), e[1] / e.sum(), 0, 0]], dtype=torch.float64))  # the 2 likeliest, renormalised
    assert (seen[3] > 0).all() and seen[4][0, 2] == 0 and (seen[4][0, :2] > 0).all()
    # a token whose predecessors already reach top_p is not needed (the smallest set, as transformers' TopPLogitsWarper)
    M.sample(torch.tensor([[0.5, 0.5]]).log(), 1.0, top_p=0.5)
    M.sample(torch.tensor([[0.5, 0.25, 0.25]]).log(), 1.0, top_p=0.5)
    M.sample(torch.tensor([[0.5, 0.25, 0.25]]).log(), 1.0, top_p=0.0)  # the likeliest token is always kept
    assert [(q[0] > 0).tolist() for q in seen[5:]] == [[True, False], [True, False, False], [True, False, False]]


def test_sample_applies_temperature_then_top_k_then_top_p(monkeypatch):
    # as transformers' generate orders its warpers: the nucleus is cut from the tempered distribution that top-k leaves
    seen, multinomial = [], torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda p, n: seen.append(p.clone()) or multinomial(p, n))
    p = torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64)
    M.sample(p.log(), 10.0, top_p=0.55)  # at t = 10: p^(1/10) renormalised is about 0.36, 0.33, 0.31: two tokens reach 0.55
    e = (p.log() / 10).exp()[0, :2]
    assert torch.allclose(seen[0], torch.tensor([[e[0] / e.sum(), e[1] / e.sum(), 0]], dtype=torch.float64))
    M.sample(p.log(), 1.0, top_p=0.55)  # untempered, 0.6 alone reaches it
    assert torch.equal(seen[1] > 0, torch.tensor([[True, False, False]]))
    q = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    M.sample(q.log(), 1.0, top_k=2, top_p=0.5)  # top-k leaves 0.4 and 0.3, renormalised 4/7 and 3/7: 4/7 alone reaches 0.5
    assert torch.equal(seen[2] > 0, torch.tensor([[True, False, False, False]]))
    M.sample(q.log(), 1.0, top_k=3, top_p=0.75)  # 4/9 + 3/9 = 7/9 reaches 0.75: the third is not needed
    assert torch.allclose(seen[3], torch.tensor([[4 / 7, 3 / 7, 0, 0]], dtype=torch.float64))


def test_generate_samples_with_its_top_k_and_top_p():
    # top_k 1, or a top_p below the likeliest token's probability, leaves that token alone: the greedy answer at any temperature
    net = small_net()
    prompt = torch.randint(50, (1, 3), generator=torch.Generator().manual_seed(3))
    expect = prompt[0].tolist() + greedy(net, prompt[0].tolist(), 6, None)  # without the KV cache
    torch.manual_seed(0)
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(top_k=50, top_p=1e-6), dict(top_k=1, top_p=0.99)):
        assert net.generate(prompt, 6, temperature=5.0, **kw)[0].tolist() == expect, kw


def test_installed_transformers_sampling_filters_agree(monkeypatch):
    # top-k and top-p keep the tokens transformers' warpers keep (temperature, then top-k, then top-p, as its
    # generate orders them), on random logits, where transformers is installed (skipped without it)
    lp = pytest.importorskip("transformers.generation.logits_process")
    seen, multinomial = [], torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda p, n: seen.append(p.clone()) or multinomial(p, n))
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        v = int(torch.randint(2, 60, (), generator=g))
        logits = torch.randn(1, v, generator=g, dtype=torch.float64) * 5 * torch.rand((), generator=g, dtype=torch.float64)
        t, k, p = 0.05 + 2 * torch.rand((), generator=g).item(), int(torch.randint(1, v + 1, (), generator=g)), torch.rand((), generator=g).item()
        for top_k, top_p in ((k, None), (None, p), (k, p)):
            M.sample(logits, t, top_k, top_p)
            h = logits / t
            h = lp.TopKLogitsWarper(top_k)(None, h) if top_k else h
            h = lp.TopPLogitsWarper(top_p)(None, h) if top_p is not None else h
            assert torch.equal(seen[-1] > 0, h.isfinite())


def test_gradient_checkpointing_recomputes_each_block(monkeypatch):
    # same gradients either way (above); here: the block's forward really runs again in backward
    calls, forward = [], M.FeedForward.forward
    monkeypatch.setattr(M.FeedForward, "forward", lambda self, x: calls.append(1) or forward(self, x))
    net = small_net(n_layers=1, lora_r=4, lora_dropout=0.0).train()
    for grad_checkpoint, n in ((False, 1), (True, 2)):
        calls.clear()
        net.grad_checkpoint = grad_checkpoint
        idx = torch.zeros(1, 4, dtype=torch.long)
        net(idx, idx)[1].backward()
        assert len(calls) == n


def test_tokenizer_special_ids(tokenizer_file):
    tok = C.Tokenizer(tokenizer_file)
    assert (tok.bos_id, tok.eos_id) == (1, 2)  # LLaMA's ids, read from the model file
    ids = tok.encode("the lazy dog", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids) == "the lazy dog"


def test_tokenizer_decode_drops_only_ids_past_the_vocabulary(tokenizer_file):
    # a model's embedding may be padded past the tokenizer: ids of those rows are dropped; every id of the tokenizer,
    # the unknown token 0 among them, is decoded as sentencepiece decodes it
    tok = C.Tokenizer(tokenizer_file)
    ids = tok.encode("the lazy dog")
    assert tok.decode([0]) == tok.sp.decode([0]) != ""
    assert tok.decode(ids + [tok.n_words, tok.n_words + 7]) == tok.decode(ids) == "the lazy dog"
    assert tok.decode([0] + ids) == tok.sp.decode([0] + ids)


def test_train_tokenizer_reads_texts_longer_than_sentencepieces_default(tmp_path):
    # sentencepiece skips texts over 4192 bytes unless told: whole long examples were lost (all of them: no tokenizer)
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(800)) + f" Ω{i}" for i in range(8)]
    assert min(len(t.encode()) for t in texts) > 4192
    C.train_tokenizer(texts, tmp_path / "t.model", vocab_size=120)
    tok = C.Tokenizer(tmp_path / "t.model")
    assert tok.sp.unk_id() not in tok.encode("the lazy dog Ω") and tok.decode(tok.encode("the lazy dog Ω")) == "the lazy dog Ω"
    # the limit is in bytes: 1,500 CJK characters (3 bytes each) are 4,500 bytes, over the default
    wide = ["".join(chr(0x4E00 + (i + 7 * j) % 40) for j in range(1500)) for i in range(8)]
    assert max(map(len, wide)) < 4192 < min(len(t.encode()) for t in wide)
    C.train_tokenizer(wide, tmp_path / "w.model", vocab_size=80)
    tok = C.Tokenizer(tmp_path / "w.model")
    assert tok.sp.unk_id() not in tok.encode(wide[0][:50]) and tok.decode(tok.encode(wide[0][:50])) == wide[0][:50]


def test_train_tokenizer_tries_the_size_sentencepiece_names_once(tmp_path, monkeypatch):
    # a sentencepiece that refuses the size it named as well: one line naming the second refusal, not a loop or an
    # empty tokenizer.model written as if trained
    sizes = []

    def refuse(vocab_size, **kw):
        sizes.append(vocab_size)
        raise RuntimeError(f"Vocabulary size too high ({vocab_size}). Please set it to a value <= {vocab_size - 10}.\nmore")
    monkeypatch.setattr(spm.SentencePieceTrainer, "train", refuse)
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 't.model'}: cannot train a tokenizer on this data (Vocabulary "
                                                   "size too high (50). Please set it to a value <= 40.)")):
        C.train_tokenizer(WORDS, tmp_path / "t.model", vocab_size=60)
    assert sizes == [60, 50] and not (tmp_path / "t.model").exists()


def test_tokenizer_without_bos_or_eos_is_refused(tmp_path):
    # e.g. T5's sentencepiece model (no bos): the id -1 would index the embedding
    for bos, eos in ((-1, 2), (1, -1)):
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(WORDS * 10), model_writer=buf, vocab_size=40, unk_id=0,
                                       bos_id=bos, eos_id=eos, pad_id=-1, minloglevel=2)
        (tmp_path / "t.model").write_bytes(buf.getvalue())
        with pytest.raises(InputError, match=re.escape(f"t.model: the tokenizer has no bos or no eos token (bos_id {bos}, eos_id {eos})")):
            C.Tokenizer(tmp_path / "t.model")


@pytest.mark.parametrize("damage, expect", [
    ("no_params", "params.json: not found"),
    ("no_shard0", "consolidated.00.pth: shard missing"),
    ("one_shard_only", "tok_embeddings.weight has shape"),
    ("shards_disagree", "tok_embeddings.weight has shapes [(V, 32), (100, 32)] in its shards: they do not fit"),
    ("extra_key", "unexpected tensor 'layers.0.attention.bias'"),
    ("missing_key", "missing tensor 'layers.1.ffn_norm.weight'"),
    ("bad_params", "params.json:1: invalid JSON"),
    ("tokenizer_vocab", "tokenizer.model: tokenizer has 200 tokens, the checkpoint's embedding has 120"),  # more than its rows
    ("params_kv_heads", "params.json: dim 64, 4 heads, 3 kv heads: need a whole, even head dim and kv heads dividing heads"),
    ("params_odd_head_dim", "params.json: dim 64, 64 heads, 64 kv heads"),  # a head dim of 1: no rotary pairs
    ("pickle", "consolidated.01.pth: holds more than tensors and plain data; refusing to unpickle it"),  # no advice to do it anyway
    ("legacy_pickle", "consolidated.01.pth: not in torch.save's zip format"),  # not torch.save's zip format
    ("params_string", 'params.json: dim must be a positive integer, got "64"'),  # a hand-edited params.json
    ("params_negative", "params.json: n_heads must be a positive integer, got -4"),
    ("params_bool", "params.json: n_layers must be a positive integer, got true"),
    ("params_nan", "params.json: norm_eps must be a positive number, got NaN"),
    ("params_scaled_rope", "params.json: use_scaled_rope true is not implemented (only false)"),  # Llama 3.1's
    ("fp8_weights", "consolidated.01.pth: tensor 'layers.1.feed_forward.w1.weight' has dtype torch.float8_e4m3fn; only float16"),
    ("params_list", "params.json: expected a JSON object {...}, got [1]"),
    ("params_missing", "params.json: missing field 'n_heads'"),
    ("params_vocab", "tok_embeddings.weight has shape (V, 64), params.json implies ("),  # not the embedding's silently
    ("params_latin1", "params.json: invalid JSON (UnicodeDecodeError)"),
    ("not_a_dict", "consolidated.01.pth: not a state dict"),
    ("not_tensors", "consolidated.01.pth: not a state dict"),
    ("nan_weight", "consolidated.*.pth: layers.1.feed_forward.w1.weight holds NaN or inf"),  # not NaN logits later
])
def test_checkpoint_errors_name_file_and_tensor(tmp_path, meta_ckpt, tokenizer_file, damage, expect):
    src, cfg, weights = meta_ckpt
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    if damage == "no_params":
        (d / "params.json").unlink()
    elif damage == "no_shard0":
        (d / "consolidated.00.pth").unlink()
    elif damage == "one_shard_only":  # a checkpoint for 2-way model parallelism with a shard lost
        (d / "consolidated.01.pth").unlink()
    elif damage in ("extra_key", "missing_key", "shards_disagree", "fp8_weights", "nan_weight"):
        sd = torch.load(d / "consolidated.01.pth")
        if damage == "shards_disagree":  # the second shard of another model (a smaller vocabulary)
            sd["tok_embeddings.weight"] = sd["tok_embeddings.weight"][:100].clone()
        elif damage == "extra_key":
            sd["layers.0.attention.bias"] = torch.zeros(1)
        elif damage == "fp8_weights":  # Llama-3.1-405B-FP8's FFN, its scales in another file: never cast without them
            sd["layers.1.feed_forward.w1.weight"] = sd["layers.1.feed_forward.w1.weight"].to(torch.float8_e4m3fn)
        elif damage == "nan_weight":  # one weight in the second shard
            sd["layers.1.feed_forward.w1.weight"][3, 5] = float("nan")
        else:
            del sd["layers.1.ffn_norm.weight"]
        torch.save(sd, d / "consolidated.01.pth")
    elif damage == "bad_params":
        (d / "params.json").write_text("{dim: 64")
    elif damage.startswith("params_"):
        p, change = json.loads((d / "params.json").read_text()), damage.removeprefix("params_")
        p.update({"string": {"dim": str(p["dim"])}, "negative": {"n_heads": -4}, "bool": {"n_layers": True},
                  "nan": {"norm_eps": float("nan")}, "kv_heads": {"n_kv_heads": 3}, "scaled_rope": {"use_scaled_rope": True},
                  "odd_head_dim": {"n_heads": 64, "n_kv_heads": 64}, "vocab": {"vocab_size": cfg.vocab_size + 8}}.get(change, {}))
        if change == "missing":
            del p["n_heads"]
        raw = {"list": b"[1]", "latin1": '{"dim": 64, "x": "caf\xe9"}'.encode("latin-1")}.get(change, json.dumps(p).encode())
        (d / "params.json").write_bytes(raw)
    elif damage == "legacy_pickle":
        torch.save({"x": torch.zeros(1)}, d / "consolidated.01.pth", _use_new_zipfile_serialization=False)
    elif damage == "tokenizer_vocab":  # random letters: enough text for 200 pieces
        g = torch.Generator().manual_seed(0)
        words = ["".join(chr(97 + c) for c in torch.randint(26, (5,), generator=g).tolist()) for _ in range(400)]
        assert C.train_tokenizer([" ".join(words[i : i + 20]) for i in range(0, 400, 20)], d / "tokenizer.model", 200) > 120
    elif damage == "pickle":  # arbitrary pickled objects are refused (weights_only=True)
        torch.save({"x": __import__("collections").OrderedDict(a=Path("."))}, d / "consolidated.01.pth")
    elif damage in ("not_a_dict", "not_tensors"):  # plain data weights_only accepts, but no state dict
        torch.save([1, 2] if damage == "not_a_dict" else {"tok_embeddings.weight": 3}, d / "consolidated.01.pth")
    with pytest.raises(InputError, match=re.escape(expect.replace("(V,", f"({cfg.vocab_size},"))):
        M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, tokenizer=d / "tokenizer.model" if damage == "tokenizer_vocab" else None)


def test_a_zip_archive_that_torch_save_did_not_write_is_refused_as_such(tmp_path):
    # an empty zip archive (PK\x05\x06...) starts like a zip but not like torch.save's (PK\x03\x04): not its format,
    # rather than "truncated or damaged"
    f = tmp_path / "consolidated.00.pth"
    with __import__("zipfile").ZipFile(f, "w"):
        pass
    assert f.read_bytes()[:4] == b"PK\x05\x06"
    with pytest.raises(InputError, match=re.escape(f"{f}: not in torch.save's zip format") + "$"):
        C.torch_load(f)


def test_shards_of_different_models_are_named_so_with_the_tokenizer_beside_them(tmp_path, meta_ckpt, tokenizer_file):
    # the vocabulary is the first shard's embedding: a second shard of another model (fewer rows) is the fault named,
    # not the tokenizer that fits the first
    src, cfg, _ = meta_ckpt
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    shutil.copy(tokenizer_file, d / "tokenizer.model")
    sd = torch.load(d / "consolidated.01.pth")
    torch.save({**sd, "tok_embeddings.weight": sd["tok_embeddings.weight"][:100].clone()}, d / "consolidated.01.pth")
    with pytest.raises(InputError, match=re.escape(f"tok_embeddings.weight has shapes [({cfg.vocab_size}, 32), (100, 32)] in its "
                                                   "shards: they do not fit")):
        M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=0, progress=False)


def test_a_tokenizer_one_token_larger_than_the_embedding_is_refused(tmp_path, tokenizer_file):
    # an id past the embedding's rows would index out of it: one token too many is refused as well as many
    n = C.Tokenizer(tokenizer_file).n_words
    cfg = M.LLaMAConfig(**SMALL, vocab_size=n - 1)
    d = write_meta_checkpoint(tmp_path / "m", cfg, meta_weights(cfg), n_shards=1)
    with pytest.raises(InputError, match=re.escape(f"{tokenizer_file}: tokenizer has {n} tokens, the checkpoint's embedding has {n - 1}")):
        C.open_checkpoint(d, tokenizer=tokenizer_file, progress=False)
    cfg = M.LLaMAConfig(**SMALL, vocab_size=n)
    d = write_meta_checkpoint(tmp_path / "same", cfg, meta_weights(cfg), n_shards=1)
    assert C.open_checkpoint(d, tokenizer=tokenizer_file, progress=False)[0]["vocab_size"] == n


# ---------------------------------------------------------------------------------------------------
# model.py's less travelled paths: behaviour the tests above would let change unnoticed


# the params.json of each release (Meta's downloads), and its context: 2048 tokens for LLaMA 1, 4096 for Llama 2
RELEASED_PARAMS = {
    "7B": (dict(dim=4096, multiple_of=256, n_heads=32, n_layers=32, norm_eps=1e-06), 2048),
    "13B": (dict(dim=5120, multiple_of=256, n_heads=40, n_layers=40, norm_eps=1e-06), 2048),
    "33B": (dict(dim=6656, multiple_of=256, n_heads=52, n_layers=60, norm_eps=1e-06), 2048),
    "65B": (dict(dim=8192, multiple_of=256, n_heads=64, n_layers=80, norm_eps=1e-05), 2048),
    "2-7B": (dict(dim=4096, multiple_of=256, n_heads=32, n_layers=32, norm_eps=1e-05), 4096),
    "2-13B": (dict(dim=5120, multiple_of=256, n_heads=40, n_layers=40, norm_eps=1e-05), 4096),
    "2-70B": (dict(dim=8192, multiple_of=4096, ffn_dim_multiplier=1.3, n_heads=64, n_kv_heads=8, n_layers=80, norm_eps=1e-05), 4096),
}


def test_named_configs_are_the_released_params_and_the_lora_defaults_the_papers():
    for name, (params, context) in RELEASED_PARAMS.items():
        cfg = M.LLaMAConfig(**M.CONFIGS[name])
        want = {"n_kv_heads": params["n_heads"], "ffn_dim_multiplier": None, **params}
        assert {k: getattr(cfg, k) for k in want} == want, name
        assert (cfg.max_seq_len, cfg.vocab_size, cfg.rope_theta) == (context, 32000, 10000.0), name
    cfg = M.LLaMAConfig()  # QLoRA App. B.2: r 64, α 16, dropout 0.1 up to 13B
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.norm_eps, cfg.max_seq_len) == (64, 16, 0.1, 1e-5, 2048)
    assert (TR.lora_r, TR.lora_alpha, type(TR.lora_alpha)) == (64, 16.0, float)  # train.py's flags (typed by their defaults)
    # dense bf16 peaks of the data sheets; a longer name is looked up before the shorter one it holds ("L40S", "H100 PCIe")
    for device, peak in (("NVIDIA H200", 989e12), ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA GeForce RTX 4090", 165e12),
                         ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200 NVL", 835e12)):
        assert M.mfu(1e9, 1e4, device) == f"{100 * 4e13 / peak:.1f}%", device


def test_every_rmsnorm_takes_the_configs_eps():
    net = small_net(norm_eps=0.25)  # large enough to change every output visibly
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * 0.3
    norms = [m for m in net.modules() if isinstance(m, M.RMSNorm)]
    assert len(norms) == 2 * 2 + 1
    for m in norms:
        m.weight = 1 + 0.1 * torch.randn(64, generator=torch.Generator().manual_seed(1))
        xd = x.double()
        ref = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + 0.25) * m.weight.double()
        assert torch.allclose(m(x).double(), ref, atol=1e-6)


def test_rope_tables_span_twice_the_context_and_are_not_saved():
    # Meta's precompute_freqs_cis(head_dim, 2 · max_seq_len): positions up to twice the context have their angles
    net = small_net()  # max_seq_len 64, head_dim 16
    assert net.rope.shape == (2, 128, 8)
    angles = torch.arange(128, dtype=torch.float64)[:, None] * 1e4 ** -(torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    assert torch.allclose(net.rope[0].double(), angles.cos(), atol=1e-5) and torch.allclose(net.rope[1].double(), angles.sin(), atol=1e-5)
    assert "rope" not in net.state_dict()  # recomputed from the config, never part of a checkpoint
    with torch.no_grad():
        assert net(torch.zeros(1, 100, dtype=torch.long))[0].isfinite().all()  # 100 tokens > max_seq_len: still has tables
    # 16-bit activations are rotated in fp32 and handed back in their own dtype
    x = torch.randn(1, 5, 2, 16, generator=torch.Generator().manual_seed(2)).bfloat16()
    cos, sin = net.rope[0, :5], net.rope[1, :5]
    y = M.apply_rope(x, cos, sin)
    a, b = x.double()[..., 0::2], x.double()[..., 1::2]
    c, s = angles[:5, None, :].cos(), angles[:5, None, :].sin()
    ref = torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2)
    assert y.dtype == torch.bfloat16 and torch.allclose(y.double(), ref, rtol=2 ** -8, atol=1e-6)


def test_16bit_model_gives_fp32_logits_and_loss():
    # the head's matmul in the activation dtype, then fp32 for the logits and the cross-entropy (Meta: .float())
    cfg = M.LLaMAConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=32, max_seq_len=64, lora_r=0)
    net = M.LLaMA.from_config(cfg, quantize=False, dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    idx, tgt = torch.randint(50, (2, 6), generator=g), torch.randint(50, (2, 6), generator=g)
    with torch.no_grad():
        logits, _ = net(idx)
        _, loss = net(idx, tgt)
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    assert abs(loss.item() - F.cross_entropy(logits.double().view(-1, 50), tgt.view(-1)).item()) < 1e-4


def test_loss_chunks_cover_every_row_even_a_last_chunk_of_one():
    net = small_net()
    g = torch.Generator().manual_seed(4)
    idx, tgt = torch.randint(50, (2, 4), generator=g), torch.randint(50, (2, 4), generator=g)
    with torch.no_grad():
        ref = F.cross_entropy(net(idx)[0].double().view(-1, 50), tgt.view(-1))
        for chunk in (1, 3, 7, 8, 9):  # 8 rows: chunks of 1, a last chunk of 2, of 1 (7), exactly one, more than all
            net.ce_chunk = chunk
            assert abs(net(idx, tgt)[1].item() - ref.item()) < 1e-5, chunk


def test_gradient_checkpointing_only_while_training_with_gradients(monkeypatch):
    # eval() with gradients on: no recomputation; train() under no_grad (generate): the KV cache is still used
    calls, forward = [], M.FeedForward.forward
    monkeypatch.setattr(M.FeedForward, "forward", lambda self, x: calls.append(1) or forward(self, x))
    net = small_net(n_layers=1, lora_r=4, lora_dropout=0.0)
    net.grad_checkpoint = True
    idx = torch.zeros(1, 4, dtype=torch.long)
    net.eval()
    net(idx, idx)[1].backward()
    assert len(calls) == 1
    prompt = torch.randint(50, (2, 3), generator=torch.Generator().manual_seed(0))
    with_random_adapter(net, seed=3)
    expect = net.generate(prompt, 6, temperature=0)
    assert torch.equal(net.train().generate(prompt, 6, temperature=0), expect)


def test_generate_steps_cache_dtype_cleanup_and_default_temperature(monkeypatch):
    net = small_net()
    prompt = torch.randint(50, (1, 3), generator=torch.Generator().manual_seed(0))
    steps, forward = [], M.LLaMA.forward
    monkeypatch.setattr(M.LLaMA, "forward", lambda self, idx, targets=None, start_pos=None: steps.append(start_pos) or forward(self, idx, targets, start_pos))
    net.generate(prompt, 5, temperature=0)
    assert steps == [0, 3, 4, 5, 6]  # the prompt, then one step per new token but the last: no wasted forward
    assert all(layer.attention.cache is None for layer in net.layers)  # the cache is freed
    seen = []
    with torch.autocast("cpu", torch.bfloat16):  # the cache holds what autocast computes k and v in
        net.generate(prompt, 2, temperature=0, stream=lambda nxt: seen.append(net.layers[0].attention.cache[0].dtype))
    assert seen == [torch.bfloat16] * 2

    def fail(nxt):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        net.generate(prompt, 3, temperature=0, stream=fail)
    assert all(layer.attention.cache is None for layer in net.layers)  # freed on the way out too
    steps.clear()
    assert net.generate(prompt, 5, temperature=0, stream=lambda nxt: True).shape == (1, 4) and steps == [0]  # True: the end
    temps, sample = [], M.sample
    monkeypatch.setattr(M, "sample", lambda logits, t, k, p: temps.append(t) or sample(logits, t, k, p))
    net.generate(prompt, 1)
    assert temps == [1.0]  # plain sampling unless told


def test_generate_on_a_16bit_model_caches_k_and_v_in_its_dtype():
    # without autocast, k and v are computed in the weights' dtype, and the cache holds them so (not in fp32)
    cfg = M.LLaMAConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=32, max_seq_len=64, lora_r=0)
    net = M.LLaMA.from_config(cfg, quantize=False, dtype=torch.bfloat16).eval()
    prompt = torch.randint(50, (2, 3), generator=torch.Generator().manual_seed(0))
    seen = []
    out = net.generate(prompt, 4, temperature=0, stream=lambda nxt: seen.append(net.layers[0].attention.cache[1].dtype))
    assert out.shape == (2, 7) and torch.equal(out[:, :3], prompt) and seen == [torch.bfloat16] * 4


def test_sample_default_is_the_plain_softmax(monkeypatch):
    seen, multinomial = [], torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda p, n: seen.append(p.clone()) or multinomial(p, n))
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]])
    M.sample(logits)
    assert torch.allclose(seen[0], logits.double().softmax(-1))


def test_random_init_norms_are_one_and_weights_scale_with_fan_in_per_seed():
    cfg = M.LLaMAConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=32, lora_r=0)  # hidden 192
    a, b = (M.LLaMA.from_config(cfg, quantize=False, dtype=torch.float32, seed=s) for s in (0, 1))
    again = M.LLaMA.from_config(cfg, quantize=False, dtype=torch.float32, seed=0)
    half = M.LLaMA.from_config(cfg, quantize=False, seed=0)  # bf16 by default: the same draws, rounded
    for name in ("norm", "layers.0.attention_norm", "layers.0.ffn_norm"):
        assert torch.equal(a.get_submodule(name).weight, torch.ones(64))
    sa, sb, s2, sh = a.state_dict(), b.state_dict(), again.state_dict(), half.state_dict()
    for k, w in sa.items():
        assert torch.equal(w, s2[k]) and sh[k].dtype == torch.bfloat16 and torch.equal(sh[k], w.bfloat16()), k
        if w.dim() == 2:
            assert not torch.equal(w, sb[k]), k  # another seed, other weights
            assert abs(w.std().item() * w.shape[1] ** 0.5 - 1) < 0.1, k  # std 1/√fan_in (w1: 1/8, w2: 1/√192)


def chat_here(monkeypatch, capsys, *argv, stdin=b"", answers=()):
    # python model.py in this process, its generate replaced by a spy -> (calls, stdout). A call records (prompt ids,
    # max_new_tokens, temperature, top_k, top_p, eos_id, torch's seed) and streams the next of `answers` (lists of token
    # ids, emptied as they are streamed: what is left was not)
    calls, answers = [], list(answers)

    def spy(net, idx, max_new_tokens, temperature, top_k, top_p, eos_id, stream):
        calls.append((idx[0].tolist(), max_new_tokens, temperature, top_k, top_p, eos_id, torch.initial_seed()))
        answer = answers.pop(0) if answers else []
        while answer and not stream(torch.tensor([answer.pop(0)])):  # True: the answer ends, as in generate
            pass
        return idx
    monkeypatch.setattr(M.LLaMA, "generate", spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))  # strict, as in some locales
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with torch.random.fork_rng():
        M.chat([str(a) for a in argv])
    return calls, capsys.readouterr().out


def demo_variant(demo_adapter, path, **change):  # the demo adapter.pt with some of its record changed
    ck = torch.load(demo_adapter[0], weights_only=True)
    for k, v in change.items():
        ck[k] = {**ck[k], **v} if isinstance(v, dict) and isinstance(ck.get(k), dict) else v
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ck, path)
    return path


def test_chat_checks_flag_ranges_and_words_before_loading_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(M.LLaMA, "from_checkpoint", None)  # a load would be a TypeError: every check below comes first
    (d := tmp_path / "7B").mkdir()
    (d / "params.json").write_text(json.dumps({"dim": 128, "n_layers": 1, "n_heads": 4}))
    for argv, expect in ((["--top_p", "1.5"], "--top_p must be in [0, 1], got 1.5"),
                         (["--temperature", "20000"], "--temperature must be in [0, 10000], got 20000.0"),
                         (["--seed", "-1"], "--seed must be in [0, 9.22337e+18], got -1"),
                         (["hello"], "unexpected argument 'hello'"),
                         (["--prompt", " "], "--prompt: empty (without --prompt, one turn per line of stdin)"), (["--prompt="], "--prompt: empty"),
                         (["--ckpt_dir", str(d), "--template", "Alpaca"], "--template: expected alpaca, guanaco or none, got 'Alpaca'"),
                         (["--ckpt_dir", str(d)], f"{d / 'tokenizer.model'}: tokenizer not found"),
                         (["--ckpt_dir", str(d / "typo")], f"--ckpt_dir {d / 'typo'}: not a folder")):
        with pytest.raises(InputError, match=re.escape(expect)):
            M.chat(argv)


def test_chat_hands_generate_the_flags_template_and_seed(demo_adapter, meta_ckpt, tmp_path, monkeypatch, capsys):
    path, _, tok = demo_adapter
    alpaca = [tok.bos_id] + tok.encode(P.ALPACA[False].format(instruction="the lazy dog"))
    calls, _ = chat_here(monkeypatch, capsys, "--adapter", path, "--prompt", "the lazy dog", "--seed", 12345, "--quantize", "false")
    assert calls == [(alpaca, 256, 0.7, None, 0.9, tok.eos_id, 12345)]  # the defaults: temperature 0.7, top_p 0.9, no top_k
    # the upper ends are allowed; top_p 1 is no nucleus at all
    calls, _ = chat_here(monkeypatch, capsys, "--adapter", path, "--prompt", "the lazy dog", "--top_k", 5, "--top_p", 1,
                         "--temperature", 10000, "--max_new_tokens", 10**9, "--quantize", "false")
    assert calls[0][1:6] == (10**9, 10000.0, 5, None, tok.eos_id)
    # the template the adapter records, unless --template says otherwise
    guanaco = demo_variant(demo_adapter, tmp_path / "g" / "adapter.pt", template="guanaco")
    calls, _ = chat_here(monkeypatch, capsys, "--adapter", guanaco, "--prompt", "the lazy dog", "--quantize", "false")
    assert calls[0][0] == [tok.bos_id] + tok.encode("### Human: the lazy dog### Assistant: ")
    calls, _ = chat_here(monkeypatch, capsys, "--adapter", guanaco, "--prompt", "the lazy dog", "--template", "alpaca", "--quantize", "false")
    assert calls[0][0] == alpaca
    with pytest.raises(InputError, match=re.escape("--template: expected alpaca, guanaco or none, got 'chatml'")):
        chat_here(monkeypatch, capsys, "--adapter", path, "--prompt", "x", "--template", "chatml", "--quantize", "false")
    # no adapter: the bare prompt
    d, _, _ = meta_ckpt
    calls, _ = chat_here(monkeypatch, capsys, "--ckpt_dir", d, "--prompt", "the lazy dog", "--quantize", "false")
    assert calls[0][0] == [tok.bos_id] + tok.encode("the lazy dog")


def test_chat_seeds_torch_with_0_unless_told(demo_adapter, monkeypatch, capsys):
    # --seed's default, 0: the same sampled answer from one run to the next
    path = demo_adapter[0]
    calls, _ = chat_here(monkeypatch, capsys, "--adapter", path, "--prompt", "the lazy dog", "--quantize", "false")
    assert calls[0][6] == 0
    calls, _ = chat_here(monkeypatch, capsys, "--adapter", path, "--prompt", "the lazy dog", "--quantize", "false", "--seed", 7)
    assert calls[0][6] == 7


def test_chat_turns_history_eos_and_blank_lines(demo_adapter, monkeypatch, capsys):
    path, _, tok = demo_adapter
    lines = ("the brown fox", "seven birds", "old stone bridges")
    t1, t2, t3 = tok.encode(" the quick "), tok.encode("lazy dog"), tok.encode("rivers")  # t1: spaces an answer in training has not
    assert t1 != tok.encode("the quick")
    stdin = ("\ufeff  " + "\n".join(lines) + "  \n \nnever read\n").encode()  # a BOM, surrounding spaces go; a blank line ends it
    calls, out = chat_here(monkeypatch, capsys, "--adapter", path, "--template", "guanaco", "--quantize", "false", stdin=stdin,
                           answers=[t1[:], t2 + [tok.eos_id], t3[:]])
    g = [tok.encode(f"### Human: {line}### Assistant: ") for line in lines]
    first = [tok.bos_id] + g[0]
    second = first + tok.encode("the quick") + [tok.eos_id] + g[1]  # an answer cut at max_new_tokens is closed with eos, as in training
    third = second + t2 + [tok.eos_id] + g[2]  # one that ended with eos is not closed twice
    assert [c[0] for c in calls] == [first, second, third]
    assert out == "".join(tok.decode(t) + "\n" for t in (t1, t2 + [tok.eos_id], t3))
    # Alpaca: every line a fresh instruction
    calls, _ = chat_here(monkeypatch, capsys, "--adapter", path, "--quantize", "false", stdin=b"the brown fox\r\nseven birds\n",
                         answers=[t1[:], t2[:]])  # CRLF (a prompt file saved by Notepad) is not part of the prompt
    assert [c[0] for c in calls] == [[tok.bos_id] + tok.encode(P.ALPACA[False].format(instruction=line)) for line in lines[:2]]
    with pytest.raises(InputError, match=re.escape("stdin: not UTF-8 text")):  # not a UnicodeDecodeError from input()
        chat_here(monkeypatch, capsys, "--adapter", path, "--quantize", "false", stdin=b"caf\xe9\n")


def test_chat_refuses_a_prompt_over_the_context_and_drops_a_conversations_oldest_tokens(demo_adapter, tmp_path, monkeypatch, capsys):
    _, _, tok = demo_adapter
    short = demo_variant(demo_adapter, tmp_path / "a" / "adapter.pt", model_config={"max_seq_len": 24})
    prompt = " ".join(WORDS[:30])
    n = 1 + len(tok.encode(P.ALPACA[False].format(instruction=prompt)))
    assert n > 24
    for new, keep in ((4, 20), (20, 12)):  # a prompt may have max(context - new tokens, context / 2), bos included; cut from
        with pytest.raises(InputError, match=re.escape(f"--prompt: {n} tokens with bos and the template, over the {keep} a prompt")):
            chat_here(monkeypatch, capsys, "--adapter", short, "--prompt", prompt, "--max_new_tokens", new, "--quantize", "false")
    # at the limit: bos and the prompt exactly filling what a prompt may have is taken whole; one token over is refused
    edge = demo_variant(demo_adapter, tmp_path / "e" / "adapter.pt", model_config={"max_seq_len": n + 4})
    with pytest.raises(InputError, match=re.escape(f"--prompt: {n} tokens with bos and the template, over the {n - 1} a prompt")):
        chat_here(monkeypatch, capsys, "--adapter", edge, "--prompt", prompt, "--max_new_tokens", 5, "--quantize", "false")
    calls, _ = chat_here(monkeypatch, capsys, "--adapter", edge, "--prompt", prompt, "--max_new_tokens", 4, "--quantize", "false")
    assert calls[0][0] == [tok.bos_id] + tok.encode(P.ALPACA[False].format(instruction=prompt))
    # the front to fit, it would lose the template's head. A Guanaco conversation that outgrows the context loses its oldest
    # tokens after bos instead: every prompt starts with bos and ends with the newest turn, whole
    turn = tok.encode(P.GUANACO.format(instruction="hi"))
    conv = demo_variant(demo_adapter, tmp_path / "b" / "adapter.pt", model_config={"max_seq_len": 2 * len(turn) + 2})
    calls, _ = chat_here(monkeypatch, capsys, "--adapter", conv, "--template", "guanaco", "--max_new_tokens", 4, "--quantize", "false",
                         stdin=b"hi\nhi\nhi\n", answers=[tok.encode("red") for _ in range(3)])
    keep = 2 * len(turn) - 2  # the context less 4 new tokens
    assert [len(c[0]) for c in calls] == [len(turn) + 1, keep, keep] and all(c[0][0] == tok.bos_id for c in calls)
    assert all(c[0][-len(turn):] == turn for c in calls)
    assert calls[2][0][-len(turn) - 1 - len(tok.encode("red")) : -len(turn)] == tok.encode("red") + [tok.eos_id]  # the answer before


def test_chat_refuses_an_adapter_with_nan_or_an_unknown_template_and_reads_a_closed_stdin_as_empty(demo_adapter, tmp_path, monkeypatch, capsys):
    path = demo_adapter[0]
    ck = torch.load(path, weights_only=True)
    k = next(k for k in ck["lora"] if k.endswith("lora_B"))
    ck["lora"][k] = torch.full_like(ck["lora"][k], float("nan"))  # a diverged run's: a traceback from sampling, or garbage
    torch.save(ck, tmp_path / "nan.pt")
    monkeypatch.setattr(M.LLaMA, "from_config", None)  # both refused before the base is built (a load would be a TypeError)
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'nan.pt'}: tensor {k!r} holds NaN or inf")):
        chat_here(monkeypatch, capsys, "--adapter", tmp_path / "nan.pt", "--prompt", "x", "--quantize", "false")
    for t in ("chatml", ["alpaca"]):  # named as the adapter's, not a flag's; edited by hand into a list: not a TypeError
        bad = demo_variant(demo_adapter, tmp_path / "t" / "adapter.pt", template=t)
        with pytest.raises(InputError, match=re.escape(f"{bad}: its template: expected alpaca, guanaco or none, got {t!r}")):
            chat_here(monkeypatch, capsys, "--adapter", bad, "--prompt", "x")
    for args in (["--prompt", "x"], []):  # stdin closed (`<&-`): --prompt does not read it; a chat ends at once, as on </dev/null
        r = subprocess.run([sys.executable, str(ROOT / "model.py"), "--adapter", str(path), "--max_new_tokens", "2", *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, env=CPU_ENV, stdin=subprocess.DEVNULL, preexec_fn=lambda: os.close(0))
        assert r.returncode == 0 and r.stderr == "" and r.stdout.count("\n") == len(args) // 2, r.stderr


def test_chat_finds_the_base_the_tokenizer_and_the_device_as_recorded(demo_adapter, meta_ckpt, tmp_path, monkeypatch, capsys):
    path, _, tok = demo_adapter
    # an adapter folder moved elsewhere: the tokenizer it names is looked for beside it
    recorded = Path(torch.load(path, weights_only=True)["base"]["tokenizer"])
    moved = demo_variant(demo_adapter, tmp_path / "moved" / "adapter.pt", base={"tokenizer": str(tmp_path / "gone" / recorded.name)})
    shutil.copy(recorded, moved.parent / recorded.name)
    calls, _ = chat_here(monkeypatch, capsys, "--adapter", moved, "--prompt", "x", "--quantize", "false")
    assert len(calls) == 1
    # a random base is only rebuilt on the device kind it was made on; an older record without one is taken as this one
    cuda = demo_variant(demo_adapter, tmp_path / "cuda" / "adapter.pt", base={"device": "cuda"})
    with pytest.raises(InputError, match=re.escape("its random base was made on cuda; rebuilding it needs the same here")):
        chat_here(monkeypatch, capsys, "--adapter", cuda, "--prompt", "x", "--quantize", "false")
    for edit in (dict(base={"seed": None}), dict(base={"tokenizer": 5}), *(dict(model_config={"vocab_size": v}) for v in ("120", 0, True))):
        # edited by hand: one line, not a KeyError or TypeError (nor an embedding of 0 rows, or of 1 for True)
        bad = demo_variant(demo_adapter, tmp_path / "bad" / "adapter.pt", **edit)
        with pytest.raises(InputError, match=re.escape(f"{bad}: its random base records no seed, no tokenizer or no vocabulary")):
            chat_here(monkeypatch, capsys, "--adapter", bad, "--prompt", "x", "--quantize", "false")
    rec = {"seed": 3, "tokenizer": str(recorded), "device": "cuda"}  # made on CUDA and rebuilt on CUDA: fine (any machine can ask)
    assert C.random_base(path, {"base": rec, "model_config": {"vocab_size": 120}}, "cuda") == (recorded, 3, 120)
    with pytest.raises(InputError, match=re.escape("its random base was made on cpu; rebuilding it needs the same here")):
        C.random_base(path, {"base": {**rec, "device": "cpu"}, "model_config": {"vocab_size": 120}}, "cuda")
    with pytest.raises(InputError, match=re.escape(f"{path}: its random base's vocabulary of {tok.n_words - 1} is smaller than its "
                                                   f"tokenizer's, {tok.n_words} ({recorded})")):  # not an IndexError in training
        C.random_base(path, {"base": rec, "model_config": {"vocab_size": tok.n_words - 1}}, "cuda")
    ck = torch.load(path, weights_only=True)
    del ck["base"]["device"]
    torch.save(ck, tmp_path / "old.pt")
    assert len(chat_here(monkeypatch, capsys, "--adapter", tmp_path / "old.pt", "--prompt", "x", "--quantize", "false")[0]) == 1
    # --ckpt_dir wins over the base folder an adapter records (here: one that is gone), and serves one recording none
    d, _, _ = meta_ckpt
    net = M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=4, progress=False)
    for i, base in enumerate(({"ckpt_dir": str(tmp_path / "gone")}, None, str(d))):  # a base edited into a string: as if none
        torch.save({"lora": net.lora_state_dict(), "model_config": vars(net.config), "base": base}, tmp_path / f"{i}.pt")
        calls, _ = chat_here(monkeypatch, capsys, "--adapter", tmp_path / f"{i}.pt", "--ckpt_dir", d, "--template", "none",
                             "--prompt", "the lazy dog", "--quantize", "false")
        assert calls[0][0] == [tok.bos_id] + tok.encode("the lazy dog")
    for i in (1, 2):
        with pytest.raises(InputError, match=re.escape("--ckpt_dir DIR is needed")):  # no folder, no random base: said so
            chat_here(monkeypatch, capsys, "--adapter", tmp_path / f"{i}.pt", "--prompt", "x")


def test_random_base_is_rebuilt_at_the_vocabulary_it_records_not_its_tokenizers(tmp_path, tokenizer_file):
    # --init random may size the embedding past the tokenizer (tiny's 512 rows): the rebuilt base has the rows it recorded
    n = C.Tokenizer(tokenizer_file).n_words
    info = {"base": {"seed": 5, "tokenizer": str(tokenizer_file), "device": "cpu"}, "model_config": {"vocab_size": n + 392}}
    assert C.random_base(tmp_path / "adapter.pt", info, "cpu") == (tokenizer_file, 5, n + 392)


def byte_tokenizer(path):  # as LLaMA's, characters it has no token for fall back to byte tokens (<0xC3> <0xA9> for "é")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(WORDS * 10), model_writer=buf, vocab_size=300, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, byte_fallback=True, minloglevel=2)
    path.write_bytes(buf.getvalue())
    return C.Tokenizer(path)


def test_chat_streams_a_character_split_over_byte_tokens_whole(demo_adapter, tmp_path, monkeypatch, capsys):
    # the first byte of "é" alone decodes to U+FFFD, which must not be printed, since the streamed text is never taken back
    tok = byte_tokenizer(tmp_path / "bytes.model")
    answer = tok.encode("the café ☕ is open")
    assert "<0xC3>" in [tok.sp.id_to_piece(i) for i in answer]  # é is two byte tokens here
    adapter = demo_variant(demo_adapter, tmp_path / "b" / "adapter.pt", base={"tokenizer": str(tok.path)},
                           model_config={"vocab_size": tok.n_words})  # a base as wide as that tokenizer
    _, out = chat_here(monkeypatch, capsys, "--adapter", adapter, "--prompt", "the lazy dog", "--quantize", "false", "--max_new_tokens", 64,
                       answers=[answer])  # (bytes make the template 138 tokens: more than the 128 it may have beside 256 new ones)
    assert out == "the café ☕ is open\n"


def test_chat_ends_a_guanaco_answer_at_a_human_turn_of_its_own(demo_adapter, tmp_path, monkeypatch, capsys):
    # the paper's Guanaco adapters saw one eos per conversation, so an answer may go on "### Human: ..." by itself.
    # It ends there with no part of the marker printed (a possible start of it is held back until the answer ends),
    # and the conversation keeps the answer alone, closed by eos
    tok = byte_tokenizer(tmp_path / "bytes.model")
    adapter = demo_variant(demo_adapter, tmp_path / "b" / "adapter.pt", base={"tokenizer": str(tok.path)},
                           model_config={"vocab_size": tok.n_words})  # a base as wide as that tokenizer
    answers = ["the fox. ### Human: and you?### Assistant: a dog", "see C# ##", "old ## stone"]
    assert all(tok.decode(tok.encode(a)) == a for a in answers) and len(tok.encode("### Human:")) > 5  # streamed piece by piece
    ids = [tok.encode(a) for a in answers]
    calls, out = chat_here(monkeypatch, capsys, "--adapter", adapter, "--template", "guanaco", "--quantize", "false",
                           stdin=b"a\nb\nc\n", answers=ids)
    assert out == "the fox. \nsee C# ##\nold ## stone\n"  # "##" held back, then printed when the answer ends there
    assert tok.decode(ids[0]) == "and you?### Assistant: a dog" and ids[1:] == [[], []]  # generation ended at the ':'
    g = [tok.encode(f"### Human: {line}### Assistant: ") for line in "abc"]
    second = [tok.bos_id] + g[0] + tok.encode("the fox.") + [tok.eos_id] + g[1]
    assert [c[0] for c in calls[1:]] == [second, second + tok.encode("see C# ##") + [tok.eos_id] + g[2]]
    _, out = chat_here(monkeypatch, capsys, "--adapter", adapter, "--template", "alpaca", "--quantize", "false", "--prompt", "a",
                       answers=[tok.encode(answers[0])])
    assert out == answers[0] + "\n"  # other templates have no such marker


# ---------------------------------------------------------------------------------------------------
# export: merged weights equal base + (α/r)·B A; peft's q/k permutation preserves attention scores


@pytest.mark.parametrize("theta, kv_heads, multiplier", [(10000.0, 2, None), (500000.0, 4, 1.3)])
def test_installed_meta_reference_agrees(tmp_path, theta, kv_heads, multiplier):
    # against Meta's own reference network (llama_models' llama3 model.py, the Llama 2 architecture with GQA; it needs
    # fairscale) where both are installed (not dependencies: skipped without them). A checkpoint in Meta's layout that
    # its Transformer wrote gives its logits here, and a merged export loads into it (strictly) with ours.
    llama3 = pytest.importorskip("llama_models.llama3.model")
    fs_init = pytest.importorskip("fairscale.nn.model_parallel.initialize")
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        fs_init.initialize_model_parallel(1)
        torch.manual_seed(0)
        params = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=kv_heads, vocab_size=150, multiple_of=32, norm_eps=1e-5,
                      rope_theta=theta, **({"ffn_dim_multiplier": multiplier} if multiplier else {}))
        meta = llama3.Transformer(llama3.ModelArgs(**params, max_seq_len=64, max_batch_size=2))
        with torch.no_grad():  # every weight random, norms too
            for p in meta.parameters():
                p.copy_(1 + 0.1 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) / p.shape[-1] ** 0.5)
        (tmp_path / "m").mkdir()
        torch.save({k: v for k, v in meta.state_dict().items() if "cache" not in k}, tmp_path / "m" / "consolidated.00.pth")
        (tmp_path / "m" / "params.json").write_text(json.dumps(params))
        idx = torch.randint(150, (2, 13))
        net = M.LLaMA.from_checkpoint(tmp_path / "m", quantize=False, dtype=torch.float32, lora_r=4, progress=False).eval()
        for n, p in net.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)
        C.export_merged(net, tmp_path / "out", dtype=torch.float32, progress=False)
        exported = json.loads((tmp_path / "out" / "params.json").read_text())
        # θ = 10000 is left out, as in Meta's Llama 2 files (its code has no such field; llama3's defaults to 500000)
        again = llama3.Transformer(llama3.ModelArgs(**{"rope_theta": 10000.0, **exported}, max_seq_len=64, max_batch_size=2))
        state = torch.load(tmp_path / "out" / "consolidated.00.pth", weights_only=True)
        again.load_state_dict({**{k: v for k, v in again.state_dict().items() if "cache" in k}, **state})  # strict
        with torch.inference_mode():
            base = meta(idx, 0)
            assert rel_err(M.LLaMA.from_checkpoint(tmp_path / "m", quantize=False, dtype=torch.float32, lora_r=0,
                                                   progress=False)(idx)[0], base) < 2e-6
            assert rel_err(net(idx)[0], again(idx, 0)) < 2e-6 and rel_err(net(idx)[0], base) > 0.1
    finally:
        fs_init.destroy_model_parallel()
        dist.destroy_process_group()


def test_export_merged_roundtrip(tmp_path, meta_ckpt, monkeypatch):
    d, cfg, _ = meta_ckpt
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    net = M.LLaMA.from_checkpoint(d, quantize=True, dtype=torch.float32, lora_r=4, lora_alpha=8).eval()
    for n, p in net.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    C.export_merged(net, tmp_path / "merged", dtype=torch.float32)
    sd = torch.load(tmp_path / "merged" / "consolidated.00.pth", weights_only=True)
    lin = net.layers[1].feed_forward.w2
    expect = qlora.dequantize_nf4(lin.weight, torch.float32) + (8 / 4) * lin.lora_B @ lin.lora_A
    assert torch.allclose(sd["layers.1.feed_forward.w2.weight"], expect, atol=1e-6)
    merged = M.LLaMA.from_checkpoint(tmp_path / "merged", quantize=False, dtype=torch.float32, tokenizer=d.parent / "tokenizer.model", lora_r=0)
    idx = torch.randint(cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(6))
    assert rel_err(merged(idx)[0], net(idx)[0]) < 1e-5
    assert not list(tmp_path.glob("merged/*.tmp"))
    assert json.loads((tmp_path / "merged" / "merge.json").read_text())["base"] == "nf4-dequantized"


def test_export_merged_hf_roundtrip(tmp_path, meta_ckpt, monkeypatch):
    # --export merged_hf: Hugging Face's names and rotary row order, one model.safetensors and config.json; our HF reader
    # gives back the logits of the model with its adapters (transformers too: test_installed_transformers_and_peft_agree)
    d, cfg, _ = meta_ckpt
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    net = M.LLaMA.from_checkpoint(d, quantize=True, dtype=torch.float32, lora_r=4, lora_alpha=8, progress=False).eval()
    for n, p in net.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    C.export_merged(net, tmp_path / "m", dtype=torch.float32, tokenizer=d.parent / "tokenizer.model", hf=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "merge.json", "model.safetensors", "tokenizer.model",
                                                                   "tokenizer_config.json"]
    assert json.loads((tmp_path / "m" / "tokenizer_config.json").read_text()) == {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 192,  # 32·⌈170/32⌉
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": cfg.vocab_size,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False,
        "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2}  # the tokenizer's: transformers stops at this eos
    sd = C.read_safetensors(tmp_path / "m" / "model.safetensors")
    assert len(sd) == 3 + 2 * 9 and sd["lm_head.weight"].shape == (cfg.vocab_size, 64)
    for sub, heads in (("wq", 4), ("wk", 2), ("wv", 2)):  # rows (head, i, pair j) -> (head, j, i): HF rotates halves
        lin = getattr(net.layers[1].attention, sub)
        w = qlora.dequantize_nf4(lin.weight, torch.float32) + (8 / 4) * lin.lora_B @ lin.lora_A
        if sub != "wv":
            w = w.view(heads, 8, 2, 64).transpose(1, 2).reshape(-1, 64)
        assert torch.allclose(sd[f"model.layers.1.self_attn.{sub[1]}_proj.weight"], w, atol=1e-6)
    back = M.LLaMA.from_checkpoint(tmp_path / "m", quantize=False, dtype=torch.float32, lora_r=0, progress=False)
    idx = torch.randint(cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(6))
    assert rel_err(back(idx)[0], net(idx)[0]) < 1e-5


def test_folder_rules_layout_tokenizer_context_and_params(tmp_path, meta_ckpt, tokenizer_file):
    d, cfg, weights = meta_ckpt
    # Mistral's Hugging Face folders also hold a params.json of its own: without consolidated.NN.pth, HF's layout
    hf = write_hf(tmp_path / "models" / "hf", cfg, weights, tokenizer_file)
    (hf / "params.json").write_text(json.dumps({"dim": 1, "n_layers": 1, "n_heads": 1}))
    net = M.LLaMA.from_checkpoint(hf, quantize=False, dtype=torch.float32, lora_r=0, progress=False)
    idx = torch.randint(cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    assert rel_err(net(idx)[0], reference_forward(weights, cfg, idx)) < 1e-4
    # a tokenizer one level up belongs to Meta's layout (its download's); an HF folder's own is inside it
    (hf / "tokenizer.model").unlink()
    shutil.copy(tokenizer_file, hf.parent / "tokenizer.model")
    assert C.find_tokenizer(hf) is None and C.find_tokenizer(d) == d.parent / "tokenizer.model"
    # params.json states no context length: the model is built for the one asked for, at least 2048
    for context, n in ((None, 2048), (3000, 3000)):
        assert C.read_params(d, context)["max_seq_len"] == n
    # an embedding padded past the tokenizer (fewer tokens than rows) loads; only more tokens than rows is refused
    C.train_tokenizer(WORDS * 5, tmp_path / "small.model", vocab_size=60)
    M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=0, tokenizer=tmp_path / "small.model", progress=False)
    # an exported params.json names n_kv_heads only where it differs from n_heads (LLaMA-1's ModelArgs has no such field)
    assert "n_kv_heads" not in json.loads(C.meta_params(M.LLaMAConfig(dim=64, n_heads=4)))
    assert json.loads(C.meta_params(M.LLaMAConfig(dim=64, n_heads=4, n_kv_heads=2)))["n_kv_heads"] == 2


# ---------------------------------------------------------------------------------------------------
# checkpoint.py's less travelled paths: behaviour the tests above would let change unnoticed


def raw_safetensors(path, header, data):  # a file as another writer might make it: header and bytes as given
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + data)


def test_safetensors_reader_reads_unaligned_tensors_and_names_bad_offsets(tmp_path):
    # a tensor that starts off its dtype's alignment (a 2-byte F16 before an F32) is copied, not viewed in place;
    # offsets past the data, a size that disagrees with the shape, or a header past the file: the check's own message
    f = tmp_path / "a.safetensors"
    t = {"a": torch.tensor([1.5], dtype=torch.float16), "b": torch.tensor([1.0, -2.0, 3.25])}
    write_safetensors(f, t)
    got = C.read_safetensors(f)
    assert got["b"].dtype == torch.float32 and all(torch.equal(got[k], v) for k, v in t.items())
    for header, data in (({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(4)),  # past the data
                         ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, bytes(8))):  # 8 bytes, shape needs 4
        raw_safetensors(f, header, data)
        with pytest.raises(InputError, match=re.escape("tensor 'x': data_offsets disagree with its shape or the file size")):
            C.read_safetensors(f)
    f.write_bytes(struct.pack("<Q", 16) + b"{}      ")  # says 16 header bytes, holds 8
    with pytest.raises(InputError, match="header longer than the file"):
        C.read_safetensors(f)


def test_safetensors_offsets_before_the_data_are_refused(tmp_path):
    # data_offsets count from the end of the header: a negative begin would read the header's own bytes as a tensor
    f = tmp_path / "a.safetensors"
    for offsets in ([-4, 0], [-8, -4]):
        raw_safetensors(f, {"x": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}, bytes(8))
        with pytest.raises(InputError, match=re.escape("tensor 'x': data_offsets disagree with its shape or the file size")):
            C.read_safetensors(f)


def test_safetensors_file_whose_tensors_hold_no_bytes_is_read(tmp_path):
    # a header that reaches the end of the file is whole: empty tensors (or none) have no data after it
    f = tmp_path / "e.safetensors"
    C.save_safetensors({"e": torch.zeros(0), "f": torch.zeros(2, 0, dtype=torch.float16)}, f)
    assert struct.unpack("<Q", f.read_bytes()[:8])[0] == f.stat().st_size - 8
    got = C.read_safetensors(f)
    assert (got["e"].shape, got["f"].shape, got["f"].dtype) == ((0,), (2, 0), torch.float16)
    C.save_safetensors({}, f)
    assert C.read_safetensors(f) == {}


def test_safetensors_writer_pads_the_header_and_keeps_the_metadata(tmp_path, meta_ckpt):
    # every header length (names of 1..8 characters): padded to 8, so tensors start aligned; peft's export says
    # format "pt", which transformers' loader asks of a safetensors file
    for k in range(1, 9):
        t = {"n" * k: torch.arange(6.0).view(2, 3), "m": torch.tensor([7], dtype=torch.bfloat16)}
        C.save_safetensors(t, tmp_path / "s.safetensors", {"format": "pt"})
        raw = (tmp_path / "s.safetensors").read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        assert n % 8 == 0 and json.loads(raw[8 : 8 + n])["__metadata__"] == {"format": "pt"}
        assert all(torch.equal(C.read_safetensors(tmp_path / "s.safetensors")[k], v) for k, v in t.items())
    d, cfg, _ = meta_ckpt
    C.export_peft(M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=2, progress=False), tmp_path / "peft")
    raw = (tmp_path / "peft" / "adapter_model.safetensors").read_bytes()
    assert json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])["__metadata__"] == {"format": "pt"}
    (tmp_path / "peft" / "adapter_model.bin").write_bytes(b"not read")  # beside it, a pickle is not read
    assert len(C.read_adapter(tmp_path / "peft")["lora"]) == 2 * 7 * cfg.n_layers


def test_config_json_defaults_are_transformers_and_params_json_fields_are_checked(tmp_path, meta_ckpt):
    # a config.json without the optional fields means transformers' LlamaConfig defaults (LLaMA-1 conversions
    # have no num_key_value_heads); a head_dim that agrees is fine; a sliding window bounds the context
    need = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100, intermediate_size=172)
    p = C.hf_params(need, "config.json")
    assert (p["n_kv_heads"], p["norm_eps"], p["rope_theta"], p["max_seq_len"], p["tie_embeddings"]) == (4, 1e-6, 10000.0, 2048, False)
    (tmp_path / "w").mkdir()  # a window wider than the positions (Qwen2-style configs) leaves them as they are
    for window, n in ((64, 64), (4096, 128)):
        (tmp_path / "w" / "config.json").write_text(json.dumps({**need, "max_position_embeddings": 128, "sliding_window": window}))
        assert C.read_params(tmp_path / "w")["max_seq_len"] == n
    # Mistral's config without the key has transformers' window of 4096 (null: none); the old architectures spelling is LLaMA
    for arch, conf, n in (("MistralForCausalLM", {}, 4096), ("MistralForCausalLM", {"sliding_window": None}, 8192), ("LLaMAForCausalLM", {}, 8192)):
        (tmp_path / "w" / "config.json").write_text(json.dumps({**need, "max_position_embeddings": 8192, "architectures": [arch], **conf}))
        assert C.read_params(tmp_path / "w")["max_seq_len"] == n
    # rope_scaling or rope_parameters that say "default" in either key (transformers 4.43+ writes both) are no scaling
    for rs in ({"type": "default"}, {"rope_type": "default"}, {"type": "default", "rope_type": "default"}, None):
        assert C.hf_params({**need, "rope_scaling": rs, "rope_theta": 1e6}, "config.json")["rope_theta"] == 1e6
        assert C.hf_params({**need, "rope_parameters": {**(rs or {}), "rope_theta": 1e6}}, "config.json")["rope_theta"] == 1e6
    with pytest.raises(InputError, match=re.escape('rope_scaling {"type": "default", "rope_type": "linear"} is not implemented')):
        C.hf_params({**need, "rope_scaling": {"type": "default", "rope_type": "linear"}}, "config.json")
    # the older key alone names a scaling too (a hand-edited config that lost its factor): refused, not run as plain rotary
    with pytest.raises(InputError, match=re.escape('rope_scaling {"type": "linear"} is not implemented')):
        C.hf_params({**need, "rope_scaling": {"type": "linear"}}, "config.json")
    assert C.hf_params({**need, "hidden_act": "swish"}, "config.json") == p  # silu's other name (transformers' ACT2FN)
    assert C.hf_params({**need, "architectures": []}, "config.json") == p  # an empty list, as a missing one: LLaMA
    with pytest.raises(InputError, match=re.escape("config.json: tie_word_embeddings must be true or false, got 1")):  # not an int
        C.hf_params({**need, "tie_word_embeddings": 1}, "config.json")
    (tmp_path / "w" / "config.json").write_text(json.dumps({**need, "head_dim": 16}))  # as hidden_size / num_attention_heads: fine
    assert C.read_params(tmp_path / "w")["dim"] == 64
    # transformers >= 5 writes θ inside rope_parameters (Llama 3: 500000), which wins over a top-level one
    v5 = {**need, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}
    assert C.hf_params(v5, "config.json")["rope_theta"] == C.hf_params({**v5, "rope_theta": 10000.0}, "config.json")["rope_theta"] == 500000.0
    assert C.hf_params({**need, "rope_parameters": {"rope_type": "default"}, "rope_theta": 1e6}, "config.json")["rope_theta"] == 1e6
    assert C.hf_params({**need, "rope_parameters": {"rope_theta": 1e6}}, "config.json")["rope_theta"] == 1e6  # rope_type: default
    # params.json: use_scaled_rope false (Meta's ModelArgs default, written out by some conversions) is plain rotary, as without it
    src = meta_ckpt[0]
    (tmp_path / "params.json").write_text(json.dumps({**json.loads((src / "params.json").read_text()), "use_scaled_rope": False}))
    assert C.read_params(tmp_path) == C.read_params(src)
    # params.json: multiple_of is an integer like the other sizes (a width is rounded up to a multiple of it)
    (tmp_path / "params.json").write_text(json.dumps({**json.loads((src / "params.json").read_text()), "multiple_of": 32.5}))
    with pytest.raises(InputError, match="params.json: multiple_of must be a positive integer, got 32.5"):
        C.read_params(tmp_path)


def test_an_infinite_size_in_params_json_or_config_json_is_refused(tmp_path, meta_ckpt):
    # JSON's Infinity (which Python's json reads and writes) is no positive number to compute with
    src = meta_ckpt[0]
    (tmp_path / "params.json").write_text(json.dumps({**json.loads((src / "params.json").read_text()), "norm_eps": math.inf}))
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'params.json'}: norm_eps must be a positive number, got Infinity")):
        C.read_params(tmp_path)
    need = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100, intermediate_size=172)
    with pytest.raises(InputError, match=re.escape("config.json: rope_theta must be a positive number, got Infinity")):
        C.hf_params({**need, "rope_theta": math.inf}, "config.json")


def test_a_config_json_nested_too_deep_is_one_line(tmp_path):
    # deeper than json's recursion limit: an invalid file like any other, not a RecursionError's traceback
    (tmp_path / "config.json").write_bytes(b'{"hidden_size": ' + b"[" * 100_000)
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'config.json'}: invalid JSON (RecursionError)")):
        C.read_params(tmp_path)


def test_mistral_own_download_layout(tmp_path, tokenizer_file):
    # Mistral's own download (mistral-7B-v0.1.tar): Meta's names and rotary layout, and a params.json that gives the FFN
    # width (hidden_dim: 14336 for 7B, which Meta's formula does not give), head_dim and sliding_window
    cfg = M.LLaMAConfig(**SMALL, ffn_dim=100, vocab_size=C.Tokenizer(tokenizer_file).n_words)
    weights = meta_weights(cfg)
    d = write_meta_checkpoint(tmp_path / "mistral", cfg, weights, n_shards=1)
    shutil.copy(tokenizer_file, d / "tokenizer.model")
    params = dict(dim=64, n_layers=2, head_dim=16, hidden_dim=100, n_heads=4, n_kv_heads=2, norm_eps=1e-5, sliding_window=96,
                  vocab_size=cfg.vocab_size)
    (d / "params.json").write_text(json.dumps(params))
    net = M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=0, context=80, progress=False)
    assert (net.config.hidden_dim, net.config.max_seq_len) == (100, 96)  # generating, too, stays within the window
    idx = torch.randint(cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    assert rel_err(net(idx)[0], reference_forward(weights, cfg, idx)) < 1e-4
    # null, as Meta's ModelArgs writes an unset optional field: as if absent (no window, Meta's ffn_dim_multiplier unused)
    (d / "params.json").write_text(json.dumps({**params, "sliding_window": None, "ffn_dim_multiplier": None}))
    p = C.read_params(d, context=80)
    assert (p["ffn_dim"], p["max_seq_len"], "ffn_dim_multiplier" in p) == (100, 2048, False)
    # from v0.3 on (no window): the weights in one consolidated.safetensors under the same names, tokenizer.model.v3
    (v3 := tmp_path / "mistral-v0.3").mkdir()
    (v3 / "params.json").write_text(json.dumps({k: v for k, v in params.items() if k != "sliding_window"}))
    C.save_safetensors(torch.load(d / "consolidated.00.pth"), v3 / "consolidated.safetensors")
    shutil.copy(tokenizer_file, v3 / "tokenizer.model.v3")
    (v3 / "config.json").write_text('{"architectures": ["MistralForCausalLM"]}')  # its Hugging Face repo holds both layouts
    net = M.LLaMA.from_checkpoint(v3, quantize=False, dtype=torch.float32, lora_r=0, progress=False)
    assert rel_err(net(idx)[0], reference_forward(weights, cfg, idx)) < 1e-4 and C.find_tokenizer(v3) == v3 / "tokenizer.model.v3"
    (v3 / "params.json").write_text(json.dumps({**params, "hidden_dim": 96, "sliding_window": None}))
    with pytest.raises(InputError, match=re.escape(f"{v3 / 'consolidated.safetensors'}: layers.0.feed_forward.w1.weight has shape")):
        M.LLaMA.from_checkpoint(v3, quantize=False, dtype=torch.float32, lora_r=0, progress=False)
    (d / "consolidated.safetensors").write_bytes(b"junk")  # the fallback only: beside .pth shards it is not read
    net = M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=0, context=80, progress=False)
    assert rel_err(net(idx)[0], reference_forward(weights, cfg, idx)) < 1e-4
    for change, expect in ((dict(head_dim=32), "head_dim 32 is not dim / heads = 64 / 4 = 16 (not implemented)"),
                           (dict(head_dim="16"), 'head_dim must be a positive integer, got "16"'),  # a hand edit: not "16 is not"
                           (dict(sliding_window="96"), 'sliding_window must be a positive integer, got "96"'),  # not a TypeError
                           (dict(hidden_dim=100.0), "hidden_dim must be a positive integer, got 100.0"),
                           (dict(sliding_window=64), "sliding_window 64 is shorter than the context of 80 tokens")):
        (d / "params.json").write_text(json.dumps({**params, **change}))
        with pytest.raises(InputError, match=re.escape(f"{d / 'params.json'}: {expect}")):
            M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=0, context=80, progress=False)


def test_meta_folder_without_shards_and_the_bytes_progress_expects(tmp_path, meta_ckpt, tokenizer_file):
    d, cfg, weights = meta_ckpt
    (tmp_path / "empty").mkdir()
    shutil.copy(d / "params.json", tmp_path / "empty" / "params.json")
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'empty'}: no consolidated.NN.pth checkpoint shards")):
        C.open_checkpoint(tmp_path / "empty", tokenizer=tokenizer_file)
    # the progress total is the whole model (every shard's part), and a tied head is the embedding, counted once
    assert C.open_checkpoint(d, progress=False)[2].total >= sum(w.nbytes for w in weights.values())
    tied = {**weights, "output.weight": weights["tok_embeddings.weight"]}
    hf = write_hf(tmp_path / "hf", cfg, tied, tokenizer_file, config=hf_config(cfg, tie_word_embeddings=True))
    assert C.open_checkpoint(hf, progress=False)[2].total == sum(w.nbytes for k, w in weights.items() if k != "output.weight")


def test_hf_folder_prefers_one_file_and_safetensors_and_skips_what_it_recomputes(tmp_path, meta_ckpt, tokenizer_file):
    # hub folders often hold both model.safetensors and pytorch_model.bin: the safetensors is read (no pickle); a single
    # file before an index, as transformers reads them (an export into a sharded folder leaves the old index and shards
    # beside its model.safetensors, which was read as before). Old conversions store rotary_emb.inv_freq, and tied models
    # sometimes an lm_head.weight: both are skipped, and the tied head is the embedding
    d, cfg, weights = meta_ckpt
    idx = torch.randint(cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    ref = reference_forward(weights, cfg, idx)
    for k, stray in enumerate(("pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")):
        hf = write_hf(tmp_path / f"hf{k}", cfg, weights, tokenizer_file)
        (hf / stray).write_bytes(b"not read")
        net = M.LLaMA.from_checkpoint(hf, quantize=False, dtype=torch.float32, lora_r=0, progress=False)
        assert rel_err(net(idx)[0], ref) < 1e-4
    hf = write_hf(tmp_path / "tied", cfg, weights, tokenizer_file, config=hf_config(cfg, tie_word_embeddings=True))
    sd = read_safetensors(hf / "model.safetensors")
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(cfg.head_dim // 2)
    write_safetensors(hf / "model.safetensors", sd)  # lm_head.weight stays, and differs from the embedding
    load = C.open_checkpoint(hf, "cpu", torch.float32, progress=False)[1]
    assert torch.equal(load("output.weight", (cfg.vocab_size, cfg.dim)), weights["tok_embeddings.weight"])
    # a pickled checkpoint has no dtype check of its own: float64 is refused here, by name
    hf = write_hf(tmp_path / "bin", cfg, weights, tokenizer_file, kind="bin")
    sd = torch.load(hf / "pytorch_model.bin")
    torch.save({**sd, "model.norm.weight": sd["model.norm.weight"].double()}, hf / "pytorch_model.bin")
    with pytest.raises(InputError, match=re.escape("tensor 'model.norm.weight' has dtype torch.float64; only float16")):
        C.open_checkpoint(hf, progress=False)


def test_meta_folder_with_a_config_json_and_which_tokenizer_is_used(tmp_path, meta_ckpt, tokenizer_file):
    # consolidated.NN.pth makes a folder Meta's even with a config.json beside it; its own tokenizer.model comes
    # before the one a level up; an explicit tokenizer comes before both
    src, cfg, _ = meta_ckpt
    d = tmp_path / "llama" / "7B"
    shutil.copytree(src, d)
    (d / "config.json").write_text(json.dumps(hf_config(cfg, num_hidden_layers=9)))
    assert not C.is_hf(d) and C.read_params(d)["n_layers"] == cfg.n_layers
    shutil.copy(tokenizer_file, d / "tokenizer.model")
    (d.parent / "tokenizer.model").write_bytes(b"another")
    assert C.find_tokenizer(d) == d / "tokenizer.model"
    # Mistral's tokenizer.model.v3 comes after the folder's own tokenizer.model, and before the one a level up (another model's)
    shutil.copy(tokenizer_file, d / "tokenizer.model.v3")
    assert C.find_tokenizer(d) == d / "tokenizer.model"
    (d / "tokenizer.model").unlink()
    assert C.find_tokenizer(d) == d / "tokenizer.model.v3"
    (d / "tokenizer.model").mkdir()  # a folder of that name is no tokenizer: the file after it is taken
    assert C.find_tokenizer(d) == d / "tokenizer.model.v3"
    (d / "tokenizer.model").rmdir()
    (tmp_path / "bad.model").write_bytes(b"junk")
    with pytest.raises(InputError, match="bad.model: not a sentencepiece tokenizer model"):
        C.open_checkpoint(d, tokenizer=tmp_path / "bad.model", progress=False)
    (tmp_path / "bad.model").write_bytes(b"IQ== 0\nIg== 1\nIw== 2\n")  # how Llama 3's tokenizer.model (tiktoken's ranks) begins
    with pytest.raises(InputError, match="bad.model: Llama 3's tiktoken tokenizer: only sentencepiece models"):
        C.open_checkpoint(d, tokenizer=tmp_path / "bad.model", progress=False)
    (tmp_path / "bad.model").write_bytes(b"junk\nIQ== 0\n")  # named Llama 3's only by how it begins; other text is just not one
    with pytest.raises(InputError, match="bad.model: not a sentencepiece tokenizer model"):
        C.open_checkpoint(d, tokenizer=tmp_path / "bad.model", progress=False)


@pytest.mark.parametrize("change, expect", [
    (dict(use_dora=True), "use_dora true is not supported"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out true is not supported"),
    (dict(bias="all"), 'bias "all" is not supported'),
    (dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
    (dict(r=0), "the rank and alpha must be finite numbers, got 0, 8"),  # not a division by zero
    (dict(alora_invocation_tokens=[32, 7]), "alora_invocation_tokens [32, 7] is not supported"),  # active only after them
    (dict(use_qalora=True), "use_qalora true is not supported"),
    (dict(arrow_config={"top_k": 3}), 'arrow_config {"top_k": 3} is not supported'),
    *((dict([(k, {"r": 1})]), f'{k} {{"r": 1}} is not supported') for k in ("velora_config", "monteclora_config", "use_bdlora", "kasa_config")),
    (dict(layers_to_transform=[0, 1]), "layers_to_transform [0, 1] is not supported"),  # not a missing tensor of layer 2
    (dict(exclude_modules=["layers.0.self_attn.q_proj"]), 'exclude_modules ["layers.0.self_attn.q_proj"] is not supported'),
    (dict(layer_replication=[[0, 1], [0, 2]]), "layer_replication [[0, 1], [0, 2]] is not supported"),  # another stack of layers
    (dict(init_lora_weights="pissa"), 'init_lora_weights "pissa" is not supported'),  # trained on a base peft changed
    (dict(init_lora_weights="loftq"), 'init_lora_weights "loftq" is not supported'),
    (dict(init_lora_weights="gaussian"), None), (dict(init_lora_weights=True), None), (dict(init_lora_weights=False), None),
    (dict(init_lora_weights="eva"), None), (dict(init_lora_weights="orthogonal"), None),  # other starting A, B; the base unchanged
    (dict(use_dora=None, fan_in_fan_out=None, bias=None, rank_pattern=None, alpha_pattern=None), None),  # null: the default
    (dict(use_qalora=False, alora_invocation_tokens=None, kasa_config=None, loftq_config={}, qalora_group_size=16), None),
    (dict(layers_to_transform=None, exclude_modules=None, layer_replication=None, layers_pattern=None), None),  # peft writes these
    (dict(use_rslora=True), None),
])
def test_peft_config_fields_refused_or_read(tmp_path, meta_ckpt, change, expect):
    d, cfg, _ = meta_ckpt
    C.export_peft(M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=4, lora_alpha=8, progress=False), tmp_path / "a")
    cj = tmp_path / "a" / "adapter_config.json"
    cj.write_text(json.dumps({**json.loads(cj.read_text()), **change}))
    if expect:
        with pytest.raises(InputError, match=re.escape(expect)):
            C.read_adapter(tmp_path / "a")
    else:  # rsLoRA scales by α/√r, not α/r
        assert C.read_adapter(tmp_path / "a")["scaling"] == (8 / 2 if change.get("use_rslora") else 8 / 4)


def test_peft_tensor_of_no_llama_linear_layer_is_refused(tmp_path, meta_ckpt):
    # a peft adapter of another architecture (Phi-3's fused qkv_proj), or a tensor outside the layers (lm_head): one
    # line naming the tensor, not a LoRA weight left unloaded or a KeyError later
    d, _, _ = meta_ckpt
    C.export_peft(M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=4, progress=False), tmp_path / "a")
    st = tmp_path / "a" / "adapter_model.safetensors"
    lora = C.read_safetensors(st)
    for extra in ("base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight", "base_model.model.lm_head.lora_A.weight"):
        C.save_safetensors({**lora, extra: torch.zeros(4, 64)}, st)
        with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'a'}: tensor {extra!r} is not a LoRA weight of a LLaMA linear layer")):
            C.read_adapter(tmp_path / "a")
    C.save_safetensors(lora, st)
    assert C.read_adapter(tmp_path / "a")["lora"].keys() == lora.keys()


def test_peft_folder_with_both_weight_files_reads_the_safetensors(tmp_path, meta_ckpt):
    # peft saves adapter_model.safetensors by default; an older adapter_model.bin left beside it is not the one read
    d, _, _ = meta_ckpt
    C.export_peft(with_random_adapter(M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=4, progress=False)), tmp_path / "a")
    lora = read_safetensors(tmp_path / "a" / "adapter_model.safetensors")
    torch.save({k: torch.zeros_like(v) for k, v in lora.items()}, tmp_path / "a" / "adapter_model.bin")
    got = C.read_adapter(tmp_path / "a")["lora"]
    assert got.keys() == lora.keys() and all(torch.equal(got[k], lora[k]) for k in lora)


def test_peft_adapter_on_some_layers_loads_and_exports_again(tmp_path, meta_ckpt, tokenizer_file):
    # an adapter of q_proj and v_proj only (peft's default): the other layers lose their LoRA branch (no parameters
    # left to train), the model takes the adapter's r and α, and both exports skip the layers without LoRA
    d, cfg, weights = meta_ckpt
    net = with_random_adapter(M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=4, lora_alpha=8, progress=False))
    C.export_peft(net, tmp_path / "a")
    cj, st = tmp_path / "a" / "adapter_config.json", tmp_path / "a" / "adapter_model.safetensors"
    cj.write_text(json.dumps({**json.loads(cj.read_text()), "target_modules": ["q_proj", "v_proj"]}))
    write_safetensors(st, {k: v for k, v in read_safetensors(st).items() if ".q_proj." in k or ".v_proj." in k})
    fresh = M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=16, lora_alpha=3, progress=False).eval()
    C.load_adapter(fresh, tmp_path / "a")
    assert {n.split(".")[3] for n, _ in fresh.named_parameters() if "lora_" in n} == {"wq", "wv"}
    assert (fresh.config.lora_r, fresh.config.lora_alpha) == (4, 8)
    ref = {k: v.float() for k, v in merged_weights(weights, fresh).items()}
    idx = torch.randint(cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(4))
    assert rel_err(fresh(idx)[0], reference_forward(ref, cfg, idx)) < 1e-4
    C.export_peft(fresh, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    C.export_merged(fresh, tmp_path / "m", base=d, tokenizer=tokenizer_file, progress=False)  # default: float16
    sd = torch.load(tmp_path / "m" / "consolidated.00.pth", weights_only=True)
    assert all(sd[k].dtype == torch.float16 and torch.allclose(sd[k].float(), ref[k], atol=2e-3, rtol=2e-3) for k in ref)
    merge = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert (merge["base"], merge["base_dir"], merge["dtype"], merge["lora_r"], merge["lora_alpha"]) == ("original", str(d), "float16", 4, 8)
    assert (tmp_path / "m" / "tokenizer.model").read_bytes() == tokenizer_file.read_bytes()


def test_meta_params_give_back_the_ffn_width_and_rope_theta():
    # Meta's formula int(multiplier · int(8·dim/3)) must give back the width exactly, also where the plain quotient
    # rounds down (175/170·170 = 174.99...); rope_theta only where it is not Llama 2's 10000 (its ModelArgs has none)
    for ffn in (172, 175, 11008):
        p = json.loads(C.meta_params(M.LLaMAConfig(dim=64, n_heads=4, ffn_dim=ffn)))
        assert M.LLaMAConfig(**p).hidden_dim == ffn
    assert "rope_theta" not in json.loads(C.meta_params(M.LLaMAConfig(dim=64, n_heads=4)))
    p = json.loads(C.meta_params(M.LLaMAConfig(dim=64, n_heads=4, ffn_dim=256)))  # the formula's own width: LLaMA-1's
    assert "ffn_dim_multiplier" not in p and p["multiple_of"] == 256  # ModelArgs has no ffn_dim_multiplier field
    assert json.loads(C.meta_params(M.LLaMAConfig(dim=64, n_heads=4, rope_theta=1e6)))["rope_theta"] == 1e6


def fake_clock(times, **more):  # stands for a module's `time`: each time() is the next of times
    return SimpleNamespace(time=iter(times).__next__, **more)


def test_progress_line_counts_layers_from_one_and_estimates_the_rest(monkeypatch):
    # on a terminal: layer i/N for the i-th block (the embedding is 0), GB done/total, eta from the rate so far
    monkeypatch.setattr(C, "time", fake_clock([100.0, 110.0]))  # 100 s at the start, 110 s at the first step
    err = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", err)
    p = C.Progress("loaded", 2, 4e9)
    p.step("layers.0.attention.wq.weight", 1e9)  # a quarter in 10 s: 30 s to go
    assert err.getvalue() == "\rloaded: layer 1/2, 1.0/4.0 GB, 10s, eta 30s\033[K"


def test_progress_line_puts_the_embedding_at_layer_0_and_the_final_norm_and_head_at_the_last(monkeypatch):
    monkeypatch.setattr(C, "time", fake_clock(map(float, range(0, 1000, 10))))  # 10 s per call
    err = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", err)
    p = C.Progress("loaded", 3, 5e9)
    seen = []
    for name in ("tok_embeddings.weight", "layers.2.feed_forward.w2.weight", "norm.weight", "output.weight"):
        p.step(name, 1e9)
        seen.append(re.findall(r"layer (\d+/\d+)", err.getvalue())[-1])
    assert seen == ["0/3", "3/3", "3/3", "3/3"]


ST = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_safetensors(path, tensors):
    # the format as the safetensors package writes it: u64 header length, JSON header padded to 8, raw bytes
    header, off, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for k, t in tensors.items():
        if isinstance(t, tuple):  # (dtype name, shape, bytes): a dtype torch cannot express
            header[k] = {"dtype": t[0], "shape": t[1], "data_offsets": [off, off + len(t[2])]}
            off, blobs = off + len(t[2]), blobs + [t[2]]
            continue
        b = t.contiguous().view(torch.int16 if t.dtype == torch.bfloat16 else t.dtype).numpy().tobytes()
        header[k] = {"dtype": ST[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        off, blobs = off + len(b), blobs + [b]
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def read_safetensors(path):
    raw = Path(path).read_bytes()
    n, = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0  # every tensor 8-aligned
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__")
    dt = {v: k for k, v in ST.items()}
    return {k: torch.frombuffer(bytearray(raw[8 + n + h["data_offsets"][0] : 8 + n + h["data_offsets"][1]]),
                                dtype=dt[h["dtype"]]).view(h["shape"]) for k, h in header.items()}


def hf_rope(x):  # HF's rotate-half rotary on (T, H, hd)
    T, hd = x.shape[0], x.shape[-1]
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.cat([torch.outer(torch.arange(T, dtype=torch.float64), freqs)] * 2, -1)[:, None, :]
    rot = torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1)
    return x * ang.cos() + rot * ang.sin()


def test_export_peft_permutes_q_k_for_hf_rotary(tmp_path, meta_ckpt):
    d, cfg, weights = meta_ckpt
    net = M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float64, lora_r=4)
    for n, p in net.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    C.export_peft(net, tmp_path / "peft")
    conf = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and set(conf["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    sd = read_safetensors(tmp_path / "peft" / "adapter_model.safetensors")
    assert len(sd) == 2 * 7 * cfg.n_layers
    pre = "base_model.model.model.layers.0.self_attn."
    att = net.layers[0].attention
    hd, s = cfg.head_dim, att.wq.scaling
    x = torch.randn(6, cfg.dim, dtype=torch.float64)
    # Meta: interleaved rotary on W + sBA.  HF: rotate-half on the permuted base + the exported adapter.
    wq, wk = (m.weight + s * m.lora_B @ m.lora_A for m in (att.wq, att.wk))
    q = M.apply_rope((x @ wq.T).view(1, 6, cfg.n_heads, hd), *M.rope_tables(hd, 6, 1e4, "cpu"))[0]
    k = M.apply_rope((x @ wk.T).view(1, 6, cfg.n_kv_heads, hd), *M.rope_tables(hd, 6, 1e4, "cpu"))[0]
    wq_hf = C.hf_permute(att.wq.weight, "attention.wq", cfg.n_heads, 0) + s * sd[pre + "q_proj.lora_B.weight"].double() @ sd[pre + "q_proj.lora_A.weight"].double()
    wk_hf = C.hf_permute(att.wk.weight, "attention.wk", 0, cfg.n_kv_heads) + s * sd[pre + "k_proj.lora_B.weight"].double() @ sd[pre + "k_proj.lora_A.weight"].double()
    q_hf, k_hf = hf_rope((x @ wq_hf.T).view(6, cfg.n_heads, hd)), hf_rope((x @ wk_hf.T).view(6, cfg.n_kv_heads, hd))
    rep = cfg.n_heads // cfg.n_kv_heads
    scores = torch.einsum("thd,shd->hts", q, k.repeat_interleave(rep, 1))
    scores_hf = torch.einsum("thd,shd->hts", q_hf, k_hf.repeat_interleave(rep, 1))
    assert torch.allclose(scores, scores_hf, atol=1e-5)  # rope_tables are fp32


def test_export_peft_writes_the_adapter_config_peft_reads(tmp_path, meta_ckpt):
    # every field as peft's LoraConfig takes it: a causal LM's task (the class PeftModel builds), the run's rank, alpha and
    # dropout, the HF names of the adapted layers, and inference_mode (the adapter loads frozen unless told to train)
    d, _, _ = meta_ckpt
    net = M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=4, lora_alpha=16, lora_dropout=0.05, progress=False)
    C.export_peft(net, tmp_path / "a", base=d)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text()) == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 16, "lora_dropout": 0.05,
        "target_modules": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"], "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": str(d)}


# ---------------------------------------------------------------------------------------------------
# Hugging Face's layout: the fixture's weights under HF's names, q/k rows permuted for HF's rotate-half
# rotary as transformers' convert_llama_weights_to_hf.py does, in each file variant


HF_LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
            "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
            "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def convert_permute(w, n_heads):  # convert_llama_weights_to_hf.py's permute
    d1, d2 = w.shape
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def hf_config(cfg, **kw):
    return {"architectures": ["LlamaForCausalLM"], "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "num_hidden_layers": cfg.n_layers,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": 10000.0, "vocab_size": cfg.vocab_size, "hidden_act": "silu",
            "max_position_embeddings": 128, "rope_scaling": None, "tie_word_embeddings": False, **kw}


def write_hf(d, cfg, weights, tokenizer, kind="safetensors", shards=1, config=None, dtype=torch.float32):
    t = {"model.embed_tokens.weight": weights["tok_embeddings.weight"], "model.norm.weight": weights["norm.weight"],
         "lm_head.weight": weights["output.weight"]}
    for i in range(cfg.n_layers):
        for meta, hf in HF_LAYER.items():
            w = weights[f"layers.{i}.{meta}.weight"]
            if meta in ("attention.wq", "attention.wk"):
                w = convert_permute(w, cfg.n_heads if meta == "attention.wq" else cfg.n_kv_heads)
            t[f"model.layers.{i}.{hf}.weight"] = w
    t = {k: v.to(dtype) for k, v in t.items()}
    d.mkdir(parents=True)
    names, stem = list(t), "model.safetensors" if kind == "safetensors" else "pytorch_model.bin"
    files = {stem: names} if shards == 1 else {
        stem.replace(".", f"-{s + 1:05d}-of-{shards:05d}."): names[s::shards] for s in range(shards)}
    for f, keys in files.items():
        (write_safetensors if kind == "safetensors" else lambda p, sd: torch.save(sd, p))(d / f, {k: t[k] for k in keys})
    if shards > 1:
        (d / f"{stem}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {k: f for f, ks in files.items() for k in ks}}))
    (d / "config.json").write_text(json.dumps(config or hf_config(cfg)))
    shutil.copy(tokenizer, d / "tokenizer.model")
    return d


@pytest.mark.parametrize("kind,shards,dtype", [("safetensors", 1, torch.float32), ("safetensors", 2, torch.float32),
                                               ("safetensors", 1, torch.bfloat16), ("bin", 1, torch.float32), ("bin", 2, torch.float32)])
def test_hf_layout_loads_like_meta(tmp_path, meta_ckpt, tokenizer_file, kind, shards, dtype):
    d, cfg, weights = meta_ckpt
    hf = write_hf(tmp_path / "hf", cfg, weights, tokenizer_file, kind, shards, dtype=dtype)
    net = M.LLaMA.from_checkpoint(hf, quantize=False, dtype=torch.float32, lora_r=0, progress=False)
    assert net.config.hidden_dim == cfg.hidden_dim and net.config.n_kv_heads == cfg.n_kv_heads
    idx = torch.randint(cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    stored = {k: v.to(dtype) for k, v in weights.items()}  # what the files hold
    assert rel_err(net(idx)[0], reference_forward(stored, cfg, idx)) < 1e-4
    if dtype == torch.float32:
        meta = M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=0, progress=False)
        assert rel_err(net(idx)[0], meta(idx)[0]) < 1e-5


def test_hf_layout_quantized_and_tied(tmp_path, meta_ckpt, tokenizer_file, monkeypatch):
    d, cfg, weights = meta_ckpt
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tied = {**weights, "output.weight": weights["tok_embeddings.weight"]}
    hf = write_hf(tmp_path / "hf", cfg, tied, tokenizer_file, config=hf_config(cfg, tie_word_embeddings=True))
    stored = read_safetensors(hf / "model.safetensors")
    write_safetensors(hf / "model.safetensors", {k: v for k, v in stored.items() if k != "lm_head.weight"})  # tied: not stored
    net = M.LLaMA.from_checkpoint(hf, quantize=True, dtype=torch.float32, progress=False)
    assert all(isinstance(m.weight, qlora.NF4Weight) for m in net.modules() if isinstance(m, qlora.LoRALinear))
    rt = {k: qlora.dequantize_nf4(qlora.quantize_nf4(v)) if v.dim() == 2 and k.startswith("layers.") else v for k, v in tied.items()}
    idx = torch.randint(cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    assert rel_err(net(idx)[0], reference_forward(rt, cfg, idx)) < 1e-3


@pytest.mark.parametrize("arch, kv_heads, theta, tied", [("Llama", 2, 500000.0, False), ("Llama", 4, 10000.0, True),
                                                     ("Mistral", 2, 1e6, False)])
def test_installed_transformers_and_peft_agree(tmp_path, tokenizer_file, arch, kv_heads, theta, tied):
    # against transformers and peft themselves where they are installed (not dependencies: skipped without them):
    # a folder transformers saved loads to the same logits; an adapter peft saved loads to peft's logits; and
    # export_peft's folder gives peft the logits we compute
    tf, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    torch.manual_seed(0)
    conf = getattr(tf, f"{arch}Config")(vocab_size=150, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                                         rope_theta=theta, rms_norm_eps=1e-5, tie_word_embeddings=tied)
    hf = getattr(tf, f"{arch}ForCausalLM")(conf).eval()
    with torch.no_grad():  # every weight random, norms too (transformers initialises them to 1)
        for p in hf.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) / p.shape[-1] ** 0.5)
    hf.save_pretrained(tmp_path / "hf")
    idx = torch.randint(150, (2, 17))
    net = M.LLaMA.from_checkpoint(tmp_path / "hf", quantize=False, dtype=torch.float32, lora_r=2, progress=False).eval()
    with torch.no_grad():
        base = hf(idx).logits
        assert rel_err(M.LLaMA.from_checkpoint(tmp_path / "hf", quantize=False, dtype=torch.float32, lora_r=0,
                                               progress=False)(idx)[0], base) < 2e-6
        names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # Mistral: "all-linear", which peft
        names = "all-linear" if arch == "Mistral" else names  # writes out as every module's full name (model.layers.0.mlp.up_proj)
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=names, init_lora_weights=False, task_type="CAUSAL_LM")
        theirs = peft.get_peft_model(hf, lora).eval()  # random A and B
        theirs.save_pretrained(tmp_path / "peft")
        C.load_adapter(net, tmp_path / "peft")
        assert rel_err(net(idx)[0], theirs(idx).logits) < 2e-6 and rel_err(theirs(idx).logits, base) > 0.1
        C.export_peft(net, tmp_path / "ours")
        fresh = getattr(tf, f"{arch}ForCausalLM").from_pretrained(tmp_path / "hf").eval()
        fresh.generation_config.eos_token_id = None  # greedy decoding with each one's KV cache: the same 12 tokens
        again = peft.PeftModel.from_pretrained(fresh, tmp_path / "ours").eval()
        assert rel_err(net(idx)[0], again(idx).logits) < 2e-6
        assert torch.equal(net.generate(idx, 12, temperature=0), again.generate(input_ids=idx, max_new_tokens=12, do_sample=False))
        C.export_merged(net, tmp_path / "merged", dtype=torch.float32, tokenizer=tokenizer_file, hf=True, progress=False)  # merged_hf
        merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        assert rel_err(net(idx)[0], merged(idx).logits) < 2e-6
        assert merged.generation_config.eos_token_id == C.Tokenizer(tokenizer_file).eos_id  # its generate stops where ours does
    pytest.importorskip("google.protobuf")  # transformers reads a sentencepiece model through it
    text = " ".join(WORDS[:12])  # tokenized as in training: bos first
    assert tf.AutoTokenizer.from_pretrained(tmp_path / "merged")(text).input_ids == C.Tokenizer(tokenizer_file).encode(text, bos=True)


@pytest.mark.parametrize("damage, expect", [
    (dict(attention_bias=True), "attention or MLP biases (attention_bias/mlp_bias true) are not implemented"),
    (dict(mlp_bias=True), "attention or MLP biases"),
    ("bias_tensor", "tensor 'model.layers.0.self_attn.q_proj.bias': biases are not implemented"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), 'rope_scaling {"type": "linear", "factor": 2.0} is not implemented'),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),  # Llama 3.1 as transformers >= 5 writes it
     'rope_parameters {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0} is not implemented (only rope_type default)'),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 5e5}), 'rope_parameters {"rope_type": "linear", "rope_theta": 500000.0} is not'),
    (dict(rope_parameters={"rope_theta": 5e5, "partial_rotary_factor": 0.5}), "rope_parameters {"),
    (dict(rope_parameters=[]), "rope_parameters [] is not implemented"),
    (dict(rope_scaling={"rope_type": ["default"]}), 'rope_scaling {"rope_type": ["default"]} is not implemented'),  # not a TypeError
    (dict(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}),  # a -bnb-4bit folder: U8 tensors
     "config.json: quantization_config: the weights are quantized already; use the 16-bit original"),
    (dict(rope_parameters={"rope_theta": "5e5"}), 'config.json: rope_parameters: rope_theta must be a positive number, got "5e5"'),
    (dict(architectures=["MistralForCausalLM"], sliding_window=64), "sliding_window 64 is shorter than the context of 100 tokens"),
    (dict(architectures=["Qwen2ForCausalLM"]), "architectures ['Qwen2ForCausalLM']: only LlamaForCausalLM"),
    ("f8_dtype", "tensor 'model.norm.weight' has dtype F8_E4M3; only F16, BF16 and F32 are read"),
    (dict(head_dim=32), "config.json: head_dim 32 is not dim / heads = 64 / 4 = 16 (not implemented)"),
    (dict(head_dim=32, num_attention_heads=3, num_key_value_heads=3), "head_dim 32 is not dim / heads = 64 / 3 = 21.3333"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not implemented"),
    ("missing_tensor", "missing tensor 'model.layers.1.post_attention_layernorm.weight'"),
    ("missing_shard", "model-00002-of-00002.safetensors: not found (listed in"),
    ("missing_shard1", "model-00001-of-00002.safetensors: not found (listed in"),
    ("index_map_list", 'model.safetensors.index.json: weight_map must map tensor names to file names, got ["model-0'),
    ("index_map_null", "model.safetensors.index.json: weight_map must map tensor names to file names, got null"),
    ("index_file_int", 'model.safetensors.index.json: weight_map must map tensor names to file names, got {"model.'),
    ("truncated", "not a valid safetensors file"),
    ("negative_shape", "not a valid safetensors file (RuntimeError: "),  # (-2)·(-2)·4 bytes: the size agrees
    ("no_weights", "no weights (model.safetensors"),
    (dict(hidden_size="64"), 'config.json: hidden_size must be a positive integer, got "64"'),  # hand-edited config.json
    (dict(rms_norm_eps=0), "config.json: rms_norm_eps must be a positive number, got 0"),
    (dict(sliding_window="4096"), 'config.json: sliding_window must be a positive integer, got "4096"'),
    (dict(tie_word_embeddings="false"), 'config.json: tie_word_embeddings must be true or false, got "false"'),
    ("config_list", "config.json: expected a JSON object {...}, got []"),
    (dict(intermediate_size=None), "config.json: missing field 'intermediate_size'"),  # null: as if absent
    (dict(hidden_size=None), "config.json: missing field 'hidden_size'"),
    (dict(num_key_value_heads=3), "config.json: dim 64, 4 heads, 3 kv heads: need a whole, even head dim"),  # weights fit 4/3
    (dict(num_attention_heads=5), "config.json: dim 64, 5 heads, 2 kv heads"),
])
def test_hf_unsupported_is_one_line_before_any_weight_is_read(tmp_path, meta_ckpt, tokenizer_file, monkeypatch, damage, expect):
    _, cfg, weights = meta_ckpt
    hf = write_hf(tmp_path / "hf", cfg, weights, tokenizer_file, shards=2 if damage in ("missing_shard", "missing_shard1", "index_map_list", "index_map_null", "index_file_int") else 1,
                  config=hf_config(cfg, **damage) if isinstance(damage, dict) else None)
    st = hf / "model.safetensors"
    if damage in ("bias_tensor", "f8_dtype", "missing_tensor", "negative_shape"):
        sd = read_safetensors(st)
        if damage == "negative_shape":
            sd["model.norm.weight"] = ("F32", [-2, -2], bytes(16))
        elif damage == "bias_tensor":
            sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(cfg.dim)
        elif damage == "f8_dtype":
            sd["model.norm.weight"] = ("F8_E4M3", [cfg.dim], bytes(cfg.dim))
        else:
            del sd["model.layers.1.post_attention_layernorm.weight"]
        write_safetensors(st, sd)
    elif damage in ("missing_shard", "missing_shard1"):
        (hf / f"model-0000{1 + (damage == 'missing_shard')}-of-00002.safetensors").unlink()
    elif damage in ("index_map_list", "index_map_null", "index_file_int"):  # an index edited by hand or written by another tool
        index = hf / "model.safetensors.index.json"
        wm = json.loads(index.read_text())["weight_map"]
        wm = {"index_map_list": sorted(set(wm.values())), "index_map_null": None}.get(damage, {k: 1 for k in wm})
        index.write_text(json.dumps({"weight_map": wm}))
    elif damage == "truncated":
        st.write_bytes(st.read_bytes()[:100])
    elif damage == "config_list":
        (hf / "config.json").write_text("[]")
    elif damage == "no_weights":
        st.unlink()

    def build(*a, **k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(M.LLaMA, "__init__", build)  # the network asks for the weights: it must not be reached
    with pytest.raises(InputError, match=re.escape(expect)) as e:
        M.LLaMA.from_checkpoint(hf, dtype=torch.float32, context=100, progress=False)
    assert "\n" not in str(e.value)


def test_an_inf_in_a_checkpoint_is_named_by_the_files_tensor_name(tmp_path, meta_ckpt, tokenizer_file):
    # a damaged weight (NaN or inf), in HF's layout named as there: before, NF4 stored it as 0 and a 16-bit one gave NaN logits
    _, cfg, weights = meta_ckpt
    hf = write_hf(tmp_path / "hf", cfg, {**weights, "norm.weight": torch.full((cfg.dim,), float("inf"))}, tokenizer_file)
    with pytest.raises(InputError, match=re.escape(f"{hf}: model.norm.weight holds NaN or inf")):
        M.LLaMA.from_checkpoint(hf, dtype=torch.float32, progress=False)
    # the check sums in float32: a float16 load of finite weights whose float16 sum overflows (64 x 2048 > 65504) is refused by nothing
    big = write_hf(tmp_path / "big", cfg, {**weights, "norm.weight": torch.full((cfg.dim,), 2048.0)}, tokenizer_file)
    assert (M.LLaMA.from_checkpoint(big, quantize=False, dtype=torch.float16, progress=False).norm.weight == 2048).all()


def test_a_weight_of_another_shape_in_hf_layout_is_named_by_the_files_tensor_name(tmp_path, meta_ckpt, tokenizer_file):
    # a config.json that disagrees with the weights: the tensor named as the user finds it in model.safetensors
    _, cfg, weights = meta_ckpt
    hf = write_hf(tmp_path / "hf", cfg, weights, tokenizer_file, config=hf_config(cfg, vocab_size=cfg.vocab_size + 8))
    with pytest.raises(InputError, match=re.escape(f"{hf}: model.embed_tokens.weight has shape ({cfg.vocab_size}, 64), config.json "
                                                   f"implies ({cfg.vocab_size + 8}, 64) (missing shard or wrong config.json?)")):
        M.LLaMA.from_checkpoint(hf, quantize=False, dtype=torch.float32, lora_r=0, progress=False)


def test_config_files_saved_as_utf16_are_read(tmp_path, meta_ckpt, tokenizer_file):
    # some Windows editors save JSON as UTF-16 with a byte-order mark; json reads it from the bytes
    src, cfg, weights = meta_ckpt
    d, hf = tmp_path / "meta", write_hf(tmp_path / "hf", cfg, weights, tokenizer_file)
    shutil.copytree(src, d)
    for f in (d / "params.json", hf / "config.json"):
        f.write_text(f.read_text(), encoding="utf-16")
    assert C.read_params(d) == C.read_params(src) and C.read_params(hf)["dim"] == cfg.dim


# config.json of published models (as on the Hugging Face hub) and their published parameter counts
LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 11008,
             "max_position_embeddings": 4096, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
             "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False, "vocab_size": 32000}
PUBLISHED = [
    ("Llama-2-7b-hf", LLAMA2_7B, 6_738_415_616),
    ("TinyLlama-1.1B", {**LLAMA2_7B, "hidden_size": 2048, "intermediate_size": 5632, "max_position_embeddings": 2048,
                        "num_hidden_layers": 22, "num_key_value_heads": 4, "rope_theta": 10000.0, "attention_bias": False}, 1_100_048_384),
    ("Mistral-7B-v0.1", {**LLAMA2_7B, "architectures": ["MistralForCausalLM"], "intermediate_size": 14336, "max_position_embeddings": 32768,
                         "num_key_value_heads": 8, "rope_theta": 10000.0, "sliding_window": 4096}, 7_241_732_096),
    ("CodeLlama-7b-hf", {**LLAMA2_7B, "max_position_embeddings": 16384, "rope_theta": 1000000, "vocab_size": 32016}, 6_738_546_688),
]


@pytest.mark.parametrize("name, conf, n_params", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_hf_configs(tmp_path, name, conf, n_params):
    cfg = M.LLaMAConfig(**C.hf_params(conf, name), lora_r=0)
    net = M.LLaMA(cfg, lambda n, shape: torch.empty(shape, device="meta"), quantize=False)  # shapes only
    assert sum(t.numel() for n, t in net.state_dict().items() if "rope" not in n) == n_params
    assert cfg.rope_theta == conf.get("rope_theta", 10000.0) and cfg.max_seq_len <= conf["max_position_embeddings"]
    # the merged export's params.json: only Meta's fields, and Meta's FFN formula gives back intermediate_size
    p = json.loads(C.meta_params(cfg))
    assert ("ffn_dim_multiplier" in p) == name.startswith("Mistral")  # the others' widths are Meta's formula's
    assert set(p) <= {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier", "norm_eps", "rope_theta"}
    h = int(2 * 4 * p["dim"] / 3)
    h = int(p.get("ffn_dim_multiplier", 1.0) * h)
    assert p["multiple_of"] * ((h + p["multiple_of"] - 1) // p["multiple_of"]) == conf["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(conf))
    assert C.read_params(tmp_path, context=4096)["max_seq_len"] == min(conf["max_position_embeddings"], conf.get("sliding_window", 1e9))
    if name.startswith("Mistral"):
        with pytest.raises(InputError, match="sliding_window 4096 is shorter than the context of 8192"):
            C.read_params(tmp_path, context=8192)


# ---------------------------------------------------------------------------------------------------
# adapters in and out: a model with LoRA equals the float64 reference on the merged weights W + (α/r)·B A


def with_random_adapter(net, seed=7):
    g = torch.Generator().manual_seed(seed)
    for n, p in net.named_parameters():
        if "lora_" in n:
            p.data = torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05
    return net.eval()  # no dropout


def merged_weights(weights, net):
    out = dict(weights)
    for n, m in net.named_modules():
        if isinstance(m, qlora.LoRALinear) and m.r > 0:
            out[n + ".weight"] = weights[n + ".weight"].double() + m.scaling * m.lora_B.double() @ m.lora_A.double()
    return out


def test_peft_export_loads_back_through_load_adapter(tmp_path, meta_ckpt, tokenizer_file):
    d, cfg, weights = meta_ckpt
    hf = write_hf(tmp_path / "hf", cfg, weights, tokenizer_file)
    net = with_random_adapter(M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=4, lora_alpha=8, progress=False))
    C.export_peft(net, tmp_path / "peft", base=hf)
    conf = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(hf) and (conf["r"], conf["lora_alpha"]) == (4, 8)
    assert not (tmp_path / "peft" / "adapter_model.bin").exists()
    # into a model of the other layout built with another rank: r and α/r come from the adapter
    fresh = M.LLaMA.from_checkpoint(hf, quantize=False, dtype=torch.float32, lora_r=16, lora_alpha=3, progress=False)
    assert C.load_adapter(fresh.eval(), tmp_path / "peft") == {"base": {"ckpt_dir": str(hf)}}
    lin = fresh.layers[1].attention.wk
    assert lin.lora_A.shape == (4, cfg.dim) and lin.scaling == 2.0 and lin.lora_A.requires_grad
    idx = torch.randint(cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(8))
    ref = reference_forward(merged_weights(weights, net), cfg, idx)
    assert rel_err(fresh(idx)[0], ref) < 1e-4 and rel_err(fresh(idx)[0], net(idx)[0]) < 1e-5
    # base_model_name_or_path is only a hint: null (peft's "unknown") or a non-string records no base
    for base in (None, 5, ["x"], ""):
        (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**conf, "base_model_name_or_path": base}))
        assert C.read_adapter(tmp_path / "peft")["info"] == {}


def test_a_16bit_peft_adapter_loads_as_float32_parameters(tmp_path, meta_ckpt):
    # another trainer's adapter saved in float16: its A and B become float32 parameters to train, as the model's own
    d, cfg, _ = meta_ckpt
    C.export_peft(with_random_adapter(M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=4, progress=False)), tmp_path / "a")
    st = tmp_path / "a" / "adapter_model.safetensors"
    half = {k: v.half() for k, v in read_safetensors(st).items()}
    write_safetensors(st, half)
    fresh = M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=4, progress=False)
    C.load_adapter(fresh, tmp_path / "a")
    lora = {n: p for n, p in fresh.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * 7 * cfg.n_layers and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    assert torch.equal(lora["layers.1.feed_forward.w2.lora_A"], half["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].float())


def test_own_adapter_pt_loads_and_returns_its_record(tmp_path, meta_ckpt):
    d, cfg, weights = meta_ckpt
    net = with_random_adapter(M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=2, lora_alpha=6, progress=False))
    torch.save({"lora": net.lora_state_dict(), "model_config": vars(net.config), "config": {"data": "x.jsonl"},
                "template": "guanaco"}, tmp_path / "adapter.pt")
    fresh = M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=0, progress=False)
    info = C.load_adapter(fresh.eval(), tmp_path / "adapter.pt")
    assert info["template"] == "guanaco" and info["config"] == {"data": "x.jsonl"}
    idx = torch.randint(cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(9))
    assert rel_err(fresh(idx)[0], reference_forward(merged_weights(weights, net), cfg, idx)) < 1e-4


def test_a_lora_factor_stored_transposed_is_refused_by_its_shape(tmp_path, meta_ckpt):
    # a B of shape (r, out) where (out, r) is due (another writer's transposed layout): the same number of values, still
    # refused by its shape, never taken as if laid out as ours
    d, _, _ = meta_ckpt
    net = M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=2, progress=False)
    C.export_peft(net, tmp_path / "a")
    st, k = tmp_path / "a" / "adapter_model.safetensors", "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    sd = read_safetensors(st)
    write_safetensors(st, {**sd, k: sd[k].T.contiguous()})
    with pytest.raises(InputError) as e:
        C.load_adapter(net, tmp_path / "a")
    assert str(e.value) == f"{tmp_path / 'a'}: tensor {k!r} has shape (2, 32), the model's layers.0.attention.wv needs (32, 2)"


def test_own_adapter_pt_of_some_layers_adapts_only_those(tmp_path, meta_ckpt):
    # an adapter.pt holding the q and v layers' A and B (a run resumed from a peft adapter of those): the other layers
    # get no LoRA branch, rather than being reported as missing tensors
    d, cfg, weights = meta_ckpt
    net = with_random_adapter(M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=2, lora_alpha=6, progress=False))
    lora = {k: v for k, v in net.lora_state_dict().items() if ".attention.wq." in k or ".attention.wv." in k}
    torch.save({"lora": lora, "model_config": vars(net.config)}, tmp_path / "adapter.pt")
    assert C.read_adapter(tmp_path / "adapter.pt")["targets"] == {"attention.wq", "attention.wv"}
    fresh = M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=8, progress=False).eval()
    C.load_adapter(fresh, tmp_path / "adapter.pt")
    assert {n for n, _ in fresh.named_parameters() if "lora_" in n} == set(lora)
    ref = dict(weights)
    for k in lora:
        if k.endswith("lora_A"):
            w = k.removesuffix(".lora_A")
            ref[w + ".weight"] = weights[w + ".weight"].double() + 3.0 * lora[w + ".lora_B"].double() @ lora[k].double()  # α/r = 6/2
    idx = torch.randint(cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(9))
    assert rel_err(fresh(idx)[0], reference_forward(ref, cfg, idx)) < 1e-4


def test_peft_adapter_naming_its_modules_in_full_loads(tmp_path, meta_ckpt):
    # peft writes target_modules="all-linear" out as every module's full name (model.layers.0.mlp.gate_proj, ...)
    d, cfg, _ = meta_ckpt
    net = with_random_adapter(M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=4, lora_alpha=8, progress=False))
    C.export_peft(net, tmp_path / "a")
    cj = tmp_path / "a" / "adapter_config.json"
    full = [f"model.layers.{i}.{hf}" for i in range(cfg.n_layers) for hf in C.LINEARS.values()]
    cj.write_text(json.dumps({**json.loads(cj.read_text()), "target_modules": full}))
    fresh = M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=2, progress=False).eval()
    C.load_adapter(fresh, tmp_path / "a")
    idx = torch.randint(cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(4))
    assert torch.equal(fresh(idx)[0], net.eval()(idx)[0]) and (fresh.config.lora_r, fresh.config.lora_alpha) == (4, 8)


def test_own_adapter_pt_record_leaves_out_the_weights_optimizer_and_rng(tmp_path, meta_ckpt):
    # train.py's ckpt.pt read as an adapter: what it returns is the run's record, not the tensors of its optimizer state
    # and generators; a base edited into something not a dict is left out too
    d, _, _ = meta_ckpt
    net = M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=2, progress=False)
    ck = {"lora": net.lora_state_dict(), "model_config": vars(net.config), "config": {"data": "x.jsonl"}, "iter": 5,
          "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}}, "rng": [torch.zeros(4, dtype=torch.uint8)], "base": "somewhere"}
    torch.save(ck, tmp_path / "ckpt.pt")
    assert C.read_adapter(tmp_path / "ckpt.pt")["info"] == {"model_config": vars(net.config), "config": {"data": "x.jsonl"}, "iter": 5}


@pytest.mark.parametrize("damage, expect", [
    ("shape", "tensor 'layers.0.attention.wq.lora_A' has shape (2, 10), the model's layers.0.attention.wq needs (2, 64)"),
    ("extra_layer", "tensor 'layers.7.attention.wq.lora_A' has no layer in this model"),
    ("missing", "tensor 'layers.1.feed_forward.w2.lora_B' missing"),
    ("peft_target", 'target_modules ["q_proj", "lm_head"] is not supported (only q_proj, k_proj'),
    ("peft_target_nested", 'target_modules [["q_proj"]] is not supported'),
    ("peft_target_empty", "target_modules [] is not supported"),  # adapts nothing: an empty optimizer
    ("peft_alpha_nan", "the rank and alpha must be finite numbers, got 2, nan"),  # NaN logits in chat
    ("peft_missing", "tensor 'base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight' missing"),
    ("peft_bin_list", "adapter_model.bin: not a state dict"),
    ("peft_inf", "tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight' holds NaN or inf"),  # said before a load
    ("bad_name", "adapter.pt: tensor 'x' has no layer in this model"),  # adapter.pt written by another program
    ("not_tensor", "adapter.pt: not an adapter (expected a dict with 'lora' (named tensors) and 'model_config')"),
    ("empty", "adapter.pt: not an adapter"),
])
def test_adapter_mismatch_is_one_line(tmp_path, meta_ckpt, damage, expect):
    d, cfg, _ = meta_ckpt
    net = M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=2, progress=False)
    lora = net.lora_state_dict()
    if damage.startswith("peft"):
        C.export_peft(net, tmp_path / "a")
        path, cj = tmp_path / "a", tmp_path / "a" / "adapter_config.json"
        if damage.startswith("peft_target"):
            targets = {"peft_target": ["q_proj", "lm_head"], "peft_target_nested": [["q_proj"]], "peft_target_empty": []}[damage]
            cj.write_text(json.dumps({**json.loads(cj.read_text()), "target_modules": targets}))
        elif damage == "peft_alpha_nan":
            cj.write_text(json.dumps({**json.loads(cj.read_text()), "lora_alpha": float("nan")}))
        elif damage == "peft_bin_list":  # plain data weights_only accepts, in peft's pickled format
            (path / "adapter_model.safetensors").unlink()
            torch.save([1, 2], path / "adapter_model.bin")
        elif damage == "peft_inf":  # another trainer's diverged run, in peft's format: an inf is as bad as a NaN
            sd = read_safetensors(path / "adapter_model.safetensors")
            sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"][0, 0] = float("inf")
            write_safetensors(path / "adapter_model.safetensors", sd)
        else:
            sd = read_safetensors(path / "adapter_model.safetensors")
            del sd["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
            write_safetensors(path / "adapter_model.safetensors", sd)
    else:
        if damage == "shape":
            lora["layers.0.attention.wq.lora_A"] = torch.zeros(2, 10)
        elif damage == "extra_layer":
            lora["layers.7.attention.wq.lora_A"] = torch.zeros(2, cfg.dim)
        elif damage == "bad_name":
            lora["x"] = torch.zeros(1)
        elif damage == "not_tensor":
            lora["layers.0.attention.wq.lora_A"] = 1
        elif damage == "empty":
            lora = {}
        else:
            del lora["layers.1.feed_forward.w2.lora_B"]
        path = tmp_path / "adapter.pt"
        torch.save({"lora": lora, "model_config": vars(net.config)}, path)
    with pytest.raises(InputError, match=re.escape(expect)):
        C.load_adapter(net, path)


def test_merged_export_on_the_original_16bit_base(tmp_path, meta_ckpt, tokenizer_file, monkeypatch):
    d, cfg, weights = meta_ckpt
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hf = write_hf(tmp_path / "hf", cfg, weights, tokenizer_file)
    net = with_random_adapter(M.LLaMA.from_checkpoint(hf, quantize=True, dtype=torch.float32, lora_r=4, lora_alpha=8, progress=False))
    C.export_merged(net, tmp_path / "merged", dtype=torch.float32, base=hf, progress=False)
    sd = torch.load(tmp_path / "merged" / "consolidated.00.pth", weights_only=True)
    ref = merged_weights(weights, net)  # the original weights, not their NF4 rounding
    assert all(torch.allclose(sd[k], ref[k].float(), atol=1e-6) for k in ref)
    assert json.loads((tmp_path / "merged" / "merge.json").read_text())["base"] == "original"
    idx = torch.randint(cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(10))
    C.export_merged(net, tmp_path / "merged_hf", dtype=torch.float32, base=hf, hf=True, progress=False)  # --export merged_hf
    for out in ("merged", "merged_hf"):
        back = M.LLaMA.from_checkpoint(tmp_path / out, quantize=False, dtype=torch.float32, tokenizer=tokenizer_file, lora_r=0, progress=False)
        assert rel_err(back(idx)[0], reference_forward(ref, cfg, idx)) < 1e-4


def test_merged_export_of_a_16bit_model_records_its_base_as_loaded(tmp_path, meta_ckpt):
    # merge.json says which W0 the merge used: a model loaded in 16/32 bits (no NF4 rounding) merged onto its own weights
    d, cfg, weights = meta_ckpt
    net = with_random_adapter(M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=2, lora_alpha=4, progress=False))
    C.export_merged(net, tmp_path / "m", dtype=torch.float32, progress=False)
    merge = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert (merge["base"], merge["base_dir"], merge["dtype"], merge["lora_r"], merge["lora_alpha"]) == ("as-loaded", None, "float32", 2, 4)
    sd = torch.load(tmp_path / "m" / "consolidated.00.pth", weights_only=True)
    ref = merged_weights(weights, net)
    assert all(torch.allclose(sd[k], ref[k].float(), atol=1e-6) for k in ref)


def test_merged_export_saves_copies_not_views_of_a_mapped_file(tmp_path, meta_ckpt):
    # a weight loaded from safetensors in the export's own dtype is a view into the file's memory map: saved as it is,
    # torch.save would write the whole mapped file with it (the view's storage)
    d, _, weights = meta_ckpt
    (src := tmp_path / "src").mkdir()
    shutil.copy(d / "params.json", src / "params.json")
    C.save_safetensors({k: t.float() for k, t in weights.items()}, src / "consolidated.safetensors")
    net = M.LLaMA.from_checkpoint(src, quantize=False, dtype=torch.float32, lora_r=2, progress=False)
    C.export_merged(net, tmp_path / "m", dtype=torch.float32, progress=False)
    sd = torch.load(tmp_path / "m" / "consolidated.00.pth", weights_only=True)
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in sd.values())


def test_merged_export_in_metas_layout_writes_only_metas_files(tmp_path, meta_ckpt, tokenizer_file):
    # Meta's layout: the shard, params.json, the tokenizer and merge.json; transformers' tokenizer_config.json belongs
    # to the Hugging Face export only
    d, _, _ = meta_ckpt
    net = M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=2, progress=False)
    C.export_merged(net, tmp_path / "m", dtype=torch.float32, tokenizer=tokenizer_file, progress=False)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["consolidated.00.pth", "merge.json", "params.json", "tokenizer.model"]


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("tty", [False, True])
def test_load_progress(meta_ckpt, monkeypatch, tty):
    d, cfg, _ = meta_ckpt
    err = FakeTerminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=0, progress=False)
    assert err.getvalue() == ""
    M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=0)
    out = err.getvalue()
    assert re.search(r"loaded 2 layers, 0\.0 GB in \d+\.\ds", out) and out.endswith("\n") and out.count("\n") == 1
    assert ("\r" in out and "layer 2/2" in out) == tty  # a terminal sees one line rewritten in place


# ---------------------------------------------------------------------------------------------------
# python model.py: the chat command on a demo adapter (a random tiny base rebuilt from what adapter.pt records)


@pytest.fixture(scope="session")
def demo_adapter(tmp_path_factory, tokenizer_file):
    d = tmp_path_factory.mktemp("demo")
    tok = shutil.copy(tokenizer_file, d / "tokenizer-0123456789.model")
    cfg = M.LLaMAConfig(**{**M.CONFIGS["tiny"], "vocab_size": C.Tokenizer(tok).n_words, "lora_r": 4})
    net = with_random_adapter(M.LLaMA.from_config(cfg, dtype=torch.float32, seed=3), seed=11)
    for n, p in net.named_parameters():
        if "lora_B" in n:
            p.data *= 20  # an adapter that changes what the model says
    torch.save({"lora": net.lora_state_dict(), "model_config": vars(cfg), "config": {},
                "base": {"init": "random", "model": "tiny", "seed": 3, "tokenizer": str(tok), "device": "cpu"}}, d / "adapter.pt")
    return d / "adapter.pt", net, C.Tokenizer(tok)


def greedy(net, ids, n, eos):  # without the KV cache: the whole sequence again each step
    out = []
    for _ in range(n):
        nxt = net(torch.tensor([ids + out]))[0][0, -1].argmax().item()
        out.append(nxt)
        if nxt == eos:
            break
    return out


def run_chat(*args, input=None, env=None):
    return subprocess.run([sys.executable, str(ROOT / "model.py"), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env or ENV, input=input)


def test_chat_answers_a_prompt_in_the_alpaca_template(demo_adapter, monkeypatch):
    path, net, tok = demo_adapter
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as in the subprocess
    r = run_chat("--adapter", path, "--prompt", "the lazy dog", "--temperature", 0, "--max_new_tokens", 10, env=CPU_ENV)
    assert r.returncode == 0, r.stderr
    prompt = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n" \
             "### Instruction:\nthe lazy dog\n\n### Response: "
    expect = tok.decode(greedy(net.eval(), [tok.bos_id] + tok.encode(prompt), 10, tok.eos_id))
    assert expect.strip() and r.stdout == expect + "\n"


def test_chat_refuses_text_that_is_not_utf8(demo_adapter):
    # a Latin-1 terminal: bytes that are not UTF-8, in argv or on stdin, are one line, not a tokenizer traceback
    cmd = [sys.executable, str(ROOT / "model.py"), "--adapter", str(demo_adapter[0]), "--max_new_tokens", "2"]
    for extra, stdin, expect in (([b"--prompt", b"caf\xe9"], b"", b"error: --prompt: not UTF-8 text"),
                                 ([], b"hello\ncaf\xe9\n", b"error: stdin: not UTF-8 text")):
        for lang in ("C", "C.UTF-8", "en_US.UTF-8"):  # Python decodes stdin strictly in some locales
            r = subprocess.run(cmd + extra, cwd=ROOT, capture_output=True, timeout=300, env={**CPU_ENV, "LC_ALL": lang}, input=stdin)
            assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == expect and b"Traceback" not in r.stderr, r.stderr


def test_chat_interactive_keeps_the_guanaco_conversation(demo_adapter, monkeypatch, tmp_path):
    path, net, tok = demo_adapter
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    r = run_chat("--adapter", path, "--template", "guanaco", "--temperature", 0, "--max_new_tokens", 6,
                 input="the brown fox\nseven birds\n\nnever read\n", env=CPU_ENV)
    assert r.returncode == 0, r.stderr
    ids, answers = [tok.bos_id], []
    for line in ("the brown fox", "seven birds"):  # stops at the empty line
        ids += tok.encode(f"### Human: {line}### Assistant: ")
        out = greedy(net.eval(), ids, 6, tok.eos_id)
        answers.append(tok.decode(out))
        ids += tok.encode(answers[-1].strip()) + [tok.eos_id]  # re-encoded as training encodes an answer, closed by eos
    assert r.stdout == "".join(a + "\n" for a in answers)


def test_chat_on_a_peft_adapter_finds_its_base_folder(tmp_path, meta_ckpt, tokenizer_file):
    d, cfg, weights = meta_ckpt
    hf = write_hf(tmp_path / "hf", cfg, weights, tokenizer_file)
    net = with_random_adapter(M.LLaMA.from_checkpoint(hf, quantize=False, dtype=torch.float32, lora_r=4, progress=False))
    C.export_peft(net, tmp_path / "peft", base=hf)  # records the base folder: no --ckpt_dir needed
    r = run_chat("--adapter", tmp_path / "peft", "--template", "none", "--prompt", "the lazy dog", "--temperature", 0,
                 "--max_new_tokens", 5, "--quantize", "false")
    assert r.returncode == 0, r.stderr
    tok = C.Tokenizer(tokenizer_file)
    assert r.stdout == tok.decode(greedy(net, [tok.bos_id] + tok.encode("the lazy dog"), 5, tok.eos_id)) + "\n"
    assert r.stderr.startswith("loaded 2 layers")  # the progress line goes to stderr, never into the answer


@pytest.mark.parametrize("args, expect", [
    (["--colour", "red"], "error: unknown flag --colour"),
    (["--max_new_tokens", "many"], "error: --max_new_tokens: expected int, got 'many'"),
    (["--prompt", "hi"], "error: --ckpt_dir DIR is needed"),
    (["--top_k", "-1"], "error: --top_k must be in [0, 1e+09], got -1"),
    (["--temperature", "nan"], "error: --temperature must be in [0, 10000], got nan"),
    (["--max_new_tokens", "-5"], "error: --max_new_tokens must be in [0, 1e+09], got -5"),
    (["--seed", str(2**64)], f"error: --seed must be in [0, 9.22337e+18], got {2**64}"),  # torch.manual_seed's range
    (["--adapter", "/nonexistent/adapter.pt"], "error: /nonexistent/adapter.pt: adapter not found"),
])
def test_chat_bad_input_is_one_line(args, expect):
    r = run_chat(*args)
    assert r.returncode == 2 and r.stderr.startswith(expect) and len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------
# edges of data/prepare.py, data/files.py and data/mmlu.py that the tests above leave unchecked: each test
# names the behaviour it pins; all run in-process and fast


def test_read_records_layout_line_numbers_and_surrogates(tmp_path):
    f = tmp_path / "in.jsonl"
    # an array after a blank line and indentation is still one array, each item at the line it starts on
    f.write_text('\n  [\n  {"instruction": "i",\n   "output": "o"},\n  {"instruction": "j", "output": "p"}\n]\n')
    assert P.read_records(f) == [(3, {"instruction": "i", "output": "o"}), (5, {"instruction": "j", "output": "p"})]
    # a malformed item spread over lines is reported at the line of the error, not the line it starts on
    f.write_text('[\n  {"instruction": "i",\n   "output": }\n]\n')
    with pytest.raises(InputError, match=re.escape(f"{f}:3: malformed JSON (Expecting value)") + "$"):
        P.read_records(f)
    # items that share a line (json.dump without indent) are also named by their position in the array
    f.write_text(json.dumps([{"instruction": "i", "output": "o"}, {"instruction": "j", "output": None}]) + "\n")
    assert [n for n, _ in P.read_records(f)] == ["1 (item 1)", "1 (item 2)"]
    with pytest.raises(InputError, match=re.escape(f"{f}:1 (item 2): field 'output' must be a non-empty string")):
        P.read_data(f)
    for text, where in (('[{"instruction": "i", "output": "o"}, {"instruction": }]', "1 (item 2)"), ('[{"x": }, {"y": 1}]', "1 (item 1)"),
                        ('[{"x": 1}, {"y": 2}\n', "2")):  # an array never closed: no item 3 named
        f.write_text(text)
        with pytest.raises(InputError, match=re.escape(f"{f}:{where}: malformed JSON (Expecting value)") + "$"):
            P.read_records(f)
    # one object spread over lines (a dataset wrapped as {"data": [...]}, pretty-printed) is valid JSON, but not this layout
    f.write_text(json.dumps({"data": [{"instruction": "i", "output": "o"}]}, indent=2))
    with pytest.raises(InputError, match=re.escape(f"{f}:1: malformed JSON (Expecting property name enclosed in double quotes) "
                                                   "(one object per line, or one JSON array)")):
        P.read_records(f)
    # even one stray character after the array is refused, not dropped unread
    f.write_text('[{"instruction": "i", "output": "o"}]x')
    with pytest.raises(InputError, match=re.escape(f"{f}:1: more after the JSON array that ends on line 1")):
        P.read_records(f)
    # JSONL: a line of only whitespace is a blank line; U+2028 inside a string does not end a line (no splitlines())
    f.write_text('{"instruction": "a\u2028b", "output": "o"}\n  \t\n{"instruction": "c", "output": "d"}\n', encoding="utf-8")
    assert P.read_records(f) == [(1, {"instruction": "a\u2028b", "output": "o"}), (3, {"instruction": "c", "output": "d"})]
    # a lone low surrogate is refused like a lone high one
    f.write_text('{"instruction": "a \\udc00 b", "output": "o"}\n')
    with pytest.raises(InputError, match=re.escape(f"{f}:1: a lone UTF-16 surrogate")):
        P.read_records(f)
    # a file of only whitespace is empty, not zero records
    f.write_text(" \n\t\n")
    with pytest.raises(InputError, match=re.escape(f"{f}:1: file is empty")):
        P.read_records(f)


def test_read_records_array_cut_short_after_an_item_names_no_item_past_the_end(tmp_path):
    # a download cut off after an item, without a final newline: the error is at the end of the file, where no
    # item 3 begins, so only the line is named (as with a final newline); an error inside an item is still by position
    f = tmp_path / "in.json"
    for text, where in (('[{"x": 1}, {"y": 2}', "1"), ('[{"x": 1}, {"y": 2}, ', "1"), ('[{"x": 1}, {"y": }]', "1 (item 2)")):
        f.write_text(text)
        with pytest.raises(InputError, match=re.escape(f"{f}:{where}: malformed JSON (Expecting value)") + "$"):
            P.read_records(f)


def test_oasst_path_skips_deleted_replies_trailing_prompts_and_orphans(tmp_path):
    # a deleted reply is never followed however well ranked; a path ending in two prompter messages drops both
    # (a conversation ends with an answer); in the flat table only parent_id null starts a conversation, so
    # messages whose parent is not in the file (a partial export) are not made into conversations of their own: counted
    qa = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    tree = {"prompt": msg("prompter", "Q", replies=[
        msg("assistant", "deleted", rank=0, deleted=True),
        msg("assistant", "A", rank=1, replies=[msg("prompter", "Q2", replies=[msg("prompter", "Q3")])])])}
    assert convert("oasst", write(tmp_path / "trees.jsonl", [json.dumps(tree)])) == [qa]
    rows = [{"message_id": "q", "role": "prompter", "text": "Q"},  # no parent_id at all: a root, as null is
            {"message_id": "a", "parent_id": "q", "role": "assistant", "text": "A"},
            {"message_id": "x", "parent_id": "not in this file", "role": "prompter", "text": "orphan Q"},
            {"message_id": "y", "parent_id": "x", "role": "assistant", "text": "orphan A"}]
    skipped = Counter()
    assert convert("oasst", write(tmp_path / "messages.jsonl", [json.dumps(r) for r in rows]), skipped=skipped) == [qa]
    assert skipped == {"messages whose parent is not in the file, and their replies": 1}
    # a deleted or blank first prompt starts no conversation (counted); a NaN rank (pandas' missing one) ranks last
    trees = [{"prompt": msg("prompter", "spam", deleted=True, replies=[msg("assistant", "A")])},
             {"prompt": msg("prompter", " \n", replies=[msg("assistant", "A")])},
             {"prompt": msg("prompter", "Q", replies=[msg("assistant", "unranked", rank=math.nan), msg("assistant", "A", rank=0)])}]
    skipped = Counter()
    assert convert("oasst", write(tmp_path / "gone.jsonl", [json.dumps(t) for t in trees]), skipped=skipped) == [qa]
    assert skipped == {"whose prompt is deleted or blank": 2}


def test_oasst_replies_that_are_not_objects_are_never_chosen(tmp_path):
    # a reply that is no message (null, a bare string, a list) is passed over like a deleted one: the path goes on
    # through the message beside it, with no traceback from reading its fields
    tree = {"prompt": msg("prompter", "Q", replies=[None, "A?", ["A"], msg("assistant", "A", rank=1)])}
    assert convert("oasst", write(tmp_path / "trees.jsonl", [json.dumps(tree)])) == [
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]


def test_convert_self_instruct_tasks_one_example_per_instance(tmp_path):
    # Wang et al. 2023's seed tasks (and their generated ones): an instruction with a list of instances
    task = {"id": "seed_task_1", "name": "antonyms", "instruction": "Relate the pair.", "is_classification": False,
            "instances": [{"input": "Night : Day", "output": "Opposites.", "instruction": "not this"}, {"input": "", "output": "None given."},
                          {"input": "a : b", "output": " "}]}  # a blank output: skipped and counted, as in alpaca
    skipped = Counter()
    assert convert("self_instruct", write(tmp_path / "t.jsonl", [json.dumps(task)]), skipped=skipped) == [
        {"instruction": "Relate the pair.", "input": "Night : Day", "output": "Opposites."},
        {"instruction": "Relate the pair.", "input": "", "output": "None given."}] and sum(skipped.values()) == 1
    skipped = Counter()  # a task without instances is counted too, not lost without a word
    got = convert("self_instruct", write(tmp_path / "t.jsonl", [json.dumps({**task, "instances": []}), json.dumps(task)]), skipped=skipped)
    assert [e["output"] for e in got] == ["Opposites.", "None given."] and skipped == {"with an empty instruction or output": 2}


def test_convert_skips_blank_instructions_and_half_guanaco_texts(tmp_path):
    src = write(tmp_path / "a.jsonl", [GOOD_ALPACA, json.dumps({"instruction": " \n", "output": "o"})])
    skipped = Counter()  # an instruction of only whitespace is as empty as ""
    assert convert("alpaca", src, skipped=skipped) == [json.loads(GOOD_ALPACA)] and sum(skipped.values()) == 1
    # a Guanaco text is read as training reads it: turns that alternate from a human one, ending with an answer. One that
    # training would refuse is left out and counted by why, as empty Alpaca records are (training on it refuses the file)
    good = "Be brief.### Human: a### Assistant: b"  # a preamble, kept
    for text, why in (("### Human: a, and no answer", "the conversation must end with an assistant reply"),
                      ("### Assistant: b### Human: a### Assistant: c", "field 'text' must alternate '### Human:' and '### Assistant:'"),
                      ("### Human: a### Human: b### Assistant: c", "field 'text' must alternate"),
                      ("### Human: a### Assistant: b### Assistant: c", "field 'text' must alternate"),  # any turn, not only the first two
                      ("Intro### Assistant: b", "field 'text' must alternate"), (" ", "field 'text' must be a non-empty string"),
                      ("### Human: a### Assistant: \n ", "field 'text' has an empty '### Assistant:' turn"),  # a message content
                      ("### Human: ### Assistant: b", "field 'text' has an empty '### Human:' turn")):  # must not be blank either
        src, skipped = write(tmp_path / "g.jsonl", [json.dumps({"text": text}), json.dumps({"text": good})]), Counter()
        assert convert("guanaco", src, skipped=skipped) == [{"text": good}]
        assert len(skipped) == 1 and next(iter(skipped)).startswith(why) and sum(skipped.values()) == 1
        with pytest.raises(InputError, match=re.escape(f"{src}:1: {why}")):
            read_data(src)
    src = write(tmp_path / "g.jsonl", [json.dumps({"text": t}) for t in ("### Human: a", "### Human: a### Human: b", good)])
    r = run_prepare("guanaco", src, tmp_path / "out.jsonl")  # reasons hold commas: told apart by semicolons
    assert r.stdout == (f"wrote 1 examples to {tmp_path / 'out.jsonl'}, skipped 2 (1 the conversation must end with an assistant "
                        "reply; 1 field 'text' must alternate '### Human:' and '### Assistant:' turns, a human's first)\n"), r.stderr
    # nothing left: the error counts every reason, not only the first
    src = write(tmp_path / "g.jsonl", [json.dumps({"text": t}) for t in ("### Human: a", "Intro### Assistant: b", "### Human: c")])
    with pytest.raises(InputError, match=re.escape(f"{src}: no examples left to write; 2 skipped: the conversation must end with "
                                                   "an assistant reply; 1 skipped: field 'text' must alternate")):
        convert("guanaco", src)


def test_segments_blank_content_missing_input_and_leading_whitespace():
    # whitespace-only content is refused like empty content (nothing to train on)
    with pytest.raises(InputError, match=re.escape("f:1: messages[1]: field 'content' must be a non-empty string")):
        P.segments({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " \n"}]}, "f:1")
    with pytest.raises(InputError, match=re.escape("f:1: field 'output' must be a non-empty string")):
        P.segments({"instruction": "Say hi.", "output": "\t"}, "f:1")
    # a missing "input", like an input of only whitespace, takes the template without the input section
    no_input = P.segments({"instruction": "Say hi.", "input": "", "output": "Hi"}, "f:1")
    assert P.segments({"instruction": "Say hi.", "output": "Hi"}, "f:1") == no_input
    assert P.segments({"instruction": "Say hi.", "input": " \n", "output": "Hi"}, "f:1") == no_input
    # tatsu-lab/alpaca's records also hold the whole formatted example as "text": read as the Alpaca example they are
    assert P.segments({"instruction": "Say hi.", "output": "Hi", "text": "Below is an instruction ... Hi"}, "f:1") == no_input
    # "output" is what makes a record with a text Alpaca's (without an instruction: refused, not read by its text);
    # "messages" comes before both
    with pytest.raises(InputError, match="^f:1: field 'instruction' must be a non-empty string$"):
        P.segments({"text": "### Human: a### Assistant: b", "output": "b"}, "f:1")
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    assert P.segments({**chat, "output": "c"}, "f:1") == P.segments(chat, "f:1")
    # only whitespace before the first "### Human:" is no segment; a conversation ending in a question is refused
    assert P.segments({"text": " \n### Human: a### Assistant: b"}, "f:1")[0] == ("### Human: a### Assistant: ", False)
    # the turns lose the whitespace around them on both sides, as the messages they are would have none
    assert P.segments({"text": "### Human:  a \n### Assistant: b \n### Human: c### Assistant:\td\n"}, "f:1") == [
        ("### Human: a### Assistant: ", False), ("b", True), ("### Human: c### Assistant: ", False), ("d", True)]
    with pytest.raises(InputError, match="f:1: the conversation must end with an assistant reply"):
        P.segments({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                 {"role": "user", "content": "c"}]}, "f:1")


def test_batch_order_seed_and_epoch_do_not_collide_and_micro_batches_are_shuffled():
    lengths = list(range(1000))
    # (seed 0, epoch 1) and (seed 1, epoch 0) are different runs: their orders differ
    assert P.batch_order(lengths, 1, 4, seed=0) != P.batch_order(lengths, 0, 4, seed=1)
    # sorted by length within windows, but the micro-batches are then shuffled: no short-to-long curriculum
    maxes = [max(lengths[i] for i in mb) for mb in P.batch_order(lengths, 0, 4, seed=0)]
    assert maxes[1:65] != sorted(maxes[1:65])


@pytest.mark.parametrize("group_by_length", [True, False])
def test_each_epoch_starts_with_its_longest_micro_batch(group_by_length):
    # as transformers' LengthGroupedSampler: a run too long for memory fails at its first step
    lengths = (torch.randperm(203, generator=torch.Generator().manual_seed(2)) + 1).tolist()  # 203: the longest may sit out
    for epoch in range(4):
        mbs = P.batch_order(lengths, epoch, 4, seed=0, group_by_length=group_by_length)
        kept = [i for mb in mbs for i in mb]
        assert max(lengths[i] for i in mbs[0]) == max(lengths[i] for i in kept) and len(kept) == len(set(kept)) == 200


def test_prepare_refuses_more_than_three_words(tmp_path):
    with pytest.raises(InputError, match="expected 3 arguments, got 4"):
        P.main(["alpaca", str(tmp_path / "in.json"), str(tmp_path / "out.jsonl"), "extra"])
    assert not (tmp_path / "out.jsonl").exists()


def torch_style_enospc(f):  # how older torch.save reports a full disk: a RuntimeError raised while handling the OSError
    try:
        enospc(f)
    except OSError:
        raise RuntimeError("unexpected pos 704 vs 598")


def test_disk_full_message_sizes_and_a_full_disk_under_another_error(tmp_path):
    for write, size, need in ((enospc, 0, ""), (enospc, 999, " (needs ~1 kB)"), (enospc, 1_000_000, " (needs ~1 MB)"),
                              (torch_style_enospc, 2_000_000, " (needs ~2 MB)")):
        with pytest.raises(InputError) as e:
            atomic_write(tmp_path / "f", write, size)
        assert str(e.value) == f"no space left on device writing {tmp_path / 'f'}{need}"
        assert list(tmp_path.iterdir()) == []


def test_disk_full_message_counts_the_tensors_inside_lists_and_tuples(tmp_path, monkeypatch):
    # a checkpoint's optimizer state and rng states keep tensors in lists and tuples: they count toward the size said
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    target, real_open = tmp_path / "ckpt.pt", os.open
    monkeypatch.setattr(os, "open", lambda p, *a: real_open("/dev/full", os.O_WRONLY) if p == tmp_path / ".ckpt.pt.tmp" else real_open(p, *a))
    ck = {"rng": [torch.zeros(250_000), 5], "groups": ({"w": torch.zeros(250_000)}, [(torch.zeros(250_000),)]), "iter": 3}
    with pytest.raises(InputError) as e:
        atomic_save(ck, target)
    assert str(e.value) == f"no space left on device writing {target} (needs ~3 MB)"


def test_locked_dir_pid_reuse_of_a_folder_and_cleanup(tmp_path):
    d = tmp_path / "o"
    d.mkdir()
    (d / ".lock").write_text("99999999999")  # left by a killed run, longer than our pid: rewritten, not overwritten in part
    with locked_dir(d) as got:
        assert got == d and (d / ".lock").read_text() == str(os.getpid())
        with pytest.raises(InputError, match=re.escape(f"--out_dir {d}: in use by another run (pid {os.getpid()})")):
            with locked_dir(d):
                pass
    assert d.is_dir() and not any(d.iterdir())  # a folder that existed before stays, empty, without the lock file
    with locked_dir(tmp_path / "new") as n:
        (n / "adapter.pt").write_bytes(b"x")
    assert [p.name for p in n.iterdir()] == ["adapter.pt"]  # a folder made here and written to stays
    with locked_dir(tmp_path / "empty"):
        pass
    assert not (tmp_path / "empty").exists()  # a folder made here and left empty is removed
    with locked_dir(tmp_path / "runs" / "a" / "b"):  # --out_dir runs/a/b, none of them there: all three made
        (tmp_path / "runs" / "keep").write_text("x")  # written into while the run went on: stays
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["keep"]
    with locked_dir(tmp_path / "x" / "y" / "z"):
        pass
    assert not (tmp_path / "x").exists()
    (tmp_path / "pre").mkdir()  # there before, empty: not ours to remove, however it is spelled
    for spelled in (tmp_path / "pre" / "q", tmp_path / "gone" / ".." / "pre"):
        with locked_dir(spelled):
            pass
        assert (tmp_path / "pre").is_dir() and not (tmp_path / "gone").exists() and not (tmp_path / "pre" / "q").exists()
    (tmp_path / "pre" / ".lock").symlink_to(tmp_path / "precious")  # a link where the lock goes: not written through
    (tmp_path / "precious").write_text("the user's")
    with pytest.raises(InputError, match=re.escape(f"--out_dir {tmp_path / 'pre'}: its .lock is a link: remove it")):
        with locked_dir(tmp_path / "pre"):
            pass
    assert (tmp_path / "precious").read_text() == "the user's" and (tmp_path / "pre" / ".lock").is_symlink()


def test_locked_dir_says_the_os_error_for_a_link_loop_above_the_lock(tmp_path):
    # only a link at out_dir/.lock itself is "its .lock is a link": a loop further up --out_dir's path (which the same
    # errno reports) is the OS's words, so that the user looks where the fault is
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(InputError, match=re.escape(f"--out_dir {tmp_path / 'loop' / 'out'}: cannot write there (Too many levels of symbolic links)") + "$"):
        with locked_dir(tmp_path / "loop" / "out"):
            pass
    assert [p.name for p in tmp_path.iterdir()] == ["loop"] and (tmp_path / "loop").is_symlink()


def test_locked_dir_refuses_a_lock_file_its_holder_removed_between_our_open_and_our_lock(tmp_path, monkeypatch):
    # the run holding the folder ends (removing .lock) after our open and before our lock: the file we would lock is
    # gone from the folder, and a third run may hold a new .lock there, so the folder is in use; a holder that had not
    # written its pid yet is shown as "?"
    d = tmp_path / "o"
    d.mkdir()
    (d / ".lock").write_text("")
    real_flock = fcntl.flock

    def holder_ends_first(fd, op):
        (d / ".lock").unlink(missing_ok=True)
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", holder_ends_first)
    with pytest.raises(InputError, match=re.escape(f"--out_dir {d}: in use by another run (pid ?); wait for it or choose another --out_dir")):
        with locked_dir(d):
            pass
    assert d.is_dir() and not any(d.iterdir())


def test_locked_dir_in_use_names_the_folder_as_given(tmp_path):
    # --out_dir through a link: the message names what the user typed, not the folder the link resolves to
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with locked_dir(tmp_path / "link"):
        with pytest.raises(InputError) as e:
            with locked_dir(tmp_path / "link"):
                pass
    assert str(e.value) == (f"--out_dir {tmp_path / 'link'}: in use by another run (pid {os.getpid()}); wait for it or choose "
                            "another --out_dir")
    assert (tmp_path / "link").is_symlink() and not any((tmp_path / "real").iterdir())


def test_run_turns_ctrl_c_into_its_own_line_and_exit_130(capsys):
    # the interrupt's own message (where it stopped, what is kept), or "interrupted" when it has none; exit status 130
    for args, err in ((("interrupted at iter 4; --resume continues",), "interrupted at iter 4; --resume continues\n"),
                      ((), "interrupted\n"), (("last checkpoint: o\nut/ckpt.pt",), "last checkpoint: o\\nut/ckpt.pt\n")):  # still one line
        def stop(argv, args=args):
            raise KeyboardInterrupt(*args)
        with pytest.raises(SystemExit) as e:
            files_run(stop)
        assert e.value.code == 130 and capsys.readouterr().err == err


def test_parse_flags_forms(capsys):
    d = {"lr": 1.0, "compile": False, "name": "x", "n": 3}
    assert parse_flags(["a", "--lr=0.5", "--compile", "--name", "y", "b"], d, "") == (["a", "b"], {"lr": 0.5, "compile": True, "name": "y"})
    assert parse_flags(["--compile", "--n", "4"], d, "")[1] == {"compile": True, "n": 4}  # a bool flag alone, then another flag
    assert parse_flags(["--compile", "0", "--n=5"], d, "")[1] == {"compile": False, "n": 5}
    assert parse_flags(["--compile=no", "--name=--x"], d, "")[1] == {"compile": False, "name": "--x"}
    with pytest.raises(InputError, match="flag --name needs a value"):
        parse_flags(["--name", "--n", "4"], d, "")
    with pytest.raises(InputError, match="--compile: expected bool, got 'maybe'"):
        parse_flags(["--compile=maybe"], d, "")
    for h in ("-h", "--help"):
        with pytest.raises(SystemExit) as e:
            parse_flags(["--lr", "2", h], d, "the help")
        assert e.value.code == 0 and capsys.readouterr().out == "the help\n"
    assert parse_flags(["--name", "-h", "a"], d, "the help") == (["a"], {"name": "-h"})  # a value: `--prompt -h` asks about -h


def test_parse_flags_reads_true_and_false_words_in_any_case():
    d = {"compile": False, "quantize": True}
    for words, want in ((("True", "FALSE"), (True, False)), (("YES", "No"), (True, False)), (("tRuE", "0"), (True, False))):
        got = parse_flags([f"--compile={words[0]}", "--quantize", words[1]], d, "")[1]
        assert (got["compile"], got["quantize"]) == want


def test_parse_flags_names_an_unknown_flag_as_written():
    d = {"lr": 1.0, "compile": False}
    for arg in ("--colour", "--colour=red", "--lr2=3"):
        with pytest.raises(InputError) as e:
            parse_flags(["--lr", "2", arg, "x"], d, "")
        assert str(e.value) == f"unknown flag {arg} (flags: --lr, --compile)"
    with pytest.raises(InputError) as e:
        parse_flags(["--lr", "2", "x"], d, "", words_ok=False)
    assert str(e.value) == "unexpected argument 'x': flags are --name value (see --help)"


def test_parse_flags_a_number_flag_left_without_its_value_is_refused_not_read_as_true():
    # only a bool flag alone means true: a number flag last, or followed by another flag, lacks its value
    d = {"lr": 1.0, "n": 3, "compile": False}
    for argv, key in ((["--n"], "n"), (["--compile", "--lr"], "lr"), (["--lr", "--compile"], "lr")):
        with pytest.raises(InputError) as e:
            parse_flags(argv, d, "")
        assert str(e.value) == f"flag --{key} needs a value (one that starts with -- is written --{key}=VALUE)"
    assert parse_flags(["--n=4", "--compile"], d, "")[1] == {"n": 4, "compile": True}


def test_flag_help_reads_every_name_of_a_config_line(tmp_path):
    src = tmp_path / "cfg.py"
    src.write_text("lr = 3e-4  # the learning rate\nbeta1, beta2 = 0.9, 0.999  # AdamW's moment decay rates\nquiet = 1\n")
    lines = flag_help(src, {"lr": 3e-4, "beta1": 0.9, "beta2": 0.999, "quiet": 1}).splitlines()
    assert [l.split(None, 2) for l in lines] == [["--lr", "0.0003", "the learning rate"], ["--beta1", "0.9", "AdamW's moment decay rates"],
                                                 ["--beta2", "0.999", "AdamW's moment decay rates"], ["--quiet", "1"]]


@pytest.mark.parametrize("files,error", [
    ({"dev/x_dev.csv": "q,a,b,c,d,A\n", "val/x_val.csv": "q,a,b,c,d,A,extra\n"}, "x_val.csv:1: expected 6 fields (question,A,B,C,D,answer), got 7"),
])
def test_mmlu_csv_with_too_many_fields_is_one_line(tmp_path, files, error):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises(InputError, match=re.escape(error)):
        MM.read_mmlu(tmp_path)


def test_mmlu_answer_spaces_and_subjects_in_name_order(tmp_path, monkeypatch):
    for s in ("b", "a"):
        (tmp_path / "dev").mkdir(exist_ok=True)
        (tmp_path / "val").mkdir(exist_ok=True)
        (tmp_path / f"dev/{s}_dev.csv").write_text("q,a,b,c,d, C \n")
        (tmp_path / f"val/{s}_val.csv").write_text("q,a,b,c,d,B \n")
    real_glob = Path.glob  # the folder's listing in reverse: subjects still come in name order, whatever the file system says
    monkeypatch.setattr(Path, "glob", lambda self, pattern: sorted(real_glob(self, pattern), reverse=True))
    qs = MM.read_mmlu(tmp_path)
    assert [(q["subject"], q["answer"]) for q in qs] == [("a", 1), ("b", 1)]  # an answer letter padded with spaces is read
    assert qs[0]["shots"] == ["q\nA. a\nB. b\nC. c\nD. d\nAnswer: C\n\n"]


def test_mmlu_csv_with_mac_line_ends_and_a_field_over_csvs_limit(tmp_path):
    # CR alone ends a line too (old Mac exports): read row by row, a quoted CR kept, rows still named by their line
    f = tmp_path / "x_val.csv"
    f.write_bytes(b'1+1?,1,2,3,4,B\r"Two\rlines?",yes,no,maybe,never,A\r')
    assert MM.read_csv(f) == [("1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:", 1), ("Two\rlines?\nA. yes\nB. no\nC. maybe\nD. never\nAnswer:", 0)]
    f.write_bytes(b'1+1?,1,2,3,4,B\r"Two\rlines?",yes,no,maybe,never,A\rq,a,b\r')
    with pytest.raises(InputError, match=re.escape(f"{f}:4: expected 6 fields (question,A,B,C,D,answer), got 3") + "$"):
        MM.read_csv(f)
    # what csv itself refuses (a field over its 131072 characters: a broken quote swallowing the file) is one line too
    f.write_text("q,a,b,c,d,A\n" + "x" * 140_000 + ",a,b,c,d,A\n")
    with pytest.raises(InputError, match=re.escape(f"{f}:2: cannot read (field larger than field limit (131072))") + "$"):
        MM.read_csv(f)


def test_mmlu_json_of_another_split_and_the_first_questions_of_each_subject_wherever_they_sit(tmp_path):
    # --mmlu_split test reads five_shot_mmlu_test.json even beside a val file; a file that interleaves subjects keeps
    # the first max_per_subject of each subject in file order, subjects in name order (as the CSV folders give them)
    rec = lambda s, i: json.dumps({"subject": s, "input": f"{s} {i}\nAnswer:", "output": "ABCD"[i % 4]})  # noqa: E731
    write(tmp_path / "five_shot_mmlu_val.json", [rec("val_only", 0)])
    write(tmp_path / "five_shot_mmlu_test.json", [rec("b", 0), rec("a", 0), rec("b", 1), rec("a", 1), rec("b", 2), rec("a", 2)])
    assert [q["question"] for q in MM.read_mmlu(tmp_path)] == ["val_only 0\nAnswer:"]
    assert [(q["subject"], q["answer"]) for q in MM.read_mmlu(tmp_path, "test")] == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)]
    assert [q["question"] for q in MM.read_mmlu(tmp_path, "test", max_per_subject=2)] == [
        "a 0\nAnswer:", "a 1\nAnswer:", "b 0\nAnswer:", "b 1\nAnswer:"]


def test_mmlu_a_folder_named_like_the_json_file_is_passed_over_for_the_csvs(tmp_path, mmlu_dirs):
    # five_shot_mmlu_val.json is read where it is a file; a folder of that name beside dev/ and val/ is not it
    shutil.copytree(mmlu_dirs[0], tmp_path / "mmlu")
    (tmp_path / "mmlu" / "five_shot_mmlu_val.json").mkdir()
    assert MM.read_mmlu(tmp_path / "mmlu") == MM.read_mmlu(mmlu_dirs[0])


def test_mmlu_cut_prompts_counted_and_summarized(mmlu_dirs, mmlu_tok):
    class Flat(torch.nn.Module):  # every letter equally likely: argmax picks "A"
        def forward(self, idx):
            return torch.zeros(*idx.shape, mmlu_tok.n_words), None
    r = MM.evaluate(Flat(), mmlu_tok, MM.read_mmlu(mmlu_dirs[1]), 4, "cpu", 20)  # preprocessed prompts: cut, never dropped
    assert (r["cut_prompts"], r["dropped_shots"], r["predictions"]) == (10, 0, ["A"] * 10)
    assert MM.summary(3, "val", r).endswith(" s, 10 prompts cut)")


def test_mmlu_letters_must_follow_answer_unchanged_and_be_distinct():
    class Tok:  # "Answer:" then a letter: "Answer: " + c, spelled by the table below
        path = "t.model"

        def __init__(self, table):
            self.table = table

        def encode(self, s, bos=False, eos=False):
            return self.table[s]
    merged = {"Answer:": [7], **{f"Answer: {c}": [8, 10 + i] for i, c in enumerate("ABCD")}}  # the letter changes "Answer:"'s tokens
    shared = {"Answer:": [7], **{f"Answer: {c}": [7, 10 + min(i, 2)] for i, c in enumerate("ABCD")}}  # C and D one token
    for table in (merged, shared):
        with pytest.raises(InputError, match=r"t\.model: 'A'\.\.'D' after 'Answer:' are not four distinct single tokens"):
            MM.letter_ids(Tok(table))
    assert MM.letter_ids(Tok({"Answer:": [7], **{f"Answer: {c}": [7, 10 + i] for i, c in enumerate("ABCD")}})) == [10, 11, 12, 13]


# ---------------------------------------------------------------------------------------------------
# data/files.py: every write goes through atomic_write (fsync, rename, fsync; a full disk is one line)

def test_atomic_write_fsyncs_the_file_then_renames_then_fsyncs_the_folder(tmp_path, monkeypatch):
    target, calls = tmp_path / "f.bin", []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        kind = "folder" if stat.S_ISDIR(st.st_mode) else ("file", st.st_size, (tmp_path / ".f.bin.tmp").read_bytes())
        calls.append(("fsync", kind))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", Path(src).name, Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_bytes(target, b"x" * 10_000)
    # the data is on disk under the temporary name before the rename; the rename is on disk after the folder's fsync
    assert calls == [("fsync", ("file", 10_000, b"x" * 10_000)), ("replace", ".f.bin.tmp", "f.bin"), ("fsync", "folder")]
    assert target.read_bytes() == b"x" * 10_000


def test_atomic_write_refuses_what_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "folder").mkdir()
    for name in ("pipe", "folder"):
        with pytest.raises(InputError, match=f"{tmp_path / name}: exists and is not a regular file"):
            atomic_write_bytes(tmp_path / name, b"x")
    assert stat.S_ISFIFO(os.stat(tmp_path / "pipe").st_mode) and not any((tmp_path / "folder").iterdir())
    # a link planted at the temporary name (.NAME.tmp, in a shared folder) is removed, never written through; a leftover replaced
    (tmp_path / "victim").write_text("theirs")
    (tmp_path / ".out.bin.tmp").symlink_to(tmp_path / "victim")
    atomic_write_bytes(tmp_path / "out.bin", b"ours")
    assert (tmp_path / "victim").read_text() == "theirs" and (tmp_path / "out.bin").read_bytes() == b"ours"
    assert not (tmp_path / "out.bin").is_symlink() and not os.path.lexists(tmp_path / ".out.bin.tmp")
    (tmp_path / "file").write_text("")  # any other OSError names the target (not its temporary file)
    with pytest.raises(InputError, match=re.escape(f"cannot write {tmp_path / 'file' / 'x'} (Not a directory)")):
        atomic_write_bytes(tmp_path / "file" / "x", b"x")
    # a link is refused, the link and its target untouched: /dev/stdout -> /proc/self/fd/1 (and /dev/fd/1) is a stream, even
    # when it goes to a file: renaming over the link replaced the machine's /dev/stdout, renaming over its target would lose
    # what a shell appends to (`>> all.jsonl`); an ordinary link, a link to a pipe, a dangling link, a loop: the same
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "t.jsonl").write_text("old")
    with open(tmp_path / "held.jsonl", "a") as held:
        held.write("kept\n")
        held.flush()
        links = {"stdout": f"/proc/self/fd/{held.fileno()}", "l.jsonl": tmp_path / "d" / "t.jsonl", "p": tmp_path / "pipe",
                 "gone": tmp_path / "d" / "new.jsonl", "loop": tmp_path / "loop"}
        for link, to in links.items():
            (tmp_path / link).symlink_to(to)
            with pytest.raises(InputError, match=re.escape(f"{tmp_path / link}: exists and is not a regular file (a link: name its target)")):
                atomic_write_bytes(tmp_path / link, b"x")
        with pytest.raises(InputError, match=re.escape(f"/proc/self/fd/{held.fileno()}: exists and is not a regular file (a link")):
            atomic_write_bytes(f"/proc/self/fd/{held.fileno()}", b"x")
    assert (tmp_path / "held.jsonl").read_text() == "kept\n" and all((tmp_path / n).is_symlink() for n in links)
    assert {p.name: p.read_text() for p in (tmp_path / "d").iterdir()} == {"t.jsonl": "old"} and stat.S_ISFIFO(os.stat(tmp_path / "pipe").st_mode)


def test_atomic_write_creates_its_temporary_file_afresh_with_the_usual_permissions(tmp_path, monkeypatch):
    # a link planted at .NAME.tmp between the removal of a leftover and the open (another user of a shared folder) is
    # never written through: the temporary file is one this call creates, or the write fails naming the target
    (tmp_path / "victim").write_text("theirs")
    tmp, real_open = tmp_path / ".out.bin.tmp", os.open

    def racing_open(path, flags, *a):
        if Path(path) == tmp and not os.path.lexists(tmp):
            tmp.symlink_to(tmp_path / "victim")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", racing_open)
    with pytest.raises(InputError, match=re.escape(f"cannot write {tmp_path / 'out.bin'} (File exists)") + "$"):
        atomic_write_bytes(tmp_path / "out.bin", b"ours")
    assert (tmp_path / "victim").read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["victim"]
    monkeypatch.setattr(os, "open", real_open)
    # the file gets open()'s permissions under the umask, as any file the user writes (an adapter shared with a group)
    old = os.umask(0o002)
    try:
        atomic_write_bytes(tmp_path / "shared.bin", b"x")
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "private.bin", b"x")
    finally:
        os.umask(old)
    assert [stat.S_IMODE(os.stat(tmp_path / n).st_mode) for n in ("shared.bin", "private.bin")] == [0o664, 0o600]


def test_run_turns_an_os_error_into_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        files_run(lambda argv: open(tmp_path))  # e.g. a folder where the output file goes
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {tmp_path}: Is a directory\n"


def test_run_shows_an_os_error_that_names_no_file_in_its_own_words(capsys):
    # an OSError that carries no file name (a failing disk read, a socket): the OS's message as it is, not "None: ..."
    def fail(argv):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    with pytest.raises(SystemExit) as e:
        files_run(fail)
    assert e.value.code == 2 and capsys.readouterr().err == f"error: [Errno {errno.EIO}] {os.strerror(errno.EIO)}\n"


def enospc(f):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def edquot(f):
    f.write(b"partial")
    raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))


@pytest.mark.parametrize("how", ["dev_full_torch", "dev_full_bytes", "enospc", "edquot"])
def test_disk_full_keeps_the_old_file_and_leaves_no_tmp(tmp_path, monkeypatch, how):
    target, tmp = tmp_path / "ckpt.pt", tmp_path / ".ckpt.pt.tmp"
    target.write_bytes(b"the last good checkpoint")
    if how.startswith("dev_full"):
        if not os.path.exists("/dev/full"):
            pytest.skip("no /dev/full")
        real_open = os.open  # every write to the temporary file fails with ENOSPC, as on a full disk
        monkeypatch.setattr(os, "open", lambda p, *a: real_open("/dev/full", os.O_WRONLY) if p == tmp else real_open(p, *a))
    with pytest.raises(InputError) as e:
        if how == "dev_full_torch":  # torch.save reports it as a RuntimeError ("unexpected pos ...") on top of the OSError
            atomic_save({"lora": torch.zeros(3, 1_000_000), "iter": 5}, target)  # 12 MB of float32
        elif how == "dev_full_bytes":  # the tokenizer cache's path
            atomic_write_bytes(target, b"t" * 250_000)
        else:
            atomic_write(target, enospc if how == "enospc" else edquot, 7_500_000)
    need = {"dev_full_torch": "12 MB", "dev_full_bytes": "250 kB"}.get(how, "8 MB")
    assert str(e.value) == f"no space left on device writing {target} (needs ~{need})"
    assert target.read_bytes() == b"the last good checkpoint" and not os.path.lexists(tmp) and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("exc", [KeyboardInterrupt, ValueError])
def test_interrupted_or_failed_write_keeps_the_old_file(tmp_path, exc):
    target = tmp_path / "adapter.pt"
    target.write_bytes(b"old")

    def write(f):
        f.write(b"half of the new")
        raise exc("stop")

    with pytest.raises(exc):  # anything but a full disk goes through unchanged
        atomic_write(target, write)
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


# ---------------------------------------------------------------------------------------------------
# data/prepare.py: templates, masking, truncation, batching; converters of public datasets; the sample files

class CharTok:  # a transparent tokenizer for masking tests: one id per character
    bos_id, eos_id = 1, 2

    def encode(self, s):
        return [3 + ord(c) % 200 for c in s]


def test_alpaca_template_is_the_papers():
    segs = P.segments({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}, "f:1")
    assert segs == [("Below is an instruction that describes a task, paired with an input that provides further context. "
                     "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n"
                     "### Input:\n2 and 3\n\n### Response: ", False), ("5", True)]
    segs = P.segments({"instruction": "Say hi.", "input": "", "output": "Hi"}, "f:1")
    assert segs[0][0] == ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                          "request.\n\n### Instruction:\nSay hi.\n\n### Response: ")


def test_oasst_text_and_messages_formats():
    segs = P.segments({"text": "### Human: Hi there### Assistant: Hello!### Human: 2+2?### Assistant: 4"}, "f:1")
    assert [s for s, r in segs if r] == ["Hello!", "4"]
    assert "".join(s for s, _ in segs) == "### Human: Hi there### Assistant: Hello!### Human: 2+2?### Assistant: 4"
    segs = P.segments({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                                    {"role": "assistant", "content": "Bye!"}]}, "f:1")
    assert segs == [("Be brief.\n", False), ("### Human: Hi### Assistant: ", False), ("Hello", True),
                    ("### Human: Bye### Assistant: ", False), ("Bye!", True)]


def test_labels_mask_everything_but_responses():
    items = [("f:1", [("ab", False), ("cd", True), ("e", False), ("fg", True)])]
    ((ids, labels),), _ = P.tokenize(items, CharTok(), 100, 100)
    tok = CharTok()
    assert ids == [1] + tok.encode("ab") + tok.encode("cd") + [2] + tok.encode("e") + tok.encode("fg") + [2]
    assert labels == [-100] * 3 + tok.encode("cd") + [2] + [-100] + tok.encode("fg") + [2]
    ((_, labels),), _ = P.tokenize(items, CharTok(), 100, 100, train_on_source=True)
    assert labels == [-100] + ids[1:]  # everything but bos


def test_truncation_limits_keep_every_example():
    ex, truncated = P.tokenize([("f:1", [("abcdef", False), ("xyz", True)]), ("f:2", [("ab", False), ("", True)])],
                               CharTok(), source_max_len=3, target_max_len=2)
    ids, labels = ex[0]
    assert len(ids) == 3 + 2 and labels[-2:] == CharTok().encode("xy")  # bos counts in the prompt's 3; eos cut with the response tail
    assert ids[:3] == [1] + CharTok().encode("ab")
    assert truncated == 1 and ex[1] == ([1] + CharTok().encode("ab") + [2], [-100] * 3 + [2])  # an empty response: eos is learned
    # a prompt that fills the whole budget still leaves target_max_len tokens of its response
    ((ids, labels),), truncated = P.tokenize([("f:1", [("a" * 50, False), ("xyz", True)])], CharTok(), 4, 1)
    assert truncated == 1 and len(ids) == 5 and labels == [-100] * 4 + CharTok().encode("x")


def test_conversation_cut_ends_with_the_cut_turns_response():
    segs = [("Q1", False), ("A1", True), ("QQQQQQ2", False), ("A2", True), ("Q3", False), ("A3", True)]
    ((ids, labels),), truncated = P.tokenize([("f:1", segs)], CharTok(), source_max_len=6, target_max_len=100)
    tok = CharTok()
    # the prompt budget (bos counted) runs out inside turn 2: keep its cut prompt and its answer, drop turn 3
    assert ids == [1] + tok.encode("Q1") + tok.encode("A1") + [2] + tok.encode("QQQ") + tok.encode("A2") + [2]
    assert truncated == 1
    # it runs out exactly after turn 1: turn 2's prompt keeps nothing, so its answer is not trained right after A1's eos
    ((ids, labels),), truncated = P.tokenize([("f:1", segs)], CharTok(), source_max_len=3, target_max_len=100)
    assert ids == [1] + tok.encode("Q1") + tok.encode("A1") + [2] and truncated == 1
    # its answers' budget runs out exactly after turn 1: turn 2's prompt is not left dangling (trained under --train_on_source)
    ((ids, labels),), truncated = P.tokenize([("f:1", segs)], CharTok(), source_max_len=100, target_max_len=3, train_on_source=True)
    assert ids == [1] + tok.encode("Q1") + tok.encode("A1") + [2] and labels == [-100] + ids[1:] and truncated == 1
    # a later turn's system message cut: the turn goes whole, system message and all
    sys_segs = [("S1", False), ("Q1", False), ("A1", True), ("SSSS2", False), ("Q2", False), ("A2", True)]
    ((ids, labels),), truncated = P.tokenize([("f:1", sys_segs)], CharTok(), source_max_len=7, target_max_len=100)
    assert ids == [1] + tok.encode("S1Q1A1") + [2] and truncated == 1
    # the first prompt cut to nothing keeps its response (the paper's collator cuts the source alone)
    ((ids, labels),), _ = P.tokenize([("f:1", segs)], CharTok(), source_max_len=1, target_max_len=100)
    assert ids == [1] + tok.encode("A1") + [2]


def test_a_cut_prompt_counts_as_truncated_though_its_answer_fits():
    # only the prompt is cut, its answer fits whole: the example was still truncated (the count train.py reports)
    tok = CharTok()
    ((ids, labels),), truncated = P.tokenize([("f:1", [("abcdef", False), ("xy", True)])], tok, source_max_len=3, target_max_len=100)
    assert ids == [1] + tok.encode("ab") + tok.encode("xy") + [2] and truncated == 1


def test_group_by_length_and_deterministic_order():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 500, (258,), generator=g).tolist()  # not a multiple of the micro-batch

    def padding(mbs):
        assert all(len(mb) == 4 for mb in mbs)
        return sum(max(lengths[i] for i in mb) * 4 - sum(lengths[i] for i in mb) for mb in mbs)

    grouped = P.batch_order(lengths, 0, micro_batch=4, seed=0)
    flat = [i for mb in grouped for i in mb]
    assert len(flat) == len(set(flat)) == 256 and set(flat) <= set(range(258))  # 2 examples sit this epoch out
    assert grouped == P.batch_order(lengths, 0, 4, 0) != P.batch_order(lengths, 1, 4, 0)
    assert padding(grouped) < 0.2 * padding(P.batch_order(lengths, 0, 4, 0, group_by_length=False))


def test_group_by_length_sorts_windows_of_64_micro_batches():
    # 128 examples in micro-batches of 2 fill one window of 64 micro-batches: it is sorted by length as a whole, so each
    # micro-batch holds two neighbours in the length order of all 128 (windows of 64 examples would pair within halves)
    lengths = (torch.randperm(128, generator=torch.Generator().manual_seed(1)) + 100).tolist()
    for seed in range(3):
        mbs = P.batch_order(lengths, 0, micro_batch=2, seed=seed)
        assert sorted(sorted(lengths[i] for i in mb) for mb in mbs) == [[100 + 2 * k, 101 + 2 * k] for k in range(64)]


def test_batch_is_right_padded_and_shifted():
    x, y = P.get_batch([([1, 5, 6, 2], [-100, -100, 6, 2]), ([1, 7, 2], [-100, 7, 2])], [0, 1])
    assert x.tolist() == [[1, 5, 6, 2], [1, 7, 2, 0]]
    assert y.tolist() == [[-100, 6, 2, -100], [7, 2, -100, -100]]  # position t predicts token t + 1


DATA = ROOT / "data"

def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path

def run_prepare(*args):
    return subprocess.run([sys.executable, str(DATA / "prepare.py"), *map(str, args)], capture_output=True, text=True)

def test_a_folder_name_that_is_not_utf8_is_printed_not_a_traceback(tmp_path):
    # under a UTF-8 locale (en_US.UTF-8) Python's stdout refuses the surrogates that stand for such bytes in a path: the
    # converted file was written, then "wrote ... to" was a UnicodeEncodeError; and stdout closed (`>&-`) is None, not a stream
    (d := Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))).mkdir()
    write(d / "in.jsonl", ['{"instruction": "a", "output": "b"}'])
    r = subprocess.run([sys.executable, str(DATA / "prepare.py"), "alpaca", d / "in.jsonl", d / "out.jsonl"], capture_output=True,
                       env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})  # as stdout is under en_US.UTF-8
    assert r.returncode == 0 and r.stdout == b"wrote 1 examples to " + bytes(d) + b"/out.jsonl, skipped 0\n", r.stderr
    r = subprocess.run([sys.executable, str(DATA / "prepare.py"), "--lang"], stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1))
    assert (r.returncode, r.stderr) == (2, b"error: flag --lang needs a value (one that starts with -- is written --lang=VALUE)\n")
    with contextlib.redirect_stdout(io.StringIO()) as s:  # called from Python with a stream of its own (a notebook's, IDLE's)
        files_run(lambda argv: print("hello"))
    assert s.getvalue() == "hello\n"


def test_alpaca_json_array_and_jsonl(tmp_path):
    items = [{"instruction": "Add 2 and 3.", "input": "", "output": "5", "extra": 1},
             {"instruction": "Reverse the words.", "input": "a b", "output": "b a"},
             {"instruction": "Say hi.", "output": "hi"},
             {"instruction": "Empty answer.", "input": "", "output": "  "}]
    want = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
            {"instruction": "Reverse the words.", "input": "a b", "output": "b a"},
            {"instruction": "Say hi.", "input": "", "output": "hi"}]
    array = tmp_path / "alpaca_data.json"
    array.write_text(json.dumps(items, indent=4))
    jsonl = write(tmp_path / "alpaca.jsonl", [json.dumps(x) for x in items])
    skipped = Counter()
    assert convert("alpaca", array, skipped=skipped) == want
    assert sum(skipped.values()) == 1
    assert convert("alpaca", jsonl) == want
    out = tmp_path / "out.jsonl"
    r = run_prepare("alpaca", array, out)
    assert r.returncode == 0 and "wrote 3 examples" in r.stdout and "skipped 1" in r.stdout
    assert [json.loads(line) for line in out.read_text().splitlines()] == want
    assert not list(tmp_path.glob("*.tmp"))

def msg(role, text, rank=None, replies=(), **kw):
    m = {"role": role, "text": text, "replies": list(replies), **kw}
    if rank is not None:
        m["rank"] = rank
    return m

# one tree: the best path is Q -> A0 (rank 0) -> Q2 -> B1 (rank 1, beats an unranked and a blank reply); a second, german
# tree; and a tree whose prompt was never answered
TREE = {"message_tree_id": "t1", "prompt": msg("prompter", "Q", lang="en", replies=[
    msg("assistant", "A2", rank=2),
    msg("assistant", "A0", rank=0, replies=[msg("prompter", "Q2", replies=[
        msg("assistant", "unranked"), msg("assistant", "B1", rank=1), msg("assistant", "B3", rank=3),
        msg("assistant", " \n", rank=0)])]),  # best ranked, but blank: never chosen (train.py refuses an empty turn)
    msg("assistant", "A1", rank=1, replies=[msg("prompter", "not this one", replies=[msg("assistant", "nor this")])]),
])}
DE_TREE = {"message_tree_id": "t2", "prompt": msg("prompter", "Hallo?", lang="de", replies=[msg("assistant", "Hallo!")])}
LONELY = {"message_tree_id": "t3", "prompt": msg("prompter", "Anyone?", lang="en")}
BEST = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A0"},
                     {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "B1"}]}
GERMAN = {"messages": [{"role": "user", "content": "Hallo?"}, {"role": "assistant", "content": "Hallo!"}]}

def test_oasst_trees_follow_best_ranked_path(tmp_path):
    src = write(tmp_path / "trees.jsonl", [json.dumps(t) for t in (TREE, DE_TREE, LONELY)])
    skipped = Counter()
    assert convert("oasst", src, skipped=skipped) == [BEST, GERMAN]
    assert list(skipped.values()) == [1]  # the unanswered prompt
    assert convert("oasst", src, lang="en") == [BEST]
    out = tmp_path / "out.jsonl"
    r = run_prepare("oasst", src, out, "--lang", "de")
    assert r.returncode == 0 and "wrote 1 examples" in r.stdout
    assert json.loads(out.read_text()) == GERMAN

def test_oasst_lang_leaves_out_trees_that_record_no_language(tmp_path):
    # --lang keeps the trees whose prompt says that language; one that records none is not taken for it: counted
    unlabelled = {"prompt": msg("prompter", "Q", replies=[msg("assistant", "A")])}
    skipped = Counter()
    assert convert("oasst", write(tmp_path / "trees.jsonl", [json.dumps(t) for t in (DE_TREE, unlabelled)]), "de", skipped) == [GERMAN]
    assert skipped == {"not in language 'de'": 1}

def flatten(node, parent_id, rows):
    mid = f"m{len(rows)}"
    rows.append({k: v for k, v in node.items() if k != "replies"} | {"message_id": mid, "parent_id": parent_id})
    for child in node["replies"]:
        flatten(child, mid, rows)
    return rows

def test_oasst_flat_message_table(tmp_path):
    rows = flatten(TREE["prompt"], None, [])
    rows = flatten(DE_TREE["prompt"], None, rows)
    rows = rows[::-1]  # children listed before their parents must not matter
    src = write(tmp_path / "messages.jsonl", [json.dumps(r) for r in rows])
    assert sorted(map(json.dumps, convert("oasst", src))) == sorted(map(json.dumps, [BEST, GERMAN]))
    assert convert("oasst", src, lang="en") == [BEST]

def test_oasst_flat_table_an_empty_parent_id_names_a_parent_not_a_root(tmp_path):
    # parent_id "" is an id (of no message here), not a missing one: its message is counted with the orphans and
    # starts no conversation; it is never both counted as skipped and written
    rows = [{"message_id": "q", "parent_id": None, "role": "prompter", "text": "Q"},
            {"message_id": "a", "parent_id": "q", "role": "assistant", "text": "A"},
            {"message_id": "x", "parent_id": "", "role": "prompter", "text": "orphan Q"},
            {"message_id": "y", "parent_id": "x", "role": "assistant", "text": "orphan A"}]
    skipped = Counter()
    assert convert("oasst", write(tmp_path / "messages.jsonl", [json.dumps(r) for r in rows]), skipped=skipped) == [
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]
    assert skipped == {"messages whose parent is not in the file, and their replies": 1}

def test_guanaco(tmp_path):
    texts = ["### Human: Hi?### Assistant: Hello!", "### Human: 2+2?### Assistant: 4.### Human: 3+3?### Assistant: 6."]
    src = write(tmp_path / "guanaco.jsonl", [json.dumps({"text": t}) for t in texts])
    assert convert("guanaco", src) == [{"text": t} for t in texts]

GOOD_ALPACA = json.dumps({"instruction": "i", "input": "", "output": "o"})
BAD = [  # (format, file lines, text the one-line error must contain)
    ("alpaca", [GOOD_ALPACA, '{"instruction": "i", "output": '], "in.jsonl:2"),
    ("alpaca", [GOOD_ALPACA, "", json.dumps({"instruction": "i", "input": ""})], "in.jsonl:3: missing or invalid field 'output'"),
    ("alpaca", [GOOD_ALPACA, json.dumps({"instruction": 5, "output": "o"})], "in.jsonl:2: missing or invalid field 'instruction'"),
    ("alpaca", [GOOD_ALPACA, "[1, 2]"], "in.jsonl:2: expected a JSON object"),
    ("alpaca", ["[", "  " + GOOD_ALPACA + ",", '  {"instruction": "i"}', "]"], "in.jsonl:3: missing or invalid field 'output'"),
    ("alpaca", ["[", "  " + GOOD_ALPACA + ",", '  {"instruction": }', "]"], "in.jsonl:3 (item 2): malformed JSON"),
    ("alpaca", [], "in.jsonl:1: file is empty"),
    ("alpaca", ["[]"], "no examples"),
    ("guanaco", [json.dumps({"text": "### Human: a### Assistant: b"}), json.dumps({"txt": "x"})], "in.jsonl:2: missing or invalid field 'text'"),
    ("guanaco", [json.dumps({"text": "Human: a Assistant: b"})], "in.jsonl: no examples left to write; 1 skipped: field 'text' must alt"),
    ("oasst", [json.dumps(TREE), json.dumps({"message_tree_id": "t9"})], "in.jsonl:2: missing or invalid field 'prompt'"),
    ("oasst", [json.dumps({"prompt": msg("prompter", "Q", replies=[msg("assistant", None)])})], "in.jsonl:1: missing or invalid field 'text'"),
    ("oasst", [json.dumps({"prompt": msg("user", "Q")})], "in.jsonl:1: missing or invalid field 'role'"),
    ("oasst", [json.dumps({"prompt": {**msg("prompter", "Q"), "replies": 5}})], "in.jsonl:1: missing or invalid field 'replies'"),
    ("oasst", [json.dumps({"message_id": "a", "parent_id": None, "role": "prompter", "text": "Q"}),
               json.dumps({"parent_id": "a", "role": "assistant", "text": "A"})], "in.jsonl:2: missing or invalid field 'message_id'"),
    ("oasst", [json.dumps({"message_id": "a", "parent_id": None, "role": "prompter", "text": "Q"}),
               json.dumps({"message_id": "b", "parent_id": "a", "role": "assistant"})], "in.jsonl:2: missing or invalid field 'text'"),
    ("oasst", [json.dumps({"message_id": "a", "parent_id": None, "role": "prompter", "text": "Q"}),
               json.dumps({"message_id": "b", "parent_id": ["a"], "role": "assistant"})], "in.jsonl:2: missing or invalid field 'parent_id'"),
    ("llama", [GOOD_ALPACA], "unknown format 'llama'"),
    ("self_instruct", [json.dumps({"instruction": "i", "instances": {"input": "", "output": "o"}})], "in.jsonl:1: missing or invalid field 'instances'"),
    ("self_instruct", [json.dumps({"instruction": "i", "instances": ["o"]})], "in.jsonl:1: missing or invalid field 'output'"),
    ("self_instruct", [json.dumps({"instruction": 3, "instances": [{"output": "o"}]})], "in.jsonl:1: missing or invalid field 'instruction'"),
    ("alpaca", [GOOD_ALPACA, '{"instruction": "a \\ud83d b", "output": "o"}'], "in.jsonl:2: a lone UTF-16 surrogate"),
    ("alpaca", [GOOD_ALPACA, "[" * 100_000], "in.jsonl:2: malformed JSON"),  # too deep for the decoder
    ("alpaca", ["[", "  " + GOOD_ALPACA, "]", GOOD_ALPACA], "in.jsonl:4: more after the JSON array that ends on line 3"),
    ("alpaca", [json.dumps([json.loads(GOOD_ALPACA)] * 2) + " " + GOOD_ALPACA], "in.jsonl:1: more after the JSON array"),
]

@pytest.mark.parametrize("kind,lines,error", BAD)
def test_bad_input(tmp_path, kind, lines, error):
    src = write(tmp_path / "in.jsonl", lines)  # no lines: an empty file
    with pytest.raises(InputError) as e:
        convert(kind, src)
    assert error in str(e.value) and "\n" not in str(e.value)
    out = tmp_path / "out.jsonl"
    r = run_prepare(kind, src, out)
    assert r.returncode == 2 and r.stdout == ""
    assert error in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))

def test_nesting_too_deep_is_one_line_at_any_depth(tmp_path):
    # json decodes a little deeper than it encodes: the surrogate check's json.dumps must be caught too
    for depth in range(800, 1000):
        src = write(tmp_path / "in.jsonl", ["[", '{"instruction": "i", "output": "o", "z": ' + "[" * depth + "]" * depth + "}", "]"])
        try:
            convert("alpaca", src)
        except InputError as e:
            assert str(e).startswith(f"{src}:2: malformed JSON (maximum recursion depth exceeded"), e


def test_unreadable_data_is_one_line_naming_the_file(tmp_path):
    for name, why in [("none.jsonl", "No such file or directory"), ("", "Is a directory")]:
        with pytest.raises(InputError) as e:
            read_data(tmp_path / name)
        assert str(e.value) == f"{tmp_path / name}: cannot read ({why})"
    # text that is not UTF-8 (a Latin-1 export) is named by the line of its first bad byte, a byte-order mark or not
    good = json.dumps({"instruction": "a", "output": "b"}).encode() + b"\n"
    for bom, body, line, why in [(b"", good + b'{"instruction": "caf\xe9", "output": "b"}\n', 2, "byte 0xe9: invalid continuation byte"),
                                 (b"\xef\xbb\xbf", good * 2 + b"\n\n" + good + b'{"x": "\xff"}', 6, "byte 0xff: invalid start byte"),
                                 (b"\xef\xbb\xbf", b"\xe2\x82", 1, "byte 0xe2: unexpected end of data")]:
        (tmp_path / "latin1.jsonl").write_bytes(bom + body)
        with pytest.raises(InputError) as e:
            read_data(tmp_path / "latin1.jsonl")
        assert str(e.value) == f"{tmp_path / 'latin1.jsonl'}:{line}: not UTF-8 text ({why})"


def test_a_byte_order_mark_is_no_part_of_the_text(tmp_path):
    # editors on Windows and Excel's "CSV UTF-8" start a file with EF BB BF: read as if it were not there, not as
    # malformed JSON nor as a U+FEFF glued to the first MMLU question
    bom = b"\xef\xbb\xbf"
    (f := tmp_path / "bom.jsonl").write_bytes(bom + b'{"instruction": "a", "output": "b"}\n')
    assert P.read_records(f) == [(1, {"instruction": "a", "output": "b"})]
    (f := tmp_path / "bom.json").write_bytes(bom + b'[{"instruction": "a", "output": "b"}]')
    assert P.read_records(f) == [(1, {"instruction": "a", "output": "b"})]
    (f := tmp_path / "bom_val.csv").write_bytes(bom + b"1+1?,1,2,3,4,B\n")
    assert MM.read_csv(f) == [("1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:", 1)]


def test_failure_keeps_existing_output(tmp_path):
    out = write(tmp_path / "out.jsonl", [GOOD_ALPACA])
    src = write(tmp_path / "in.jsonl", ["not json"])
    assert run_prepare("alpaca", src, out).returncode == 2
    assert out.read_text() == GOOD_ALPACA + "\n" and not list(tmp_path.glob("*.tmp"))
    # the temporary file is .NAME.tmp (hidden): a user's NAME.tmp, even the input, is never touched
    src = write(tmp_path / "data.tmp", [GOOD_ALPACA])
    assert run_prepare("alpaca", src, tmp_path / "data").returncode == 0
    assert src.read_text() == GOOD_ALPACA + "\n" and (tmp_path / "data").read_text() == out.read_text()

def test_bad_command_line(tmp_path):
    for args, expect in [((), "usage"), (("alpaca", "x.json"), "usage"), (("oasst", "a", "b", "--lang"), "--lang needs a value"),
                         (("alpaca", "a", "b", "--lang", "en"), "error: --lang: only oasst records a language, not alpaca"),
                         (("self_instruct", "a", "b", "--lang", "en"), "error: --lang: only oasst records a language, not self_instruct"),
                         (("guanaco", "a", "b", "--lang", "en"), "error: --lang: only oasst records a language, not guanaco"),
                         (("llama", "a", "b", "--lang", "en"), "error: unknown format 'llama'")]:
        with pytest.raises(InputError) as e:  # in this process: the line run() prints (below, from the command line)
            P.main(list(args))
        assert expect.removeprefix("error: ") in str(e.value) and "\n" not in str(e.value), str(e.value)
    r = run_prepare("llama", "a", "b", "--lang", "en")
    assert r.returncode == 2 and r.stderr == "error: unknown format 'llama' (expected alpaca, oasst, guanaco or self_instruct)\n", r.stderr
    r = run_prepare("alpaca", tmp_path / "missing.json", tmp_path / "out.jsonl")
    assert r.returncode == 2 and "missing.json" in r.stderr and "Traceback" not in r.stderr
    src = write(tmp_path / "in.jsonl", [GOOD_ALPACA, json.dumps({"instruction": "", "output": "o"})])  # one to skip
    r = run_prepare("alpaca", src, tmp_path / "." / "in.jsonl")  # the input itself: the skipped record would be lost
    assert r.returncode == 2 and f"{tmp_path / 'in.jsonl'}: is the input file" in r.stderr and len(src.read_text().splitlines()) == 2


def test_prepare_refuses_the_input_file_under_another_spelling_of_its_path(tmp_path, monkeypatch):
    # a relative name and the absolute path of one file are the same file: refused, the record it would skip kept
    src = write(tmp_path / "in.jsonl", [GOOD_ALPACA, json.dumps({"instruction": "", "output": "o"})])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=re.escape(f"{src}: is the input file")):
        P.main(["alpaca", "in.jsonl", str(src)])
    assert len(src.read_text().splitlines()) == 2

def test_sample_files():
    def rows(name):
        lines = (DATA / name).read_text(encoding="ascii").splitlines()
        assert lines and len(lines) == len(set(lines)), name
        return [json.loads(line) for line in lines]
    alpaca = rows("sample.jsonl")
    assert 300 <= len(alpaca) <= 400
    for ex in alpaca:
        assert set(ex) == {"instruction", "input", "output"} and all(isinstance(v, str) for v in ex.values())
        assert ex["instruction"].strip() and ex["output"].strip()
    for ex in rows("sample_chat.jsonl"):
        roles = [m["role"] for m in ex["messages"]]
        roles = roles[1:] if roles[0] == "system" else roles
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        assert all(set(m) == {"role", "content"} and m["content"].strip() for m in ex["messages"])
    for ex in rows("sample_oasst.jsonl"):
        assert set(ex) == {"text"} and ex["text"].startswith("### Human: ") and "### Assistant: " in ex["text"]
    # the shipped samples also go through the converters unchanged
    assert convert("alpaca", DATA / "sample.jsonl") == alpaca
    assert convert("guanaco", DATA / "sample_oasst.jsonl") == rows("sample_oasst.jsonl")


SEED_TASKS = ROOT.parent / "shared" / "data" / "self_instruct_seed_tasks.jsonl"


@pytest.mark.skipif(not SEED_TASKS.is_file(), reason="../shared/data/self_instruct_seed_tasks.jsonl not present")
def test_real_instructions_through_the_pipeline(tmp_path):
    # 175 human-written tasks through `prepare.py self_instruct`: Alpaca-shaped, a tokenizer trained on them, every
    # response intact after tokenization
    lines = [json.loads(l) for l in SEED_TASKS.read_text().splitlines() if l.strip()]
    rows = [{"instruction": t["instruction"], "input": i["input"], "output": i["output"]} for t in lines for i in t["instances"]]
    f = tmp_path / "seed.jsonl"
    r = run_prepare("self_instruct", SEED_TASKS, f)
    assert r.returncode == 0 and r.stdout == f"wrote 175 examples to {f}, skipped 0\n", r.stderr
    assert [json.loads(l) for l in f.read_text().splitlines()] == rows
    items = P.read_data(f)
    C.train_tokenizer([s for _, segs in items for s, _ in segs], tmp_path / "tok.model", vocab_size=800)
    tok = C.Tokenizer(tmp_path / "tok.model")
    examples, truncated = P.tokenize(items, tok, 4096, 4096)
    assert len(examples) == len(rows) == 175 and truncated == 0
    for (ids, labels), r in zip(examples, rows):
        resp = [t for t in labels if t != -100]
        assert resp[-1] == tok.eos_id and tok.decode(resp[:-1]) == r["output"].strip()


# ---------------------------------------------------------------------------------------------------
# data/mmlu.py: MMLU 5-shot prompts, letter scoring and the macro average, on a tiny MMLU folder written
# here in both public shapes (Hendrycks et al.'s CSVs and the QLoRA code's five_shot_mmlu_*.json)

HEAD = "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"  # two spaces, as evaluate.py
ALGEBRA_DEV = ('"Is 2, or 3, prime?",only 2,only 3,both,neither,C\n1+1?,1,2,3,4,B\n2+2?,2,3,4,5,C\n'
               '"Two\nlines?",yes,no,maybe,never,A\n3+3?,6,7,8,9,A\n')
ALGEBRA_VAL = "5+5?,10,11,12,13,A\n6+1?,5,6,7,8,C\n"
SHOTS = ["Is 2, or 3, prime?\nA. only 2\nB. only 3\nC. both\nD. neither\nAnswer: C\n\n",
         "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n", "2+2?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer: C\n\n",
         "Two\nlines?\nA. yes\nB. no\nC. maybe\nD. never\nAnswer: A\n\n", "3+3?\nA. 6\nB. 7\nC. 8\nD. 9\nAnswer: A\n\n"]
FIRST_Q = "5+5?\nA. 10\nB. 11\nC. 12\nD. 13\nAnswer:"
# answers of the val questions: unequal subject sizes, so the mean over subjects differs from that over questions
VAL_ANSWERS = {"abstract_algebra": "AC", "philosophy": "ACA", "sports_trivia": "DBAAC"}  # sports_trivia: not an MMLU subject


def mmlu_row(subject, i, letter):
    return [f"Which {subject.replace('_', ' ')} fact {i} holds?", f"fact {i}", f"no fact {i}", f"all of {i}", f"none {i}", letter]


def mmlu_prompt(subject, dev, row):  # the standard 5-shot prompt, written out independently of data/mmlu.py
    q = lambda r: f"{r[0]}\nA. {r[1]}\nB. {r[2]}\nC. {r[3]}\nD. {r[4]}\nAnswer:"  # noqa: E731
    shots = "".join(f"{q(r)} {r[5]}\n\n" for r in dev[:5])
    return f"The following are multiple choice questions (with answers) about  {subject.replace('_', ' ')}.\n\n{shots}{q(row)}"


@pytest.fixture(scope="session")
def mmlu_dirs(tmp_path_factory):
    # (csv folder, json folder, [(subject, prompt, answer)]) with the same val questions in both
    root = tmp_path_factory.mktemp("mmlu")
    for sub in ("csv/dev", "csv/val", "json"):
        (root / sub).mkdir(parents=True)
    (root / "csv/dev/abstract_algebra_dev.csv").write_text(ALGEBRA_DEV)
    (root / "csv/val/abstract_algebra_val.csv").write_text(ALGEBRA_VAL)
    algebra = list(csv.reader(io.StringIO(ALGEBRA_DEV)))
    items = [("abstract_algebra", mmlu_prompt("abstract_algebra", algebra, r), r[5]) for r in csv.reader(io.StringIO(ALGEBRA_VAL))]
    for subject, n_dev in (("philosophy", 5), ("sports_trivia", 6)):  # 6: only the first five are shots
        dev = [mmlu_row(subject, i, "ABCDA"[i % 5]) for i in range(n_dev)]
        val = [mmlu_row(subject, 10 + i, a) for i, a in enumerate(VAL_ANSWERS[subject])]
        for split, rows in (("dev", dev), ("val", val)):
            with open(root / f"csv/{split}/{subject}_{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows(rows)
        items += [(subject, mmlu_prompt(subject, dev, r), r[5]) for r in val]
    (root / "json/five_shot_mmlu_val.json").write_text(
        "".join(json.dumps({"subject": s, "input": p, "output": a}) + "\n" for s, p, a in items))
    return root / "csv", root / "json", items


@pytest.fixture(scope="session")
def mmlu_tok(tmp_path_factory, mmlu_dirs):
    # a tokenizer trained on the prompts: "A".."D" after "Answer:" are single tokens in it
    path = tmp_path_factory.mktemp("mmlu_tok") / "tokenizer.model"
    C.train_tokenizer([p + " " + a for _, p, a in mmlu_dirs[2]] * 4, path, vocab_size=160)
    return C.Tokenizer(path)


class RiggedModel(torch.nn.Module):
    # logits prefer the letter want(prompt) at a row's last prompt token and "D" everywhere else, so
    # reading any other position (the padding, say) shows up as a wrong answer
    def __init__(self, tok, want, vocab):
        super().__init__()
        self.tok, self.want, self.vocab = tok, want, vocab
        self.letters = [tok.encode("Answer: " + c)[-1] for c in "ABCD"]

    def forward(self, idx):
        assert not self.training and not torch.is_grad_enabled()
        logits = torch.zeros(*idx.shape, self.vocab)
        logits[:, :, self.letters[3]] = 0.5
        for b, row in enumerate(idx.tolist()):
            for prompt, letter in self.want.items():
                ids = self.tok.encode(prompt, bos=True)
                if row[: len(ids)] == ids:
                    logits[b, len(ids) - 1, self.letters["ABCD".index(letter)]] = 1.0
        return logits, None


def test_mmlu_reads_both_shapes_and_builds_the_standard_prompt(mmlu_dirs):
    csv_dir, json_dir, items = mmlu_dirs
    qs = MM.read_mmlu(csv_dir)
    assert MM.prompt_text(qs[0]) == (
        "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
        "Is 2, or 3, prime?\nA. only 2\nB. only 3\nC. both\nD. neither\nAnswer: C\n\n"
        "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "2+2?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer: C\n\n"
        "Two\nlines?\nA. yes\nB. no\nC. maybe\nD. never\nAnswer: A\n\n"
        "3+3?\nA. 6\nB. 7\nC. 8\nD. 9\nAnswer: A\n\n"
        "5+5?\nA. 10\nB. 11\nC. 12\nD. 13\nAnswer:")
    (csv_dir / "crlf.csv").write_bytes(b'"Two\r\nlines?",a,b,c,d,A\r\n')  # as csv reads a file: a quoted line break kept as it is
    assert MM.read_csv(csv_dir / "crlf.csv") == [("Two\r\nlines?\nA. a\nB. b\nC. c\nD. d\nAnswer:", 0)]
    for d in (csv_dir, json_dir):
        qs = MM.read_mmlu(d)
        assert [(q["subject"], MM.prompt_text(q), "ABCD"[q["answer"]]) for q in qs] == items
        short = MM.read_mmlu(d, max_per_subject=2)
        assert [q["subject"] for q in short] == ["abstract_algebra"] * 2 + ["philosophy"] * 2 + ["sports_trivia"] * 2
        assert [MM.prompt_text(q) for q in short] == [p for p, s in zip((p for _, p, _ in items), [0, 1, 0, 1, 2, 0, 1, 2, 3, 4])
                                                      if s < 2]


def test_mmlu_rigged_model_scores_and_macro_average(mmlu_dirs, mmlu_tok):
    csv_dir, json_dir, items = mmlu_dirs
    for d in (csv_dir, json_dir):
        qs = MM.read_mmlu(d)
        model = RiggedModel(mmlu_tok, {p: a for _, p, a in items}, mmlu_tok.n_words).train()
        r = MM.evaluate(model, mmlu_tok, qs, batch_size=4, device="cpu", max_len=1024)
        assert model.training  # mode restored
        assert r["accuracy"] == 1.0 and r["predictions"] == [a for _, _, a in items] and r["questions"] == 10
        model = RiggedModel(mmlu_tok, {p: "A" for _, p, _ in items}, mmlu_tok.n_words).eval()
        r = MM.evaluate(model, mmlu_tok, qs, batch_size=3, device="cpu", max_len=1024)
        assert not model.training and r["predictions"] == ["A"] * 10
        share = {s: a.count("A") / len(a) for s, a in VAL_ANSWERS.items()}  # 1/2, 2/3, 2/5
        assert r["subjects"] == pytest.approx(share)
        assert r["accuracy"] == pytest.approx((1 / 2 + 2 / 3 + 2 / 5) / 3)  # over subjects: 0.522, over questions 0.5
        assert r["dropped_shots"] == r["cut_prompts"] == 0


def test_mmlu_long_prompts_drop_shots_from_the_front(mmlu_dirs, mmlu_tok):
    csv_dir, json_dir, items = mmlu_dirs
    q = MM.read_mmlu(csv_dir)[0]
    enc = lambda s: mmlu_tok.encode(s, bos=True)  # noqa: E731
    full = enc(HEAD + "".join(SHOTS) + FIRST_Q)
    assert MM.prompt_ids(q, mmlu_tok, len(full)) == (full, 0, False)
    assert MM.prompt_ids(q, mmlu_tok, len(full) - 1) == (enc(HEAD + "".join(SHOTS[1:]) + FIRST_Q), 1, False)
    three = enc(HEAD + "".join(SHOTS[3:]) + FIRST_Q)
    assert MM.prompt_ids(q, mmlu_tok, len(three)) == (three, 3, False)
    bare = enc(HEAD + FIRST_Q)
    assert MM.prompt_ids(q, mmlu_tok, 6) == ([mmlu_tok.bos_id] + bare[-5:], 5, True)
    # the preprocessed shape: the input as given, cut from the front after bos
    qj = MM.read_mmlu(json_dir)[0]
    assert MM.prompt_ids(qj, mmlu_tok, len(full)) == (full, 0, False)
    assert MM.prompt_ids(qj, mmlu_tok, len(full) - 3) == ([mmlu_tok.bos_id] + full[-(len(full) - 4):], 0, True)
    # evaluate counts them; the rigged model is still read at each row's real last token
    qs = MM.read_mmlu(csv_dir)
    n = len(full) - 1
    want = {MM.prompt_text(x, MM.prompt_ids(x, mmlu_tok, n)[1]): "ABCD"[x["answer"]] for x in qs}
    r = MM.evaluate(RiggedModel(mmlu_tok, want, mmlu_tok.n_words), mmlu_tok, qs, 8, "cpu", n)
    assert r["accuracy"] == 1.0 and r["dropped_shots"] == sum(MM.prompt_ids(x, mmlu_tok, n)[1] for x in qs) > 0
    assert MM.summary(7, "val", r).startswith("iter 7: mmlu val 1.000 (3 subjects, 10 questions, ")
    assert MM.summary(7, "val", r).endswith(f" s, {r['dropped_shots']} shots dropped)")


def test_mmlu_padding_does_not_change_predictions(mmlu_dirs, mmlu_tok):
    # a real tiny LLaMA: batch of 1, batch of 8 (right-padded) and the last logits of each prompt run alone agree
    cfg = M.LLaMAConfig(**dict(M.CONFIGS["tiny"], vocab_size=mmlu_tok.n_words))
    model = M.LLaMA.from_config(cfg, quantize=False, dtype=torch.float32)
    qs = MM.read_mmlu(mmlu_dirs[0])
    letters = [mmlu_tok.encode("Answer: " + c)[-1] for c in "ABCD"]
    with torch.no_grad():
        ref = ["ABCD"[model(torch.tensor([mmlu_tok.encode(p, bos=True)]))[0][0, -1, letters].argmax()] for _, p, _ in mmlu_dirs[2]]
    one = MM.evaluate(model, mmlu_tok, qs, 1, "cpu", cfg.max_seq_len)["predictions"]
    eight = MM.evaluate(model, mmlu_tok, qs, 8, "cpu", cfg.max_seq_len)["predictions"]
    assert one == eight == ref and len(set(ref)) > 1
    assert model.training


def test_mmlu_log_line_per_evaluation(tmp_path):
    r = {"accuracy": 0.35212, "questions": 1531, "subjects": {"anatomy": 0.5, "virology": 0.2042},
         "dropped_shots": 0, "cut_prompts": 0, "seconds": 41.2}
    assert MM.summary(200, "val", r) == "iter 200: mmlu val 0.352 (2 subjects, 1531 questions, 41 s)"
    MM.append_log(tmp_path, "val", 0, r)
    MM.append_log(tmp_path, "val", 200, dict(r, accuracy=0.4))
    lines = (tmp_path / "mmlu_val.jsonl").read_text().splitlines()
    assert [json.loads(l) for l in lines] == [
        {"iter": 0, "accuracy": 0.35212, "questions": 1531, "subjects": {"anatomy": 0.5, "virology": 0.2042}},
        {"iter": 200, "accuracy": 0.4, "questions": 1531, "subjects": {"anatomy": 0.5, "virology": 0.2042}}]
    # a run resumed at iter 200 evaluates it again: one line for it; a new run in the folder (--overwrite) starts the log afresh
    MM.append_log(tmp_path, "val", 200, dict(r, accuracy=0.5))
    assert (tmp_path / "mmlu_val.jsonl").read_text().splitlines() == [lines[0], lines[1].replace("0.4", "0.5")]
    MM.append_log(tmp_path, "val", 0, dict(r, accuracy=0.1))
    assert [json.loads(l)["accuracy"] for l in (tmp_path / "mmlu_val.jsonl").read_text().splitlines()] == [0.1]
    # lines of no evaluation (not an object, no whole iter: written by hand) are dropped, not a crash
    (tmp_path / "mmlu_val.jsonl").write_text(f'{{"note": "x"}}\n[1]\n{{"iter": "5"}}\n{lines[0]}\n{{"iter": null}}\n')
    MM.append_log(tmp_path, "val", 200, dict(r, accuracy=0.5))
    assert (tmp_path / "mmlu_val.jsonl").read_text().splitlines() == [lines[0], lines[1].replace("0.4", "0.5")]


BAD_MMLU = [  # ({file: text}, text the one-line error must contain)
    ({}, "not an MMLU folder"),
    ({"dev/x_dev.csv": "q,a,b,c,d,A\n", "val/x_val.csv": '"two\nlines",a,b,c,d,A\nq,a,b,c,d\n'}, "x_val.csv:3: expected 6 fields"),
    ({"dev/x_dev.csv": "q,a,b,c,d,A\n\nq,a,b,c,d,E\n", "val/x_val.csv": "q,a,b,c,d,A\n"}, "x_dev.csv:3: answer 'E' is not one of"),
    ({"dev/x_dev.csv": "q,a,b,c,d,A\n", "val/x_val.csv": "q,a,b,c,d,A\n", "val/y_val.csv": "q,a,b,c,d,B\n"},
     "y_dev.csv: no dev questions for subject 'y'"),
    ({"dev/x_dev.csv": "", "val/x_val.csv": "q,a,b,c,d,A\n"}, "x_dev.csv: no dev questions"),
    ({"dev/x_dev.csv": "q,a,b,c,d,A\n", "val/x_val.csv": "q,a,b,c,d,A\n", "dev/y_dev.csv": "q,a,b,c,d,A\n", "val/y_val.csv": "\n"},
     "y_val.csv: no questions"),
    ({"dev/x_dev.csv": "q,a,b,c,d,A\n", "val/x_val.csv": b"q,\xff,b,c,d,A\n"}, "x_val.csv:1: not UTF-8 text (byte 0xff"),
    ({"dev/x_dev.csv": "q,a,b,c,d,A\r\n", "val/x_val.csv": b'"two\r\nlines",a,b,c,d,A\r\nq,a,b,c,d\r\n'}, "x_val.csv:3: expected 6"),
    ({"dev/x_dev.csv": "q,a,b,c,d,A\n", "val/x_val.csv": b'"two\nlines",a,b,c,d,A\n' * 2000 + b"caf\xe9,a,b,c,d,A\n"},
     "x_val.csv:4001: not UTF-8 text (byte 0xe9"),  # by its line, also in a file larger than one read buffer
    ({"dev/x_dev.csv": "q,a,b,c,d,A\n", "test/x_test.csv": "q,a,b,c,d,A\n"}, "not an MMLU folder"),
    ({"five_shot_mmlu_val.json": '{"subject": "x", "input": "Answer:", "output": "A"}\n{"subject": "x",\n'},
     "five_shot_mmlu_val.json:2: malformed JSON"),
    ({"five_shot_mmlu_val.json": '{"subject": "x", "input": "Answer:", "output": "A"}\n{"subject": "x", "input": "Answer:", "output": "E"}\n'},
     "five_shot_mmlu_val.json:2: missing or invalid field 'output'"),
    ({"five_shot_mmlu_val.json": '{"input": "Answer:", "output": "A"}\n'}, "five_shot_mmlu_val.json:1: missing or invalid field 'subject'"),
    ({"five_shot_mmlu_val.json": "[]"}, "no val questions"),
]


@pytest.mark.parametrize("files,error", BAD_MMLU)
def test_mmlu_bad_files_give_one_line(tmp_path, files, error):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(InputError) as e:
        MM.read_mmlu(tmp_path)
    assert error in str(e.value) and "\n" not in str(e.value)


def test_mmlu_tokenizer_without_single_letter_tokens(tokenizer_file):
    tok = C.Tokenizer(tokenizer_file)  # trained on lowercase words only: "A".."D" are all unknown
    with pytest.raises(InputError, match=r"tokenizer\.model: 'A'\.\.'D' after 'Answer:' are not four distinct"):
        MM.letter_ids(tok)

    class SameLetters:  # one token per word, its length: "A".."D" are single tokens, all the same one
        path = "same.model"

        def encode(self, s, bos=False, eos=False):
            return [len(w) for w in s.split(" ")]
    with pytest.raises(InputError, match=r"same\.model: 'A'\.\.'D' after 'Answer:' are not four distinct single tokens"):
        MM.letter_ids(SameLetters())


# ports of the two references' MMLU code, written from hendrycks/test evaluate.py (format_subject, format_example,
# gen_prompt, the k-shrinking loop, weighted_acc) and artidoro/qlora qlora.py (DataCollatorForCausalLM on
# five_shot_mmlu_*.json, abcd_idx, MMLUEvalCallback); what differs is asserted as the difference it is
def _hendrycks_prompt(subject, dev, test, i, too_long=lambda p: False, ntrain=5):
    fmt_subject = "".join(" " + e for e in subject.split("_"))  # format_subject: " abstract algebra"

    def example(row, answer=True):
        return row[0] + "".join(f"\n{c}. {a}" for c, a in zip("ABCD", row[1:5])) + "\nAnswer:" + (f" {row[5]}\n\n" if answer else "")

    def gen(k):
        return f"The following are multiple choice questions (with answers) about {fmt_subject}.\n\n" + "".join(
            example(r) for r in dev[:ntrain][:k])
    k = ntrain
    while too_long(gen(k) + example(test[i], False)):  # `while crop(prompt) != prompt: k -= 1`
        k -= 1
    return gen(k) + example(test[i], False), ntrain - k


def _mmlu_reference_files(csv_dir):
    # {subject: (dev rows, val rows)} as evaluate.py reads them (first ntrain dev rows, all val rows)
    read = lambda p: list(csv.reader(io.StringIO(p.read_text())))  # noqa: E731
    return {p.name[:-8]: (read(csv_dir / "dev" / (p.name[:-8] + "_dev.csv")), read(p)) for p in sorted((csv_dir / "val").glob("*_val.csv"))}


def test_mmlu_reference_ports_agree(mmlu_dirs, mmlu_tok, tmp_path):
    csv_dir, _, _ = mmlu_dirs
    files = _mmlu_reference_files(csv_dir)
    refs = [(s, *_hendrycks_prompt(s, dev, val, i), val[i][5]) for s, (dev, val) in files.items() for i in range(len(val))]
    # the CSV shape: evaluate.py's prompt, exactly
    qc = MM.read_mmlu(csv_dir)
    assert [MM.prompt_text(q) for q in qc] == [p for _, p, _, _ in refs]
    # the paper's five_shot_mmlu_val.json holds evaluate.py's prompts (double space included): read verbatim
    (tmp_path / "five_shot_mmlu_val.json").write_text("".join(json.dumps({"subject": s, "input": p, "output": a}) + "\n"
                                                              for s, p, _, a in refs))
    qj = MM.read_mmlu(tmp_path)
    assert [(q["subject"], MM.prompt_text(q), "ABCD"[q["answer"]]) for q in qj] == [(s, p, a) for s, p, _, a in refs]
    # qlora.py: abcd_idx = tokenizer("A", add_special_tokens=False).input_ids[0] (the "▁A" of the dummy prefix);
    # source = tokenizer(bos_token + input, add_special_tokens=False, truncation=True, max_length) with the
    # slow LLaMA tokenizer (legacy: [bos] + sentencepiece ids; truncation_side "right"); the logits read are
    # those at label_non_zero_id - 1, the source's last token
    abcd_idx = [mmlu_tok.sp.encode(c)[0] for c in "ABCD"]
    assert MM.letter_ids(mmlu_tok) == abcd_idx
    source = lambda q, n: ([mmlu_tok.bos_id] + mmlu_tok.sp.encode(q["question"]))[:n]  # noqa: E731
    full = max(len(source(q, 10**6)) for q in qj)
    for q in qj:
        assert MM.prompt_ids(q, mmlu_tok, full) == (source(q, full), 0, False)
    # too long: qlora keeps the first n tokens (the question is lost); we keep bos and the last n - 1
    q, n = qj[0], len(source(qj[0], 10**6)) - 8
    assert MM.prompt_ids(q, mmlu_tok, n) == ([mmlu_tok.bos_id] + source(q, 10**6)[-(n - 1):], 0, True)
    assert MM.prompt_ids(q, mmlu_tok, n)[0] != source(q, n)

    class PrefixSum(torch.nn.Module):  # the letter at position t is a function of tokens 0..t: reveals what was read
        def forward(self, idx):
            logits = torch.zeros(*idx.shape, mmlu_tok.n_words)
            for b, t in torch.cartesian_prod(torch.arange(idx.shape[0]), torch.arange(idx.shape[1])).tolist():
                logits[b, t, abcd_idx[int(idx[b, : t + 1].sum()) % 4]] = 1.0
            return logits, None
    r = MM.evaluate(PrefixSum(), mmlu_tok, qj, 3, "cpu", full)
    preds = [sum(source(q, full)) % 4 for q in qj]  # argmax of logit[label_non_zero_id - 1][abcd_idx]
    assert r["predictions"] == ["ABCD"[p] for p in preds]
    per = {s: sum(p == q["answer"] for p, q in zip(preds, qj) if q["subject"] == s) / sum(q["subject"] == s for q in qj)
           for s in files}
    assert r["subjects"] == pytest.approx(per) and r["accuracy"] == pytest.approx(sum(per.values()) / len(per))  # qlora: np.mean(subject_scores)
    weighted = sum(p == q["answer"] for p, q in zip(preds, qj)) / len(qj)  # evaluate.py's "Average accuracy"
    assert len(set(per.values())) > 1 and r["accuracy"] != pytest.approx(weighted)
    # too long, CSV shape: evaluate.py shrinks k and keeps the FIRST k shots; we keep the LAST ones (README: "loses
    # whole shots from the front"). Our header both ways here, to compare only that
    s, (dev, val), head = "abstract_algebra", files["abstract_algebra"], qc[0]["header"]
    size = lambda p: len(mmlu_tok.encode(head + p[p.index(".\n\n") + 3 :], bos=True))  # noqa: E731
    kept = head + "".join(SHOTS[2:]) + FIRST_Q
    n = len(mmlu_tok.encode(kept, bos=True))
    ref, k_dropped = _hendrycks_prompt(s, dev, val, 0, lambda p: size(p) > n)
    assert MM.prompt_ids(qc[0], mmlu_tok, n) == (mmlu_tok.encode(kept, bos=True), 2, False)
    assert k_dropped >= 1 and ref == head + "".join(SHOTS[: 5 - k_dropped]) + FIRST_Q


# ---------------------------------------------------------------------------------------------------
# train.py and bench.py: the command line as a user meets it (flags, data, resume, DDP, faults, MMLU,
# adapters, the chat command on the result)

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # train.py runs at normal speed
CPU_ENV = {**ENV, "CUDA_VISIBLE_DEVICES": ""}  # where a run is compared with a CPU reference, on a GPU machine too


def run_train(*args, timeout=300, env=ENV):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("lines, expect", [
    (['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": "b"', ], "bad.jsonl:2: malformed JSON"),
    (['{"instruction": "a", "output": "b"}', '{"instruction": "a"}'], "bad.jsonl:2: field 'output' must be a non-empty string"),
    (['{"instruction": "a", "input": null, "output": "b"}'], "bad.jsonl:1: field 'input' must be a string"),  # blank is fine
    (['{"messages": [{"role": "bot", "content": "x"}]}'], "bad.jsonl:1: messages[0].role"),
    (['{"prompt": "a"}'], "bad.jsonl:1: expected fields"),
    ([], "bad.jsonl:1: file is empty"),
    (["[", '{"instruction": "a", "output": "b"}', "]", '{"instruction": "c", "output": "d"}'],
     "bad.jsonl:4: more after the JSON array that ends on line 3"),  # not read as the array alone
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}'],
     "bad.jsonl:1: the conversation must end with an assistant reply"),  # not trained on as prompt text
    (['{"text": "### Human: a### Assistant: b### Human: c"}'], "bad.jsonl:1: the conversation must end with an assistant reply"),
    (["[]"], "bad.jsonl: no examples"),  # not a failure to train the demo's tokenizer on nothing
])
def test_bad_data_gives_one_line_and_exit_2(tmp_path, lines, expect):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines))
    r = run_train("--data", f, "--out_dir", tmp_path / "o", "--max_iters", 1)
    assert r.returncode == 2 and expect in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # the out_dir this run made is gone again: no debris


@pytest.mark.parametrize("args, expect", [
    (["--model", "5B", "--init", "random"], "--model 5B: unknown architecture"),
    (["--model", "5B"], "--model 5B: no folder checkpoints/5B"),
    (["--colour", "red"], "unknown flag --colour"),
    (["--max_iters", "many"], "--max_iters: expected int, got 'many'"),
    (["--ckpt_dir", "/nonexistent/7B"], "/nonexistent/7B/params.json: not found"),
    (["--micro_batch", "0"], "--micro_batch must be at least 1"),
    (["--batch_size", str(2**80)], f"--batch_size must be at least 1 (below 2^31), got {2**80}"),  # loss / 2^80 overflows
    (["--lora_r", "0"], "--lora_r must be at least 1"),
    (["--export", "gguf"], "--export: expected merged, merged_hf or peft"),
    (["--learning_rate", "-1"], "--learning_rate must be positive (below 1e9), got -1.0"),
    (["--learning_rate", "nan"], "--learning_rate must be positive (below 1e9), got nan"),
    (["--beta1", "1"], "--beta1 must be in [0, 1), got 1.0"),
    (["--beta2", "-0.1"], "--beta2 must be in [0, 1), got -0.1"),
    (["--weight_decay", "-0.01"], "--weight_decay must be at least 0 (below 2^63), got -0.01"),
    (["--max_grad_norm", "0"], "--max_grad_norm must be positive (below 1e9), got 0.0"),
    (["--val_fraction", "1"], "--val_fraction must be in [0, 1), got 1.0"),
    (["--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1), got 1.5"),
    (["--max_iters", "-5"], "--max_iters must be at least 0 (below 2^63), got -5"),
    (["--learning_rate", "1e300"], "--learning_rate must be positive (below 1e9), got 1e+300"),  # AdamW's step overflows fp32
    (["--seed", str(2**64)], f"--seed must be at least 0 (below 2^63), got {2**64}"),
    (["--threads", str(2**40)], f"--threads must be in [1, {os.cpu_count()}], the CPUs here, got {2**40}"),  # would hang in OpenMP
    # tiny: dim 128, 4 heads of 32, 2 kv heads -> wk/wv are 64 x 128, the narrowest adapted layer (w1: 352 x 128)
    (["--lora_r", "65"], "--lora_r must be at most 64 for this architecture"),
    (["--source_max_len", "200", "--target_max_len", "100"], "--target_max_len must be at most the context less --source_max_len, 256 - 200, got 100"),
    (["--source_max_len", "256"], "--source_max_len must be below the context, 256 tokens, got 256"),  # not "at most 256 - 256"
    (["--model", "7B", "--init", "random", "--lora_r", "4097"], "--lora_r must be at most 4096"),
    (["stray"], "unexpected argument 'stray'"),
    (["--data", "--max_iters", "1"], "flag --data needs a value"),  # not --data '--max_iters', then a stray '1'
    (["--lora_dropout", "-5"], "--lora_dropout must be in [0, 1), got -5.0"),  # only -1 means the paper's
    (["--warmup_iters", "-9"], "--warmup_iters must be at least 0 (below 2^63), got -9"),
    (["--mmlu_max", "-1"], "--mmlu_max must be at least 0 (below 2^63), got -1"),
    (["--resume"], "--resume: "),  # an empty out_dir: nothing to resume
    (["--resume", "--overwrite"], "--overwrite must be off with --resume, which continues the run, got True"),  # not one silently
    (["--mmlu", "/nonexistent"], "/nonexistent: not an MMLU folder"),
    (["--mmlu_split", "train"], "--mmlu_split: expected val or test, got 'train'"),
    (["--merge_base", "original"], "--merge_base must be nf4 for a random base (no original weights), got original"),
    (["--adapter", "/nonexistent/adapter.pt"], "/nonexistent/adapter.pt: adapter not found"),
    (["--data", "data"], "--data must be a file (not a pipe: it is read twice), got data"),  # a folder
    (["--data", "/nonexistent/d.jsonl"], "error: /nonexistent/d.jsonl: cannot read (No such file or directory)"),  # a typo: not a pipe
    (["--data", "/nonexistent/d\n.jsonl"], "error: /nonexistent/d\\n.jsonl: cannot read (No such"),  # a newline in a name: still one line
])
def test_bad_flags_give_one_line_and_exit_2(tmp_path, args, expect, train_here, monkeypatch, capsys):
    assert exit_status(monkeypatch, capsys, TR.main, *args, "--out_dir", tmp_path) == 2  # (train_here: its working folder, threads)
    out, err = capsys.readouterr()
    assert expect in err and err.count("\n") == 1 and "model " not in out  # refused before anything was built


def exit_status(monkeypatch, capsys, main, *args):
    # a command's main through run(), as `python X.py args` calls it, in this process -> its exit status (its output
    # left in capsys); any other exception than run()'s exit (a traceback) fails here, and so does a warning (which
    # pytest would keep from stderr)
    monkeypatch.setattr(sys, "argv", ["X.py", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e, warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", ResourceWarning)  # (a file closed by the collector: never shown to a user)
        files_run(main)
    assert not said, [str(w.message) for w in said]
    return e.value.code


def test_an_empty_path_flag_is_refused_not_taken_for_the_flag_left_out(tmp_path, monkeypatch):
    # --out_dir "$OUT" with OUT unset: Path("") is ".", where the run's files would land among the user's; an empty
    # --ckpt_dir trained the tiny demo on the user's data, an empty --adapter ran without one, --data "" named no file
    monkeypatch.chdir(tmp_path)
    for k in ("out_dir", "ckpt_dir", "adapter", "data"):
        with pytest.raises(InputError) as e:
            TR.main([f"--{k}", " " if k == "data" else "", "--max_iters", "1"])
        assert str(e.value) == f"--{k}: empty (an unset variable?)" + "; . is the working folder" * (k == "out_dir")
    for k in ("ckpt_dir", "adapter"):  # and in model.py
        with pytest.raises(InputError, match=re.escape(f"--{k}: empty (an unset variable?)") + "$"):
            M.chat([f"--{k}=", "--prompt", "x"])
    assert os.listdir(tmp_path) == [] and TR.resolve({"out_dir": "."}, train_defaults())["out_dir"] == "."


def test_data_from_a_pipe_is_refused_before_it_is_read(tmp_path):
    # read twice, to train and for its SHA-1 (which --resume compares): a second read of a pipe (<(zcat data.gz)) gives
    # nothing, so any data would have passed --resume's check; a FIFO's second open waited for a writer for ever
    os.mkfifo(fifo := tmp_path / "data.jsonl")
    r = run_train("--data", fifo, "--out_dir", tmp_path / "o", timeout=60)
    assert r.returncode == 2 and r.stderr == f"error: --data must be a file (not a pipe: it is read twice), got {fifo}\n"


def test_resume_into_a_missing_out_dir_leaves_nothing_behind(tmp_path):
    r = run_train("--resume", "--out_dir", tmp_path / "typo")  # the demo would first train its tokenizer there
    assert r.returncode == 2 and r.stderr == f"error: --resume: {tmp_path / 'typo' / 'ckpt.pt'} not found\n"
    assert not (tmp_path / "typo").exists()


def test_resume_of_a_ckpt_pt_that_is_not_a_file_is_refused_not_read(tmp_path):
    # --resume reads the run's settings from ckpt.pt only when it is a regular file: a pipe under that name would wait
    # for a writer for ever, a folder is not a checkpoint either
    for d, make in ((tmp_path / "fifo", os.mkfifo), (tmp_path / "folder", Path.mkdir)):
        d.mkdir()
        make(d / "ckpt.pt")
        r = run_train("--resume", "--out_dir", d, timeout=60)
        assert r.returncode == 2 and r.stderr == (f"error: {d / 'ckpt.pt'}: is not a file, and this run writes its checkpoints there: "
                                                  "remove it or choose another --out_dir\n"), r.stderr


def losses(out):
    return [l.split(",")[0] for l in out.splitlines() if l.startswith("iter ") and ": loss " in l]


FAST = ["--batch_size", 4, "--micro_batch", 2, "--eval_interval", 3, "--eval_iters", 1, "--warmup_iters", 2,
        "--sample_tokens", 0, "--log_interval", 1, "--source_max_len", 48, "--target_max_len", 24]
# the tiny model's block linear weights (MFU's N), counted by hand: per layer wq, wo (dim²), wk, wv (dim · n_kv_heads · head_dim),
# w1, w2, w3 (dim · hidden, hidden 352: 8·128/3 = 341, rounded up to a multiple of 32)
TINY_N = 4 * (2 * 128 ** 2 + 2 * 128 * 2 * 32 + 3 * 128 * 352)  # 4 layers, dim 128, 2 kv heads of head_dim 32


@pytest.fixture(scope="session")
def demo_tokenizer(tmp_path_factory):
    # the tokenizer train.py would train on data/sample.jsonl, made once and copied into each out_dir
    d = tmp_path_factory.mktemp("demo")
    r = run_train(*FAST, "--max_iters", 0, "--out_dir", d)
    assert r.returncode == 0, r.stderr
    tok, = d.glob("tokenizer-*.model")
    return tok


def test_resume_gives_the_same_losses(tmp_path, demo_tokenizer):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        shutil.copy(demo_tokenizer, tmp_path / sub / demo_tokenizer.name)
    full = run_train(*FAST, "--max_iters", 6, "--out_dir", tmp_path / "a")
    first = run_train(*FAST, "--max_iters", 3, "--out_dir", tmp_path / "b")
    second = run_train(*FAST, "--max_iters", 6, "--out_dir", tmp_path / "b", "--resume")
    assert full.returncode == first.returncode == second.returncode == 0, full.stderr + first.stderr + second.stderr
    assert "resumed from" in second.stdout
    assert len(losses(full.stdout)) == 6 and losses(first.stdout) + losses(second.stdout) == losses(full.stdout)
    a = torch.load(tmp_path / "a" / "adapter.pt", weights_only=False)["lora"]
    b = torch.load(tmp_path / "b" / "adapter.pt", weights_only=False)["lora"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    changed = run_train(*FAST, "--max_iters", 8, "--out_dir", tmp_path / "b", "--resume", "--batch_size", 8)
    assert changed.returncode == 2 and "was made with --batch_size 4, this run has --batch_size 8" in changed.stderr
    other = run_train(*FAST, "--max_iters", 8, "--out_dir", tmp_path / "b", "--resume", "--adapter", tmp_path / "a" / "adapter.pt")
    assert other.returncode == 2 and f"was made with --adapter , this run has --adapter {tmp_path / 'a' / 'adapter.pt'}" in other.stderr


def test_resume_compares_the_data_by_content_and_every_setting_of_the_model_and_data(tmp_path, demo_tokenizer, mmlu_dirs, train_here, capsys):
    run, _ = train_here
    d, data, same = fresh_out_dir(tmp_path / "o", demo_tokenizer), tmp_path / "d.jsonl", tmp_path / "same.jsonl"
    shutil.copy(ROOT / "data" / "sample.jsonl", data)
    run(*FAST, "--max_iters", 1, "--out_dir", d, "--data", data)
    shutil.copy(data, same)  # the same data under another name: accepted
    assert "nothing to train" in run(*FAST, "--max_iters", 1, "--out_dir", d, "--data", same, "--resume")
    data.write_text("".join(data.read_text().splitlines(True)[:-1]))  # the same name, one example less: refused
    for args, what in ((["--data", data], "--data contents (SHA-1) "), (["--lora_alpha", 32], "--lora_alpha 16.0, this run has --lora_alpha 32.0"),
                       (["--lora_dropout", 0.2], "--lora_dropout 0.1, this run has --lora_dropout 0.2"),
                       (["--val_fraction", 0.2], "--val_fraction"), (["--train_on_source"], "--train_on_source False"),
                       (["--weight_decay", 0.1], "--weight_decay 0.0, this run has --weight_decay 0.1"),  # the optimizer's state_dict
                       (["--beta1", 0.8], "--beta1 0.9, this run has --beta1 0.8"), (["--beta2", 0.9], "--beta2 0.999"),  # restores them
                       (["--group_by_length", "false"], "--group_by_length True")):
        err = refused(run, capsys, *FAST, "--max_iters", 2, "--out_dir", d, "--data", same, "--resume", *args)
        assert f"was made with {what}" in err, (args, err)
    # a resumed demo keeps its tokenizer (not one trained anew for --mmlu, which keeps MMLU's letters): --mmlu then says why not
    err = refused(run, capsys, *FAST, "--max_iters", 2, "--out_dir", d, "--data", same, "--resume", "--mmlu", mmlu_dirs[0])
    assert err.startswith(f"{d / demo_tokenizer.name}: 'A'..'D' after 'Answer:' are not four distinct")
    assert [p.name for p in d.glob("tokenizer-*")] == [demo_tokenizer.name]
    ck = torch.load(d / "ckpt.pt", weights_only=True)
    ck["base"]["device"] = "cuda"  # a random base is rebuilt on the device kind it was made on (CUDA draws other weights)
    torch.save(ck, d / "ckpt.pt")
    r = run_train(*FAST, "--max_iters", 2, "--out_dir", d, "--data", same, "--resume", env=CPU_ENV)
    assert r.returncode == 2 and r.stderr == f"error: {d / 'ckpt.pt'}: its random base was made on cuda; rebuilding it needs the same here\n"


def torchrun_train(*args, env=CPU_ENV):
    # train.py under torchrun, two gloo processes on the CPU -> (process, stdout, stderr)
    with socket.socket() as s:  # a port the kernel says is free, for this run's rendezvous alone
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                          f"--master_port={port}", str(ROOT / "train.py"), *map(str, args)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env, "OMP_NUM_THREADS": "1"},
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # torchrun and both workers: nothing left running
        raise
    return p, out, err


def test_ddp_waits_hours_for_rank_0s_own_work(tmp_path, demo_tokenizer, train_here, monkeypatch):
    # the other processes wait in a collective while rank 0 validates, scores MMLU and exports: NCCL's default timeout
    # (10 min) would end a 65B run at its first MMLU evaluation or its merged export
    run, _ = train_here
    init, got = TR.dist.init_process_group, []
    monkeypatch.setattr(TR.dist, "init_process_group", lambda *a, **kw: got.append(kw["timeout"]) or init(*a, **kw))
    made = []  # DDP's arguments: the 4-bit base each process built itself is never broadcast; a GPU's process drives its own

    class DDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, *a, **kw):
            made.append(kw)
            super().__init__(*a, **kw)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", DDP)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=port).items():
        monkeypatch.setenv(k, str(v))
    assert "trained 1 iters" in run(*FAST, "--max_iters", 1, "--out_dir", fresh_out_dir(tmp_path / "o", demo_tokenizer))
    assert got == [datetime.timedelta(hours=6)] and not TR.dist.is_initialized()
    assert made == [dict(device_ids=[0] if CUDA else None, broadcast_buffers=False)]


def test_ddp_two_gloo_processes_match_one(tmp_path, demo_tokenizer):
    for sub in ("one", "two"):
        (tmp_path / sub).mkdir()
        shutil.copy(demo_tokenizer, tmp_path / sub / demo_tokenizer.name)
    # a peak of 1 GFLOP/s for the CPU (device name ""), so that the log has an MFU: tok/s counts every process's
    # tokens, MFU is per GPU: 4 · N · tok/s / processes / peak, N the block linears' weights
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text("import model\nmodel.PEAK_FLOPS[''] = 1e9\n")
    env = {**CPU_ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    args = [*FAST, "--max_iters", 2, "--lora_dropout", 0.0]
    one = run_train(*args, "--out_dir", tmp_path / "one", env=env)  # gloo on CPUs: any machine has two
    p, out, err = torchrun_train(*args, "--out_dir", tmp_path / "two", env=env)
    assert one.returncode == 0 and p.returncode == 0, one.stderr + err
    assert len(losses(out)) == 2  # only rank 0 logs
    n = TINY_N
    for log, world in ((one.stdout, 1), (out, 2)):
        for m in LOG_LINE.finditer(log):
            # (both figures are printed to 0.1: MFU off by up to 0.05, plus what tok/s's 0.05 makes of it)
            assert float(m[6].rstrip("%")) == pytest.approx(100 * 4 * n * float(m[5]) / world / 1e9, abs=0.05 + 100 * 4 * n * 0.05 / world / 1e9 + 1e-9), m[0]
    a = torch.load(tmp_path / "one" / "adapter.pt", weights_only=False)["lora"]
    b = torch.load(tmp_path / "two" / "adapter.pt", weights_only=False)["lora"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)  # it did train


@needs_cuda
def test_more_processes_than_gpus_is_one_line(tmp_path):
    n = torch.cuda.device_count()  # this process would be the (n+1)th on a machine with n GPUs
    env = {**ENV, "RANK": "0", "LOCAL_RANK": str(n), "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    r = run_train(*FAST, "--max_iters", 1, "--out_dir", tmp_path, env=env)
    assert r.returncode == 2 and r.stderr.strip() == f"error: process {n} on this machine would use cuda:{n}; it has {n} GPU(s)"


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, demo_tokenizer):
    shutil.copy(demo_tokenizer, tmp_path / demo_tokenizer.name)
    r = run_train(*FAST, "--eval_interval", 1, "--max_iters", 8, "--learning_rate", 1e8, "--warmup_iters", 0, "--out_dir", tmp_path)
    assert r.returncode == 2 and re.search(r"(loss|gradient norm) nan; stopping before the update", r.stderr) and "Traceback" not in r.stderr
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ck["iter_num"] == 1 and not list(tmp_path.glob("*.tmp"))  # the step before the NaN, intact
    assert r.stderr.endswith(f"(last checkpoint: {tmp_path / 'ckpt.pt'} (iter 1); --resume continues)\n"), r.stderr
    # a new run over it stops before its own first checkpoint: the file there is the run it replaces, said so
    r = run_train(*FAST, "--eval_interval", 100, "--max_iters", 8, "--learning_rate", 1e8, "--warmup_iters", 0, "--out_dir", tmp_path, "--overwrite")
    assert r.returncode == 2 and r.stderr.endswith(f"(no checkpoint yet ({tmp_path / 'ckpt.pt'}: the run --overwrite replaces))\n"), r.stderr
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["iter_num"] == 1


def test_nan_loss_before_any_checkpoint_says_there_is_none(tmp_path, demo_tokenizer, train_here):
    # a fresh out_dir: no checkpoint of this run, none of another that --overwrite would replace
    run, _ = train_here
    d = fresh_out_dir(tmp_path / "o", demo_tokenizer)
    with pytest.raises(InputError, match=r"; stopping before the update \(no checkpoint yet\)$"):
        run(*FAST, "--eval_interval", 100, "--max_iters", 8, "--learning_rate", 1e8, "--warmup_iters", 0, "--out_dir", d)
    assert [p.name for p in d.iterdir()] == [demo_tokenizer.name]


def fresh_out_dir(path, demo_tokenizer):
    path.mkdir()
    shutil.copy(demo_tokenizer, path / demo_tokenizer.name)
    return path


@pytest.mark.parametrize("where, expect", [
    ("file", "is a file, not a folder"),
    ("file/sub", "cannot write there (Not a directory)"),
    ("/proc/qlora-test/out", "cannot write there (No such file or directory)"),  # /proc takes no new folders
    ("readonly/out", "cannot write there (Permission denied)"),
])
def test_unwritable_out_dir_is_refused_before_building(tmp_path, where, expect):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "readonly").mkdir(mode=0o500)
    if where.startswith("readonly") and os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder anyway")
    out = where if where.startswith("/") else tmp_path / where
    r = run_train("--out_dir", out, "--max_iters", 1)
    assert r.returncode == 2 and f"error: --out_dir {out}: {expect}" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr and r.stdout == ""  # nothing built, nothing trained
    assert (tmp_path / "file").read_text() == "not a folder"


def test_resume_refuses_damaged_or_foreign_checkpoints(tmp_path, train_here, capsys):
    run, _ = train_here
    real = io.BytesIO()
    torch.save({"lora": {"w": torch.zeros(1000)}, "config": {}}, real)
    foreign = io.BytesIO()
    torch.save({"config": Path("x")}, foreign)  # a class weights_only will not unpickle
    cases = [(b"", "not in torch.save's zip format (empty file)"),
             (real.getvalue()[: len(real.getvalue()) // 2], "truncated or damaged (PytorchStreamReader failed reading zip archive: failed finding central directory)\n"),
             (foreign.getvalue(), "holds more than tensors and plain data; refusing to unpickle it"),
             (b"\x80\x04K\x01.", "not in torch.save's zip format"),  # a bare pickle, not torch's zip
             (real.getvalue(), "not a checkpoint written by train.py")]  # a torch file, but not ours
    for i, (content, expect) in enumerate(cases):
        d = tmp_path / str(i)
        d.mkdir()
        (d / "ckpt.pt").write_bytes(content)
        err = refused(run, capsys, "--resume", "--out_dir", d, "--max_iters", 1, before="model ")  # refused before the build
        assert f"{d / 'ckpt.pt'}: {expect}" in err + "\n" and "weights_only" not in err, (expect, err)
        assert (d / "ckpt.pt").read_bytes() == content  # untouched
    r = run_train("--resume", "--out_dir", d, "--max_iters", 1)  # from the command line: that line, exit status 2
    assert r.returncode == 2 and r.stderr == f"error: {err}\n", r.stderr


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence for multidimensional indexing")  # torch's, on the tensor rng entry
def test_resume_refuses_a_checkpoint_edited_by_hand(tmp_path, demo_tokenizer, train_here, capsys):
    # this run's own ckpt.pt, edited: one line naming it, never a traceback, never some LoRA silently started afresh
    run, _ = train_here
    src = fresh_out_dir(tmp_path / "src", demo_tokenizer)
    run(*FAST, "--max_iters", 1, "--out_dir", src)
    ck = torch.load(src / "ckpt.pt", weights_only=True)
    lora, k = ck["lora"], "layers.0.attention.wq.lora_A"

    def state(**edit):  # ckpt.pt's optimizer with every parameter's state edited (None: the entry removed)
        return {"optimizer": {**ck["optimizer"], "state": {i: {n: v for n, v in {**st, **edit}.items() if v is not None}
                                                           for i, st in ck["optimizer"]["state"].items()}}}

    cases = [({"lora": {n: t for n, t in lora.items() if n != k}}, f"its LoRA weights are not this model's ({k})"),
             ({"lora": {**lora, k: lora[k][:1]}}, f"cannot restore it (Error(s) in loading state_dict for LLaMA: size mismatch for {k}:"),
             ({"optimizer": {}}, "cannot restore it ('state')"),
             ({"optimizer": {**ck["optimizer"], "state": []}}, "cannot restore it ('list' object has no attribute 'items')"),
             (state(step=None), "cannot restore it ('step')"),  # (not in the first step: at load)
             (state(step=[1]), "cannot restore it (float() argument must be"),
             (state(step=torch.tensor(0.0)), "cannot restore it (an optimizer step below 1 (or NaN))"),
             (state(step=torch.tensor(float("nan"))), "cannot restore it (an optimizer step below 1 (or NaN))"),
             (state(exp_avg_sq=None), "cannot restore it ('exp_avg_sq')"),
             (state(exp_avg=torch.zeros(1)), "cannot restore it (shape "),  # not broadcast into every moment
             ({"rng": [5]}, "cannot restore it ("),
             ({"rng": [torch.tensor(5)]}, "cannot restore it (too many indices for tensor"),  # an IndexError
             ({"iter_num": "1"}, "not a checkpoint written by train.py"),
             ({"config": [1]}, "not a checkpoint written by train.py"),
             ({"model_config": [1]}, "not a checkpoint written by train.py"),
             ({"base": "x"}, "not a checkpoint written by train.py"),  # (its random base is rebuilt from it)
             ({"model_config": {**ck["model_config"], "lora_r": 8}},
              f"made for a model with lora_r 8; this one has {ck['model_config']['lora_r']}"),
             ({"model_config": {k: v for k, v in ck["model_config"].items() if k != "tie_embeddings"}},
              "made for a model with tie_embeddings None; this one has False")]
    for i, (change, expect) in enumerate(cases):
        d = fresh_out_dir(tmp_path / str(i), demo_tokenizer)
        torch.save({**ck, **change}, d / "ckpt.pt")
        err = refused(run, capsys, *FAST, "--max_iters", 2, "--out_dir", d, "--resume")
        assert err.startswith(f"--resume: {d / 'ckpt.pt'}: {expect}") and not (d / "adapter.pt").exists(), (change, err)
    # the random base is rebuilt as ckpt.pt records it: a vocabulary smaller than its tokenizer is refused, not an IndexError
    d = fresh_out_dir(tmp_path / "vocab", demo_tokenizer)
    torch.save({**ck, "model_config": {**ck["model_config"], "vocab_size": 120}}, d / "ckpt.pt")
    err = refused(run, capsys, *FAST, "--max_iters", 2, "--out_dir", d, "--resume")
    assert err.startswith(f"{d / 'ckpt.pt'}: its random base's vocabulary of 120 is smaller"), err
    # and from the command line: the same line after `error: `, exit status 2
    r = run_train(*FAST, "--max_iters", 2, "--out_dir", d, "--resume")
    assert r.returncode == 2 and r.stderr == f"error: {err}\n", r.stderr


def test_resume_rebuilds_an_adapters_random_base_at_its_vocabulary(tmp_path, train_here):
    # a demo adapter's base has its tokenizer's vocabulary (here below 512); a run on it that is not the demo (--ckpt_dir
    # named, --init random) builds that base again, and so does its --resume (not one at --init random's own size)
    run, rec = train_here
    data = mixed_data(tmp_path / "d.jsonl", 7, 6)
    run(*FAST, "--data", data, "--max_iters", 1, "--out_dir", tmp_path / "a")
    (tmp_path / "empty").mkdir()
    args = (*FAST, "--data", data, "--adapter", tmp_path / "a" / "adapter.pt", "--init", "random", "--ckpt_dir", tmp_path / "empty",
            "--out_dir", tmp_path / "b")
    run(*args, "--max_iters", 1)
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["model_config"]["vocab_size"] < 512
    assert "resumed from" in run(*args, "--max_iters", 2, "--resume") and len(rec.steps) == 3  # 1 + 1 + the one step resumed


def meta_copy(meta_ckpt, d):  # the tiny Meta checkpoint copied to d, its tokenizer inside -> d
    shutil.copytree(meta_ckpt[0], d)
    shutil.copy(meta_ckpt[0].parent / "tokenizer.model", d / "tokenizer.model")
    return d


def trained_on_a_copy(tmp_path, meta_ckpt, run):  # one iteration, checkpointed, on a copy of the checkpoint -> (copy, out_dir, flags)
    d, out = meta_copy(meta_ckpt, tmp_path / "7B"), tmp_path / "o"
    args = ("--ckpt_dir", d, "--out_dir", out, "--lora_r", 8, "--sample_tokens", 0, "--batch_size", 1, "--eval_interval", 1)
    run(*args, "--max_iters", 1)
    return d, out, args


def test_resume_refuses_a_base_whose_params_json_changed(tmp_path, meta_ckpt, train_here, capsys):
    # every setting read_checkpoint compares is the same (the folder, by name), but the model it holds is not
    run, _ = train_here
    d, out, args = trained_on_a_copy(tmp_path, meta_ckpt, run)
    (d / "params.json").write_text(json.dumps({**json.loads((d / "params.json").read_text()), "norm_eps": 1e-3}))
    with pytest.raises(InputError) as e:  # after the base's load, before training
        run(*args, "--max_iters", 2, "--resume")
    assert str(e.value) == f"--resume: {out / 'ckpt.pt'}: made for a model with norm_eps 1e-05; this one has 0.001"
    assert all(line.startswith("loaded") for line in re.split("[\r\n]", capsys.readouterr().err.strip()))  # the base's progress
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 1


def test_resume_refuses_a_base_whose_tokenizer_changed(tmp_path, meta_ckpt, train_here, capsys):
    # ckpt.pt is read before the tokenizer (for a random base it records) and compared again once the tokenizer is known
    run, _ = train_here
    d, _, args = trained_on_a_copy(tmp_path, meta_ckpt, run)
    C.train_tokenizer([" ".join(reversed(WORDS[i : i + 9])) for i in range(len(WORDS) - 9)] * 3, d / "tokenizer.model", 100)
    assert "was made with a tokenizer (SHA-1) " in refused(run, capsys, *args, "--max_iters", 2, "--resume")


def test_new_run_into_an_out_dir_holding_one_is_refused(tmp_path, demo_tokenizer, train_here, capsys):
    run, _ = train_here
    d = fresh_out_dir(tmp_path / "o", demo_tokenizer)
    (d / "ckpt.pt").write_bytes(b"the old run")
    (d / "adapter.pt").write_bytes(b"the old adapter")
    err = refused(run, capsys, *FAST, "--max_iters", 1, "--out_dir", d)
    assert err.startswith(f"{d / 'ckpt.pt'}: out_dir holds a run; --resume continues it, --overwrite replaces it"), err
    assert (d / "ckpt.pt").read_bytes() == b"the old run" and (d / "adapter.pt").read_bytes() == b"the old adapter"
    (d / "ckpt.pt").unlink()  # the adapter kept, its (large) optimizer state not: still a run's result, never replaced unasked
    err = refused(run, capsys, *FAST, "--max_iters", 1, "--out_dir", d)
    assert err == f"{d / 'adapter.pt'}: out_dir holds a run; --overwrite replaces it, or choose another --out_dir"
    assert (d / "adapter.pt").read_bytes() == b"the old adapter"
    run(*FAST, "--max_iters", 1, "--out_dir", d, "--overwrite")
    assert torch.load(d / "ckpt.pt", weights_only=False)["iter_num"] == 1


def test_a_new_run_is_refused_over_the_mmlu_log_it_would_replace_and_only_that(tmp_path, demo_tokenizer, mmlu_dirs, train_here):
    # --mmlu appends to out_dir/mmlu_SPLIT.jsonl, which a new run starts afresh: that split's log is a run's result, kept
    # unless --overwrite; another split's log, or any log for a run without --mmlu, is not touched, so not in the way
    run, rec = train_here
    d = fresh_out_dir(tmp_path / "o", demo_tokenizer)
    for split in ("val", "test"):
        (d / f"mmlu_{split}.jsonl").write_text(f'{{"iter": 0, "split": "{split}"}}\n')
    with pytest.raises(InputError, match=re.escape(f"{d / 'mmlu_test.jsonl'}: out_dir holds a run; --overwrite replaces it, or choose")):
        run(*FAST, "--max_iters", 0, "--mmlu", mmlu_dirs[0], "--mmlu_split", "test", "--out_dir", d)
    assert "nothing to train" in run(*FAST, "--max_iters", 0, "--out_dir", d)
    assert {p.name: p.read_text() for p in d.glob("mmlu_*")} == {f"mmlu_{s}.jsonl": f'{{"iter": 0, "split": "{s}"}}\n' for s in ("val", "test")}


def test_a_link_where_the_run_saves_is_refused_before_training(tmp_path, demo_tokenizer, train_here, capsys):
    # atomic_write refuses to rename over a link; found only at the first checkpoint, that cost the training before it
    run, _ = train_here
    d, target = fresh_out_dir(tmp_path / "o", demo_tokenizer), tmp_path / "elsewhere.pt"
    target.write_bytes(b"the user's file")
    for name, args in (("ckpt.pt", ()), ("ckpt.pt", ("--overwrite",)), ("adapter.pt", ())):  # said first: --overwrite would not do
        (d / name).symlink_to(target if name == "ckpt.pt" else tmp_path / "missing")
        err = refused(run, capsys, *FAST, "--max_iters", 1, "--out_dir", d, *args)
        assert err == f"{d / name}: is a link, and this run writes its checkpoints there: remove it or choose another --out_dir"
        (d / name).unlink()
        (d / name).mkdir()  # a folder: atomic_write's rename fails on it too
        (d / name / "x").write_text("the user's")
        err = refused(run, capsys, *FAST, "--max_iters", 1, "--out_dir", d, *args, before="model ")  # before the build
        assert err == f"{d / name}: is not a file, and this run writes its checkpoints there: remove it or choose another --out_dir"
        shutil.rmtree(d / name)
    assert target.read_bytes() == b"the user's file" and [p.name for p in d.iterdir()] == [demo_tokenizer.name]


def test_rank_minus_one_is_one_process_in_main_and_train(tmp_path):
    # nanoGPT's rule (RANK unset or -1: not distributed) in both places: main() took -1 for another process than rank 0,
    # which neither locked nor made out_dir, while train() ran as the one process and wrote there
    r = run_train(*FAST, "--max_iters", 0, "--sample_tokens", 0, "--out_dir", tmp_path / "o", env={**ENV, "RANK": "-1"})
    assert r.returncode == 0 and "nothing to train" in r.stdout and [p.suffix for p in (tmp_path / "o").iterdir()] == [".model"], r.stderr


def test_rank_set_by_hand_without_the_rest_of_torchruns_variables_is_one_line(tmp_path, train_here, monkeypatch, capsys):
    # RANK alone, or without MASTER_ADDR/MASTER_PORT, or not below WORLD_SIZE: refused before out_dir is made, not
    # torch's traceback from int() or from the rendezvous
    run, _ = train_here
    monkeypatch.setattr(TR.dist, "init_process_group", lambda *a, **kw: pytest.fail("a rendezvous that would wait (6 h)"))
    for env in (dict(RANK="abc"), dict(RANK=0), dict(RANK=0, WORLD_SIZE=1), dict(RANK=0, WORLD_SIZE=1, MASTER_ADDR="h"),
                dict(RANK=0, WORLD_SIZE=1, MASTER_PORT=1), dict(RANK=2, WORLD_SIZE=2, MASTER_ADDR="h", MASTER_PORT=1),
                dict(RANK=0, WORLD_SIZE=1, LOCAL_RANK="q", MASTER_ADDR="h", MASTER_PORT=1),
                dict(RANK="\u00b2", WORLD_SIZE=2, MASTER_ADDR="h", MASTER_PORT=1),  # a digit to str.isdigit, not to int()
                dict(RANK=0, LOCAL_RANK=0, MASTER_ADDR="h", MASTER_PORT=1), dict(RANK=0, WORLD_SIZE="x", MASTER_ADDR="h", MASTER_PORT=1)):
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.setenv(k, str(env[k])) if k in env else monkeypatch.delenv(k, raising=False)
        err = refused(run, capsys, "--out_dir", tmp_path / "o", "--max_iters", 1)
        assert err.startswith("RANK is set, but not as torchrun sets it (unset it for one process): RANK=") and repr(str(env["RANK"])) in err
    assert not (tmp_path / "o").exists() and exit_status(monkeypatch, capsys, TR.main, "--help") == 0  # help still helps
    r = run_train("--out_dir", tmp_path / "o", env={**ENV, "RANK": "0"})  # the command line: exit 2, one line
    assert r.returncode == 2 and r.stderr.startswith("error: RANK is set") and r.stderr.count("\n") == 1 and r.stdout == ""


def test_launch_gives_torchruns_rank_world_and_local_rank(monkeypatch):
    # RANK unset or -1: one process; under torchrun its numbers as given, and LOCAL_RANK when unset is 0 (cuda:0)
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    for env, want in ((dict(), (False, 0, 1, 0)), (dict(RANK=-1), (False, 0, 1, 0)),
                      (dict(RANK=1, WORLD_SIZE=4, LOCAL_RANK=3, MASTER_ADDR="h", MASTER_PORT=29500), (True, 1, 4, 3)),
                      (dict(RANK=2, WORLD_SIZE=3, MASTER_ADDR="h", MASTER_PORT=29500), (True, 2, 3, 0))):
        for k in names:
            monkeypatch.setenv(k, str(env[k])) if k in env else monkeypatch.delenv(k, raising=False)
        assert TR.launch() == want, env


def test_ctrl_c_in_a_process_other_than_rank_0_exits_130_without_a_word(tmp_path, train_here, monkeypatch, capsys):
    # under torchrun every process gets the Ctrl-C: rank 0 alone says where it stopped; the others leave with the
    # status a shell gives an interrupt, and nothing printed
    run, _ = train_here

    def interrupted(c):
        raise KeyboardInterrupt("interrupted at iter 3; no checkpoint yet")

    for k, v in dict(RANK=1, WORLD_SIZE=2, LOCAL_RANK=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=29500).items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.setattr(TR, "train", interrupted)
    with pytest.raises(SystemExit) as e:
        run("--out_dir", tmp_path / "o", "--max_iters", 1)
    assert e.value.code == 130 and capsys.readouterr() == ("", "") and not (tmp_path / "o").exists()
    monkeypatch.setenv("RANK", "0")  # rank 0 of the same run says where it stopped
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(KeyboardInterrupt, match="^interrupted at iter 3; no checkpoint yet$"):
        run("--out_dir", tmp_path / "o", "--max_iters", 1)


def test_second_run_on_the_same_out_dir_names_the_holder(tmp_path):
    d = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from data.files import locked_dir\n"
                               f"with locked_dir({str(d)!r}):\n    print('locked', flush=True); sys.stdin.read()"],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        r = run_train("--out_dir", d, "--max_iters", 1)
        assert r.returncode == 2 and f"--out_dir {d}: in use by another run (pid {holder.pid})" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""
    finally:
        holder.communicate("", timeout=30)
    assert holder.returncode == 0 and not d.exists()  # released at exit: the lock file and the folder it made are gone


def test_final_line_says_what_happened(tmp_path, demo_tokenizer, train_here):
    run, _ = train_here
    d = fresh_out_dir(tmp_path / "o", demo_tokenizer)
    assert "nothing to train (--max_iters 0); no adapter written" in run(*FAST, "--max_iters", 0, "--out_dir", d)
    assert not (d / "adapter.pt").exists() and not (d / "ckpt.pt").exists()
    out = run(*FAST, "--max_iters", 2, "--out_dir", d)
    assert "trained 2 iters in" in out and f"adapter (iter 2) in {d / 'adapter.pt'}" in out
    out = run(*FAST, "--max_iters", 1, "--out_dir", d, "--resume")
    assert "nothing to train (--max_iters 1, the checkpoint is at iter 2)" in out
    assert "trained -" not in out and f"adapter (iter 2) in {d / 'adapter.pt'}" in out
    assert sorted(p.name for p in d.iterdir()) == sorted(["adapter.pt", "ckpt.pt", demo_tokenizer.name])  # no .lock, no .tmp


def test_ctrl_c_is_one_line_exit_130_and_keeps_the_last_checkpoint(tmp_path, demo_tokenizer):
    d = fresh_out_dir(tmp_path / "o", demo_tokenizer)
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, [*FAST, "--max_iters", 10000, "--out_dir", d])],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a shell may have ignored it
    try:
        for line in p.stdout:
            if line.startswith("iter 4: loss"):  # after the checkpoint at iter 3 (--eval_interval 3)
                break
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    m = re.fullmatch(r"interrupted at iter (\d+); last checkpoint: (.*) \(iter (\d+)\); --resume continues\n", err)
    assert p.returncode == 130 and m, err
    assert int(m[1]) >= 4 and m[2] == str(d / "ckpt.pt")
    assert torch.load(d / "ckpt.pt", weights_only=False)["iter_num"] == int(m[3]) >= 3
    assert not list(d.glob("*.tmp")) and not (d / ".lock").exists()



def test_stopped_between_a_checkpoints_two_files_the_adapter_is_never_behind(tmp_path, demo_tokenizer, train_here, monkeypatch):
    # a checkpoint is two files, adapter.pt then ckpt.pt: a Ctrl-C between them leaves ckpt.pt at the previous checkpoint,
    # which the message names and --resume continues from, rewriting both. (ckpt.pt first left adapter.pt one checkpoint
    # behind it, and a resume with nothing left to train reported that old file as the adapter of the last iteration.)
    run, rec = train_here
    d, save = fresh_out_dir(tmp_path / "o", demo_tokenizer), TR.atomic_save

    def stop_at_fourth(obj, path):  # checkpoints at iters 3 and 6, two files each: stopped before the last file
        if len(rec.saves) == 3:
            raise KeyboardInterrupt
        save(obj, path)

    monkeypatch.setattr(TR, "atomic_save", stop_at_fourth)
    with pytest.raises(KeyboardInterrupt, match=re.escape(f"interrupted at iter 5; last checkpoint: {d / 'ckpt.pt'} (iter 3); --resume")):
        run(*FAST, "--max_iters", 6, "--out_dir", d)
    assert rec.saves == [("adapter.pt", None), ("ckpt.pt", 3), ("adapter.pt", None)]
    monkeypatch.setattr(TR, "atomic_save", save)
    out = run(*FAST, "--max_iters", 6, "--out_dir", d, "--resume")
    assert "resumed from" in out and "trained 3 iters" in out and f"adapter (iter 6) in {d / 'adapter.pt'}" in out
    ck, ad = (torch.load(d / f, weights_only=False) for f in ("ckpt.pt", "adapter.pt"))
    assert ck["iter_num"] == 6 and ck["lora"].keys() == ad["lora"].keys()
    assert all(torch.equal(ck["lora"][k], ad["lora"][k]) for k in ck["lora"])

@pytest.mark.skipif(CUDA, reason="CPU thread count")
def test_demo_runs_on_one_cpu_thread_unless_told(tmp_path, demo_tokenizer):
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}
    for extra, n in (([], 1), (["--threads", 2], 2)):
        d = fresh_out_dir(tmp_path / str(n), demo_tokenizer)
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, [*FAST, "--max_iters", 1, "--out_dir", d, *extra])],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and f"on cpu, {n} thread" in r.stdout, r.stdout + r.stderr
        assert torch.load(d / "adapter.pt", weights_only=False)["config"]["threads"] == n


def test_help_lists_every_flag_with_default_and_meaning():
    r = run_train("--help")
    assert r.returncode == 0 and r.stderr == ""
    rows = {l.split()[0]: l for l in r.stdout.splitlines() if l.startswith("  --")}
    # every module-level setting of the config block is a flag, and each has a line with its meaning
    block = (ROOT / "train.py").read_text().split("# config\n")[1].split("\n# the tiny demo")[0]
    names = [n.strip() for line in block.splitlines() for n in line.split(" = ")[0].split(",")]
    assert sorted(rows) == sorted(f"--{n}" for n in names) and len(names) > 30
    assert all(len(l.split(None, 2)) == 3 for l in rows.values())
    assert re.fullmatch(r"\s+--max_iters\s+1875\s+optimizer steps \(Guanaco 7B: 1875\)", rows["--max_iters"])
    assert re.fullmatch(r"\s+--beta2\s+0.999\s+AdamW's moment decay rates, in \[0, 1\)", rows["--beta2"])
    assert re.fullmatch(r"\s+--overwrite\s+False\s+start a new run .*", rows["--overwrite"])
    assert "--max_iters 400" in r.stdout  # the demo's own defaults are named too


@pytest.mark.parametrize("args, expect", [
    ([], "expected one command, kernels, e2e or load, got none"),
    (["train"], "expected one command, kernels, e2e or load, got train"),
    (["load", "--ckpt_dir", "/nonexistent/7B"], "/nonexistent/7B/params.json: not found"),
    (["load", "--write", "5B"], "--write 5B: unknown architecture"),
    (["e2e", "--model", "5B"], "--model 5B: unknown architecture"),
    (["e2e", "--model", "tiny", "--batch", "0"], "--batch must be at least 1"),
    (["e2e", "--model", "tiny", "--seq", str(2**70)], f"--seq must be at least 1 (below 2^31), got {2**70}"),
    (["e2e", "--colour", "red"], "unknown flag --colour"),
    pytest.param(["e2e"], "would build a random 7B on the CPU", marks=pytest.mark.skipif(CUDA, reason="CPU only")),
    pytest.param(["kernels"], "needs a CUDA GPU", marks=pytest.mark.skipif(CUDA, reason="CPU only")),
])
def test_bench_command_line(args, expect, monkeypatch, capsys):
    assert exit_status(monkeypatch, capsys, B.main, *args) == 2 and expect in (err := capsys.readouterr().err) and err.count("\n") == 1


def test_bench_write_never_replaces_a_checkpoint(tmp_path, monkeypatch, capsys):
    (tmp_path / "params.json").write_text("{}")  # --ckpt_dir's default is where the README puts Meta's download
    assert exit_status(monkeypatch, capsys, B.main, "load", "--write", "tiny", "--ckpt_dir", tmp_path) == 2
    assert capsys.readouterr().err == f"error: --ckpt_dir {tmp_path}: not empty; --write makes its random checkpoint in a new or empty folder\n"
    assert os.listdir(tmp_path) == ["params.json"]
    assert exit_status(monkeypatch, capsys, B.main, "load", "--write", "tiny", "--ckpt_dir", tmp_path / "params.json") == 2  # before the build
    assert capsys.readouterr().err == f"error: --ckpt_dir {tmp_path / 'params.json'}: a file; --write makes its random checkpoint in a new or empty folder\n"
    (empty := tmp_path / "empty").mkdir()  # a new or empty folder: written, then loaded
    r = subprocess.run([sys.executable, "-W", "default::ResourceWarning", str(ROOT / "bench.py"), "load", "--write", "tiny", "--ckpt_dir", empty],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)  # -W: a file left to the collector is reported
    assert r.returncode == 0 and f"| {empty} |" in r.stdout and sorted(os.listdir(empty)) == ["consolidated.00.pth", "params.json"], r.stderr
    # its peaks are read from /proc/self/status while it loads: the resident set (with the mapped file) holds the private pages
    anon, rss = map(float, re.search(rf"^\| {re.escape(str(empty))} \| [\d.]+ \| [\d.]+ \| [\d.]+, ([\d.]+) \| ([\d.]+) \|", r.stdout, re.M).groups())
    assert 0 < anon <= rss, r.stdout
    assert "Warning" not in r.stderr, r.stderr


def test_bench_load_quantizes_the_base_unless_no_quant(meta_ckpt, monkeypatch, capsys):
    # load times the model train.py builds, NF4; --no_quant, the 16-bit base beside it for comparison
    d, cfg, _ = meta_ckpt
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    nets, from_checkpoint = [], M.LLaMA.from_checkpoint.__func__
    monkeypatch.setattr(M.LLaMA, "from_checkpoint", classmethod(lambda cls, *a, **kw: nets.append(from_checkpoint(cls, *a, **kw)) or nets[-1]))
    B.main(["load", "--ckpt_dir", str(d)])
    B.main(["load", "--ckpt_dir", str(d), "--no_quant"])
    rows = [l.split(" | ") for l in capsys.readouterr().out.splitlines() if l.startswith(f"| {d} |")]
    assert len(rows) == 2
    for row in rows:  # memory is sampled once more when the load is done: a load faster than the 20 ms sampling has a peak
        before, peak = map(float, row[3].split(", "))
        assert before > 0 and peak > 0 and float(row[4]) >= peak
    nf4, plain = (n.layers[0].attention.wq.weight for n in nets)
    assert isinstance(nf4, qlora.NF4Weight) and nf4.shape == (cfg.dim, cfg.dim)
    assert not isinstance(plain, qlora.NF4Weight) and plain.dtype == torch.bfloat16  # the 16-bit base, as loaded


def test_bench_e2e_runs_past_the_architectures_context():
    # tiny's context is 256 (RoPE tables for 512): a longer --seq stretches it, as a long-context benchmark needs
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "e2e", "--model", "tiny", "--batch", "1", "--seq", "600", "--steps", "2",
                        "--lora_r", "8"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0 and "| tiny NF4 r=8 | 1 x 600 |" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "e2e", "--model", "tiny", "--batch", "1", "--seq", "16", "--steps", "1",
                        "--no_quant"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0 and f"| tiny {'bf16' if CUDA else 'fp32'} r=64 | 1 x 16 |" in r.stdout, r.stderr  # the base's dtype
    if not CUDA:  # no peak FLOP/s is known for a CPU: its MFU column says "-", not a share of some GPU's peak
        assert re.search(r"^\| tiny fp32 r=64 \| 1 x 16 \| \d+ \| - \| ", r.stdout, re.M), r.stdout


def test_bench_e2e_median_of_an_even_number_of_steps(monkeypatch, capsys):
    # --steps 3: the warm-up (8 s) left out, the median of 2^-21 and 2^-23 s is their mean, 5 · 2^-24 s
    ticks = iter([0.0, 2.5, 10.0, 18.0, 20.0, 20.0 + 2 ** -21, 30.0, 30.0 + 2 ** -23])
    monkeypatch.setattr(B, "time", fake_clock(ticks, strftime=lambda f: "today"))
    B.main(["e2e", "--model", "tiny", "--batch", "2", "--seq", "4", "--steps", "3", "--lora_r", "4", "--no_quant"])
    assert re.search(rf"^\| tiny \w+ r=4 \| 2 x 4 \| {2 * 4 / (5 * 2 ** -24):.0f} \| ", capsys.readouterr().out, re.M)


def test_bench_e2e_row_from_the_step_times_and_the_block_weights(monkeypatch, capsys):
    # on a clock that says: build 2.5 s, steps of 8 s (the warm-up, left out), 2^-21, 2^-23 and 2^-22 s. The median timed step,
    # 2^-22 s, gives tok/s = batch · seq / 2^-22, and MFU = 4 · N · tok/s over the GPU's peak (989 TFLOP/s for an H100),
    # N the weights of the blocks' linear layers (not the head, not the LoRA adapters). Each step runs the forward on
    # batch x seq tokens, and with gradient checkpointing each block's forward again in backward.
    ticks = iter([0.0, 2.5, 10.0, 18.0, 20.0, 20.0 + 2 ** -21, 30.0, 30.0 + 2 ** -23, 40.0, 40.0 + 2 ** -22])
    monkeypatch.setattr(B, "time", fake_clock(ticks, strftime=lambda f: "today"))
    monkeypatch.setattr(B, "header", lambda: "NVIDIA H100 80GB HBM3")
    shapes, forward, blocks, block = [], M.LLaMA.forward, [], M.FeedForward.forward
    monkeypatch.setattr(M.LLaMA, "forward", lambda self, idx, targets=None, start_pos=None: shapes.append(tuple(idx.shape)) or forward(self, idx, targets, start_pos))
    monkeypatch.setattr(M.FeedForward, "forward", lambda self, x: blocks.append(1) or block(self, x))
    B.main(["e2e", "--model", "tiny", "--batch", "2", "--seq", "4", "--steps", "4", "--lora_r", "4", "--no_quant"])  # (the same linear shapes in NF4)
    lines = capsys.readouterr().out.splitlines()
    head = next(i for i, l in enumerate(lines) if l.startswith("| model |"))
    row = dict(zip(*([c.strip() for c in lines[i].strip("|").split("|")] for i in (head, head + 2))))
    cfg, n = M.CONFIGS["tiny"], TINY_N
    tok_s = 2 * 4 * 2 ** 22
    assert (row["batch x seq"], row["tok/s"], row["build s"]) == ("2 x 4", str(tok_s), "2.5"), row
    assert row["MFU"] == f"{100 * 4 * n * tok_s / 989e12:.1f}%" == "10.0%", row
    assert lines[head + 3].endswith("step times ms: 8000, 0, 0, 0"), lines[head + 3]
    assert shapes == [(2, 4)] * 4 and len(blocks) == 4 * cfg["n_layers"] * 2


def test_bench_and_prepare_help():
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and all(w in r.stdout for w in ("bench.py kernels", "bench.py e2e", "bench.py load"))
    for flag in ("ckpt_dir", "write", "model", "batch", "seq", "steps", "lora_r", "no_quant"):
        assert re.search(rf"^\s+--{flag}\s+\S+\s+\S", r.stdout, re.M), flag
    r = run_prepare("--help")
    assert r.returncode == 0 and "--lang" in r.stdout and "usage: python data/prepare.py" in r.stdout


def test_mmlu_adapter_and_chat_after_the_demo(tmp_path, mmlu_dirs, train_here, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    r = run_train(*FAST, "--max_iters", 3, "--mmlu", mmlu_dirs[0], "--out_dir", a)
    assert r.returncode == 0, r.stderr
    logged = [json.loads(line) for line in (a / "mmlu_val.jsonl").read_text().splitlines()]
    assert [e["iter"] for e in logged] == [0, 3]  # before training (iter 0) and at the end; --eval_interval 3
    assert re.search(r"^iter 3: mmlu val \d\.\d{3} \(3 subjects, 10 questions, ", r.stdout, re.M), r.stdout
    ad = torch.load(a / "adapter.pt", weights_only=True)
    assert ad["template"] == "alpaca" and ad["base"]["init"] == "random" and ad["base"]["seed"] == 0
    assert ad["config"]["learning_rate"] == 2e-3 and ad["config"]["lora_dropout"] == 0.1  # what ran, not sentinels
    val = re.search(r"^iter 3: val loss (\S+)", r.stdout, re.M)[1]
    # a new run from the adapter starts where the first one ended: same validation loss, same MMLU answers, with the
    # tokenizer adapter.pt names (copied into its out_dir, so that its own adapter does not depend on the first folder)
    run, _ = train_here  # (the runs below in this process)
    out = run(*FAST, "--max_iters", 0, "--mmlu", mmlu_dirs[0], "--adapter", a / "adapter.pt", "--out_dir", b)
    tok, = a.glob("tokenizer-*")
    assert f"iter 0: val loss {val}" in out and [p.name for p in b.glob("tokenizer-*")] == [tok.name]
    assert (b / tok.name).read_bytes() == tok.read_bytes()
    assert json.loads((b / "mmlu_val.jsonl").read_text())["subjects"] == logged[-1]["subjects"]
    # scoring again into that folder (the base, another adapter) would replace its log: refused without --overwrite
    err = refused(run, capsys, *FAST, "--max_iters", 0, "--mmlu", mmlu_dirs[0], "--out_dir", b)
    assert err.startswith(f"{b / 'mmlu_val.jsonl'}: out_dir holds a run; --overwrite replaces it")
    out = run(*FAST, "--max_iters", 4, "--out_dir", a, "--resume")  # without --mmlu: its tokenizer (with the letters) goes on
    assert "resumed from" in out and [p.name for p in a.glob("tokenizer-*")] == [tok.name]
    ad["base"]["device"] = "cuda"  # CUDA draws other weights from one seed: not rebuilt on a CPU
    torch.save(ad, tmp_path / "cuda.pt")
    r = run_train(*FAST, "--max_iters", 0, "--adapter", tmp_path / "cuda.pt", "--out_dir", tmp_path / "c", env=CPU_ENV)
    assert r.returncode == 2 and r.stderr == f"error: {tmp_path / 'cuda.pt'}: its random base was made on cuda; rebuilding it needs the same here\n"
    # the chat command rebuilds the demo's base from what adapter.pt records and answers
    chat = subprocess.run([sys.executable, str(ROOT / "model.py"), "--adapter", str(a / "adapter.pt"), "--prompt", "Name a colour.",
                           "--temperature", "0", "--max_new_tokens", "8"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert chat.returncode == 0 and chat.stdout.strip() and not chat.stderr.strip(), chat.stderr


def test_a_new_run_with_mmlu_trains_its_own_tokenizer_beside_the_one_without(tmp_path, demo_tokenizer, mmlu_dirs, train_here):
    # the demo's tokenizer is cached under out_dir by what it was trained on: with --mmlu that includes MMLU's letters,
    # so a run with --mmlu in a folder holding the tokenizer of one without trains and uses its own (the letters single tokens)
    run, _ = train_here
    d = fresh_out_dir(tmp_path / "o", demo_tokenizer)
    out = run(*FAST, "--max_iters", 0, "--mmlu", mmlu_dirs[0], "--mmlu_max", 1, "--out_dir", d)
    assert re.search(r"^iter 0: mmlu val \d\.\d{3} \(3 subjects, 3 questions, ", out, re.M), out
    assert len(list(d.glob("tokenizer-*.model"))) == 2


def test_the_demo_tokenizer_is_trained_on_whole_examples(tmp_path, train_here):
    # sentencepiece drops each training text's trailing whitespace: trained on the pieces of examples, a system turn's
    # closing "\n" had no token (unk in every example, " ⁇ " in the sample)
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"say {w}"},
                          {"role": "assistant", "content": f"{w} it is"}]} for w in WORDS[:12]]
    f = write(tmp_path / "m.jsonl", [json.dumps(r) for r in rows])
    run, _ = train_here
    run("--data", f, "--max_iters", 0, "--out_dir", tmp_path / "o", "--sample_tokens", 0)
    tok = C.Tokenizer(next((tmp_path / "o").glob("tokenizer-*.model")))
    assert tok.sp.unk_id() not in tok.encode("Be brief.\n### Human: say it") and tok.decode(tok.encode("a\nb")) == "a\nb"


def test_an_adapters_random_base_is_rebuilt_as_it_records(tmp_path, demo_adapter, meta_ckpt, train_here):
    # its seed (3 here) whatever this run's --seed, its tokenizer (copied into out_dir) rather than one trained on --data:
    # the model that ran is the fixture's own, val loss for val loss
    path, net, tok = demo_adapter
    run, rec = train_here
    out = run("--adapter", path, "--max_iters", 0, "--seed", 5, "--out_dir", tmp_path / "o", "--val_fraction", 0.2)
    assert rec.seeds == [3] and [p.read_bytes() for p in (tmp_path / "o").glob("tokenizer-*")] == [tok.path.read_bytes()]
    with torch.no_grad():
        losses = [net.eval()(*P.get_batch(ex, idx))[1].item() for kind, ex, idx in rec.batches if kind == "val"]
    assert len(losses) == 4 and f"iter 0: val loss {sum(losses) / 4:.4f}\n" in out
    assert "trained with a vocabulary" not in out  # none was trained: a copy
    # its own adapter.pt records that base again: the adapter's seed, the tokenizer copied beside it
    run(*FAST, "--adapter", path, "--max_iters", 1, "--seed", 5, "--out_dir", tmp_path / "p")
    base = torch.load(tmp_path / "p" / "adapter.pt", weights_only=True)["base"]
    assert (base["seed"], base["tokenizer"]) == (3, str(tmp_path / "p" / tok.path.name))
    # a run that is not the demo (--ckpt_dir names a folder, with a tokenizer one level up) takes the adapter's tokenizer
    # too, and its vocabulary size (the demo's is the tokenizer's, --init random's at least the architecture's): the same base
    rec.batches.clear()
    out = run(*FAST, "--adapter", path, "--init", "random", "--ckpt_dir", meta_ckpt[0], "--max_iters", 0, "--out_dir", tmp_path / "q",
              "--val_fraction", 0.2)
    assert [p.name for p in (tmp_path / "q").glob("tokenizer*")] == [tok.path.name]
    with torch.no_grad():
        (loss,) = [net(*P.get_batch(ex, idx))[1].item() for kind, ex, idx in rec.batches if kind == "val"]
    assert f"iter 0: val loss {loss:.4f}\n" in out


def test_a_checkpoint_run_takes_nothing_from_an_adapters_random_base(tmp_path, meta_ckpt, train_here):
    # an adapter trained on a random base of the checkpoint's architecture, continued on the checkpoint itself: the
    # checkpoint's tokenizer, not the one the adapter's base records (nor is that base's device kind asked for)
    d, _, _ = meta_ckpt
    net = M.LLaMA.from_checkpoint(d, quantize=False, dtype=torch.float32, lora_r=4, progress=False)
    torch.save({"lora": net.lora_state_dict(), "model_config": vars(net.config), "config": {}, "base": {
        "init": "random", "model": "tiny", "seed": 3, "tokenizer": str(tmp_path / "gone.model"), "device": "cuda"}}, tmp_path / "a.pt")
    run, _ = train_here
    run("--ckpt_dir", d, "--adapter", tmp_path / "a.pt", "--out_dir", tmp_path / "o", "--max_iters", 0, "--sample_tokens", 0,
        "--data", mixed_data(tmp_path / "d.jsonl", 2, 2), "--val_fraction", 0, "--source_max_len", 32, "--target_max_len", 16)
    assert not list((tmp_path / "o").glob("tokenizer*"))


def test_init_random_sizes_the_embedding_to_at_least_the_architectures(tmp_path, meta_ckpt, train_here):
    # what random_base later rebuilds from: --init random with a checkpoint's tokenizer (120 tokens) keeps tiny's 512
    # rows (the demo's, sized to its own tokenizer, are checked with the data order), from --seed, recorded
    run, rec = train_here
    run(*FAST, "--data", mixed_data(tmp_path / "d.jsonl", 4, 4), "--max_iters", 1, "--val_fraction", 0, "--init", "random",
        "--ckpt_dir", meta_ckpt[0], "--seed", 8, "--out_dir", tmp_path / "o")
    ck = torch.load(tmp_path / "o" / "adapter.pt", weights_only=True)
    assert (rec.seeds, ck["base"]["seed"], ck["model_config"]["vocab_size"]) == ([8], 8, 512)
    assert C.Tokenizer(meta_ckpt[0].parent / "tokenizer.model").n_words < 512


def test_train_on_a_checkpoint_and_use_the_exports_from_any_folder(tmp_path, meta_ckpt, train_here, monkeypatch, capsys):
    # --ckpt_dir given relative to the working folder is recorded absolute (adapter.pt, the peft export), through a
    # link as the link (its tokenizer is beside the link, not beside the target); the merged export holds its
    # tokenizer; a context past 2048 is the run's to choose on Meta's layout
    out, d = tmp_path / "o", tmp_path / "checkpoints" / "7B"
    shutil.copytree(meta_ckpt[0], tmp_path / "store" / "tiny")
    d.parent.mkdir()
    d.symlink_to(tmp_path / "store" / "tiny")
    shutil.copy(meta_ckpt[0].parent / "tokenizer.model", d.parent / "tokenizer.model")
    r = run_train("--ckpt_dir", os.path.relpath(d, ROOT), "--out_dir", out, "--max_iters", 1, "--lora_r", 8, "--sample_tokens", 0,
                  "--export", "merged,merged_hf,peft", "--source_max_len", 2048, "--target_max_len", 1024)
    assert r.returncode == 0, r.stderr
    assert f"model {d} (checkpoint): " in r.stdout  # the folder that ran, not --model's default name
    assert torch.load(out / "adapter.pt", weights_only=True)["base"]["ckpt_dir"] == str(d)
    assert json.loads((out / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(d)
    assert (out / "merged" / "tokenizer.model").read_bytes() == (out / "merged_hf" / "tokenizer.model").read_bytes() \
        == (d.parent / "tokenizer.model").read_bytes()
    assert sorted(p.name for p in (out / "merged_hf").iterdir()) == ["config.json", "merge.json", "model.safetensors",
                                                                    "tokenizer.model", "tokenizer_config.json"]
    said = {}
    for args in (["--adapter", "o/peft"], ["--ckpt_dir", "o/merged"], ["--ckpt_dir", "o/merged_hf"], ["--adapter", "o/adapter.pt"]):
        chat = subprocess.run([sys.executable, str(ROOT / "model.py"), *args, "--template", "none", "--prompt", "the lazy dog",
                               "--temperature", "0", "--max_new_tokens", "4"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300, env=ENV)
        assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
        said[args[1]] = chat.stdout
    assert said["o/merged"] == said["o/merged_hf"]  # one model in two layouts
    # training on from the adapter alone takes the checkpoint it records, as model.py did above (not the tiny demo's random
    # base); --init checkpoint agrees with it; a peft folder's base_model_name_or_path counts, unless it names no folder here
    run, _ = train_here  # (from here on in this process)
    for args in (["--adapter", out / "adapter.pt"], ["--adapter", out / "peft", "--init", "checkpoint"]):
        assert f"model {d} (checkpoint): " in run(*args, "--out_dir", tmp_path / "o2", "--max_iters", 0, "--sample_tokens", 0)
    shutil.copytree(out / "peft", tmp_path / "hub")
    conf = json.loads((tmp_path / "hub" / "adapter_config.json").read_text())
    (tmp_path / "hub" / "adapter_config.json").write_text(json.dumps({**conf, "base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}))
    err = refused(run, capsys, "--adapter", tmp_path / "hub", "--out_dir", tmp_path / "o3", "--max_iters", 0)
    assert err == f"--adapter {tmp_path / 'hub'}: its base meta-llama/Llama-2-7b-hf is not a folder here; name one with --ckpt_dir"
    with pytest.raises(InputError) as e:  # model.py reads it as train.py does
        chat_here(monkeypatch, capsys, "--adapter", tmp_path / "hub", "--prompt", "x")
    assert str(e.value) == err
    assert len(chat_here(monkeypatch, capsys, "--adapter", tmp_path / "hub", "--ckpt_dir", d, "--prompt", "x")[0]) == 1


def test_export_over_a_file_is_refused_before_training(tmp_path, train_here, capsys):
    run, _ = train_here
    (out := tmp_path / "o").mkdir()
    (out / "merged_hf").write_text("mine")
    err = refused(run, capsys, "--out_dir", out, "--export", "peft,merged_hf")
    assert err == f"{out / 'merged_hf'}: is a file; --export peft,merged_hf writes a folder there"
    assert [p.name for p in out.iterdir()] == ["merged_hf"] and (out / "merged_hf").read_text() == "mine"  # nothing trained
    # a folder with files in it (the user's, or a run's whose checkpoints are gone) is written into only with --overwrite
    (out / "merged_hf").unlink()
    (out / "peft").mkdir()
    (out / "peft" / "adapter_config.json").write_text("mine")
    err = refused(run, capsys, "--out_dir", out, "--export", "peft")
    assert err == f"{out / 'peft'}: is a folder with files (--overwrite writes into it); --export peft writes a folder there"
    assert (out / "peft" / "adapter_config.json").read_text() == "mine"
    assert run_train("--out_dir", out, "--export", "peft", "--max_iters", 0, "--overwrite").returncode == 0
    assert json.loads((out / "peft" / "adapter_config.json").read_text())["r"] == 64


def test_export_over_the_base_it_trains_is_refused_before_training(tmp_path, meta_ckpt, train_here, capsys):
    # a second finetune of a merged export, in the same out_dir: --export merged would replace the base it reads
    run, _ = train_here
    (out := tmp_path / "o").mkdir()
    meta_copy(meta_ckpt, out / "merged")
    (tmp_path / "link").symlink_to(out / "merged")
    before = {p.name: p.read_bytes() for p in (out / "merged").iterdir()}
    for ckpt_dir, export, init in ((out / "merged", "merged", "checkpoint"), (tmp_path / "link", "peft,merged", "checkpoint"),
                                   (out / "merged", "merged", "random")):  # a random base: the folder lends its tokenizer
        err = refused(run, capsys, "--ckpt_dir", ckpt_dir, "--init", init, "--out_dir", out, "--export", export, "--lora_r", 8,
                      "--batch_size", 1, "--max_iters", 1, "--source_max_len", 96, "--target_max_len", 48)
        assert err == f"{out / 'merged'}: is --ckpt_dir; --export {export} writes a folder there"
    assert {p.name: p.read_bytes() for p in (out / "merged").iterdir()} == before and [p.name for p in out.iterdir()] == ["merged"]
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "merged").symlink_to(tmp_path / "elsewhere")  # a link (here dangling) was written through, or failed after training
    r = run_train("--init", "random", "--out_dir", tmp_path / "r", "--export", "merged", "--max_iters", 0)
    assert r.returncode == 2 and r.stderr == f"error: {tmp_path / 'r' / 'merged'}: is a link; --export merged writes a folder there\n"
    (tmp_path / "r" / "merged").unlink()  # and with no --ckpt_dir, a random base's export goes ahead
    assert run_train("--init", "random", "--out_dir", tmp_path / "r", "--export", "merged", "--max_iters", 0).returncode == 0


def test_export_into_an_empty_folder_or_a_resumed_runs_own_goes_ahead(tmp_path, demo_tokenizer, train_here, monkeypatch):
    # refused is a folder with another's files: an empty one holds nothing to lose, and a resumed run's export (written
    # by its first part) is its own to write again; with no --ckpt_dir (a random base) no folder is the base, not even
    # the working one
    run, rec = train_here
    d = fresh_out_dir(tmp_path / "o", demo_tokenizer)
    (d / "peft").mkdir()
    run(*FAST, "--max_iters", 1, "--out_dir", d, "--export", "peft")
    (d / "peft" / "adapter_config.json").write_text("{}")  # (the exports are recorded here, not written)
    run(*FAST, "--max_iters", 2, "--out_dir", d, "--export", "peft", "--resume")
    (d / "merged").mkdir()
    monkeypatch.chdir(d / "merged")
    run(*FAST, "--data", ROOT / "data" / "sample.jsonl", "--max_iters", 0, "--out_dir", d, "--export", "merged", "--overwrite")
    assert [k for k, _ in rec.exports] == ["peft", "peft", "merged"]


def test_a_folder_with_only_tokenizer_json_says_so(tmp_path, meta_ckpt, tokenizer_file):
    # Llama 3's, or what transformers 5 saves: a tokenizer.json, which sentencepiece does not read; said before any load
    _, cfg, weights = meta_ckpt
    hf = write_hf(tmp_path / "hf", cfg, weights, tokenizer_file)
    (hf / "tokenizer.model").unlink()
    (hf / "tokenizer.json").write_text("{}")
    expect = f"error: {hf / 'tokenizer.model'}: tokenizer not found (only tokenizer.json, which is not read: copy the base's tokenizer.model)\n"
    for r in (run_train("--ckpt_dir", hf, "--out_dir", tmp_path / "o", "--lora_r", 8, "--source_max_len", 64, "--target_max_len", 32),
              run_chat("--ckpt_dir", hf, "--prompt", "x")):
        assert r.returncode == 2 and r.stderr == expect and r.stdout == ""
    (hf / "tokenizer.json").unlink()  # without it, the plain message
    assert run_chat("--ckpt_dir", hf, "--prompt", "x").stderr == f"error: {hf / 'tokenizer.model'}: tokenizer not found\n"


def test_a_tokenizer_in_a_folder_whose_name_is_not_utf8_is_read(tmp_path, tokenizer_file):
    # a Latin-1 name: Python holds it with a surrogate escape, which sentencepiece refused as a str (a TypeError)
    (d := Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))).mkdir()
    shutil.copy(tokenizer_file, d / "tokenizer.model")
    assert C.Tokenizer(d / "tokenizer.model").encode("the lazy dog") == C.Tokenizer(tokenizer_file).encode("the lazy dog")


@pytest.mark.parametrize("content", [b"", b"\x0agarbage" * 50])
def test_unreadable_tokenizer_is_one_line(tmp_path, meta_ckpt, content):
    d = tmp_path / "7B"
    shutil.copytree(meta_ckpt[0], d)
    (d / "tokenizer.model").write_bytes(content)
    r = run_train("--ckpt_dir", d, "--out_dir", tmp_path / "o", "--max_iters", 1, "--lora_r", 8)
    assert r.returncode == 2 and f"{d / 'tokenizer.model'}: not a sentencepiece tokenizer model" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("texts, vocab", [
    (["one short record"], None),  # too little text for 512 pieces
    (["".join(chr(0x4E00 + k) for k in range(i, i + 66)) for i in range(0, 1518, 66)], None),  # 1,518 characters > 512
])
def test_demo_tokenizer_fits_the_data(tmp_path, texts, vocab):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"instruction": t, "output": t}, ensure_ascii=False) + "\n" for t in texts))
    r = run_train("--data", f, "--out_dir", tmp_path / "o", "--max_iters", 1, "--batch_size", 1, "--micro_batch", 1,
                  "--sample_tokens", 0, "--val_fraction", 0)
    assert r.returncode == 0, r.stderr
    n = int(re.search(r"trained with a vocabulary of (\d+)", r.stdout)[1])
    assert (n < 512) if len(texts) == 1 else (n >= 1518)


# ---------------------------------------------------------------------------------------------------
# train.py's less travelled paths: behaviour the tests above would let change unnoticed
# Most run train.main in this process (a second or two each, no interpreter start), with its collaborators
# watched: the learning rate and gradient norm the optimizer gets at each step, every batch it reads, the loss of
# every forward pass and the gradient that reaches it, what it saves, samples and exports, and a fake clock.

import itertools  # noqa: E402
import random  # noqa: E402

import train as TR  # noqa: E402

LOG_LINE = re.compile(r"^iter (\d+): loss (\S+), lr (\S+), (\d+)ms, (\S+) tok/s, mfu (\S+), mem \S+GB, eta (\d+)m(\d\d)s$", re.M)


@pytest.fixture
def train_here(monkeypatch, capsys):
    # -> (run(*flags) -> stdout, rec). The clock's n-th reading is 5n(n+1) s: every step takes a whole, different
    # number of seconds, read back from its log line. At normal speed: no Triton interpreter (train.py's own setting).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.chdir(ROOT)
    rec = SimpleNamespace(opt=None, steps=[], batches=[], forwards=[], saves=[], samples=[], mfu=[], exports=[], seeds=[], ckpt_calls=0)

    class Optimizer(TR.PagedAdamW):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            rec.opt = kw

        def step(self):
            grads = [p.grad.flatten() for g in self.param_groups for p in g["params"] if p.grad is not None]
            rec.steps.append(dict(lr=self.param_groups[0]["lr"], gnorm=torch.cat(grads).double().norm().item(),
                                  mapped=[l for l in Path("/proc/self/maps").read_text().splitlines() if "/ckpt.pt" in l]))  # any still mapped
            return super().step()

    def get_batch(examples, idx):  # validation reads ranges of val_set, training lists of train_set indices
        rec.batches.append(("val" if isinstance(idx, range) else "train", examples, list(idx)))
        return P.get_batch(examples, idx)

    forward, generate, from_config, checkpoint = M.LLaMA.forward, M.LLaMA.generate, M.LLaMA.from_config.__func__, M.checkpoint

    def spy_forward(self, idx, targets=None, start_pos=None):
        logits, loss = forward(self, idx, targets, start_pos)
        if loss is not None:
            f = dict(grad=loss.requires_grad, training=self.training, loss=loss.item(), upstream=None)
            if loss.requires_grad:  # d(what backward starts from)/d(this micro-batch's loss)
                loss.register_hook(lambda g: f.__setitem__("upstream", g.item()))
            rec.forwards.append(f)
        return logits, loss

    def spy_generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, stream=None):
        rec.samples.append(dict(training=self.training, prompt=idx[0].tolist(), n=max_new_tokens, temperature=temperature, eos_id=eos_id))
        return generate(self, idx, max_new_tokens, temperature, top_k, top_p, eos_id, stream)

    def spy_from_config(cls, cfg, *a, seed=0, **kw):
        rec.seeds.append(seed)
        return from_config(cls, cfg, *a, seed=seed, **kw)

    def spy_checkpoint(fn, *a, **kw):
        rec.ckpt_calls += isinstance(fn, torch.nn.Module)  # a block recomputed in backward (not the chunked loss)
        return checkpoint(fn, *a, **kw)

    def spy_save(obj, path):
        rec.saves.append((Path(path).name, obj.get("iter_num")))
        atomic_save(obj, path)

    clock = itertools.count(1)
    monkeypatch.setattr(TR, "time", SimpleNamespace(time=lambda: 5 * (n := next(clock)) * (n + 1)))
    monkeypatch.setattr(TR, "PagedAdamW", Optimizer)
    monkeypatch.setattr(TR, "get_batch", get_batch)
    monkeypatch.setattr(TR, "atomic_save", spy_save)
    monkeypatch.setattr(TR, "mfu", lambda *a: rec.mfu.append(a) or "-")
    monkeypatch.setattr(TR, "export_merged", lambda net, out, **kw: rec.exports.append(("merged", kw)))
    monkeypatch.setattr(TR, "export_peft", lambda net, out, **kw: rec.exports.append(("peft", kw)))
    monkeypatch.setattr(M.LLaMA, "forward", spy_forward)
    monkeypatch.setattr(M.LLaMA, "generate", spy_generate)
    monkeypatch.setattr(M.LLaMA, "from_config", classmethod(spy_from_config))
    monkeypatch.setattr(M, "checkpoint", spy_checkpoint)
    threads = torch.get_num_threads()

    def run(*args):
        capsys.readouterr()
        TR.main([str(a) for a in args])
        return capsys.readouterr().out

    try:
        yield run, rec
    finally:
        torch.set_num_threads(threads)


def refused(run, capsys, *args, before=r"iter \d"):
    # train.py's main in this process, refused before stdout has a line starting with `before` (by default: before it
    # trains) -> the one line run() prints (an InputError); nothing else said on stderr
    with pytest.raises(InputError) as e:
        run(*args)
    out, err = capsys.readouterr()
    assert "\n" not in str(e.value) and err == "" and not re.search(f"^{before}", out, re.M), (str(e.value), out, err)
    return str(e.value)


def train_defaults():
    # the config block's names and values, as main() hands them to resolve
    block = (ROOT / "train.py").read_text().split("# config\n")[1].split("\n# the tiny demo")[0]
    return {n: getattr(TR, n) for names in re.findall(r"^(\w[\w, ]*?) = ", block, re.M) for n in map(str.strip, names.split(","))}


def step_batches(rec, grad_accum):
    # the training micro-batches, one list per optimizer step
    train = [(ex, idx) for kind, ex, idx in rec.batches if kind == "train"]
    return [train[i : i + grad_accum] for i in range(0, len(train), grad_accum)]


def mixed_data(path, n_alpaca, n_guanaco):
    # short examples of both shapes (the majority names the template), alternating
    rows = [json.dumps({"instruction": f"Name {WORDS[i]} things", "output": " ".join(WORDS[i : i + 3 + i % 4])})
            for i in range(n_alpaca)]
    rows += [json.dumps({"text": f"### Human: say {WORDS[i]}### Assistant: {WORDS[i + 1]} {WORDS[i + 2]}"})
             for i in range(n_guanaco)]
    random.Random(5).shuffle(rows)
    path.write_text("\n".join(rows) + "\n")
    return path


def test_train_lr_warms_up_linearly_then_stays_and_resume_continues_it(tmp_path, demo_tokenizer, train_here):
    # lr at step k: learning_rate · min(1, (k + 1) / (warmup + 1)), on a resume too (at the step it stopped); the
    # optimizer gets --beta1/--beta2/--weight_decay; the gradient is clipped to --max_grad_norm before each step
    run, rec = train_here
    d = fresh_out_dir(tmp_path / "o", demo_tokenizer)
    flags = [*FAST, "--learning_rate", 1e-3, "--warmup_iters", 3, "--beta1", 0.8, "--beta2", 0.95, "--weight_decay", 0.01,
             "--max_grad_norm", 1e-3, "--out_dir", d]
    out = run(*flags, "--max_iters", 2)
    out += run(*flags, "--max_iters", 5, "--resume")
    want = [1e-3 * min(1.0, (k + 1) / 4) for k in range(5)]
    assert [s["lr"] for s in rec.steps] == pytest.approx(want, rel=1e-12)
    assert [m[2] for m in LOG_LINE.findall(out)] == [f"{lr:.2e}" for lr in want]
    assert rec.opt == dict(lr=1e-3, betas=(0.8, 0.95), weight_decay=0.01)
    assert all(s["gnorm"] == pytest.approx(1e-3, rel=1e-3) for s in rec.steps)  # clipped (the raw norms are far larger)
    # restored, ckpt.pt is let go (about 2 GB of a 7B run's memory map); this run's own: an earlier test's refused resume may
    # leave its ckpt.pt mapped in this process until the collector frees a traceback's cycle
    assert not any(str(d / "ckpt.pt") in l for s in rec.steps for l in s["mapped"])
    rec.steps.clear()
    run(*FAST, "--learning_rate", 1e-3, "--warmup_iters", 0, "--max_iters", 2, "--out_dir", d, "--overwrite")
    assert [s["lr"] for s in rec.steps] == [1e-3, 1e-3]
    # nothing left to train: the final validation is at the checkpoint's iter, not at --max_iters
    out = run(*FAST, "--max_iters", 1, "--out_dir", d, "--resume")
    assert re.search(r"^iter 2: val loss \S+$", out, re.M) and "nothing to train (--max_iters 1, the checkpoint is at iter 2)" in out


def test_resume_alone_goes_on_with_the_runs_own_settings(tmp_path, demo_tokenizer, train_here, monkeypatch):
    # --resume without the run's flags continues it as it ran (the defaults would refuse its --batch_size, or train a
    # finished run on to their --max_iters at their learning rate); a flag given wins; --threads is this machine's,
    # --out_dir where the checkpoint is now; --export is asked for by each command; what is saved is what ran
    run, rec = train_here
    d = fresh_out_dir(tmp_path / "o", demo_tokenizer)
    run(*FAST, "--learning_rate", 1e-3, "--warmup_iters", 3, "--max_iters", 2, "--export", "peft", "--out_dir", tmp_path / "o")
    assert len(rec.exports) == 1
    ck = torch.load(d / "ckpt.pt", weights_only=True)
    ck["config"].update(threads=10**6, out_dir=str(tmp_path / "moved"), overwrite=True)  # made elsewhere, on a larger machine
    torch.save({**ck, "config": {**ck["config"], "max_grad_norm": 1}}, d / "ckpt.pt")  # edited by hand: refused, not replaced
    with pytest.raises(InputError, match=re.escape(f"--resume: {d / 'ckpt.pt'}: its config has max_grad_norm 1, not a float (give --max_grad_norm)")):
        run("--out_dir", d, "--resume", "--max_iters", 4)
    torch.save({**ck, "config": {**ck["config"], "init": "checkpoint"}}, d / "ckpt.pt")  # a random base now: refused
    with pytest.raises(InputError, match="was made with --init checkpoint, this run has --init random"):
        run("--out_dir", d, "--resume", "--max_iters", 4, "--init", "random")
    torch.save(ck, d / "ckpt.pt")
    monkeypatch.setattr(TR, "out_dir", str(d))  # --out_dir not given: its default (here d), not ckpt.pt's "moved"
    out = run("--resume", "--max_iters", 4)
    assert "resumed from" in out and [s["lr"] for s in rec.steps] == pytest.approx([1e-3 * min(1.0, (k + 1) / 4) for k in range(4)])
    assert len(losses(out)) == 2 and rec.opt["lr"] == 1e-3 and len(rec.exports) == 1
    saved = torch.load(d / "adapter.pt", weights_only=True)["config"]
    assert {k: saved[k] for k in ("max_iters", "batch_size", "learning_rate", "eval_interval", "threads", "out_dir", "overwrite", "export")} == dict(
        max_iters=4, batch_size=4, learning_rate=1e-3, eval_interval=3, threads=1, out_dir=str(d), overwrite=False, export="")
    assert "nothing to train (--max_iters 4, the checkpoint is at iter 4)" in run("--out_dir", d, "--resume")


def test_train_says_where_the_optimizer_state_is_once_per_run_resumed_or_not(tmp_path, demo_tokenizer, train_here):
    # one line, after the first step of the run (a resumed one too: its state is loaded into memory of the kind named)
    run, _ = train_here
    d = fresh_out_dir(tmp_path / "o", demo_tokenizer)
    where = "managed" if CUDA else "device"
    out = run(*FAST, "--max_iters", 2, "--out_dir", d)
    assert re.findall(r"^optimizer state in (\w+) memory \(paging='auto'\)\niter (\d+): loss", out, re.M) == [(where, "0")]
    assert out.count("optimizer state") == 1
    out = run(*FAST, "--max_iters", 4, "--out_dir", d, "--resume")
    assert re.findall(r"^optimizer state in (\w+) memory \(paging='auto'\)\niter (\d+): loss", out, re.M) == [(where, "2")]
    assert out.count("optimizer state") == 1


def test_train_losses_are_means_over_micro_batches_and_so_is_the_gradient(tmp_path, demo_tokenizer, train_here):
    # the logged loss of a step: the mean of its micro-batches' losses; each backward starts from loss / grad_accum;
    # the val loss: the mean over --eval_iters micro-batches of val_set (ranges, in order), in eval mode (training
    # resumes in train mode); the last line compares with the first validation of the run, intermediate ones do not
    run, rec = train_here
    d = fresh_out_dir(tmp_path / "o", demo_tokenizer)
    out = run(*FAST, "--batch_size", 6, "--eval_interval", 2, "--eval_iters", 3, "--learning_rate", 2e-2, "--max_iters", 5, "--out_dir", d)
    train = [f for f in rec.forwards if f["grad"]]
    assert len(train) == 15 and all(f["training"] and f["upstream"] == pytest.approx(1 / 3, rel=1e-6) for f in train)
    logged = [float(m[1]) for m in LOG_LINE.findall(out)]
    means = [sum(f["loss"] for f in train[i : i + 3]) / 3 for i in range(0, 15, 3)]
    assert logged == pytest.approx(means, abs=5.1e-5)
    val = [f for f in rec.forwards if not f["grad"]]
    assert all(not f["training"] for f in val) and len(val) == 4 * 3  # iters 0, 2, 4 and the end
    val_batches = [(ex, idx) for kind, ex, idx in rec.batches if kind == "val"]
    assert [idx for _, idx in val_batches] == [[0, 1], [2, 3], [4, 5]] * 4
    n = len(P.read_data(ROOT / "data" / "sample.jsonl"))
    assert all(len(ex) == int(n * 0.08) for ex, _ in val_batches)  # the demo's --val_fraction, rounded down
    vals = [sum(f["loss"] for f in val[i : i + 3]) / 3 for i in range(0, 12, 3)]
    lines = re.findall(r"^iter (\d+): val loss (.*)$", out, re.M)
    assert [int(i) for i, _ in lines] == [0, 2, 4, 5]
    assert [l for _, l in lines] == [f"{v:.4f}" for v in vals[:3]] + [f"{vals[3]:.4f} ({100 * (vals[3] / vals[0] - 1):+.0f}% since iter 0)"]
    assert round(100 * (vals[3] / vals[0] - 1)) != round(100 * (vals[3] / vals[2] - 1))  # (so the line tells which one)
    # a run resumed at iter 7 (eval_interval 3) first validates at iter 9: the change is since then, and says so
    run(*FAST, "--max_iters", 7, "--out_dir", d, "--overwrite")
    rec.forwards.clear()
    out = run(*FAST, "--max_iters", 12, "--out_dir", d, "--resume")
    val = [f["loss"] for f in rec.forwards if not f["grad"]]
    lines = re.findall(r"^iter (\d+): val loss (.*)$", out, re.M)
    assert [(int(i), l) for i, l in lines] == [(9, f"{val[0]:.4f}"), (12, f"{val[1]:.4f} ({100 * (val[1] / val[0] - 1):+.0f}% since iter 9)")]
    # a fall of less than half a percent keeps its sign: -0%, not +0% (on the CPU: CUDA draws another random base)
    r = run_train(*FAST, "--learning_rate", 3e-4, "--max_iters", 4, "--eval_interval", 4, "--out_dir", fresh_out_dir(tmp_path / "s", demo_tokenizer), env=CPU_ENV)
    assert re.search(r"^iter 4: val loss [\d.]+ \(-0% since iter 0\)$", r.stdout, re.M), r.stdout + r.stderr


def test_installed_paper_stack_trains_the_same_steps(tmp_path, meta_ckpt, tokenizer_file, train_here, monkeypatch):
    # train.py's optimizer steps are those of the paper's stack, where it is installed (skipped without it): transformers'
    # LlamaForCausalLM with its base in NF4 with double quantization by bitsandbytes (fp32 compute), peft's LoRA,
    # bitsandbytes' PagedAdamW32bit, clip_grad_norm_, gradient accumulation of loss / grad_accum (the Trainer of the
    # paper's transformers 4.31; newer ones weight the micro-batches by their target tokens). From one starting adapter,
    # on the very micro-batches train.py read: the same loss of every micro-batch, gradient norms and final LoRA weights.
    tf, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    bnb, bf = pytest.importorskip("bitsandbytes"), pytest.importorskip("bitsandbytes.functional")
    _, cfg, weights = meta_ckpt
    nf4 = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    hf = write_hf(tmp_path / "hf", cfg, weights, tokenizer_file)
    ref = tf.LlamaForCausalLM.from_pretrained(hf, quantization_config=nf4, dtype=torch.float32, device_map="cpu")
    # bitsandbytes quantizes HF's row-permuted q/k, we Meta's rows: with in_features 64 or 192 each NF4 block of 64 lies
    # in one row, and with at most 256 blocks per matrix one double-quant group holds them all, so the base is the same
    # up to the row order (and an ulp: the mean of the block constants summed in another order). But bitsandbytes'
    # CPU 8-bit quantizer takes the farther code for ~2 in 1000 constants (test_bytes_equal_installed_bitsandbytes;
    # one here: 2e-5 of that weight, then 7e-6 in the losses, 2e-4 in the trained weights): it gets CUDA's codes instead
    heads = {"attention.wq": cfg.n_heads, "attention.wk": cfg.n_kv_heads}
    farther = 0
    for i, (meta, name) in itertools.product(range(cfg.n_layers), list(HF_LAYER.items())[:7]):
        w = weights[f"layers.{i}.{meta}.weight"]
        w_hf = convert_permute(w, heads[meta]) if meta in heads else w
        lin = ref.get_submodule(f"model.layers.{i}.{name}")
        state, c2 = lin.weight.quant_state, bf.quantize_4bit(w_hf, quant_type="nf4")[1].absmax  # its fp32 block constants
        centred = (c2 - state.offset) * (1 / state.state2.absmax)
        cuda = torch.tensor([bnb_dquantize8(REF_DYN8, v) for v in centred.tolist()], dtype=torch.uint8)
        farther += (cuda != state.absmax).sum().item()
        state.absmax = cuda
        ours = qlora.dequantize_nf4(qlora.quantize_nf4(w))
        assert rel_err(bf.dequantize_4bit(lin.weight, state), convert_permute(ours, heads[meta]) if meta in heads else ours) < 1e-6
    assert farther <= 4  # of 1,536
    ref = peft.prepare_model_for_kbit_training(ref, use_gradient_checkpointing=False)
    torch.manual_seed(3)
    targets = [n.split(".")[1] for n in list(HF_LAYER.values())[:7]]
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                                                   init_lora_weights=False, task_type="CAUSAL_LM"))
    ref.save_pretrained(tmp_path / "start")  # random nonzero A and B: where train.py starts too
    ref.train()  # as the Trainer. In eval mode bitsandbytes' CPU path (AVX512-BF16 CPUs) repacks, for good, a weight whose
    # input needs no gradient for a bf16 kernel, whatever the compute dtype: 2e-3 off in the losses here

    run, rec = train_here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # float32 on the CPU, as the reference, on a GPU machine too
    lr, clip, steps = 1e-2, 6.0, 3  # clips the first step's gradient (norm 10.5), not the others' (5.8, 3.7)
    run("--ckpt_dir", hf, "--adapter", tmp_path / "start", "--data", mixed_data(tmp_path / "d.jsonl", 12, 6),
        "--out_dir", tmp_path / "o", "--max_iters", steps, "--batch_size", 4, "--micro_batch", 2, "--learning_rate", lr,
        "--max_grad_norm", clip, "--warmup_iters", 0, "--lora_dropout", 0, "--val_fraction", 0, "--group_by_length", "false",
        "--grad_checkpoint", "false", "--sample_tokens", 0, "--source_max_len", 48, "--target_max_len", 24)
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW32bit(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)  # its default decay: 0.01
    losses, norms = [], []
    for batches in step_batches(rec, 2):
        for ex, idx in batches:
            x, y = P.get_batch(ex, idx)
            assert (y[:, -1] == -100).all()  # so y shifted right by one is HF's labels: its own shift gives y back
            loss = ref(input_ids=x, labels=torch.cat([torch.full_like(y[:, :1], -100), y[:, :-1]], 1)).loss
            (loss / len(batches)).backward()
            losses.append(loss.item())
        norms.append(torch.nn.utils.clip_grad_norm_(params, clip).item())
        opt.step()
        opt.zero_grad()
    assert len(norms) == steps and norms[0] > clip > max(norms[1:])
    assert [s["gnorm"] for s in rec.steps] == pytest.approx([min(n, clip) for n in norms], rel=1e-5)  # after clipping
    assert rel_err(torch.tensor([f["loss"] for f in rec.forwards if f["grad"]]), torch.tensor(losses)) < 1e-6  # measured 1.1e-7
    trained, start = peft.get_peft_model_state_dict(ref), read_safetensors(tmp_path / "start" / "adapter_model.safetensors")
    for k, v in torch.load(tmp_path / "o" / "adapter.pt", weights_only=True)["lora"].items():  # B's q/k rows as HF's
        i, meta, x = re.fullmatch(r"layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])", k).groups()
        name = f"base_model.model.model.layers.{i}.{HF_LAYER[meta]}.lora_{x}.weight"
        v = convert_permute(v, heads[meta]) if x == "B" and meta in heads else v
        assert rel_err(v, trained[name]) < 1e-5 and rel_err(start[name], trained[name]) > 0.05  # measured 1.2e-6; moved 0.09 at least


def test_train_log_line_tok_s_eta_mfu_and_which_iters_log(tmp_path, demo_tokenizer, train_here):
    # tok/s: the step's tokens (padding not counted) over its time (a validation's not in it); eta: the running mean of
    # step times (0.9 / 0.1) times the steps left, plus the last validation's time times the validations left, as XmYYs;
    # mfu gets the block linears' parameter count; --grad_checkpoint is what the model does; the last iter always logs;
    # the demo sets torch's CPU threads to 1
    run, rec = train_here
    if os.cpu_count() > 1:
        torch.set_num_threads(2)
    d = fresh_out_dir(tmp_path / "o", demo_tokenizer)
    out = run(*FAST, "--max_iters", 6, "--out_dir", d)
    assert CUDA or torch.get_num_threads() == 1
    lines = LOG_LINE.findall(out)
    assert [int(m[0]) for m in lines] == list(range(6))
    dt_avg = None
    for k, (m, step) in enumerate(zip(lines, step_batches(rec, 2))):
        dt = int(m[3]) / 1000
        n_tok = sum(len(ex[i][0]) for ex, idx in step for i in idx)
        dt_avg = dt if dt_avg is None else 0.9 * dt_avg + 0.1 * dt
        # validations at iters 0 and 3 (--eval_interval 3) and after iter 5 (once: 6 is a multiple of 3 too); the clock reads
        # n before one, n + 1 after it, n + 2 as the step starts, n + 3 as it ends: it took 5(n+1)(n+2) - 5n(n+1) = dt - 20 s
        val = dt - 20 if k % 3 == 0 else val
        eta = dt_avg * (6 - k - 1) + val * (5 // 3 - k // 3 + 1)
        assert (m[4], m[6], m[7]) == (f"{n_tok / dt:.1f}", f"{eta // 60:.0f}", f"{eta % 60:02.0f}"), (k, m)
        assert rec.mfu[k][1] == pytest.approx(n_tok / dt)
    assert len({int(m[3]) for m in lines}) == 6 and int(lines[0][6]) > 0  # distinct step times; an eta of minutes
    cfg = M.LLaMAConfig(**M.CONFIGS["tiny"])
    hd = cfg.dim // cfg.n_heads
    n_base = cfg.n_layers * (2 * cfg.dim * cfg.n_heads * hd + 2 * cfg.dim * cfg.n_kv_heads * hd + 3 * cfg.dim * cfg.hidden_dim)
    assert {a[0] for a in rec.mfu} == {n_base} and f": {n_base / 1e6:.1f}M params in NF4 linears" in out
    assert rec.ckpt_calls == 0
    rec.mfu.clear()
    out = run(*FAST, "--max_iters", 6, "--log_interval", 4, "--grad_checkpoint", "true", "--out_dir", d, "--overwrite")
    assert [int(m[0]) for m in LOG_LINE.findall(out)] == [0, 4, 5] and len(rec.mfu) == 3
    assert rec.ckpt_calls > 0


def test_train_data_order_template_sample_and_what_is_saved(tmp_path, train_here):
    # micro-batch k of the run is batch_order(train_set lengths, epoch, ...)[j] with epoch, j = divmod(k, per epoch):
    # each epoch its own order, every training example at most once per epoch, --group_by_length passed on; the
    # examples are shuffled with --seed, the first int(n · val_fraction) held out; checkpoints at every
    # --eval_interval and at the end (adapter.pt beside each: no optimizer); the template is the majority's; the
    # random base is built with --seed and recorded so; the sample continues the first val prompt, in eval mode
    run, rec = train_here
    for n_alpaca, n_guanaco, gbl, template in ((7, 6, True, "alpaca"), (6, 7, False, "guanaco")):
        rec.batches.clear(), rec.saves.clear(), rec.samples.clear(), rec.seeds.clear()
        data, d = mixed_data(tmp_path / f"{template}.jsonl", n_alpaca, n_guanaco), tmp_path / template
        out = run("--data", data, "--out_dir", d, "--batch_size", 4, "--micro_batch", 2, "--val_fraction", 0.2, "--eval_interval", 3,
                  "--max_iters", 7, "--seed", 3, "--group_by_length", gbl, "--sample_tokens", 4, "--temperature", 0.5)
        tok = C.Tokenizer(next(d.glob("tokenizer-*.model")))
        examples = P.tokenize(P.read_data(data), tok, 96, 48)[0]
        random.Random(3).shuffle(examples)
        val_set, train_set = examples[:2], examples[2:]  # int(13 · 0.2) = 2
        assert f"{data}: 11 examples to train on, 2 held out for validation\n" in out
        steps = step_batches(rec, 2)
        assert len(steps) == 7 and all(ex == train_set for s in steps for ex, _ in s)
        assert all(ex == val_set for kind, ex, _ in rec.batches if kind == "val")
        lengths, per_epoch = [len(ids) for ids, _ in train_set], len(train_set) // 2
        got = [idx for s in steps for _, idx in s]
        assert got == [P.batch_order(lengths, k // per_epoch, 2, 3, gbl)[k % per_epoch] for k in range(14)]
        for e in range(2):  # 5 micro-batches of 2 per epoch: 10 of the 11 examples, each once
            assert len(set(sum(got[5 * e : 5 * e + 5], []))) == 10
        assert got[:5] != got[5:10]
        assert rec.saves == [("adapter.pt", None), ("ckpt.pt", 3), ("adapter.pt", None), ("ckpt.pt", 6), ("adapter.pt", None), ("ckpt.pt", 7)]
        ad = torch.load(d / "adapter.pt", weights_only=True)
        assert sorted(ad) == ["base", "config", "lora", "model_config", "template"] and ad["template"] == template
        assert ad["base"]["seed"] == 3 and rec.seeds == [3] and ad["model_config"]["vocab_size"] == tok.n_words < 512
        ck = torch.load(d / "ckpt.pt", weights_only=True)
        assert ck["iter_num"] == 7 and len(ck["rng"]) == 1 and ck["config"]["seed"] == 3
        ids, labels = val_set[0]
        prompt = ids[: labels.index(next(l for l in labels if l != -100))]
        assert rec.samples == [dict(training=False, prompt=prompt, n=4, temperature=0.5, eos_id=tok.eos_id)] and "--- sample ---" in out
    rec.samples.clear()  # with every label set (--train_on_source) the sample still continues that example's prompt, not bos alone
    run("--data", data, "--out_dir", d, "--batch_size", 4, "--micro_batch", 2, "--val_fraction", 0.2, "--max_iters", 1, "--seed", 3,
        "--sample_tokens", 4, "--train_on_source", "--overwrite")
    assert [s["prompt"] for s in rec.samples] == [prompt]
    rec.samples.clear()
    run("--data", data, "--out_dir", d, "--batch_size", 4, "--micro_batch", 2, "--max_iters", 1, "--sample_tokens", 0, "--overwrite",
        "--lora_r", 8, "--lora_alpha", 4)
    assert rec.samples == []
    c = TR.resolve({"adapter": str(d / "adapter.pt")}, train_defaults())  # an adapter's r and α are what runs and is recorded
    assert (c["lora_r"], c["lora_alpha"]) == (8, 4.0)


def test_train_cuts_examples_to_the_limits_says_how_many_and_trains_on_source_when_told(tmp_path, demo_tokenizer, train_here):
    # the batches are tokenize(examples shuffled by --seed, --source_max_len, --target_max_len, --train_on_source): the
    # prompt and the response each cut to its own limit (here every example), the count said; with --train_on_source the
    # prompt's tokens are labels too, in training and validation
    run, rec = train_here
    d = fresh_out_dir(tmp_path / "o", demo_tokenizer)
    out = run(*FAST, "--max_iters", 1, "--out_dir", d, "--train_on_source")
    items = P.read_data(ROOT / "data" / "sample.jsonl")
    random.Random(0).shuffle(items)
    tok = C.Tokenizer(demo_tokenizer)
    examples, cut = P.tokenize(items, tok, 48, 24, True)
    n_val = int(len(items) * 0.08)  # the demo's --val_fraction
    assert {kind: ex for kind, ex, _ in rec.batches} == {"val": examples[:n_val], "train": examples[n_val:]}
    assert examples != P.tokenize(items, tok, 24, 48, True)[0] and examples != P.tokenize(items, tok, 48, 24)[0]
    assert cut > 0 and (f"data/sample.jsonl: {len(items) - n_val} examples to train on, {n_val} held out for validation, "
                        f"{cut} cut to --source_max_len=48 / --target_max_len=24\n") in out


def test_train_template_of_a_tie_is_alpacas(tmp_path, train_here):
    # as many Alpaca examples as others: the chat template recorded is Alpaca's (the paper's), not the conversation's
    run, _ = train_here
    run("--data", mixed_data(tmp_path / "d.jsonl", 3, 3), "--out_dir", tmp_path / "o", "--batch_size", 2, "--micro_batch", 2,
        "--val_fraction", 0, "--max_iters", 1, "--sample_tokens", 0)
    assert torch.load(tmp_path / "o" / "adapter.pt", weights_only=True)["template"] == "alpaca"


def test_train_exports_from_the_nf4_base_unless_told_original(tmp_path, meta_ckpt, train_here):
    run, rec = train_here
    for extra, base in (([], None), (["--merge_base", "original"], str(meta_ckpt[0]))):
        rec.exports.clear()
        out = run("--ckpt_dir", meta_ckpt[0], "--out_dir", tmp_path / str(len(extra)), "--max_iters", 1, "--lora_r", 4, "--sample_tokens", 0,
                  "--data", mixed_data(tmp_path / "d.jsonl", 2, 2), "--val_fraction", 0, "--source_max_len", 32, "--target_max_len", 16,
                  "--batch_size", 2, "--micro_batch", 2, "--export", "merged,peft", *extra)
        assert "M params in NF4 linears" in out  # the checkpoint's base is trained on in 4 bits, as the paper's
        assert [k for k, _ in rec.exports] == ["merged", "peft"]
        assert rec.exports[0][1]["base"] == base and rec.exports[1][1]["base"] == str(meta_ckpt[0])


def test_resolve_paper_defaults_per_size_and_flags_over_demo(monkeypatch):
    defaults = train_defaults()
    big = TR.resolve({"model": "65B", "init": "random"}, defaults)
    assert (big["learning_rate"], big["lora_dropout"], big["warmup_iters"], big["max_iters"]) == (1e-4, 0.05, int(0.03 * 1875), 1875)
    small = TR.resolve({"model": "7B", "init": "random", "max_iters": 100, "lora_dropout": 0.0, "learning_rate": 5e-5}, defaults)
    assert (small["learning_rate"], small["lora_dropout"], small["warmup_iters"]) == (5e-5, 0.0, 3)
    assert TR.resolve({"model": "13B", "init": "random", "max_iters": 99}, defaults)["warmup_iters"] == 2  # 2.97, rounded down
    # validation: 1000 examples (the paper's code evaluated max_eval_samples 1000), in whole micro-batches; the demo's own 4
    assert [TR.resolve({"model": "7B", "init": "random", "micro_batch": m}, defaults)["eval_iters"] for m in (1, 4, 3)] == [1000, 250, 334]
    assert TR.resolve({}, defaults)["eval_iters"] == 4 and TR.resolve({"model": "7B", "init": "random", "eval_iters": 7}, defaults)["eval_iters"] == 7
    demo = TR.resolve({"max_iters": 5}, defaults)
    assert demo["demo"] and (demo["max_iters"], demo["batch_size"], demo["learning_rate"]) == (5, 8, 2e-3)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the demo's one thread only where the user said nothing
    assert TR.resolve({}, defaults)["threads"] == torch.get_num_threads()
    for flag in ("eval_interval", "eval_iters", "log_interval", "source_max_len", "target_max_len"):
        with pytest.raises(InputError, match=rf"^--{flag} must be at least 1 \(below 2\^31\), got 0$"):
            TR.resolve({flag: 0}, defaults)
    with pytest.raises(InputError, match=r"^--temperature must be at least 0 \(below 2\^63\), got -0.5$"):
        TR.resolve({"temperature": -0.5}, defaults)


def test_resolve_takes_an_adapters_rank_alpha_and_the_base_it_records_unless_a_flag_names_one(tmp_path, meta_ckpt, monkeypatch):
    # as `python model.py --adapter` takes it: --adapter alone trains on the checkpoint it records; --ckpt_dir, --model or
    # --init names another base; its r and α replace the flags'
    defaults, lora = train_defaults(), {"layers.0.attention.wq.lora_A": torch.zeros(4, 64)}
    torch.save({"lora": lora, "model_config": {"lora_r": 4, "lora_alpha": 12.0}, "base": {"init": "checkpoint", "ckpt_dir": str(meta_ckpt[0])}},
               a := tmp_path / "adapter.pt")
    c = TR.resolve({"adapter": a, "lora_r": 8, "lora_alpha": 16}, defaults)
    assert (c["ckpt_dir"], c["init"], c["demo"], c["lora_r"], c["lora_alpha"]) == (str(meta_ckpt[0]), "checkpoint", False, 4, 12.0)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(meta_ckpt[0], other := tmp_path / "checkpoints" / "other")
    assert TR.resolve({"adapter": a, "ckpt_dir": other}, defaults)["ckpt_dir"] == str(other)
    assert TR.resolve({"adapter": a, "model": "other"}, defaults)["ckpt_dir"] == str(other)  # checkpoints/other
    assert TR.resolve({"adapter": a, "init": "random"}, defaults)["ckpt_dir"] == ""  # the demo's random base
    # a random base records no folder: none is taken
    torch.save({"lora": lora, "model_config": {"lora_r": 4, "lora_alpha": 12.0}, "base": {"init": "random", "model": "tiny"}}, a)
    assert TR.resolve({"adapter": a}, defaults)["ckpt_dir"] == ""


def test_read_checkpoint_names_every_setting_that_changes_the_model_or_data(tmp_path):
    # the checked settings, each refused by name when it differs; another process count; a negative iter; no rng
    c = {k: f"value of {k}" for k in ("model", "init", "ckpt_dir", "adapter", "data_sha1", "tokenizer_sha1")}
    c.update(lora_r=8, lora_alpha=16.0, lora_dropout=0.1, seed=0, batch_size=4, micro_batch=2, source_max_len=48, target_max_len=24,
             train_on_source=False, group_by_length=True, val_fraction=0.05, weight_decay=0.0, beta1=0.9, beta2=0.999,
             learning_rate=1e-3, max_grad_norm=0.3, eval_interval=3)
    ck = {"config": dict(c), "model_config": {}, "base": {}, "lora": {"a.lora_A": torch.zeros(2)}, "optimizer": {}, "iter_num": 3,
          "rng": [{"torch": None}]}
    path = tmp_path / "ckpt.pt"

    def read(ck, c, world=1):
        torch.save(ck, path)
        return TR.read_checkpoint(path, c, world)

    assert read(ck, c)["iter_num"] == 3
    assert read(ck, {**c, "learning_rate": 2e-3, "max_grad_norm": 1.0, "eval_interval": 5})["iter_num"] == 3  # the optimizer's, the log's: free
    # before the tokenizer is known (train.py reads ckpt.pt first, for a random base it records), its SHA-1 is not compared yet
    assert read({**ck, "config": {**c, "tokenizer_sha1": "another"}}, {k: v for k, v in c.items() if k != "tokenizer_sha1"})["iter_num"] == 3
    for k in ("model", "init", "ckpt_dir", "adapter", "lora_r", "lora_alpha", "lora_dropout", "data_sha1", "tokenizer_sha1", "seed",
              "batch_size", "micro_batch", "source_max_len", "target_max_len", "train_on_source", "group_by_length", "val_fraction",
              "weight_decay", "beta1", "beta2"):
        new = not c[k] if isinstance(c[k], bool) else c[k] + (1 if not isinstance(c[k], str) else "x")
        name = {"data_sha1": "--data contents (SHA-1)", "tokenizer_sha1": "a tokenizer (SHA-1)"}.get(k, f"--{k}")
        with pytest.raises(InputError, match=re.escape(f"{path} was made with {name} {c[k]}, this run has {name} {new}")):
            read(ck, {**c, k: new})
    with pytest.raises(InputError, match=re.escape(f"{path} was made by 1 processes, this run has 2")):
        read(ck, c, world=2)
    for bad in ({**ck, "iter_num": -1}, {k: v for k, v in ck.items() if k != "rng"}, {**ck, "lora": {"a": 1}}, {**ck, "iter_num": True},
                {**ck, "optimizer": [1]}, {k: v for k, v in ck.items() if k != "model_config"}, {**ck, "base": None}):
        with pytest.raises(InputError, match=re.escape(f"{path}: not a checkpoint written by train.py")):
            read(bad, c)


def test_read_checkpoint_without_a_process_count_takes_any(tmp_path):
    # main() reads ckpt.pt's settings for --resume before any process group exists (world not given): a run of two
    # processes resumed under torchrun is read there, and its process count compared later, by train()
    ck = {"config": {"seed": 0}, "model_config": {}, "base": {}, "lora": {"a.lora_A": torch.zeros(2)}, "optimizer": {}, "iter_num": 3,
          "rng": [{"torch": None}, {"torch": None}]}
    torch.save(ck, path := tmp_path / "ckpt.pt")
    assert TR.read_checkpoint(path, {})["config"] == {"seed": 0} and TR.read_checkpoint(path, {"seed": 0}, 2)["iter_num"] == 3
    with pytest.raises(InputError, match=re.escape(f"{path} was made by 2 processes, this run has 1")):
        TR.read_checkpoint(path, {}, 1)


def test_train_refuses_a_batch_size_micro_batches_do_not_fill(tmp_path, train_here):
    run, rec = train_here
    with pytest.raises(InputError, match=r"^--batch_size 5 must be a multiple of --micro_batch 2 × 1 processes$"):
        run("--batch_size", 5, "--micro_batch", 2, "--out_dir", tmp_path / "a", "--max_iters", 1)
    data = mixed_data(tmp_path / "d.jsonl", 2, 1)
    with pytest.raises(InputError, match=rf"^{re.escape(str(data))}: 3 training examples, fewer than --micro_batch 4$"):
        run("--data", data, "--batch_size", 4, "--micro_batch", 4, "--val_fraction", 0, "--out_dir", tmp_path / "b", "--max_iters", 1)
    assert rec.seeds == [] and not (tmp_path / "b").exists()  # refused before the model is built (a 7B takes minutes), nothing written


def test_train_refuses_a_micro_batch_the_examples_left_after_validation_do_not_fill(tmp_path, train_here):
    # 5 examples, 2 of them held out (--val_fraction 0.5): 3 to train on, fewer than a micro-batch of 4 although the file
    # holds 5; refused before the model is built, not a division by zero at the first batch
    run, rec = train_here
    data = mixed_data(tmp_path / "d.jsonl", 3, 2)
    with pytest.raises(InputError, match=rf"^{re.escape(str(data))}: 3 training examples, fewer than --micro_batch 4$"):
        run("--data", data, "--batch_size", 4, "--micro_batch", 4, "--val_fraction", 0.5, "--out_dir", tmp_path / "o", "--max_iters", 1)
    assert rec.seeds == [] and not (tmp_path / "o").exists()


def test_train_holds_out_val_fraction_of_two_examples_and_trains_on_exactly_a_micro_batch(tmp_path, train_here):
    # two examples, --val_fraction 0.5: one held out, one trained on; as many training examples as --micro_batch: trained
    run, rec = train_here
    data, d = mixed_data(tmp_path / "d.jsonl", 1, 1), tmp_path / "o"
    out = run("--data", data, "--batch_size", 1, "--micro_batch", 1, "--val_fraction", 0.5, "--out_dir", d, "--max_iters", 1, "--sample_tokens", 0)
    assert f"{data}: 1 examples to train on, 1 held out for validation\n" in out and "trained 1 iters" in out
    rec.batches.clear()
    out = run("--data", data, "--batch_size", 2, "--micro_batch", 2, "--val_fraction", 0, "--out_dir", d, "--max_iters", 1, "--sample_tokens", 0,
              "--overwrite")
    assert f"{data}: 2 examples to train on, 0 held out for validation\n" in out and "trained 1 iters" in out
    assert [sorted(idx) for kind, _, idx in rec.batches] == [[0, 1]]


def test_resume_in_a_process_other_than_rank_0_continues_its_own_dropout_stream(tmp_path, demo_tokenizer, train_here, monkeypatch):
    # ckpt.pt holds every process's RNG state; process r of a resumed run restores the r-th (here rank 1 of 2), not rank 0's
    run, _ = train_here
    d = fresh_out_dir(tmp_path / "o", demo_tokenizer)
    run(*FAST, "--max_iters", 1, "--out_dir", d)
    ck = torch.load(d / "ckpt.pt", weights_only=True)
    own = torch.Generator().manual_seed(12345).get_state()
    torch.save({**ck, "rng": [ck["rng"][0], {"torch": own, "cuda": None}]}, d / "ckpt.pt")
    states, spy = [], M.LLaMA.forward
    monkeypatch.setattr(M.LLaMA, "forward", lambda self, *a, **kw: states.append(torch.get_rng_state()) or spy(self, *a, **kw))
    monkeypatch.setattr(TR, "launch", lambda: (False, 1, 2, 0))  # this process: rank 1 of 2 (no process group needed here)
    run(*FAST, "--batch_size", 4, "--max_iters", 2, "--out_dir", d, "--resume")
    assert states and torch.equal(states[0], own) and not torch.equal(own, ck["rng"][0]["torch"])


def test_ddp_two_processes_accumulating_log_the_one_process_losses(tmp_path):
    # two micro-batches per process and step: the gradients are all-reduced once, after the last; the logged loss
    # is the mean over all processes; the demo's tokenizer, trained by rank 0 alone, is read by rank 1 after it
    args = [*FAST, "--batch_size", 8, "--max_iters", 2, "--lora_dropout", 0.0]
    one = run_train(*args, "--out_dir", tmp_path / "one", env=CPU_ENV)
    p, out, err = torchrun_train(*args, "--out_dir", tmp_path / "two")
    assert one.returncode == 0 and p.returncode == 0, one.stderr + err
    a, b = (LOG_LINE.findall(o) for o in (one.stdout, out))
    assert len(a) == len(b) == 2 and all(float(x[1]) == pytest.approx(float(y[1]), abs=2e-4) for x, y in zip(a, b))
    a = torch.load(tmp_path / "one" / "adapter.pt", weights_only=False)["lora"]
    b = torch.load(tmp_path / "two" / "adapter.pt", weights_only=False)["lora"]
    assert all(torch.allclose(a[k], b[k], atol=2e-4) for k in a)  # (Adam magnifies the sums' rounding in tiny gradients)
    rng = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["rng"]  # each process's own dropout stream: --seed + rank
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])


# ---------------------------------------------------------------------------------------------------
# data/prepare.py against the paper's DataCollatorForCausalLM (artidoro/qlora qlora.py), ported: source =
# bos + Alpaca prompt, target = output + eos, each tokenized alone and truncated on the right to
# source_max_len / target_max_len, labels -100 on the source unless train_on_source. The slow LlamaTokenizer of
# transformers 4.31 (qlora's pin), with bos/eos set as plain strings as qlora.py does, strips whitespace next to
# them: hence lstrip/rstrip. This port gave ids and labels identical to that collator on 2,340 records x limits.

def paper_collate(sp, bos, eos, source, target, source_max_len, target_max_len, train_on_source):
    s = ([bos] + sp.encode(source.lstrip()))[:source_max_len]  # bos counts toward source_max_len there
    t = (sp.encode(target.rstrip()) + [eos])[:target_max_len]
    return s + t, (s if train_on_source else [-100] * len(s)) + t


def test_tokenize_matches_the_paper_collator_on_alpaca(tmp_path):
    rows = [json.loads(l) for l in (ROOT / "data" / "sample.jsonl").read_text().splitlines() if l.strip()]
    if SEED_TASKS.is_file():
        rows += [{"instruction": t["instruction"], "input": t["instances"][0]["input"], "output": t["instances"][0]["output"]}
                 for t in map(json.loads, filter(str.strip, SEED_TASKS.read_text().splitlines()))]
    rows += [{"instruction": "Say hi.", "output": "Hi."}]  # no "input" field: the paper's .get("input", "")
    f = tmp_path / "a.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    items = P.read_data(f)
    C.train_tokenizer([s for _, segs in items for s, _ in segs], tmp_path / "tok.model", vocab_size=800)
    tok = C.Tokenizer(tmp_path / "tok.model")
    for smax, tmax, tos in ((1024, 256, False), (1024, 256, True), (40, 8, False), (40, 8, True), (300, 2, False)):
        got = P.tokenize(items, tok, smax, tmax, tos)[0]
        assert len(got) == len(rows)
        for r, (ids, labels) in zip(rows, got):
            prompt = P.ALPACA[r.get("input", "") != ""].format(instruction=r["instruction"], input=r.get("input", ""))
            want_ids, want_labels = paper_collate(tok.sp, tok.bos_id, tok.eos_id, prompt, r["output"], smax, tmax, tos)
            assert ids == want_ids and labels[1:] == want_labels[1:]  # labels[0] is never a target (shifted away)


def test_guanaco_text_tokenizes_like_messages_and_the_chat_prompt(tmp_path):
    # '### Assistant: ' is encoded with the human turn before it ('?###'), as model.py's guanaco chat prompt sends it
    turns = [("What is 2+2?", "It is 4."), ("And 3+3?", "It is 6.")]
    text = {"text": "".join(f"### Human: {q}### Assistant: {a}" for q, a in turns)}
    msgs = {"messages": [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]}
    C.train_tokenizer([text["text"]] * 20, tmp_path / "tok.model", vocab_size=60)
    tok = C.Tokenizer(tmp_path / "tok.model")
    (a, _), (b, _) = P.tokenize([("t", P.segments(text, "t")), ("m", P.segments(msgs, "m"))], tok, 1024, 256)[0]
    chat = [tok.bos_id] + tok.encode(f"### Human: {turns[0][0]}### Assistant: ")  # model.py chat, --template guanaco
    assert b[: len(chat)] == chat  # messages: as model.py prompts
    assert a == b
