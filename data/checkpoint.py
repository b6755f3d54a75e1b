"""Model files in and out, each format read or written by a few lines of our own (no safetensors, transformers
or peft package). The network (model.py) is built from `load(name, shape)`, which hands over one tensor at a
time under Meta's names, so that each weight can be quantized the moment it arrives.

  Meta:          consolidated.NN.pth or Mistral's consolidated.safetensors + params.json, tokenizer.model(.v3) beside it or one level up
  Hugging Face:  config.json + model.safetensors | model-0000k-of-0000n.safetensors + .index.json
                 | pytorch_model*.bin (+ .index.json), and tokenizer.model (sentencepiece)
  safetensors:   8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
                 then the tensors' raw little-endian bytes (offsets counted from the end of the header)
  adapters:      ours (adapter.pt: {"lora": state dict, "model_config", "config", ...}) or peft's folder
"""
import dataclasses
import io
import json
import math
import pickle
import re
import struct
import sys
import time
from pathlib import Path

import sentencepiece as spm
import torch

from data.files import InputError, atomic_save, atomic_write, atomic_write_bytes
from qlora import LoRALinear, merge_lora


class Tokenizer:
    def __init__(self, path):
        self.path = path = Path(path)
        if not path.is_file():  # beside it a tokenizer.json alone (Llama 3's, or what transformers 5 saves): say so
            raise InputError(f"{path}: tokenizer not found" + " (only tokenizer.json, which is not read: copy the base's "
                             "tokenizer.model)" * (path.parent / "tokenizer.json").is_file())
        try:
            self.sp = spm.SentencePieceProcessor(model_file=bytes(path))  # bytes (os.fsencode): a path that is not UTF-8 too
        except (RuntimeError, OSError):  # empty, truncated, or some other file; Llama 3's: tiktoken's "base64 rank" lines
            with open(path, "rb") as f:
                tiktoken = re.match(rb"[A-Za-z0-9+/]+=* 0\n", f.read(64))
            raise InputError(f"{path}: " + ("Llama 3's tiktoken tokenizer: only sentencepiece models (LLaMA 1/2, Mistral) are read"
                                            if tiktoken else "not a sentencepiece tokenizer model (cannot parse it)")) from None
        self.n_words, self.bos_id, self.eos_id = self.sp.vocab_size(), self.sp.bos_id(), self.sp.eos_id()  # LLaMA: bos 1, eos 2
        if min(self.bos_id, self.eos_id) < 0:  # every example is bos ... eos: a model without them cannot read them
            raise InputError(f"{path}: the tokenizer has no bos or no eos token (bos_id {self.bos_id}, eos_id {self.eos_id})")

    def encode(self, s, bos=False, eos=False):
        return [self.bos_id] * bos + self.sp.encode(s) + [self.eos_id] * eos

    def decode(self, ids):
        return self.sp.decode([i for i in ids if 0 <= i < self.n_words])


def train_tokenizer(texts, path, vocab_size, symbols=()):
    # a small BPE model with LLaMA's special ids (unk 0, bos 1, eos 2), for models that come without one.
    # The vocabulary must hold every character of the text and cannot exceed what the text can fill:
    # outside those bounds sentencepiece names the size that works, and we take it. -> the size used
    for retry in (False, True):
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type="bpe", unk_id=0, bos_id=1,
                eos_id=2, pad_id=-1, character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
                split_by_whitespace=True, user_defined_symbols=list(symbols), minloglevel=2, num_threads=1,
                max_sentence_length=max([4192, *(len(t.encode()) + 1 for t in texts)]))  # its default skips longer texts
            break
        except RuntimeError as e:
            if not (fit := re.search(r"value <= (\d+)|required_chars\. \d+ vs (\d+)", str(e))) or retry:  # the size it named failed too
                raise InputError(f"{path}: cannot train a tokenizer on this data ({str(e).splitlines()[0][:200]})") from None
            vocab_size = int(fit[1] or fit[2])
    atomic_write_bytes(path, buf.getvalue())
    return vocab_size


def is_hf(d):  # Hugging Face's layout: config.json and no Meta shards (Mistral's HF folders also hold a params.json, v0.3's both)
    return (Path(d) / "config.json").is_file() and not any(Path(d).glob("consolidated.*"))


def find_tokenizer(ckpt_dir):
    # in the folder (Mistral's from v0.3 on: tokenizer.model.v3); for Meta's layout also one level up, where its download puts it
    d = Path(ckpt_dir)
    return next((f for p in ((d,) if is_hf(d) else (d, d.parent)) for f in (p / "tokenizer.model", p / "tokenizer.model.v3") if f.is_file()), None)


def random_base(adapter, info, device):
    # the random base (train.py's demo) an adapter records (read_adapter's info) -> (its tokenizer: where it was, else
    # beside the adapter; its seed; its vocabulary size, which the demo and --init random choose differently)
    base, vocab = info.get("base") or {}, info["model_config"].get("vocab_size")
    if not (isinstance(base.get("seed"), int) and isinstance(base.get("tokenizer"), str) and type(vocab) is int and vocab > 0):
        raise InputError(f"{adapter}: its random base records no seed, no tokenizer or no vocabulary size")  # edited by hand
    if base.get("device", device) != device:  # CPU and CUDA generators draw other weights from one seed
        raise InputError(f"{adapter}: its random base was made on {base['device']}; rebuilding it needs the same here")
    tok = t if (t := Path(base["tokenizer"])).is_file() else Path(adapter).parent / t.name
    if (n := Tokenizer(tok).n_words) > vocab:  # edited by hand: the tokenizer's ids would run past the embedding
        raise InputError(f"{adapter}: its random base's vocabulary of {vocab} is smaller than its tokenizer's, {n} ({tok})")
    return tok, base["seed"], vocab


def read_json(path):  # -> the JSON object in the file (UTF-8, or UTF-16/32 as some editors save it: json.loads detects it from bytes)
    try:
        d = json.loads(Path(path).read_bytes())
    except (ValueError, RecursionError) as e:  # also: not UTF-8/16/32 text (UnicodeDecodeError), nested too deep
        at = f":{e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise InputError(f"{path}{at}: invalid JSON ({getattr(e, 'msg', type(e).__name__)})") from None
    if not isinstance(d, dict):
        raise InputError(f"{path}: expected a JSON object {{...}}, got {json.dumps(d)[:40]}")
    return d


def check_fields(c, where, need, ints=(), floats=(), bools=()):
    # a config edited by hand: the fields in need present, each field a positive int, positive number or true/false
    if (k := next((k for k in need if k not in c), None)) is not None:
        raise InputError(f"{where}: missing field {k!r}")
    for keys, types, want in ((ints, (int,), "a positive integer"), (floats, (int, float), "a positive number"), (bools, (bool,), "true or false")):
        for k in keys:
            if k in c and not (type(c[k]) in types and (bool in types or 0 < c[k] < math.inf)):
                raise InputError(f"{where}: {k} must be {want}, got {json.dumps(c[k])}")


def is_state_dict(sd):  # {name: tensor}, what torch's state_dict() returns
    return isinstance(sd, dict) and all(isinstance(k, str) and torch.is_tensor(t) for k, t in sd.items())


def torch_load(path, tensors=True):  # -> what torch.save wrote; tensors=True: a state dict {name: tensor}
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save's zip format, the one that can be memory-mapped
            raise InputError(f"{path}: not in torch.save's zip format" + (" (empty file)" if not f.tell() else ""))
    try:  # weights_only: a checkpoint is data, never code to run; mmap: nothing is read until it is used
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(f"{path}: holds more than tensors and plain data; refusing to unpickle it") from None
    except Exception as e:  # a zip cut short, or damaged
        raise InputError(f"{path}: truncated or damaged ({str(e).splitlines()[0].split('. ')[0][:200]})") from None  # its first sentence
    if tensors and not is_state_dict(sd):
        raise InputError(f"{path}: not a state dict (a dict of named tensors)")
    if tensors and (k := next((k for k, t in sd.items() if t.dtype not in ST_DTYPES.values()), None)):  # e.g. FP8 or int8
        raise InputError(f"{path}: tensor {k!r} has dtype {sd[k].dtype}; only float16, bfloat16 and float32 are read")  # weights
    return sd


# --- names: Meta's (the network's own) and Hugging Face's --------------------------------------

LINEARS = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
           "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
           "feed_forward.w3": "mlp.up_proj"}
PER_LAYER = {**LINEARS, "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def meta_names(n_layers):
    return ["tok_embeddings.weight", *(f"layers.{i}.{n}.weight" for i in range(n_layers) for n in PER_LAYER), "norm.weight", "output.weight"]


def hf_name(name):  # layers.3.attention.wq.weight -> model.layers.3.self_attn.q_proj.weight
    if name in TOP:
        return TOP[name]
    _, i, sub = name.split(".", 2)
    return f"model.layers.{i}.{PER_LAYER[sub[: -len('.weight')]]}.weight"


def peft_name(name):  # layers.3.attention.wq -> base_model.model.model.layers.3.self_attn.q_proj
    return "base_model.model." + hf_name(name + ".weight").removesuffix(".weight")


def hf_permute(w, name, n_heads, n_kv_heads, back=False):
    # HF's LLaMA rotates halves (rotate_half) instead of interleaved pairs, so the rows of wq (n_heads heads) and wk (n_kv_heads)
    # are permuted per head: row (h, i, j) of Meta's (h, hd/2, 2) layout goes to (h, j, i); back=True undoes it; the weights of
    # other names are returned as they are. For LoRA only B's rows move: W + s·B A permuted = W_perm + s·(B permuted) A.
    if (h := n_heads if "attention.wq" in name else n_kv_heads if "attention.wk" in name else None) is None:
        return w
    shape = (h, 2, w.shape[0] // h // 2, -1) if back else (h, w.shape[0] // h // 2, 2, -1)
    return w.reshape(shape).transpose(1, 2).reshape(w.shape[0], -1)


# --- safetensors -------------------------------------------------------------------------------

ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def read_safetensors(path):  # -> {name: tensor} over a private memory map (read when used; a misaligned one copied), checked against the file size
    size, out = path.stat().st_size, {}
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8).ljust(8, b"\xff"))[0]
        try:
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            buf = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
            for name, h in header.items():
                if h["dtype"] not in ST_DTYPES:
                    raise InputError(f"{path}: tensor {name!r} has dtype {h['dtype']}; only F16, BF16 and F32 are read")
                (begin, end), dt = h["data_offsets"], ST_DTYPES[h["dtype"]]
                if not 0 <= begin <= end <= size - 8 - n or end - begin != math.prod(h["shape"]) * dt.itemsize:
                    raise ValueError(f"tensor {name!r}: data_offsets disagree with its shape or the file size")
                raw = buf[8 + n + begin : 8 + n + end]  # viewed as dt in place only where the offset is aligned to it
                out[name] = (raw if (8 + n + begin) % dt.itemsize == 0 else raw.clone()).view(dt).view(h["shape"])
        except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:  # RuntimeError: e.g. a shape < 0
            raise InputError(f"{path}: not a valid safetensors file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return out


def save_safetensors(tensors, path, metadata=None):
    # header padded with spaces to a multiple of 8, so that the data (its first tensor) starts 8-byte aligned
    names, header, off = {v: k for k, v in ST_DTYPES.items()}, {"__metadata__": metadata or {}}, 0
    tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    for k, t in tensors.items():
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    body = [t.view(-1).view(torch.uint8).numpy() for t in tensors.values()]  # little-endian, as every torch machine
    atomic_write(path, lambda f: f.writelines([struct.pack("<Q", len(h)), h, *body]), 8 + len(h) + off)


# --- reading a checkpoint: Meta's layout or Hugging Face's, detected from the folder's files ---

META_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier", "norm_eps", "rope_theta")


def read_params(ckpt_dir, context=None):  # the architecture alone as LLaMAConfig fields: cheap, so defaults are resolved before any weight is read
    d = Path(ckpt_dir)
    if is_hf(d):
        p = hf_params(raw := read_json(where := d / "config.json"), where)
    else:  # Meta's params.json; Mistral's own download adds hidden_dim (an explicit FFN width), head_dim and sliding_window
        if not (where := d / "params.json").is_file():
            raise InputError(f"{where}: not found (Meta's layout: params.json + consolidated.NN.pth; Hugging Face's: config.json)")
        raw = {k: v for k, v in read_json(where).items() if v is not None and (k, v) != ("vocab_size", -1)}
        check_fields(raw, where, ("dim", "n_layers", "n_heads"), ints=(*META_KEYS[:6], "hidden_dim", "head_dim", "sliding_window"),
                     floats=META_KEYS[6:])
        if raw.get("use_scaled_rope"):  # Llama 3.1's: the long wavelengths stretched (Meta's apply_scaling)
            raise InputError(f"{where}: use_scaled_rope {json.dumps(raw['use_scaled_rope'])} is not implemented (only false)")
        p = {k: v for k, v in raw.items() if k in META_KEYS} | {"ffn_dim": raw.get("hidden_dim")}  # None: Meta's formula
        p["max_seq_len"] = max(2048, context or 0)  # params.json has no context length: Meta's code takes it from its caller
    heads, kv = p["n_heads"], p.get("n_kv_heads", p["n_heads"])  # attention needs whole, even (rotary pairs) head dims
    if raw.get("head_dim") not in (None, p["dim"] / heads):
        raise InputError(f"{where}: head_dim {raw['head_dim']} is not dim / heads = {p['dim']} / {heads} = {p['dim'] / heads:g} (not implemented)")
    if p["dim"] % heads or p["dim"] // heads % 2 or heads % kv:
        raise InputError(f"{where}: dim {p['dim']}, {heads} heads, {kv} kv heads: need a whole, even head dim and kv heads dividing heads")
    window = raw.get("sliding_window", 4096 if raw.get("architectures") == ["MistralForCausalLM"] else None)  # absent: transformers'
    if window:  # within the window, full causal attention is what the model computes
        if context and context > window:
            raise InputError(f"{where}: sliding_window {window} is shorter than the context of {context} tokens (not implemented)")
        p["max_seq_len"] = min(p["max_seq_len"], window)
    return p


def _read_meta(d, context):
    params, pth = read_params(d, context), sorted(d.glob("consolidated.*.pth"))
    if not (shards := pth or sorted(d.glob("consolidated.safetensors"))):  # the latter: Mistral's downloads from v0.3 on, one file
        raise InputError(f"{d}: no consolidated.NN.pth checkpoint shards (or consolidated.safetensors)")
    if gap := next((f"consolidated.{i:02d}.pth" for i, s in enumerate(pth) if s.name != f"consolidated.{i:02d}.pth"), None):
        raise InputError(f"{d / gap}: shard missing ({len(shards)} shards found)")
    sds, expected = [torch_load(s) if s.suffix == ".pth" else read_safetensors(s) for s in shards], meta_names(params["n_layers"])
    for s, sd in zip(shards, sds):
        odd = [f"unexpected tensor {k!r}" for k in sd if k not in expected and k != "rope.freqs"]  # rope.freqs: recomputed
        odd += [f"missing tensor {k!r}" for k in expected if k not in sd]
        if odd:
            raise InputError(f"{s}: {odd[0]}")
    params.setdefault("vocab_size", sds[0]["tok_embeddings.weight"].shape[0])  # LLaMA-1's params.json says -1: the embedding knows

    def take(name):
        # Meta's model parallelism: column-parallel (output rows split) wq wk wv w1 w3 output; row-parallel
        # (input columns split) wo w2; the embedding is split along its feature dim; norms are replicated
        if len(parts := [sd[name] for sd in sds]) == 1 or name.endswith("norm.weight"):
            return parts[0]
        try:
            return torch.cat(parts, 1 if name == "tok_embeddings.weight" or name.endswith(("wo.weight", "w2.weight")) else 0)
        except (RuntimeError, IndexError):  # shards of different models
            raise InputError(f"{d}: {name} has shapes {[tuple(t.shape) for t in parts]} in its shards: they do not fit") from None

    return params, take, sum(sd[k].nbytes for sd in sds for k in expected), f"{d}/consolidated.*.pth" if pth else str(shards[0])


def hf_params(c, where):
    # config.json -> LLaMAConfig fields; what the network does not implement is refused here (or in read_params) before any weight is read
    c = {k: v for k, v in c.items() if v is not None}  # null: the field's default
    rope = c.get("rope_parameters", {})  # transformers >= 5 keeps θ there: {"rope_type": "default", "rope_theta": θ}
    for key, r in (("rope_scaling", c.get("rope_scaling", {})), ("rope_parameters", rope)):  # "type": older transformers' word
        kinds = (r.get("rope_type", "default"), r.get("type", "default")) if isinstance(r, dict) else None  # (a list there: refused)
        if kinds != ("default",) * 2 or set(r) - {"rope_type", "type", "rope_theta"}:  # default: no scaling, as transformers reads it
            raise InputError(f"{where}: {key} {json.dumps(r)} is not implemented (only rope_type default)")
    check_fields(rope, f"{where}: rope_parameters", (), floats=("rope_theta",))
    c = {**c, **rope}  # its rope_theta over a top-level one, as transformers reads them
    check_fields(c, where, ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"),
                 ints=("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                       "intermediate_size", "max_position_embeddings", "head_dim", "sliding_window"),
                 floats=("rms_norm_eps", "rope_theta"), bools=("tie_word_embeddings", "attention_bias", "mlp_bias"))
    arch = c.get("architectures") or ["LlamaForCausalLM"]  # LLaMAForCausalLM: early conversions' spelling of the same
    if arch not in (["LlamaForCausalLM"], ["LLaMAForCausalLM"], ["MistralForCausalLM"]):
        raise InputError(f"{where}: architectures {arch}: only LlamaForCausalLM and MistralForCausalLM are implemented")
    if "quantization_config" in c:  # e.g. a -bnb-4bit folder: its weights are already quantized, and we quantize as we load
        raise InputError(f"{where}: quantization_config: the weights are quantized already; use the 16-bit original")
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise InputError(f"{where}: attention or MLP biases (attention_bias/mlp_bias true) are not implemented")
    if c.get("hidden_act", "silu") not in ("silu", "swish"):  # one function, two names (transformers' ACT2FN has both)
        raise InputError(f"{where}: hidden_act {c['hidden_act']!r} is not implemented (only silu, or swish)")
    return dict(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                n_kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]), vocab_size=c["vocab_size"],
                ffn_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=c.get("rope_theta", 10000.0),
                max_seq_len=c.get("max_position_embeddings", 2048), tie_embeddings=c.get("tie_word_embeddings", False))


def _read_hf(d, context):
    params = read_params(d, context)
    if (first := next((f for s in ("model.safetensors", "pytorch_model.bin") for f in (d / s, d / f"{s}.index.json")
                       if f.is_file()), None)) is None:  # transformers' order: a single file before an index, safetensors before pickles
        raise InputError(f"{d}: no weights (model.safetensors, pytorch_model.bin, or their .index.json)")
    wm = read_json(first).get("weight_map") if first.suffix == ".json" else {"": first.name}  # {tensor: file}; or the one file
    if not (isinstance(wm, dict) and all(isinstance(f, str) for f in wm.values())):
        raise InputError(f"{first}: weight_map must map tensor names to file names, got {json.dumps(wm)[:60]}")
    files = sorted({d / f for f in wm.values()})
    if lost := next((f for f in files if not f.is_file()), None):
        raise InputError(f"{lost}: not found (listed in the folder's .index.json)")
    read = read_safetensors if ".safetensors" in first.name else torch_load
    tensors = {k: t for f in files for k, t in read(f).items()}
    names = {n: hf_name(n) for n in meta_names(params["n_layers"])}
    if params["tie_embeddings"]:  # the output head is the embedding; a stored lm_head.weight is not read
        names["output.weight"] = names["tok_embeddings.weight"]
    for k in tensors:
        if k.endswith(".bias"):
            raise InputError(f"{d}: tensor {k!r}: biases are not implemented")
        if k not in names.values() and not k.endswith("rotary_emb.inv_freq") and k != "lm_head.weight":  # inv_freq: recomputed
            raise InputError(f"{d}: unexpected tensor {k!r}")
    if missing := next((k for k in names.values() if k not in tensors), None):
        raise InputError(f"{d}: missing tensor {missing!r}")
    total = sum(tensors[k].nbytes for k in set(names.values()))  # a tied head is the embedding, counted once
    return params, lambda name: tensors[names[name]], total, str(d)


class Progress:  # loading a 7B takes minutes: on a terminal one line rewritten in place, else one summary line at the end
    def __init__(self, verb, n_layers, total, quiet=False):
        self.verb, self.n, self.total, self.done, self.t0 = verb, n_layers, total, 0, time.time()
        self.quiet, self.tty = quiet, not quiet and sys.stderr.isatty()

    def step(self, name, nbytes):
        self.done += nbytes
        if self.tty:
            layer = int(name.split(".")[1]) + 1 if name.startswith("layers.") else 0 if name.startswith("tok_") else self.n
            t = time.time() - self.t0
            print(f"\r{self.verb}: layer {layer}/{self.n}, {self.done / 1e9:.1f}/{self.total / 1e9:.1f} GB, {t:.0f}s, "
                  f"eta {t * (self.total - self.done) / max(self.done, 1):.0f}s\033[K", end="", file=sys.stderr, flush=True)

    def close(self):
        if not self.quiet:
            line = f"{self.verb} {self.n} layers, {self.done / 1e9:.1f} GB in {time.time() - self.t0:.1f}s"
            print("\r" + line + "\033[K" if self.tty else line, file=sys.stderr, flush=True)


def open_checkpoint(ckpt_dir, device=None, dtype=torch.bfloat16, tokenizer=None, context=None, progress=True):
    # -> (LLaMAConfig fields, load(name, shape) -> tensor on device, Progress to close when the model is built).
    # context: the longest sequence that will be used (a sliding window shorter than it is refused).
    d, hf = Path(ckpt_dir), is_hf(ckpt_dir)
    params, take, total, where = (_read_hf if hf else _read_meta)(d, context)
    tok = tokenizer if tokenizer is not None else find_tokenizer(d)
    n_words = Tokenizer(tok).n_words if tok is not None else params["vocab_size"]
    if n_words > params["vocab_size"]:  # the embedding may be padded past the tokenizer (a multiple of 64, an added pad)
        raise InputError(f"{tok}: tokenizer has {n_words} tokens, the checkpoint's embedding has {params['vocab_size']}")
    prog = Progress("loaded", params["n_layers"], total, quiet=not progress)

    def load(name, shape):
        t = take(name)
        if tuple(t.shape) != tuple(shape):
            src = "config.json" if hf else "params.json"
            raise InputError(f"{where}: {hf_name(name) if hf else name} has shape {tuple(t.shape)}, {src} implies "
                             f"{tuple(shape)} (missing shard or wrong {src}?)")
        nbytes, t = t.nbytes, t.to(device=device, dtype=dtype)
        if not t.sum(dtype=torch.float32).isfinite():  # NaN or inf anywhere makes the sum so (one pass, cheaper than isfinite)
            raise InputError(f"{where}: {hf_name(name) if hf else name} holds NaN or inf")  # a damaged file: now, not NaN logits later
        prog.step(name, nbytes)
        return hf_permute(t, name, params["n_heads"], params["n_kv_heads"], back=True) if hf else t  # to Meta's interleaved rotary

    return params, load, prog


# --- adapters in: ours (adapter.pt) or peft's folder -------------------------------------------

def read_adapter(path):  # -> {"lora": {name in the file: tensor}, "r", "scaling", "targets", "hf", "where", "info" (its base: a dict)}
    path, short = Path(path), {v.split(".")[1]: k for k, v in LINEARS.items()}  # q_proj -> attention.wq
    if path.is_dir():  # peft's folder
        where, conf = path / "adapter_config.json", read_json(path / "adapter_config.json")
        ok = {"peft_type": ("LORA",), "bias": ("none",), "init_lora_weights": (True, "gaussian", "eva", "orthogonal"),  # not PiSSA,
              **dict.fromkeys(("fan_in_fan_out", "rank_pattern", "alpha_pattern", "use_qalora", "use_dora",  # LoftQ...: a changed base;
                               "velora_config", "alora_invocation_tokens", "monteclora_config", "use_bdlora", "arrow_config",  # LoRA
                               "kasa_config", "layers_to_transform", "layer_replication", "exclude_modules"), ())}  # variants and
        # layer choices we do not compute (peft 0.21's): refused by name (others, e.g. lora_bias, by their extra tensors)
        for key, values in ok.items():
            if (conf.get(key) or None) not in (None, *values):  # None: false, null, {} or [], each field's default
                raise InputError(f"{where}: {key} {json.dumps(conf[key])} is not supported")
        targets = conf.get("target_modules")  # short names, or full ones (peft's "all-linear": model.layers.0.mlp.gate_proj, ...)
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t.split(".")[-1] in short for t in targets):
            raise InputError(f"{where}: target_modules {json.dumps(targets)} is not supported (only {', '.join(short)})")
        st, pt = path / "adapter_model.safetensors", path / "adapter_model.bin"
        if not st.is_file() and not pt.is_file():
            raise InputError(f"{path}: no adapter_model.safetensors or adapter_model.bin")
        lora = read_safetensors(st) if st.is_file() else torch_load(pt)
        for k in lora:
            if not (m := re.fullmatch(r"base_model\.model\.model\.layers\.\d+\.\w+\.(\w+)\.lora_[AB]\.weight", k)) or m[1] not in short:
                raise InputError(f"{path}: tensor {k!r} is not a LoRA weight of a LLaMA linear layer")
        r, alpha, rslora, targets = conf.get("r"), conf.get("lora_alpha"), conf.get("use_rslora"), {short[t.split(".")[-1]] for t in targets}
        base = conf.get("base_model_name_or_path")  # a folder (ours), a hub name, or null
        info = {"base": {"ckpt_dir": base}} if isinstance(base, str) and base else {}
    elif path.is_file():  # ours: train.py's adapter.pt (or ckpt.pt)
        where, ck = path, torch_load(path, tensors=False)
        if not (isinstance(ck, dict) and is_state_dict(ck.get("lora")) and ck["lora"] and isinstance(ck.get("model_config"), dict)):
            raise InputError(f"{path}: not an adapter (expected a dict with 'lora' (named tensors) and 'model_config')")
        lora = ck["lora"]  # names layers.3.attention.wq.lora_A: a name of no layer is refused by load_adapter
        r, alpha = ck["model_config"].get("lora_r"), ck["model_config"].get("lora_alpha")
        targets = {sub for sub in LINEARS if any(f".{sub}.lora_" in k for k in lora)}
        info, rslora = {k: v for k, v in ck.items() if k not in ("lora", "optimizer", "rng") and (k != "base" or isinstance(v, dict))}, False
    else:
        raise InputError(f"{path}: adapter not found (adapter.pt, or a peft folder with adapter_config.json)")
    if bad := next((k for k, t in lora.items() if not t.isfinite().all()), None):  # another trainer's diverged run: now, not after
        raise InputError(f"{path}: tensor {bad!r} holds NaN or inf")  # the (slow) base is loaded
    if type(r) is not int or r < 1 or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InputError(f"{where}: the rank and alpha must be finite numbers, got {r!r}, {alpha!r}")
    return dict(lora=lora, r=r, scaling=alpha / (math.sqrt(r) if rslora else r), targets=targets, hf=path.is_dir(),  # rsLoRA: α/√r
                where=str(path), info=info)


def load_adapter(model, adapter):
    # LoRA weights into a built model; r and α come from the adapter (A and B are recreated when r differs).
    # adapter: a path, or read_adapter's result. Returns what the adapter records (train config, base, template).
    a = adapter if isinstance(adapter, dict) else read_adapter(adapter)
    lora, cfg = dict(a["lora"]), model.config
    for name, m in ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)):
        if (sub := name.split(".", 2)[2]) not in a["targets"]:  # not adapted: no LoRA branch at all
            if m.r > 0:
                del m.lora_A, m.lora_B
            m.r, m.scaling = 0, 0.0
            continue
        for x, shape in (("A", (a["r"], m.in_features)), ("B", (m.out_features, a["r"]))):
            k = f"{peft_name(name)}.lora_{x}.weight" if a["hf"] else f"{name}.lora_{x}"  # its name in the file
            if (t := lora.pop(k, None)) is None or tuple(t.shape) != shape:
                raise InputError(f"{a['where']}: tensor {k!r} " + ("missing" if t is None else
                                 f"has shape {tuple(t.shape)}, the model's {name} needs {shape}"))
            t = hf_permute(t, sub, cfg.n_heads, cfg.n_kv_heads, back=True) if x == "B" and a["hf"] else t
            setattr(m, f"lora_{x}", torch.nn.Parameter(t.to(m.weight.device, torch.float32).contiguous()))
        m.r, m.scaling = a["r"], a["scaling"]
    if lora:
        raise InputError(f"{a['where']}: tensor {next(iter(lora))!r} has no layer in this model")
    cfg.lora_r, cfg.lora_alpha = a["r"], a["scaling"] * a["r"]  # the model's LoRA is the adapter's now
    return a["info"]


# --- export: a merged 16-bit checkpoint in Meta's layout or Hugging Face's; the adapter in peft's format

def meta_params(cfg):
    # params.json as Meta's loaders read it: they do ModelArgs(**params), so no keys of ours. An explicit FFN width (HF's
    # intermediate_size) that Meta's formula does not give is written so that it does: multiple_of 1 and
    # int(multiplier · int(8·dim/3)) = ffn_dim. Left out at their defaults: LLaMA-1 has no n_kv_heads or ffn_dim_multiplier
    # (a LLaMA-1 read from HF's layout has the formula's width); Llama 2's ModelArgs no rope_theta (CodeLlama's params.json has)
    p = {k: getattr(cfg, k) for k in META_KEYS if getattr(cfg, k) != {"n_kv_heads": cfg.n_heads, "rope_theta": 10000.0}.get(k)}
    if cfg.ffn_dim not in (None, dataclasses.replace(cfg, ffn_dim=None).hidden_dim):
        p.update(multiple_of=1, ffn_dim_multiplier=(cfg.ffn_dim + 0.5) / int(2 * 4 * cfg.dim / 3))
    return json.dumps({k: v for k, v in p.items() if v is not None}, indent=2)


def hf_config(cfg, dtype, tok=None):
    # config.json as transformers' LlamaForCausalLM reads it, the FFN width explicit; and the tokenizer's bos and eos
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id} if tok else {}  # without them its generate runs past eos
    return json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
                       "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
                       "num_key_value_heads": cfg.n_kv_heads, "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps,
                       "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": False,
                       "torch_dtype": str(dtype).removeprefix("torch."), **ids}, indent=2)


def export_merged(model, out_dir, dtype=torch.float16, base=None, tokenizer=None, progress=True, hf=False):
    # W = W0 + (α/r)·B A for every adapted layer: in Meta's layout one shard (consolidated.00.pth) + params.json, with hf=True
    # Hugging Face's (model.safetensors under its names, q/k rows permuted for its rotary, + config.json); and, if given, a copy
    # of the tokenizer (the folder loads alone). W0 is by default the NF4-rounded base the adapter was trained on
    # (dequantized); with base=FOLDER, the original 16-bit checkpoint re-read one weight at a time (merge.json says which).
    out_dir, cfg, names, sd = Path(out_dir), model.config, meta_names(model.config.n_layers), {}
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers()), "output.weight": model.output}
    load = open_checkpoint(base, "cpu", torch.float32, progress=False)[1] if base is not None else None
    linear = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    shapes = {n: tuple((linear[n].weight if n in linear else tensors[n]).shape) for n in names}
    prog = Progress("merged", cfg.n_layers, sum(math.prod(s) for s in shapes.values()) * dtype.itemsize, quiet=not progress)
    for n in names:  # to host memory one weight at a time: the GPU holds one weight's fp32 merge at most
        w0 = load(n, shapes[n]) if load is not None else None  # the original weight; None: the model's own
        w = merge_lora(linear[n], torch.float32, w0) if n in linear else w0 if w0 is not None else tensors[n]
        sd[n] = w.detach().to("cpu", dtype, copy=True).contiguous()  # a copy: a view would save its whole source file
        prog.step(n, sd[n].nbytes)
    if hf:
        sd = {hf_name(n): hf_permute(w, n, cfg.n_heads, cfg.n_kv_heads) for n, w in sd.items()}
        save_safetensors(sd, out_dir / "model.safetensors", {"format": "pt"})
        atomic_write_bytes(out_dir / "config.json", hf_config(cfg, dtype, tokenizer and Tokenizer(tokenizer)).encode())
    else:
        atomic_save(sd, out_dir / "consolidated.00.pth")
        atomic_write_bytes(out_dir / "params.json", meta_params(cfg).encode())
    if tokenizer is not None:
        atomic_write_bytes(out_dir / "tokenizer.model", Path(tokenizer).read_bytes())
        if hf:  # transformers' tokenizer then puts bos first, as training did (without the file it puts none)
            atomic_write_bytes(out_dir / "tokenizer_config.json", b'{"tokenizer_class": "LlamaTokenizer", "add_bos_token": true}')
    kind = "original" if base is not None else "nf4-dequantized" if model.quantize else "as-loaded"
    merge = {"base": kind, "base_dir": str(base) if base is not None else None, "dtype": str(dtype).removeprefix("torch."),
             "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha}
    atomic_write_bytes(out_dir / "merge.json", json.dumps(merge, indent=2).encode())
    prog.close()


def export_peft(model, out_dir, base=None):
    # peft's layout: adapter_model.safetensors under HF's module names (B's q/k rows permuted for HF's
    # rotary) and adapter_config.json; base: the base model's folder, recorded as base_model_name_or_path
    out_dir, cfg, sd, targets = Path(out_dir), model.config, {}, set()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear) and m.r > 0:
            key, b = peft_name(name), hf_permute(m.lora_B.detach(), name, cfg.n_heads, cfg.n_kv_heads)
            sd[key + ".lora_A.weight"], sd[key + ".lora_B.weight"] = m.lora_A.detach(), b
            targets.add(LINEARS[name.split(".", 2)[2]].split(".")[1])
    conf = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_r, "lora_alpha": cfg.lora_alpha,
            "lora_dropout": cfg.lora_dropout, "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "base_model_name_or_path": str(base) if base is not None else None}
    save_safetensors(sd, out_dir / "adapter_model.safetensors", {"format": "pt"})
    atomic_write_bytes(out_dir / "adapter_config.json", json.dumps(conf, indent=2).encode())
