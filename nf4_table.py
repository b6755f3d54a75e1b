"""The two lookup tables QLoRA needs, built exactly the way bitsandbytes builds them so that our 4-bit
weights are bit-compatible with its format:

  NF4    16 values, "4-bit NormalFloat" (paper §3): the quantiles of N(0, 1), rescaled to [-1, 1].
  DYN8   256 values, the signed 8-bit dynamic map for double quantization of c2 (paper §3's "8-bit Floats").

Run as a script to see *why* NF4: `python nf4_table.py`.
"""
import torch
from scipy.stats import norm

# The outermost quantile: ppf(1) is infinite, so bitsandbytes takes ppf(0.9677083) instead (a constant it does not derive).
# It is ½·((1 − 1/30) + (1 − 1/32)) = 0.96770833…: the middle 1 − 1/(2n) of the last of n equal-probability bins, averaged
# over n = 15 and n = 16 (our reading of it), written with bitsandbytes' 7 decimals
NF4_OFFSET = 0.9677083


def nf4_values(offset=NF4_OFFSET):
    # Weights of a trained layer are ~N(0, sigma); divided by their block's absmax they lie in [-1, 1], still
    # bell shaped. Code values at equal-probability quantiles of N(0, 1) aim at every code being equally likely (the
    # paper's "information-theoretically optimal"; the demo below measures how near: 3.88 of 4 bits). Asymmetric so
    # that 0 is exact (padding and zero weights): 8 positive quantiles, 7 negative ones and a true 0.
    pos = norm.ppf(torch.linspace(offset, 0.5, 9)[:-1].numpy()).tolist()  # 8 values > 0
    neg = (-norm.ppf(torch.linspace(offset, 0.5, 8)[:-1].numpy())).tolist()  # 7 values < 0
    v = torch.tensor(pos + [0.0] + neg, dtype=torch.float32).sort().values
    return v / v.max()  # (16,) float32, v[0] = -1, v[7] = 0, v[15] = 1


def midpoints(code):
    # Decision boundaries for "nearest value" (and dynamic_map's bin centres): halfway between neighbours, computed in
    # float64 and rounded once to float32 (these are exactly the constants in bitsandbytes' NF4 decision tree).
    c = code.double()
    return ((c[:-1] + c[1:]) / 2).float()  # (len(code) - 1,)


def dynamic_map(max_exponent_bits=7):
    # The signed 8-bit "dynamic tree" map: the leading zeros of a byte act as a decimal exponent
    # (10^-6 .. 10^0) and the remaining bits as a linear fraction in [0.1, 1]. 127 positive values,
    # their negatives, 0 and 1.0 = 256 values covering six orders of magnitude.
    data = [0.0, 1.0]
    for i in range(max_exponent_bits):
        means = midpoints(torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32))  # of 2^i equal bins in [0.1, 1]
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist() + (-scale * means).tolist()
    return torch.tensor(sorted(data), dtype=torch.float32)  # (256,)


if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends it quietly, as it does a Unix tool (not a traceback)
    nf4 = nf4_values()
    print("NF4 code (index: value)\n" + "\n".join(f"  {i:2d} 0b{i:04b}  {v:+.10f}" for i, v in enumerate(nf4.tolist())))

    # The experiment: blocks of 64 N(0, 1) weights divided by their absmax (as blockwise quantization does)
    torch.manual_seed(0)
    x = torch.randn(1 << 16, 64)
    x = x / x.abs().amax(dim=1, keepdim=True)
    int4 = torch.arange(-7, 8, dtype=torch.float32) / 7  # symmetric uniform int4: 15 levels, so that 0 is one as in NF4
    e2m1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6]) / 6  # FP4 E2M1 magnitudes (bitsandbytes' FP4: 1/192 in place of 1/12)
    fp4 = torch.cat([-e2m1.flip(0)[:-1], e2m1])
    print("\nN(0,1) blocks of 64 scaled by absmax: share of elements per code value (ideal 1/16 = 6.25%)")
    print("  code  " + " ".join(f"{i:5d}" for i in range(16)))
    for name, code in [("NF4", nf4), ("int4", int4), ("FP4", fp4)]:
        idx = torch.bucketize(x, midpoints(code))
        share = torch.bincount(idx.flatten(), minlength=len(code)).float() / idx.numel()
        cells = " ".join(f"{100 * s:5.1f}" for s in share.tolist()) + ("      -" if len(code) < 16 else "")
        mse = (code[idx] - x).pow(2).mean().item()
        print(f"  {name:5s} {cells}   MSE {mse:.3e}   entropy {-(share[share > 0] * share[share > 0].log2()).sum():.3f} bits")
    print("\nUniform int4 wastes its outer codes on values a normal block rarely holds (1.2% in each tail)")
    print("and crowds the middle; NF4 follows the density, so its codes are used most evenly (highest")
    print("entropy, the 4 bits carry the most information) and its rounding error is the lowest.")
