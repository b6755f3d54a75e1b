"""Benchmarks, on one GPU (e2e and load also on a CPU). Three commands:

  python bench.py kernels                       # NF4 dequant GB/s; NF4 linear vs bf16 cuBLAS per shape and M
  python bench.py e2e --model 7B --batch 2 --seq 2048 [--steps 10]   # QLoRA training steps: tok/s, MFU, memory
  python bench.py load --ckpt_dir DIR [--write 7B]   # load time and peak memory (--write: first a random Meta checkpoint in a new DIR)

Memory is reported two ways: the caching allocator's peak (torch.cuda.max_memory_allocated) and the
device-level peak (free before the model minus free, from cudaMemGetInfo), which also counts the paged optimizer state
that lives in unified memory while it is resident on the GPU.
"""
import threading
import time
from functools import partial
from itertools import cycle
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

import qlora
import train as recipe  # the recipe's defaults (LoRA r and α, AdamW, clipping) live in train.py's config block
from data.checkpoint import meta_params
from data.files import InputError, atomic_save, atomic_write_bytes, flag_help, parse_flags, run
from model import CONFIGS, LLaMA, LLaMAConfig, mfu, paper_hparams

# --- flags: python bench.py kernels|e2e|load [--name value] ------------------------------------
ckpt_dir = "checkpoints/7B"  # load: the checkpoint folder (Meta's or HF's layout)
write = ""  # load: first write a random checkpoint of this architecture (7B, 13B, ...) into --ckpt_dir, a new or empty folder
model = "7B"  # e2e: the architecture, random weights (on a CPU, only when named)
batch = 2  # e2e: sequences per step
seq = 2048  # e2e: tokens per sequence (past the architecture's context, the context is stretched)
steps = 10  # e2e: steps timed (the first, warm-up, left out of the median)
lora_r = recipe.lora_r  # e2e: LoRA rank
no_quant = False  # e2e, load: an unquantized base (plain LoRA; bf16, but fp32 for e2e on a CPU) for comparison
# -----------------------------------------------------------------------------------------------

SHAPES_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in): wq/wk/wv/wo, w1/w3, w2


def header():
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"# {name} | torch {torch.__version__} | triton {triton.__version__} | {time.strftime('%Y-%m-%d')}")
    return name


def kernels():
    header()
    ms = partial(do_bench, warmup=50, rep=300, return_mode="median")  # ms(fn): median milliseconds per call
    print("\n## NF4 dequantize (double-quant), bf16 out: effective bandwidth = bytes read + written\n| shape | ms | GB/s |\n|---|---|---|")
    for n, k in SHAPES_7B + [(8192, 28672)]:
        q = qlora.quantize_nf4(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
        out = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
        t = ms(lambda: qlora.dequantize_nf4(q, out=out))
        nbytes = q.bits_per_param() * q.numel() / 8 + out.numel() * 2
        print(f"| {n}x{k} | {t:.3f} | {nbytes / t / 1e6:.0f} |")

    print("\n## NF4 linear vs bf16 cuBLAS (ratio < 1: faster than bf16)")
    print("| out x in | M | bf16 fwd ms | nf4 fwd ms | ratio | fused ms | dequant+mm ms | bf16 fwd+bwd ms | nf4 fwd+bwd ms | ratio |\n|---|---|---|---|---|---|---|---|---|---|")
    buf = qlora.DequantBuffer()  # one for all shapes, as in a model
    for n, k in SHAPES_7B:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        q = qlora.quantize_nf4(w)
        for m in (1, 16, 64, 256, 4096, 8192):
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(4)]
            dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            x = cycle(xs).__next__  # x(): the next input in turn (do_bench itself also clears L2 before each call)
            dense, ours = ms(lambda: x() @ w.t()), ms(lambda: qlora.nf4_matmul(x(), q, buf))
            fused = f"{ms(lambda: qlora._fused_matmul(x().detach(), q, False)):.4f}" if m <= 256 else "-"  # (too slow above)
            route = ms(lambda: x().detach() @ buf.dequantize(q, torch.bfloat16).t())
            dense_fb = ms(lambda: torch.autograd.grad(x() @ w.t(), xs, dy, allow_unused=True))
            ours_fb = ms(lambda: torch.autograd.grad(qlora.nf4_matmul(x(), q, buf), xs, dy, allow_unused=True))
            print(f"| {n}x{k} | {m} | {dense:.4f} | {ours:.4f} | {ours / dense:.2f} | {fused} | {route:.4f} | "
                  f"{dense_fb:.4f} | {ours_fb:.4f} | {ours_fb / dense_fb:.2f} |")


def e2e(model, batch, seq, steps, r, quantize):
    name = header()
    paper = paper_hparams(CONFIGS[model]["dim"])  # the learning rate and dropout of the recipe, per size
    cfg = LLaMAConfig(**{**CONFIGS[model], "lora_r": r, "lora_alpha": recipe.lora_alpha, "lora_dropout": paper["lora_dropout"]})
    cfg.max_seq_len = max(cfg.max_seq_len, seq)  # random weights: the context stretches to --seq
    dev, dtype = ("cuda", torch.bfloat16) if (cuda := torch.cuda.is_available()) else ("cpu", torch.float32)
    free0 = torch.cuda.mem_get_info()[0] if cuda else 0  # before the model: the CUDA context is not counted
    t0 = time.time()
    net = LLaMA.from_config(cfg, quantize=quantize, device=dev, dtype=dtype)
    net.grad_checkpoint = True  # a freshly built module is in training mode, where checkpointing applies
    load_s, load_alloc = time.time() - t0, torch.cuda.max_memory_allocated() / 1e9 if cuda else 0
    params = [p for p in net.parameters() if p.requires_grad]
    opt = qlora.PagedAdamW(params, paper["learning_rate"], (recipe.beta1, recipe.beta2), weight_decay=recipe.weight_decay)
    x = torch.randint(cfg.vocab_size, (batch, seq + 1), device=dev)
    device_peak, times = 0, []
    for step in range(steps):
        t = time.time()
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
            _, loss = net(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            device_peak = max(device_peak, free0 - torch.cuda.mem_get_info()[0])
        times.append(time.time() - t)
    dt = torch.tensor(times[1:] or times, dtype=torch.float64).quantile(0.5).item()  # median, first step (warm-up) excluded
    n_lin = sum(m.in_features * m.out_features for m in net.modules() if isinstance(m, qlora.LoRALinear))
    tok_s, alloc = batch * seq / dt, torch.cuda.max_memory_allocated() / 1e9 if cuda else 0
    print("| model | batch x seq | tok/s | MFU | peak allocated GB | device-level peak GB | build s | build peak GB |\n|---|---|---|---|---|---|---|---|")
    print(f"| {model} {'NF4' if quantize else 'bf16' if cuda else 'fp32'} r={r} | {batch} x {seq} | {tok_s:.0f} | "
          f"{mfu(n_lin, tok_s, name)} | {alloc:.2f} | {device_peak / 1e9:.2f} | {load_s:.1f} | {load_alloc:.2f} |")
    print(f"loss {loss.item():.3f}, optimizer state in {opt.memory} memory, step times ms: {', '.join(f'{1000 * t:.0f}' for t in times)}")


def write_random_checkpoint(name, d):  # Meta's layout with LLaMA.from_config's random bf16 weights (no LoRA); the head is a buffer named "output"
    if Path(d).is_file() or Path(d).is_dir() and any(Path(d).iterdir()):  # never over a real checkpoint (--ckpt_dir's default)
        raise InputError(f"--ckpt_dir {d}: {'a file' if Path(d).is_file() else 'not empty'}; --write makes its random checkpoint in a new or empty folder")
    cfg = LLaMAConfig(**{**CONFIGS[name], "lora_r": 0})
    sd = LLaMA.from_config(cfg, quantize=False).state_dict()
    sd["output.weight"] = sd.pop("output")
    Path(d).mkdir(parents=True, exist_ok=True)
    atomic_save(sd, Path(d) / "consolidated.00.pth")
    atomic_write_bytes(Path(d) / "params.json", meta_params(cfg).encode())
    print(f"wrote {sum(t.numel() for t in sd.values()) / 1e6:.0f}M params to {d}")


def load(ckpt_dir, quantize):  # peak host memory: private (anonymous) pages, and the whole resident set incl. the mmap'd file pages
    def status():  # {"RssAnon": bytes, "VmRSS": bytes} from lines like "VmRSS:    123456 kB"
        return {k: int(v.split()[0]) * 1024 for k, v in (l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines()) if k in ("RssAnon", "VmRSS")}

    base, peak, done = (now := status())["RssAnon"], now, threading.Event()  # base: torch itself; the peak starts there

    def watch():  # every 20 ms while loading, and once when it is done (a load under 20 ms gets that one)
        while not done.is_set():
            done.wait(0.02)
            peak.update({k: max(peak[k], v) for k, v in status().items()})

    (watcher := threading.Thread(target=watch, daemon=True)).start()
    cuda, t0 = torch.cuda.is_available(), time.time()
    net = LLaMA.from_checkpoint(ckpt_dir, quantize=quantize, device="cuda" if cuda else "cpu", dtype=torch.bfloat16)
    if cuda:
        torch.cuda.synchronize()
    dt = time.time() - t0
    done.set(), watcher.join()
    model_gb = sum(b.numel() * b.element_size() for b in net.buffers()) / 1e9
    gpu = f"{torch.cuda.max_memory_allocated() / 1e9:.2f}" if cuda else "-"
    header()
    print("| checkpoint | load s | model GB (buffers) | host private GB: before, peak | peak host RSS GB (incl. mmap) | peak GPU allocated GB |\n|---|---|---|---|---|---|")
    print(f"| {ckpt_dir} | {dt:.1f} | {model_gb:.2f} | {base / 1e9:.2f}, {peak['RssAnon'] / 1e9:.2f} | {peak['VmRSS'] / 1e9:.2f} | {gpu} |")


def main(argv):
    defaults = {k: v for k, v in globals().items() if not k.startswith("_") and k.islower() and isinstance(v, (int, float, bool, str))}
    words, given = parse_flags(argv, defaults, f"{__doc__.strip()}\n\nflags, default, meaning:\n{flag_help(__file__, defaults)}")
    f, cuda = {**defaults, **given}, torch.cuda.is_available()
    if words not in (["kernels"], ["e2e"], ["load"]):
        raise InputError(f"expected one command, kernels, e2e or load, got {' '.join(words) or 'none'} (see --help)")
    if k := next((k for k in ("model", "write") if f[k] and f[k] not in CONFIGS), None):
        raise InputError(f"--{k} {f[k]}: unknown architecture (known: {', '.join(CONFIGS)})")
    if k := next((k for k in ("batch", "seq", "steps", "lora_r") if not 1 <= f[k] < 2**31), None):
        raise InputError(f"--{k} must be at least 1 (below 2^31), got {f[k]}")
    if words == ["kernels"]:
        if not cuda:
            raise InputError("bench.py kernels needs a CUDA GPU")
        kernels()
    elif words == ["load"]:
        if f["write"]:
            write_random_checkpoint(f["write"], f["ckpt_dir"])
        load(f["ckpt_dir"], not f["no_quant"])
    else:
        if not cuda and "model" not in given:
            raise InputError(f"bench.py e2e: no GPU here; this would build a random {f['model']} on the CPU (slow, many GB of RAM): "
                             "name --model to run it anyway (--model tiny for a quick check)")
        e2e(f["model"], f["batch"], f["seq"], f["steps"], f["lora_r"], not f["no_quant"])


if __name__ == "__main__":
    run(main)
