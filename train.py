"""QLoRA instruction finetuning of LLaMA, with the paper's recipe (Dettmers et al. 2023, §5 and App. B.2, Guanaco).

  python train.py                                  # tiny random LLaMA on data/sample.jsonl, CPU, ~1 min
  python train.py --model 7B --data my.jsonl --out_dir out-7b # Meta weights in checkpoints/7B (or --ckpt_dir DIR)
  python train.py --model 65B --init random --max_iters 1 --out_dir /tmp/fit   # does it fit? (no download; with --data, its longest example first)
  torchrun --standalone --nproc_per_node=2 train.py --model 13B --out_dir out-13b  # data parallel over 2 GPUs

Every name in the config block below is a flag (--name=value or --name value; --resume alone means True;
--help lists them). One way through: parse the flags (--resume: those not given from ckpt.pt), resolve every default once, lock out_dir,
build with the resolved values, train, save the resolved config beside the adapter: what is saved is what
ran. Bad input is one line `error: ...` and exit status 2; Ctrl-C one line and 130, the last checkpoint kept.
"""
import hashlib
import math
import os
import random
import resource
import time
import warnings
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from data import mmlu as mmlu_eval
from data.checkpoint import (Tokenizer, export_merged, export_peft, find_tokenizer, is_state_dict, load_adapter, random_base,
                             read_adapter, read_params, torch_load, train_tokenizer)
from data.files import InputError, atomic_save, atomic_write_bytes, flag_help, locked_dir, parse_flags, run
from data.prepare import ALPACA, batch_order, get_batch, read_data, tokenize
from model import CONFIGS, LLaMA, LLaMAConfig, mfu, paper_hparams
from qlora import LoRALinear, PagedAdamW

# -----------------------------------------------------------------------------------------------
# config
model = "tiny"  # checkpoints/NAME (Meta's or HF's layout), or a named architecture with --init random
ckpt_dir = ""  # a checkpoint folder, Meta's or Hugging Face's layout; overrides --model's folder
adapter = ""  # start from these LoRA weights: an adapter.pt or a peft folder (their r and α replace --lora_r/--lora_alpha)
init = ""  # "checkpoint" or "random" ("": random for the tiny demo, checkpoint otherwise)
data = "data/sample.jsonl"  # JSONL: Alpaca {instruction,input,output}, {text} (### Human/### Assistant), {messages}
out_dir = "out"  # checkpoints, adapter, exports, the demo's tokenizer; one run at a time (out_dir/.lock)
overwrite = False  # start a new run in an out_dir that holds one (otherwise refused: --resume continues it)
max_iters = 1875  # optimizer steps (Guanaco 7B: 1875)
batch_size = 16  # examples per optimizer step, reached by gradient accumulation
micro_batch = 1  # examples per forward pass (per GPU)
learning_rate = 0.0  # 0: the paper's, 2e-4 up to 13B, 1e-4 for 33B and larger
warmup_iters = -1  # -1: 3% of max_iters; then constant
weight_decay = 0.0  # AdamW's decoupled weight decay
beta1, beta2 = 0.9, 0.999  # AdamW's moment decay rates, in [0, 1)
max_grad_norm = 0.3  # gradient clipping: the norm of all LoRA gradients together is at most this
lora_r, lora_alpha = LLaMAConfig.lora_r, LLaMAConfig.lora_alpha  # LoRA rank r and α, the paper's (64, 16): the update L1 L2 is scaled by s = α/r
lora_dropout = -1.0  # -1: the paper's, 0.1 up to 13B, 0.05 for 33B and larger
source_max_len, target_max_len = 1024, 256  # tokens kept per example, all turns together: of prompt (bos included), of response (eos included)
train_on_source = False  # False: loss on response tokens only
group_by_length = True  # batch similar lengths together: less padding
val_fraction = 0.05  # share of the examples held out for validation, in [0, 1)
eval_interval, eval_iters = 200, -1  # iters between validations (each also saves a checkpoint); micro-batches per validation (-1: 1000 examples)
log_interval = 1  # iters between log lines
grad_checkpoint = True  # recompute each block in backward instead of storing its activations
compile = False  # torch.compile each block
threads = 0  # CPU threads (0: 1 for the tiny demo unless OMP_NUM_THREADS is set, else torch's default)
seed = 0  # weights of --init random, LoRA init, data order, dropout
resume = False  # continue out_dir/ckpt.pt exactly where it stopped, with its settings (a flag given wins where its run allows; --threads, --export: this one's)
export = ""  # after training, comma-separated: "merged" (16-bit, Meta's layout), "merged_hf" (Hugging Face's), "peft" (HF adapter)
merge_base = "nf4"  # the merged exports' base: "nf4" (Ŵ, the dequantized 4-bit base the adapter was trained on) or "original" (16-bit W)
mmlu = ""  # an MMLU folder (dev/ val/ test/ CSVs, or five_shot_mmlu_*.json): 5-shot accuracy at every evaluation
mmlu_split, mmlu_max = "val", 0  # the MMLU split, val or test; questions per subject (0: all)
sample_tokens, temperature = 64, 0.8  # the sample printed at the end (0 tokens: none; temperature 0: greedy)
# the tiny demo (--model tiny, no --ckpt_dir, random init) runs with these instead of the defaults above; flags still win
DEMO = dict(max_iters=400, batch_size=8, micro_batch=8, learning_rate=2e-3, warmup_iters=10, source_max_len=96,
            target_max_len=48, eval_interval=100, eval_iters=4, log_interval=10, grad_checkpoint=False, val_fraction=0.08,
            temperature=0.0)
# -----------------------------------------------------------------------------------------------

def resolve(given, defaults):  # every default, once: the demo's, then the paper's per-size ones (which need the architecture)
    if given.get("adapter"):  # its r and α are what will run; so is the checkpoint it records, when no flag names a base
        a, named = read_adapter(given["adapter"]), {"model", "ckpt_dir"} & given.keys() or given.get("init") == "random"
        use = {"ckpt_dir": rec} if isinstance(rec := (a["info"].get("base") or {}).get("ckpt_dir"), str) and not named else {}
        if use and not Path(rec).is_dir():  # e.g. peft's base_model_name_or_path, a hub model's name (as model.py reads it)
            raise InputError(f"--adapter {given['adapter']}: its base {rec} is not a folder here; name one with --ckpt_dir")
        given = {**given, **use, "lora_r": a["r"], "lora_alpha": a["scaling"] * a["r"]}
    demo = given.get("model", defaults["model"]) == "tiny" and not given.get("ckpt_dir") and given.get("init", "random") in ("", "random")
    c = {**defaults, **(DEMO if demo else {}), **given, "demo": demo}  # the later wins: flags > demo > defaults
    c["eval_iters"] = c["eval_iters"] if c["eval_iters"] != -1 else math.ceil(1000 / max(c["micro_batch"], 1))  # the paper's code: max_eval_samples 1000
    for k in ("batch_size", "micro_batch", "eval_interval", "eval_iters", "log_interval", "lora_r", "source_max_len", "target_max_len"):
        if not 1 <= c[k] < 2**31:  # a batch of 2^31 examples overflows before it is built
            raise InputError(f"--{k} must be at least 1 (below 2^31), got {c[k]}")
    if set(filter(None, c["export"].split(","))) - {"merged", "merged_hf", "peft"}:
        raise InputError(f"--export: expected merged, merged_hf or peft, or a comma-separated list of them, got {c['export']!r}")
    c["init"] = c["init"] or ("random" if demo else "checkpoint")
    for k, ok in (("init", ("checkpoint", "random")), ("merge_base", ("nf4", "original")), ("mmlu_split", ("val", "test"))):
        if c[k] not in ok:
            raise InputError(f"--{k}: expected {' or '.join(ok)}, got {c[k]!r}")
    if c["init"] == "random":
        if c["model"] not in CONFIGS:
            raise InputError(f"--model {c['model']}: unknown architecture for --init random (known: {', '.join(CONFIGS)})")
        arch = LLaMAConfig(**CONFIGS[c["model"]])
    else:
        c["ckpt_dir"] = c["ckpt_dir"] or f"checkpoints/{c['model']}"
        if not given.get("ckpt_dir") and c["model"] not in CONFIGS and not Path(c["ckpt_dir"]).is_dir():
            raise InputError(f"--model {c['model']}: no folder {c['ckpt_dir']} and not a known name ({', '.join(CONFIGS)})")
        c["ckpt_dir"] = os.path.abspath(c["ckpt_dir"])  # recorded so (adapter.pt, peft export): valid from any folder; links kept
        arch = LLaMAConfig(**read_params(c["ckpt_dir"], context=c["source_max_len"] + c["target_max_len"]))
    paper = paper_hparams(arch.dim)
    c["learning_rate"] = c["learning_rate"] or paper["learning_rate"]
    c["lora_dropout"] = c["lora_dropout"] if c["lora_dropout"] != -1 else paper["lora_dropout"]
    c["warmup_iters"] = c["warmup_iters"] if c["warmup_iters"] != -1 else int(0.03 * c["max_iters"])
    c["threads"] = c["threads"] or (1 if demo and "OMP_NUM_THREADS" not in os.environ else torch.get_num_threads())
    # the adapted layers' sides: wq, wo {n_heads·head_dim, dim}, wk, wv {n_kv_heads·head_dim, dim}, w1-w3 {hidden_dim, dim};
    # a rank above the smaller side of one adds nothing there (rank L1 L2 <= min(in, out))
    max_r = min(arch.dim, arch.n_heads * arch.head_dim, arch.n_kv_heads * arch.head_dim, arch.hidden_dim)
    for k, ok, want in (*((k, 0 < c[k] < 1e9, "positive (below 1e9)") for k in ("learning_rate", "max_grad_norm", "lora_alpha")),
                        *((k, 0 <= c[k] < 2**63, "at least 0 (below 2^63)")
                          for k in ("weight_decay", "temperature", "max_iters", "warmup_iters", "sample_tokens", "seed", "mmlu_max")),
                        ("threads", 0 < c["threads"] <= os.cpu_count(), f"in [1, {os.cpu_count()}], the CPUs here"),
                        *((k, 0 <= c[k] < 1, "in [0, 1)") for k in ("beta1", "beta2", "val_fraction", "lora_dropout")),
                        ("merge_base", c["merge_base"] == "nf4" or c["init"] == "checkpoint", "nf4 for a random base (no original weights)"),
                        ("overwrite", not (c["overwrite"] and c["resume"]), "off with --resume, which continues the run"),
                        ("data", os.path.isfile(c["data"]) or not os.path.exists(c["data"]), "a file (not a pipe: it is read twice)"),
                        ("source_max_len", c["source_max_len"] < arch.max_seq_len, f"below the context, {arch.max_seq_len} tokens"),
                        ("lora_r", c["lora_r"] <= max_r, f"at most {max_r} for this architecture (the smaller side of its narrowest adapted layer)"),
                        ("target_max_len", c["source_max_len"] + c["target_max_len"] <= arch.max_seq_len,
                         f"at most the context less --source_max_len, {arch.max_seq_len} - {c['source_max_len']}")):
        if not ok:
            raise InputError(f"--{k} must be {want}, got {c[k]}")
    return c


def load_tokenizer(c, items, master, ddp, given=None):
    # the checkpoint's (beside it or one level up: Meta's download layout); given (the tokenizer a resumed run's or an adapter's random base recorded),
    # copied into out_dir; for the demo, or a random model with none, a small BPE trained on the data and cached under out_dir
    folder = Path(c["ckpt_dir"] or f"checkpoints/{c['model']}")
    tok_path = None if c["demo"] or given else find_tokenizer(folder) or (folder / "tokenizer.model" if c["init"] == "checkpoint" else None)
    if tok_path is None:
        texts = ["".join(t for t, _ in segs) for _, segs in items]  # whole examples: a trailing "\n" of a piece is mid-text
        keep = mmlu_eval.LETTER_PIECES if c["mmlu"] else ()  # MMLU scores the letters as single tokens
        digest = hashlib.sha1("\x00".join(texts + list(keep)).encode()).hexdigest()[:10]
        tok_path = Path(c["out_dir"]) / (given.name if given else f"tokenizer-{digest}.model")  # given: copied beside the adapter
        if master and not tok_path.exists():
            n = atomic_write_bytes(tok_path, given.read_bytes()) if given else train_tokenizer(texts, tok_path, CONFIGS["tiny"]["vocab_size"], keep)
            if n not in (None, CONFIGS["tiny"]["vocab_size"]):  # None: a copy
                print(f"{tok_path}: trained with a vocabulary of {n}, the size {c['data']} can fill")
        if ddp:
            dist.barrier()
    return Tokenizer(tok_path)


def build_model(c, tok, device, dtype, master, seed, vocab=None):
    # -> the model (block linears NF4 as they load, in LoRALinears: Ŵ frozen, L1 L2 trained), how to rebuild its base (for adapter.pt)
    lora = dict(lora_r=c["lora_r"], lora_alpha=c["lora_alpha"], lora_dropout=c["lora_dropout"])
    if c["init"] == "checkpoint":
        net = LLaMA.from_checkpoint(c["ckpt_dir"], device=device, dtype=dtype, tokenizer=tok.path,
                                    context=c["source_max_len"] + c["target_max_len"], progress=master, **lora)
        base = {"init": "checkpoint", "ckpt_dir": c["ckpt_dir"]}
    else:
        mcfg = LLaMAConfig(**{**CONFIGS[c["model"]], **lora})
        mcfg.vocab_size = vocab or (tok.n_words if c["demo"] else max(mcfg.vocab_size, tok.n_words))  # vocab: an adapter's base's
        net = LLaMA.from_config(mcfg, device=device, dtype=dtype, seed=seed)
        base = {"init": "random", "model": c["model"], "seed": seed, "tokenizer": str(tok.path), "device": device.split(":")[0]}
    if c["adapter"]:
        load_adapter(net, c["adapter"])
    return net, base


def read_checkpoint(path, c, world=0, ck=None):
    # ckpt.pt as save_checkpoint wrote it for this run's model and data (world 0: any); memory-mapped. ck: the file's
    ck = torch_load(path, tensors=False) if ck is None else ck  # contents, read already (one line naming the file if not torch.save's)
    want = {"config": dict, "model_config": dict, "base": dict, "lora": dict, "optimizer": dict, "iter_num": int, "rng": list}
    if not (isinstance(ck, dict) and all(type(ck.get(k)) is t for k, t in want.items()) and is_state_dict(ck["lora"]) and ck["iter_num"] >= 0):
        raise InputError(f"--resume: {path}: not a checkpoint written by train.py")
    for k in ("model", "init", "ckpt_dir", "adapter", "lora_r", "lora_alpha", "lora_dropout", "data_sha1", "tokenizer_sha1", "seed",
              "batch_size", "micro_batch", "source_max_len", "target_max_len", "train_on_source", "group_by_length", "val_fraction", "weight_decay",
              "beta1", "beta2"):  # the model, the data stream (the data by content), what the optimizer's state_dict restores
        if k in c and (old := ck["config"].get(k)) != c[k]:  # (tokenizer_sha1: once the tokenizer is known, a later call)
            name = {"data_sha1": "--data contents (SHA-1)", "tokenizer_sha1": "a tokenizer (SHA-1)"}.get(k, f"--{k}")
            raise InputError(f"--resume: {path} was made with {name} {old}, this run has {name} {c[k]}")
    if world and len(ck["rng"]) != world:
        raise InputError(f"--resume: {path} was made by {len(ck['rng'])} processes, this run has {world}")
    return ck


def launch():  # -> (ddp, rank, world, local): torchrun's variables, checked; RANK unset or -1 is one process, as in nanoGPT
    env = {k: os.environ.get(k, d) for k, d in (("RANK", "-1"), ("WORLD_SIZE", ""), ("LOCAL_RANK", "0"), ("MASTER_ADDR", ""), ("MASTER_PORT", ""))}
    if env["RANK"] != "-1" and not (all(env[k].isascii() and env[k].isdigit() for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"))
                                    and env["MASTER_ADDR"] and int(env["RANK"]) < int(env["WORLD_SIZE"])):  # set by hand, not by torchrun
        raise InputError("RANK is set, but not as torchrun sets it (unset it for one process): " + " ".join(f"{k}={v!r}" for k, v in env.items()))
    return (False, 0, 1, 0) if env["RANK"] == "-1" else (True, *(int(env[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")))


def train(c):
    ddp, rank, world, local = launch()
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():  # torchrun: more processes than GPUs
            raise InputError(f"process {local} on this machine would use cuda:{local}; it has {torch.cuda.device_count()} GPU(s)")
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    else:
        device = "cpu"
        torch.set_num_threads(c["threads"])  # more threads than free cores makes each step many times slower
    data, ckpt_path = c["data"], (out_dir := Path(c["out_dir"])) / "ckpt.pt"
    if bad := next((p for p in (ckpt_path, out_dir / "adapter.pt") if p.is_symlink() or p.exists() and not p.is_file()), None):
        raise InputError(f"{bad}: is {'a link' if bad.is_symlink() else 'not a file'}, and this run writes its checkpoints there: "
                         "remove it or choose another --out_dir")  # refused now, not at the first save (a folder, a pipe)
    ours = (ckpt_path, out_dir / "adapter.pt", *[out_dir / f"mmlu_{c['mmlu_split']}.jsonl"] * bool(c["mmlu"]))  # the log: a new run's replaces it
    if (held := next((p for p in ours if p.exists()), None)) and not (c["resume"] or c["overwrite"]):
        raise InputError(f"{held}: out_dir holds a run; {'--resume continues it, ' * (held == ckpt_path)}--overwrite replaces it, "
                         "or choose another --out_dir")
    for f in (out_dir / k for k in c["export"].split(",") if k):  # refused now, not after the training
        same = c["ckpt_dir"] and os.path.realpath(f) == os.path.realpath(c["ckpt_dir"])  # never written over: the user's weights
        full = f.is_dir() and any(f.iterdir()) and not (c["resume"] or c["overwrite"])  # not this run's: another's, or the user's
        why = "a link" if f.is_symlink() else "a file" if f.is_file() else "--ckpt_dir" if same else ""
        if why := why or "a folder with files (--overwrite writes into it)" * full:
            raise InputError(f"{f}: is {why}; --export {c['export']} writes a folder there")
    if c["resume"] and not ckpt_path.is_file():  # before anything is written into out_dir
        raise InputError(f"--resume: {ckpt_path} not found")
    if ddp:  # rank 0 alone validates, runs MMLU and exports while the others wait in a collective: at 65B hours, not NCCL's 10 min
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(hours=6))
    master = rank == 0
    if c["batch_size"] % (c["micro_batch"] * world):
        raise InputError(f"--batch_size {c['batch_size']} must be a multiple of --micro_batch {c['micro_batch']} × {world} processes")
    grad_accum = c["batch_size"] // (c["micro_batch"] * world)
    torch.manual_seed(c["seed"] + rank)
    dtype, ctx = (torch.bfloat16, torch.autocast("cuda", dtype=torch.bfloat16)) if device.startswith("cuda") else (torch.float32, nullcontext())

    items = read_data(data)
    n_val = int(len(items) * c["val_fraction"]) if len(items) > 1 else 0  # 0 (too few, or 0): no val loss is printed
    if len(items) - n_val < c["micro_batch"]:  # before anything is written (a tokenizer trained for it)
        raise InputError(f"{data}: {len(items) - n_val} training examples, fewer than --micro_batch {c['micro_batch']}")
    questions = mmlu_eval.read_mmlu(c["mmlu"], c["mmlu_split"], c["mmlu_max"]) if c["mmlu"] else []
    c["data_sha1"] = hashlib.sha1(Path(data).read_bytes()).hexdigest()  # what ran, by content (not name): --resume compares it
    ck = read_checkpoint(ckpt_path, c, world) if c["resume"] else None  # before the slow part (the model): fails fast
    info = ck or (read_adapter(c["adapter"])["info"] if c["adapter"] and c["init"] == "random" else {})  # a random base recorded
    given, seed, vocab = (random_base(ckpt_path if ck else c["adapter"], info, device.split(":")[0])  # there is rebuilt as it was:
                          if (info.get("base") or {}).get("init") == "random" else (None, c["seed"], None))  # tokenizer, seed, vocab
    tok = load_tokenizer(c, items, master, ddp, given)
    c["tokenizer_sha1"] = hashlib.sha1(tok.path.read_bytes()).hexdigest()
    ck = read_checkpoint(ckpt_path, c, world, ck) if ck else None  # compared again with the tokenizer (its tokenizer.model replaced?)
    if questions:
        mmlu_eval.letter_ids(tok)  # a tokenizer without single-token letters fails here, not after training
    random.Random(c["seed"]).shuffle(items)  # the examples' order: the first n_val held out, the sample's prompt the first's
    examples, truncated = tokenize(items, tok, c["source_max_len"], c["target_max_len"], c["train_on_source"])
    val_set, train_set = examples[:n_val], examples[n_val:]
    if master:
        print(f"{data}: {len(train_set)} examples to train on, {n_val} held out for validation" + (
              f", {truncated} cut to --source_max_len={c['source_max_len']} / --target_max_len={c['target_max_len']}" if truncated else ""))
    micro_batch, t0 = c["micro_batch"], time.time()  # t0: the model's build time is logged
    raw, base = build_model(c, tok, device, dtype, master, seed, vocab)
    # the prompt template a chat with the result should use: the one most examples of --data had (ALPACA[False][:45]: both Alpaca templates' start)
    template = "alpaca" if 2 * sum(segs[0][0].startswith(ALPACA[False][:45]) for _, segs in items) >= len(items) else "guanaco"
    raw.grad_checkpoint = c["grad_checkpoint"]
    n_base = sum(m.in_features * m.out_features for m in raw.modules() if isinstance(m, LoRALinear))  # block linears
    if master:
        print(f"model {c['model'] if c['init'] == 'random' else c['ckpt_dir']} ({c['init']}): "
              f"{n_base / 1e6:.1f}M params in {'NF4' if raw.quantize else dtype} linears, "
              f"{sum(p.numel() for p in raw.parameters() if p.requires_grad) / 1e6:.2f}M LoRA params, "
              f"loaded in {time.time() - t0:.1f}s on {device}" + (f", {c['threads']} thread{'s' * (c['threads'] > 1)}" if device == "cpu" else ""))
    if c["compile"]:
        for layer in raw.layers:
            layer.compile()
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")  # DDP's, in newer torch; its own advice
    net = torch.nn.parallel.DistributedDataParallel(  # only the LoRA weights are trained; never broadcast the 4-bit buffers
        raw, device_ids=[local] if device.startswith("cuda") else None, broadcast_buffers=False) if ddp else raw

    params = [p for p in raw.parameters() if p.requires_grad]  # the LoRA factors L1, L2 (lora_A, lora_B) alone: all else is frozen
    optimizer = PagedAdamW(params, lr=c["learning_rate"], betas=(c["beta1"], c["beta2"]), weight_decay=c["weight_decay"])
    iter_num, saved = 0, None  # saved: the iteration of the last checkpoint
    if ck:  # the settings read_checkpoint compares can still build another model: an edited params.json, another random base
        if k := next((k for k, v in vars(raw.config).items() if ck["model_config"].get(k) != v), None):
            raise InputError(f"--resume: {ckpt_path}: made for a model with {k} {ck['model_config'].get(k)}; this one has {vars(raw.config)[k]}")
        if ck["lora"].keys() != (lora := {k for k in raw.state_dict() if ".lora_" in k}):  # resuming would start some layers' LoRA afresh
            raise InputError(f"--resume: {ckpt_path}: its LoRA weights are not this model's ({min(lora ^ ck['lora'].keys())})")
        try:  # edited by hand, or more than the GPU holds: one line
            raw.load_state_dict(ck["lora"], strict=False)  # strict=False: the frozen base is not in it
            optimizer.load_state_dict(ck["optimizer"])
            torch.set_rng_state(ck["rng"][rank]["torch"])  # each process continues its own dropout stream
            if ck["rng"][rank]["cuda"] is not None:
                torch.cuda.set_rng_state(ck["rng"][rank]["cuda"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
            raise InputError(f"--resume: {ckpt_path}: cannot restore it ({' '.join(str(e).split())[:200]})") from None
        iter_num = saved = ck["iter_num"]
        if master:
            print(f"resumed from {ckpt_path} at iter {iter_num}")
        del ck, info  # unmaps the file (info: the same dict)

    orders = {}

    def micro_batch_indices(k):  # the k-th micro-batch of the run, all processes together: process r takes every world-th one
        epoch, j = divmod(k, len(train_set) // micro_batch)
        if epoch not in orders:
            orders[epoch] = batch_order([len(ids) for ids, _ in train_set], epoch, micro_batch, c["seed"], c["group_by_length"])
        return orders[epoch][j]

    @torch.no_grad()
    def validate(it):  # rank 0: the val loss (at the end, with its change over this run), then MMLU accuracy
        nonlocal val0
        if val_set:
            raw.eval()
            batches = [get_batch(val_set, range(s, min(s + micro_batch, len(val_set))))
                       for s in range(0, min(len(val_set), c["eval_iters"] * micro_batch), micro_batch)]
            with ctx:
                losses = [raw(x.to(device), y.to(device))[1].item() for x, y in batches]
            raw.train()
            val = sum(losses) / max(len(losses), 1)
            change = f" ({100 * (val / val0[0] - 1):+.0f}% since iter {val0[1]})" if val0 and it >= max_iters else ""
            val0 = val0 or (val, it)  # (loss, iter) of this run's first validation
            print(f"iter {it}: val loss {val:.4f}{change}")
        if questions:
            r = mmlu_eval.evaluate(raw, tok, questions, micro_batch, device, raw.config.max_seq_len, ctx)
            print(mmlu_eval.summary(it, c["mmlu_split"], r))
            mmlu_eval.append_log(out_dir, c["mmlu_split"], it, r)

    def last():  # where a stopped run can go on from: this run's last checkpoint (before it: the file of the run it replaces)
        return (f"last checkpoint: {ckpt_path} (iter {saved}); --resume continues" if saved is not None else "no checkpoint yet"
                + f" ({ckpt_path}: the run --overwrite replaces)" * ckpt_path.exists())

    def save_checkpoint(it):  # every process's RNG state (dropout), gathered to rank 0, which writes adapter.pt and ckpt.pt atomically
        nonlocal saved
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.startswith("cuda") else None}
        rngs = [rng] * world
        if ddp:
            dist.all_gather_object(rngs, rng)
        if master:
            adapter = {"lora": raw.lora_state_dict(), "model_config": vars(raw.config), "config": c, "base": base, "template": template}
            atomic_save(adapter, out_dir / "adapter.pt")  # first: stopped between the two, adapter.pt is ahead of the run, never behind
            atomic_save({**adapter, "optimizer": optimizer.state_dict(), "iter_num": it, "rng": rngs}, ckpt_path)
            saved = it

    max_iters, gpu = c["max_iters"], torch.cuda.get_device_name() if device.startswith("cuda") else ""  # gpu: its peak FLOP/s, for MFU
    t_start, dt_avg, val0, it, t_val = time.time(), None, None, iter_num, 0.0  # it: for the Ctrl-C line, also before the loop starts
    try:
        for it in range(iter_num, max_iters):
            t, loss_sum, n_tok = time.time(), 0.0, 0
            if it % c["eval_interval"] == 0 and master:
                validate(it)
                t_val, t = time.time() - t, time.time()  # the ETA counts each validation still to come as long as this one
            lr = c["learning_rate"] * min(1.0, (it + 1) / (c["warmup_iters"] + 1))  # linear warmup, then constant
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(grad_accum):
                idx = micro_batch_indices((it * grad_accum + micro) * world + rank)
                x, y = (b.to(device, non_blocking=True) for b in get_batch(train_set, idx))
                if ddp:
                    net.require_backward_grad_sync = micro == grad_accum - 1  # all-reduce once per step
                with ctx:
                    _, loss = net(x, y)
                (loss / grad_accum).backward()
                loss_sum, n_tok = loss_sum + loss.item() / grad_accum, n_tok + sum(len(train_set[i][0]) for i in idx)
            if ddp:  # log the mean loss and all tokens of all processes
                stats = torch.tensor([loss_sum / world, n_tok], dtype=torch.float64, device=device)
                dist.all_reduce(stats)
                loss_sum, n_tok = stats[0].item(), int(stats[1].item())
            # a NaN/inf anywhere (any process: the gradients are already averaged) shows in the gradient norm
            gnorm = torch.nn.utils.clip_grad_norm_(params, c["max_grad_norm"]).item()
            if not (math.isfinite(loss_sum) and math.isfinite(gnorm)):
                raise InputError(f"iter {it}: loss {loss_sum}, gradient norm {gnorm}; stopping before the update ({last()})")
            optimizer.step()
            if master and it == iter_num:  # the optimizer picks its memory at the first allocation
                print(f"optimizer state in {optimizer.memory} memory (paging={optimizer.paging!r})")
            optimizer.zero_grad(set_to_none=True)
            dt = time.time() - t
            dt_avg = dt if dt_avg is None else 0.9 * dt_avg + 0.1 * dt
            if master and (it % c["log_interval"] == 0 or it == max_iters - 1):
                tok_s = n_tok / dt  # tokens (padding not counted) per second, all processes (MFU: per GPU, so / world)
                mem = torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else resource.getrusage(0).ru_maxrss / 1e6
                eta = dt_avg * (max_iters - it - 1) + t_val * ((max_iters - 1) // c["eval_interval"] - it // c["eval_interval"] + 1)
                print(f"iter {it}: loss {loss_sum:.4f}, lr {lr:.2e}, {dt * 1000:.0f}ms, {tok_s:.1f} tok/s, "
                      f"mfu {mfu(n_base, tok_s / world, gpu)}, mem {mem:.2f}GB, eta {eta // 60:.0f}m{eta % 60:02.0f}s")
            if (it + 1) % c["eval_interval"] == 0 or it == max_iters - 1:
                save_checkpoint(it + 1)
        it = max(max_iters, iter_num)
        if master:
            validate(it)
            done = (f"trained {max_iters - iter_num} iters in {time.time() - t_start:.1f}s" if max_iters > iter_num else
                    f"nothing to train (--max_iters {max_iters}" + (f", the checkpoint is at iter {iter_num})" if iter_num else ")"))
            print(f"{done}; " + (f"adapter (iter {saved}) in {out_dir / 'adapter.pt'}" if saved is not None else "no adapter written"))
            if c["sample_tokens"]:  # continue the first example's prompt (tokenized without --train_on_source, to find its end)
                ids, labels = tokenize(items[:1], tok, c["source_max_len"], c["target_max_len"])[0][0]
                prompt = ids[: next(i for i, l in enumerate(labels) if l != -100)]
                raw.eval()
                with ctx:
                    out = raw.generate(torch.tensor([prompt], device=device), c["sample_tokens"], c["temperature"], top_k=200, eos_id=tok.eos_id)
                print(f"--- sample ---\n{tok.decode(prompt)}{tok.decode(out[0, len(prompt):].tolist())}")
            src = c["ckpt_dir"] if c["init"] == "checkpoint" else None
            for kind in filter(None, c["export"].split(",")):
                if kind.startswith("merged"):
                    export_merged(raw, out_dir / kind, base=src if c["merge_base"] == "original" else None, tokenizer=tok.path,
                                  hf=kind == "merged_hf")
                else:
                    export_peft(raw, out_dir / kind, base=src)
                print(f"exported {kind} to {out_dir / kind}")
    except KeyboardInterrupt:  # no save: a step may be half done; the last checkpoint is a consistent point
        raise KeyboardInterrupt(f"interrupted at iter {it}; {last()}") from None
    if ddp:
        dist.barrier()  # no process leaves (and destroys its process group) while another still writes


def main(argv):
    defaults = {k: v for k, v in globals().items() if not k.startswith("_") and k.islower() and isinstance(v, (int, float, bool, str))}
    demo = ", ".join(f"--{k} {v}" for k, v in DEMO.items())
    help_text = f"{__doc__.strip()}\n\nflags, default, meaning (the tiny demo's own defaults: {demo}):\n{flag_help(__file__, defaults)}"
    given = parse_flags(argv, defaults, help_text, words_ok=False)[1]
    master = launch()[1] == 0  # under torchrun, rank 0 alone locks out_dir and speaks
    if k := next((k for k in ("data", "out_dir", "ckpt_dir", "adapter") if k in given and not given[k].strip()), None):
        raise InputError(f"--{k}: empty (an unset variable?){'; . is the working folder' * (k == 'out_dir')}")  # not the flag left out
    if given.get("resume") and (ckpt := Path(given.get("out_dir", defaults["out_dir"]), "ckpt.pt")).is_file():  # the run goes on as it
        ran = {k: v for k, v in read_checkpoint(ckpt, {})["config"].items()  # ran: a flag not given takes ckpt.pt's value, not the
               if k in defaults and k not in {*given, "out_dir", "threads", "overwrite", "export"}}  # default; not what this command
        if k := next((k for k in ran if type(ran[k]) is not type(defaults[k])), None):  # decides: where, threads, what it writes
            raise InputError(f"--resume: {ckpt}: its config has {k} {ran[k]!r}, not a {type(defaults[k]).__name__} (give --{k})")
        given.update(ran)
    c = resolve(given, defaults)
    try:
        with locked_dir(c["out_dir"]) if master else nullcontext():
            try:
                train(c)
            finally:  # also after an error: a process that leaves without this can abort at exit
                if dist.is_initialized():
                    dist.destroy_process_group()
    except KeyboardInterrupt as e:  # rank 0 alone says where it stopped and what is on disk
        if not master:
            raise SystemExit(130)
        raise KeyboardInterrupt(e.args[0] if e.args else "interrupted before training started") from None


if __name__ == "__main__":
    run(main)  # data, flags, checkpoints, a full disk, a diverged run: one line and exit 2; Ctrl-C: exit 130
