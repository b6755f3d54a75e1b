"""LLaMA 1 and 2 (and models of the same shape: Mistral, TinyLlama, CodeLlama), quantized to NF4 one linear weight at a
time while loading, with LoRA on every linear layer of every block. The file formats (Meta's raw checkpoints,
Hugging Face folders, adapters, exports, the tokenizer) live in data/checkpoint.py.

References: Touvron et al. 2023 (LLaMA, Llama 2); Meta's llama/model.py for the layout of the weights.

Run as a script, it answers --prompt, or chats with one turn per line of stdin (until a blank line or EOF):
  python model.py --adapter out/adapter.pt --prompt "Name three colours."   # python train.py's demo (its base is rebuilt)
  python model.py --ckpt_dir checkpoints/7B --adapter out-7b/peft            # a base folder and an adapter: chat
  python model.py --ckpt_dir checkpoints/7B --template none --prompt "The capital of France is"
The prompt is wrapped in the adapter's template (--template alpaca|guanaco|none; default: the adapter's, else
alpaca; none without an adapter). Guanaco keeps the conversation; Alpaca's template is single-turn.
"""
import sys
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from data.checkpoint import Tokenizer, find_tokenizer, load_adapter, open_checkpoint, random_base, read_adapter
from data.files import InputError, parse_flags, run
from data.prepare import ALPACA, GUANACO
from qlora import DequantBuffer, LoRALinear, quantize_nf4


@dataclass
class LLaMAConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = None  # None: = n_heads (no grouped-query attention)
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float = None
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    ffn_dim: int = None  # None: Meta's formula (hidden_dim); else an explicit width (HF's intermediate_size)
    tie_embeddings: bool = False  # output head = the embedding (HF's tie_word_embeddings)
    lora_r: int = 64  # the paper's LoRA (App. B.2: r 64, α 16 on every linear layer); train.py's flags default to these
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @property
    def hidden_dim(self):  # SwiGLU keeps the parameter count of a 4·d MLP: 2/3 · 4d, scaled, rounded up to multiple_of
        if self.ffn_dim is not None:
            return self.ffn_dim
        h = int((self.ffn_dim_multiplier or 1) * int(2 * 4 * self.dim / 3))  # Meta's int(multiplier · int(8d/3))
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)


CONFIGS = {  # the published architectures, so `--init random` needs no files (params.json of each release)
    "7B": dict(dim=4096, n_layers=32, n_heads=32, norm_eps=1e-6),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, norm_eps=1e-6),
    "33B": dict(dim=6656, n_layers=60, n_heads=52, norm_eps=1e-6),
    "65B": dict(dim=8192, n_layers=80, n_heads=64, norm_eps=1e-5),
    "2-7B": dict(dim=4096, n_layers=32, n_heads=32, max_seq_len=4096),
    "2-13B": dict(dim=5120, n_layers=40, n_heads=40, max_seq_len=4096),
    "2-70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096, max_seq_len=4096),
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=256),
}


def paper_hparams(dim):  # the paper's recipe per size (App. B.2, Guanaco), read off the width rather than a folder's name
    big = dim >= 6656  # 33B and up
    return dict(learning_rate=1e-4 if big else 2e-4, lora_dropout=0.05 if big else 0.1)


PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200 NVL": 835e12, "H200": 989e12,  # dense bf16, by the
              "A100": 312e12, "L40S": 362e12, "L40": 181e12, "4090": 165e12}  # first key in the device's name (SXM: "NVIDIA H100 80GB HBM3")


def mfu(n_linear, tok_s, device_name):
    # MFU, as "12.3%" ("-": the peak is unknown, e.g. a CPU): forward 2N + backward 2N (input gradients: the base is frozen) per
    # token, N = block linear params; recomputation excluded as in PaLM's; unlike PaLM's, attention, head, LoRA too: a lower bound
    peak = next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)
    return f"{100 * 4 * n_linear * tok_s / peak:.1f}%" if peak else "-"


# --- the network -------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, weight, eps):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", weight)  # frozen (QLoRA trains only the adapters)

    def forward(self, x):  # x / rms(x) · g, the statistic in fp32 as in Meta's code
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim, n_pos, theta, device):  # rotation angle of pair i at position t: t · θ^(-2i/d)
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(n_pos, device=device, dtype=torch.float32), freqs)  # (n_pos, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # Meta's rotary form rotates interleaved pairs (x0, x1), (x2, x3), ... — raw checkpoints are laid
    # out for this (HF's are permuted for a rotate-half form). x (B, T, H, hd), cos/sin (T, hd/2).
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each (B, T, H, hd/2)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg, linear, prefix):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = linear(prefix + "wq.weight", (cfg.n_heads * cfg.head_dim, cfg.dim))
        self.wk = linear(prefix + "wk.weight", (cfg.n_kv_heads * cfg.head_dim, cfg.dim))
        self.wv = linear(prefix + "wv.weight", (cfg.n_kv_heads * cfg.head_dim, cfg.dim))
        self.wo = linear(prefix + "wo.weight", (cfg.dim, cfg.n_heads * cfg.head_dim))
        self.cache = None  # (k, v) each (B, prompt + new tokens (at most max_seq_len), n_kv_heads, head_dim) while generating

    def forward(self, x, cos, sin, start_pos=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, n_head, head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_head, head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = None
        if start_pos is not None:  # generation: append to the cache, attend over everything so far
            ck, cv = self.cache
            ck[:B, start_pos : start_pos + T], cv[:B, start_pos : start_pos + T] = k, v
            k, v = ck[:B, : start_pos + T], cv[:B, : start_pos + T]
            if start_pos > 0 and T > 1:  # query i sees keys up to start_pos + i (is_causal would align the mask top-left)
                mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device).tril(start_pos)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        # flash attention on the GPU; grouped-query attention shares each k/v head among n_head/n_kv_head queries
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg, linear, prefix):
        super().__init__()
        self.w1 = linear(prefix + "w1.weight", (cfg.hidden_dim, cfg.dim))  # gate
        self.w2 = linear(prefix + "w2.weight", (cfg.dim, cfg.hidden_dim))  # down
        self.w3 = linear(prefix + "w3.weight", (cfg.hidden_dim, cfg.dim))  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg, i, load, linear):
        super().__init__()
        p = f"layers.{i}."
        self.attention = Attention(cfg, linear, p + "attention.")
        self.feed_forward = FeedForward(cfg, linear, p + "feed_forward.")
        self.attention_norm = RMSNorm(load(p + "attention_norm.weight", (cfg.dim,)), cfg.norm_eps)
        self.ffn_norm = RMSNorm(load(p + "ffn_norm.weight", (cfg.dim,)), cfg.norm_eps)

    def forward(self, x, cos, sin, start_pos=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, start_pos)
        return x + self.feed_forward(self.ffn_norm(x))


def _chunk_ce(x, w, targets):  # summed cross-entropy of some rows; their fp32 logits (rows, vocab) live only inside here
    return F.cross_entropy(F.linear(x, w).float(), targets, ignore_index=-100, reduction="sum")


class LLaMA(nn.Module):
    # `load(name, shape)` hands over each tensor in checkpoint order; the linear weights are quantized
    # (and the 16-bit copy dropped) the moment they arrive, so the 16-bit model never exists whole.
    def __init__(self, cfg, load, quantize=True):
        super().__init__()
        self.config, self.quantize = cfg, quantize
        self.grad_checkpoint, self.ce_chunk = False, 2048
        buffer = DequantBuffer()  # the layers run one at a time: one dequantization buffer serves them all

        def linear(name, shape):  # quantize_nf4's defaults are the paper's: NF4, blocks of 64, double quantization
            w = load(name, shape)
            return LoRALinear(quantize_nf4(w) if quantize else w, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, buffer)

        emb = load("tok_embeddings.weight", (cfg.vocab_size, cfg.dim))
        self.tok_embeddings = nn.Embedding.from_pretrained(emb, freeze=True)
        self.layers = nn.ModuleList(Block(cfg, i, load, linear) for i in range(cfg.n_layers))
        self.norm = RMSNorm(load("norm.weight", (cfg.dim,)), cfg.norm_eps)
        self.register_buffer("output", emb if cfg.tie_embeddings else load("output.weight", (cfg.vocab_size, cfg.dim)))  # the head, frozen
        cos_sin = torch.stack(rope_tables(cfg.head_dim, 2 * cfg.max_seq_len, cfg.rope_theta, emb.device))
        self.register_buffer("rope", cos_sin, persistent=False)  # (2, 2·max_seq_len, head_dim/2): cos, sin

    def forward(self, idx, targets=None, start_pos=None):
        B, T = idx.shape  # idx (B, T) -> (logits (B, T, vocab) fp32, None), or with targets (B, T): (None, mean cross-entropy)
        p0 = start_pos or 0
        cos, sin = self.rope[:, p0 : p0 + T]
        x = self.tok_embeddings(idx)  # (B, T, dim)
        ckpt = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            x = checkpoint(layer, x, cos, sin, use_reentrant=False) if ckpt else layer(x, cos, sin, start_pos)
        x = self.norm(x)
        if targets is None:
            return F.linear(x, self.output.to(x.dtype)).float(), None
        # chunked cross-entropy: (B·T, vocab) fp32 logits for the whole batch would be the largest
        # tensor of the step (2×2048×32000×4 B = 0.5 GB), so each chunk's logits are recomputed in backward
        x, targets, w = x.reshape(B * T, -1), targets.reshape(B * T), self.output.to(x.dtype)
        total = sum(checkpoint(_chunk_ce, x[i : i + self.ce_chunk], w, targets[i : i + self.ce_chunk], use_reentrant=False)
                    for i in range(0, B * T, self.ce_chunk))
        return None, total / (targets != -100).sum().clamp(min=1)

    def lora_state_dict(self):
        return {k: v.detach().cpu() for k, v in self.state_dict().items() if ".lora_" in k}

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, stream=None):
        # idx (B, T) prompt -> (B, T + new), at most max_seq_len in all (Meta's limit; for a sliding-window
        # model, its window). A KV cache keeps each step O(T) instead of O(T²). stream(nxt (B,)) sees each step; True ends it.
        B, T = idx.shape
        if T > self.config.max_seq_len:  # the cache holds at most max_seq_len positions (chat cuts its prompts to fit)
            raise ValueError(f"generate: the prompt has {T} tokens, more than the model's max_seq_len {self.config.max_seq_len}")
        total = min(T + max_new_tokens, self.config.max_seq_len)
        kv = (B, total, self.config.n_kv_heads, self.config.head_dim)
        dtype = self.output.dtype if not torch.is_autocast_enabled(idx.device.type) else torch.get_autocast_dtype(idx.device.type)
        for layer in self.layers:
            layer.attention.cache = (torch.zeros(kv, dtype=dtype, device=idx.device), torch.zeros(kv, dtype=dtype, device=idx.device))
        try:
            logits, _ = self(idx, start_pos=0)
            done = torch.zeros(B, dtype=torch.bool, device=idx.device)
            for pos in range(T, total):
                nxt = sample(logits[:, -1], temperature, top_k, top_p)  # (B,)
                if eos_id is not None:
                    nxt = torch.where(done, eos_id, nxt)
                    done |= nxt == eos_id
                idx = torch.cat([idx, nxt[:, None]], dim=1)
                if (stream is not None and stream(nxt)) or (eos_id is not None and done.all()) or pos == total - 1:
                    break
                logits, _ = self(nxt[:, None], start_pos=pos)
        finally:
            for layer in self.layers:
                layer.attention.cache = None
        return idx

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg, quantize=True, device=None, dtype=torch.bfloat16, seed=0):
        # random weights (benchmarks, dry runs), generated on the target device one tensor at a time
        gen = torch.Generator(device=device or "cpu").manual_seed(seed)

        def load(name, shape):
            if name.endswith("norm.weight"):
                return torch.ones(shape, device=device, dtype=dtype)
            # std 1/√fan_in keeps activations and logits O(1) at any width (1/64 at 4096)
            return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * shape[-1] ** -0.5).to(dtype)

        return cls(cfg, load, quantize)

    @classmethod
    def from_checkpoint(cls, ckpt_dir, quantize=True, device=None, dtype=torch.bfloat16, tokenizer=None, context=None, progress=True, **lora):
        # Meta's layout or HF's (told apart by their files), read tensor by tensor; context: the longest sequence
        params, load, prog = open_checkpoint(ckpt_dir, device, dtype, tokenizer, context, progress)
        net = cls(LLaMAConfig(**params, **lora), load, quantize)
        prog.close()
        return net


def sample(logits, temperature=1.0, top_k=None, top_p=None):  # (B, vocab) logits -> (B,) ids; temperature 0 is greedy
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.double()  # fp64, as the temperature itself: a tiny one does not round to 0
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature  # ≤ 0: cannot overflow to inf - inf = nan
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None:  # nucleus: the smallest set of tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = ((before := probs.cumsum(-1) - probs) >= top_p) & (before > 0)  # keep the token that reaches top_p, and the first
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -float("inf")))
    return torch.multinomial(logits.softmax(-1), 1)[:, 0]


# --- python model.py: answer or chat -----------------------------------------------------------

FLAGS = dict(ckpt_dir="", adapter="", prompt="", template="", max_new_tokens=256, temperature=0.7, top_p=0.9, top_k=0, seed=0, quantize=True)


def chat(argv):
    help_text = __doc__.strip() + "\n\nflags (defaults): " + " ".join(f"--{k} {v!r}" for k, v in FLAGS.items())
    f = {**FLAGS, **(given := parse_flags(argv, FLAGS, help_text, words_ok=False)[1])}  # defaults, then the flags given
    if k := next((k for k in ("prompt", "ckpt_dir", "adapter") if k in given and not given[k].strip()), None):  # "$UNSET": not a chat
        raise InputError(f"--{k}: empty " + ("(without --prompt, one turn per line of stdin)" if k == "prompt" else "(an unset variable?)"))
    for k, lo, hi in (("max_new_tokens", 0, 1e9), ("top_k", 0, 1e9), ("top_p", 0, 1), ("temperature", 0, 1e4), ("seed", 0, 2**63 - 1)):
        if not lo <= f[k] <= hi:  # not NaN either
            raise InputError(f"--{k} must be in [{lo}, {hi:g}], got {f[k]}")
    adapter = read_adapter(f["adapter"]) if f["adapter"] else {"info": {}}  # none: an adapter that records nothing
    info, base = adapter["info"], adapter["info"].get("base") or {}
    template = f["template"] or info.get("template") or ("alpaca" if f["adapter"] else "none")
    if (wrap := {"alpaca": ALPACA[False], "guanaco": GUANACO, "none": "{instruction}"}.get(str(template))) is None:
        raise InputError(f"{'--template' if f['template'] else f['adapter'] + ': its template'}: expected alpaca, guanaco or none, got {template!r}")
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)  # as train.py
    if (d := f["ckpt_dir"] or base.get("ckpt_dir")) and not Path(d).is_dir():  # a typo, or peft's hub model name
        raise InputError(f"--ckpt_dir {d}: not a folder" if f["ckpt_dir"] else
                         f"--adapter {f['adapter']}: its base {d} is not a folder here; name one with --ckpt_dir")
    if d:
        tok = Tokenizer(find_tokenizer(d) or Path(d) / "tokenizer.model")  # checked before the (slow) load, as --template
        net = LLaMA.from_checkpoint(d, f["quantize"], device, dtype, lora_r=0)
    elif base.get("init") == "random":  # train.py's demo: the same random base (same seed, device kind, dtype)
        t, seed, _ = random_base(f["adapter"], info, device)
        tok, net = Tokenizer(t), LLaMA.from_config(LLaMAConfig(**info["model_config"]), f["quantize"], device, dtype, seed=seed)
    else:
        raise InputError("--ckpt_dir DIR is needed (no --adapter, or the adapter does not record its base)")
    if f["adapter"]:
        load_adapter(net, adapter)
    net.eval()
    stop = GUANACO.split(" {")[0] if template == "guanaco" else ""  # "### Human:", where the paper's adapters may put eos
    keep = max(net.config.max_seq_len - f["max_new_tokens"], net.config.max_seq_len // 2)  # prompt tokens kept: bos, the newest
    torch.manual_seed(f["seed"])

    history, src = [tok.bos_id], "--prompt" if f["prompt"] else "stdin"
    sys.stdin = sys.stdin or open("/dev/null")  # closed (`<&-`): read as empty, as </dev/null is
    sys.stdin.reconfigure(errors="surrogateescape")  # bytes that are not UTF-8 reach the check below; a BOM (Notepad's) is dropped
    with suppress(EOFError):  # --prompt, or one turn per line of stdin until a blank line (or EOF)
        for line in [f["prompt"]] if f["prompt"] else iter(lambda: input("> " * sys.stdin.isatty()).lstrip("\ufeff").strip(), ""):
            if any("\ud800" <= ch <= "\udfff" for ch in line):  # such bytes, as Python escapes them
                raise InputError(f"{src}: not UTF-8 text")
            turn = tok.encode(wrap.format(instruction=line))  # cut from the front to fit, it would lose its template's head
            if len(turn) + 1 > keep:  # (older turns of a conversation are dropped first; bos and this turn stay)
                raise InputError(f"{src}: {len(turn) + 1} tokens with bos and the template, over the {keep} a prompt may have here")
            ids = (history if template == "guanaco" else [tok.bos_id]) + turn
            out, shown = [], ""  # the answer is printed as it is produced: decode it as it grows, print the new suffix

            def show(nxt, end=False):  # -> True once the answer reaches `stop`, no part of which is printed
                nonlocal shown
                out.extend(nxt.tolist())
                text = tok.decode(out).rstrip("\ufffd")  # hold back a character whose bytes are not all there yet
                hit = bool(stop) and stop in text  # and, until the answer ends, a tail that may begin `stop`, held back:
                held = 0 if hit or end else next(k for k in range(len(stop), -1, -1) if text.endswith(stop[:k]))
                text = text.split(stop)[0] if hit else text[: len(text) - held]
                if text.startswith(shown):
                    print(text[len(shown):], end="", flush=True)
                    shown = text
                return hit

            with torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
                net.generate(torch.tensor([ids[:1] + ids[max(1, len(ids) + 1 - keep):]], device=device), f["max_new_tokens"],
                             f["temperature"], f["top_k"] or None, f["top_p"] if f["top_p"] < 1 else None, tok.eos_id, show)
            show(torch.tensor([], dtype=torch.long), end=True)  # what was held back
            print(flush=True)
            history = ids + tok.encode(shown.strip()) + [tok.eos_id]  # the answer as training reads it, closed by eos


if __name__ == "__main__":
    run(chat)
