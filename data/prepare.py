"""Everything about data. Run as a script, it converts instruction datasets you have already downloaded
into this project's JSONL shapes; train.py imports the rest (templates, tokenization, batching).

python data/prepare.py alpaca  alpaca_data.json                       out.jsonl  -> {"instruction", "input", "output"}
python data/prepare.py oasst   2023-04-12_oasst_ready.trees.jsonl     out.jsonl  -> {"messages": [...]}  [--lang en]
python data/prepare.py guanaco openassistant_best_replies_train.jsonl out.jsonl  -> {"text": "### Human: ..."}
python data/prepare.py self_instruct seed_tasks.jsonl                  out.jsonl  -> {"instruction", "input", "output"}
"""
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

import torch  # only for get_batch
from torch.nn.utils.rnn import pad_sequence

if __name__ == "__main__":  # run as a script: the project folder, not data/, is the import root
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
from data.files import InputError, atomic_write_bytes, parse_flags, run

ALPACA = {  # the Alpaca templates, as in the paper's code; the key: has the example a non-blank input?
    True: "Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: ",
    False: "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
           "### Instruction:\n{instruction}\n\n### Response: ",
}
GUANACO = "### Human: {instruction}### Assistant: "  # one turn of a conversation, as the paper's OASST1 data writes it


def read_text(path, newline=None):  # the whole file as text; a byte that is not UTF-8 is named by its line, like malformed JSON
    try:
        return open(path, encoding="utf-8-sig", newline=newline).read()  # -sig: tolerate a byte-order mark
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})")  # strerror: the path once
    except UnicodeDecodeError as e:  # e.object: the file's bytes (after a BOM), all decoded at once by read()
        raise InputError(f"{path}:{e.object[:e.start].count(10) + 1}: not UTF-8 text (byte {e.object[e.start]:#04x}: {e.reason})")


def read_records(path):  # (line number, object) pairs from a JSONL file, or from one JSON array like the Alpaca release
    if not (text := read_text(path)).strip():
        raise InputError(f"{path}:1: file is empty")
    records, array = [], text.lstrip().startswith("[")
    try:
        if array:  # decode the array item by item so that a bad item can still be reported by its line
            skip, dec, pos, last, line = re.compile(r"[\s,]*"), json.JSONDecoder(), text.index("[") + 1, 0, 1
            while not text.startswith("]", pos := skip.match(text, pos).end()):
                line, last = line + text.count("\n", last, pos), pos
                obj, pos = dec.raw_decode(text, pos)
                records.append((line, obj))
            if (after := re.compile(r"\s*").match(text, pos + 1).end()) < len(text):  # more after the array: refused rather than dropped unread
                at, end = text.count("\n", 0, after) + 1, text.count("\n", 0, pos) + 1
                raise InputError(f"{path}:{at}: more after the JSON array that ends on line {end} (one array, or one object per line)")
            shared = Counter(n for n, _ in records)  # items on one line (json.dump without indent): also named by position
            records = [(f"{n} (item {i})" if shared[n] > 1 else n, obj) for i, (n, obj) in enumerate(records, 1)]
        else:
            for line, s in enumerate(text.split("\n"), 1):  # not splitlines(): JSON may hold U+2028
                if s.strip():
                    records.append((line, json.loads(s)))
        for line, obj in records:  # "\ud83d" alone is valid JSON, but no tokenizer or UTF-8 file takes it
            if re.search("[\ud800-\udfff]", json.dumps(obj, ensure_ascii=False)):
                raise InputError(f"{path}:{line}: a lone UTF-16 surrogate (half of an emoji?) in a string")
    except (ValueError, RecursionError) as e:  # also a number of over 4,300 digits, nesting too deep to decode or encode
        if array and isinstance(e, json.JSONDecodeError):  # at the error's line; on the line its item starts: by position too
            line = f"{line} (item {len(records) + 1})" if e.lineno == line and e.pos < len(text.rstrip()) else e.lineno
        raise InputError(f"{path}:{line}: malformed JSON ({getattr(e, 'msg', e)})" + " (one object per line, or one JSON array)" * (not array))
    return records


def field(where, obj, key, default=None, choices=None, kind=str):
    # every record is checked before use, so bad data fails with its location rather than a KeyError
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object")
    if not isinstance(val := obj.get(key, default), kind) or (choices and val not in choices):
        raise InputError(f"{where}: missing or invalid field '{key}'")
    return val


def usable(m):  # a message that is neither deleted nor blank (no text at all: field() names it)
    return isinstance(m, dict) and not m.get("deleted") and str(m.get("text", "?")).strip()


def best_path(path, line, node):  # follow the best-ranked reply at each level (rank 0 first, missing rank last), as Guanaco did
    messages = []
    while node is not None:
        where = f"{path}:{node.get('line', line)}"  # messages from the flat table carry their own line
        role = field(where, node, "role", choices=("prompter", "assistant"))
        messages.append({"role": "user" if role == "prompter" else "assistant", "content": field(where, node, "text")})
        replies = filter(usable, field(where, node, "replies", [], kind=(list, type(None))) or [])  # deleted or blank: never chosen
        # a rank that is no number, or NaN (how pandas writes a missing one): last
        node = min(replies, key=lambda r: r["rank"] if isinstance(r.get("rank"), (int, float)) and r["rank"] < 1e9 else 1e9, default=None)
    while messages and messages[-1]["role"] == "user":
        messages.pop()  # a conversation must end with a response to learn from
    return messages


def convert(kind, path, lang=None, skipped=None):
    skipped = Counter() if skipped is None else skipped  # reason -> count, for the summary line
    if kind not in ("alpaca", "oasst", "guanaco", "self_instruct"):
        raise InputError(f"unknown format '{kind}' (expected alpaca, oasst, guanaco or self_instruct)")
    out, records = [], read_records(path)
    if kind == "self_instruct":  # Wang et al. 2023's {instruction, instances: [{input, output}]}: an example per instance
        # with the task's instruction; a task without instances gives one with an empty output, skipped and counted as such
        records = [(line, {**(i if isinstance(i, dict) else {}), "instruction": r.get("instruction")})
                   for line, r in records for i in field(f"{path}:{line}", r, "instances", kind=list) or [{"output": ""}]]
    if kind == "oasst" and records and isinstance(records[0][1], dict) and "message_id" in records[0][1]:
        # the flat message table: rebuild the trees from parent_id links, roots in file order
        nodes = {field(f"{path}:{line}", m, "message_id"): dict(m, replies=[], line=line) for line, m in records}
        for n in nodes.values():
            if field(f"{path}:{n['line']}", n, "parent_id", kind=(str, type(None))) in nodes:
                nodes[n["parent_id"]]["replies"].append(n)
            elif n.get("parent_id") is not None:  # e.g. a table filtered by row: no conversation to start from, so counted
                skipped["messages whose parent is not in the file, and their replies"] += 1
        records = [(n["line"], {"prompt": n}) for n in nodes.values() if n.get("parent_id") is None]
    for line, r in records:
        where = f"{path}:{line}"
        if kind in ("alpaca", "self_instruct"):
            ex = {k: field(where, r, k, "" if k == "input" else None) for k in ("instruction", "input", "output")}
            if ex["instruction"].strip() and ex["output"].strip():
                out.append(ex)
            else:
                skipped["with an empty instruction or output"] += 1
        elif kind == "guanaco":
            text = field(where, r, "text")
            try:  # read as training will read it: a conversation it would refuse is left out, counted by why
                segments({"text": text}, where)
                out.append({"text": text})
            except InputError as e:
                skipped[str(e).removeprefix(f"{where}: ")] += 1
        else:
            prompt = field(where, r, "prompt", kind=dict)
            if lang and prompt.get("lang") != lang:
                skipped[f"not in language '{lang}'"] += 1
            elif not usable(prompt):
                skipped["whose prompt is deleted or blank"] += 1
            elif messages := best_path(path, line, prompt):
                out.append({"messages": messages})
            else:
                skipped["without an assistant reply"] += 1
    if not out:
        raise InputError(f"{path}: no examples left to write" + "".join(f"; {n} skipped: {why}" for why, n in skipped.items()))
    return out


# --- reading the project's JSONL for training: examples become segments (text, is_response), then tokens

def segments(obj, where):
    def text(o, key, w=where):
        if not isinstance(v := o.get(key), str) or (key != "input" and not v.strip()):  # o is a dict: checked by the callers
            raise InputError(f"{w}: field '{key}' must be a {'' if key == 'input' else 'non-empty '}string")  # input may be blank
        return v

    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object")
    if "messages" not in obj and ("text" not in obj or "output" in obj):  # Alpaca (tatsu-lab/alpaca's has the whole prompt as text)
        if "output" not in obj and "instruction" not in obj:
            raise InputError(f"{where}: expected fields instruction/input/output, text, or messages")
        inp = text(obj, "input") if "input" in obj else ""
        prompt = ALPACA[bool(inp.strip())].format(instruction=text(obj, "instruction"), input=inp)
        return [(prompt, False), (text(obj, "output"), True)]
    if "messages" in obj:
        msgs, out = obj["messages"], []
        if not isinstance(msgs, list) or not msgs:
            raise InputError(f"{where}: field 'messages' must be a non-empty list")
        for j, m in enumerate(msgs):
            if (role := m.get("role") if isinstance(m, dict) else None) not in ("system", "user", "assistant"):
                raise InputError(f"{where}: messages[{j}].role must be system, user or assistant")
            c = text(m, "content", f"{where}: messages[{j}]")
            out.append(({"system": c + "\n", "user": GUANACO.format(instruction=c), "assistant": c}[role], role == "assistant"))
    else:  # OASST/Guanaco: "### Human: ...### Assistant: ..." turns, as the messages they are (tokenized the same, bodies stripped)
        parts = re.split(r"(### Human:|### Assistant:)", text(obj, "text"))
        if len(parts) < 3 or any(m != ("### Human:", "### Assistant:")[i % 2] for i, m in enumerate(parts[1::2])):  # not rewritten
            raise InputError(f"{where}: field 'text' must alternate '### Human:' and '### Assistant:' turns, a human's first")
        if empty := next((m for m, body in zip(parts[1::2], parts[2::2]) if not body.strip()), None):  # as messages' contents
            raise InputError(f"{where}: field 'text' has an empty '{empty}' turn")  # (an empty answer would teach empty answers)
        out = [(parts[0], False)] if parts[0].strip() else []
        for marker, body in zip(parts[1::2], parts[2::2]):
            out.append((GUANACO.format(instruction=body.strip()), False) if marker == "### Human:" else (body.strip(), True))
    if not out or not out[-1][1]:  # refused: neither trained on as prompt text nor dropped unseen
        raise InputError(f"{where}: the conversation must end with an assistant reply")
    return out


def read_data(path):  # -> [(file:line, segments)]: read_records' checks, then every example's fields, before any work is done
    if not (items := [(f"{path}:{n}", segments(obj, f"{path}:{n}")) for n, obj in read_records(path)]):  # an empty array
        raise InputError(f"{path}: no examples")
    return items


def tokenize(items, tok, source_max_len, target_max_len, train_on_source=False):
    # (bos + prompt)[:source_max_len] + (response + eos)[:target_max_len], budgets shared by the turns, as the paper's collator;
    # labels the ids, -100 off responses, unshifted (get_batch shifts). -> (examples, how many cut); none dropped: each keeps >= 1 response token
    examples, truncated = [], 0
    for _, segs in items:
        ids, labels, budget, cut, end = [tok.bos_id], [-100], {False: source_max_len - 1, True: target_max_len}, False, 1
        for text, is_resp in segs:
            t = tok.encode(text) + [tok.eos_id] * is_resp  # eos ends every response: the model learns to stop
            keep = min(len(t), budget[is_resp])
            cut |= keep < len(t)
            if not keep and end > 1:  # no room left for a later turn's prompt or response: the example ends after the last response
                break
            budget[is_resp] -= keep
            ids += t[:keep]
            labels += t[:keep] if is_resp or train_on_source else [-100] * keep
            end = len(ids) if is_resp else end  # the end of the last response kept
            if cut and is_resp:  # after a cut, end with the response it belongs to: no orphaned turns
                break
        truncated += cut
        examples.append((ids[:end], labels[:end]))  # nothing after the last response (a later turn's prompt without it)
    return examples, truncated


def batch_order(lengths, epoch, micro_batch, seed, group_by_length=True):
    # the micro-batches of one epoch, a function of (seed, epoch) only: exact resume; the len % micro_batch examples the shuffle
    # puts last sit it out (others, another epoch). The longest first (as the paper's sampler): a run that does not fit fails at once.
    g, order, w = random.Random(seed * 1000003 + epoch), list(range(len(lengths))), 64 * micro_batch
    g.shuffle(order)
    order = order[: len(order) - len(order) % micro_batch]
    if group_by_length:  # sort within windows of w = 64 micro-batches (less padding), then shuffle the micro-batches
        order = [i for s in range(0, len(order), w) for i in sorted(order[s : s + w], key=lambda i: lengths[i])]
    mbs = [order[i : i + micro_batch] for i in range(0, len(order), micro_batch)]
    if group_by_length:
        g.shuffle(mbs)
    longest = max(mbs, key=lambda mb: max(lengths[i] for i in mb))  # (the first of equals)
    return [longest] + [mb for mb in mbs if mb is not longest]


def get_batch(examples, indices):  # right-padded (B, T) inputs and (B, T) targets; position t predicts token t + 1
    return (pad_sequence([torch.tensor(examples[i][0]) for i in indices], batch_first=True),
            pad_sequence([torch.tensor(examples[i][1][1:] + [-100]) for i in indices], batch_first=True, padding_value=-100))


USAGE = "python data/prepare.py {alpaca,oasst,guanaco,self_instruct} SRC OUT.jsonl [--lang en]"


def main(args):
    words, flags = parse_flags(args, {"lang": ""}, f"{__doc__.strip()}\n\nusage: {USAGE}\n  --lang LANG   oasst: keep only trees whose prompt is in this language")
    if len(words) != 3:
        raise InputError(f"expected 3 arguments, got {len(words)} (usage: {USAGE})")
    kind, src, dst = words
    if Path(dst).resolve() == Path(src).resolve():  # the skipped records would be lost with the original
        raise InputError(f"{dst}: is the input file; write the converted examples to another file")
    if flags.get("lang") and kind in ("alpaca", "guanaco", "self_instruct"):  # a filter that would silently filter nothing
        raise InputError(f"--lang: only oasst records a language, not {kind}")
    examples = convert(kind, src, flags.get("lang") or None, skipped := Counter())
    atomic_write_bytes(dst, "".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in examples).encode())
    why = "; ".join(f"{n} {reason}" for reason, n in skipped.items())
    print(f"wrote {len(examples)} examples to {dst}, skipped {sum(skipped.values())}" + (f" ({why})" if why else ""))


if __name__ == "__main__":
    run(main)
