"""MMLU 5-shot accuracy (Hendrycks et al. 2021) as the QLoRA paper reports it: the model reads five solved
questions of a subject, then a question of the same subject ending in "Answer:"; its choice is the likeliest
of the four letter tokens next (no generation). The figure is the mean of the per-subject accuracies.

Reads either the original release, DIR/dev/*_dev.csv + DIR/{val,test}/*_{val,test}.csv (rows
question,A,B,C,D,answer without a header), or the QLoRA code's preprocessed DIR/five_shot_mmlu_{val,test}.json
(records {"input": five shots + question ending in "Answer:", "output": "A".."D", "subject"}).
"""
import csv
import io
import json
import time
from contextlib import nullcontext
from itertools import groupby
from pathlib import Path
from statistics import fmean

import torch
from torch.nn.utils.rnn import pad_sequence

from data.files import InputError, atomic_write_bytes
from data.prepare import field, read_records, read_text

LETTERS = ("A", "B", "C", "D")
LETTER_PIECES = tuple("\u2581" + x for x in LETTERS)  # "▁A".."▁D": how LLaMA's tokenizer spells them after "Answer:"


def read_csv(path):  # [(question text ending in "Answer:", answer index)]; quoted fields may hold commas and newlines
    rows, line, reader = [], 1, csv.reader(io.StringIO(read_text(path, newline=""), newline=""))  # "": "\r\n" kept in quoted fields
    try:
        for row in reader:
            if row:  # a blank line reads as []
                if len(row) != 6:
                    raise InputError(f"{path}:{line}: expected 6 fields (question,A,B,C,D,answer), got {len(row)}")
                if row[5].strip() not in LETTERS:
                    raise InputError(f"{path}:{line}: answer {row[5]!r} is not one of A, B, C, D")
                text = row[0] + "".join(f"\n{c}. {a}" for c, a in zip(LETTERS, row[1:5])) + "\nAnswer:"
                rows.append((text, LETTERS.index(row[5].strip())))
            line = reader.line_num + 1  # where the next row starts
    except csv.Error as e:
        raise InputError(f"{path}:{line}: cannot read ({e})") from None
    return rows


def read_mmlu(folder, split="val", max_per_subject=0):  # -> [{"subject", "header", "shots": [solved question + "\n\n"], "question", "answer": 0..3}]
    folder, out = Path(folder), []
    if (js := folder / f"five_shot_mmlu_{split}.json").is_file():  # the paper's files: shots inside "input"
        for line, r in read_records(js):
            where = f"{js}:{line}"
            out.append(dict(subject=field(where, r, "subject"), header="", shots=[], question=field(where, r, "input"),
                            answer=LETTERS.index(field(where, r, "output", choices=LETTERS))))
    elif (folder / "dev").is_dir() and (folder / split).is_dir():
        for path in sorted((folder / split).glob(f"*_{split}.csv")):
            subject = path.name[: -len(f"_{split}.csv")]
            dev = folder / "dev" / f"{subject}_dev.csv"
            if not (shots := [f"{text} {LETTERS[a]}\n\n" for text, a in (read_csv(dev)[:5] if dev.is_file() else [])]):
                raise InputError(f"{dev}: no dev questions for subject '{subject}' (its five examples)")
            header = f"The following are multiple choice questions (with answers) about  {subject.replace('_', ' ')}.\n\n"  # 2 spaces, as in evaluate.py
            if not (rows := read_csv(path)):  # a subject silently missing would change the mean over subjects
                raise InputError(f"{path}: no questions (a download cut short?)")
            out += [dict(subject=subject, header=header, shots=shots, question=t, answer=a) for t, a in rows]
    else:
        raise InputError(f"{folder}: not an MMLU folder (expected dev/ and {split}/ with *_{split}.csv files, or five_shot_mmlu_{split}.json)")
    by_subject = groupby(sorted(out, key=lambda q: q["subject"]), key=lambda q: q["subject"])  # (sorted is stable: file order kept)
    if not (kept := [q for _, qs in by_subject for q in list(qs)[: max_per_subject or None]]):  # the first max_per_subject of each (0: all)
        raise InputError(f"{folder}: no {split} questions")
    return kept


def prompt_text(q, drop=0):
    return q["header"] + "".join(q["shots"][drop:]) + q["question"]


def prompt_ids(q, tok, max_len):
    # -> (ids starting with bos, shots dropped, cut). Too long for max_len: drop whole shots from the front
    # (the header stays); still too long, or preprocessed: keep bos and the last max_len - 1 tokens.
    for drop in range(len(q["shots"]) + 1):
        ids = tok.encode(prompt_text(q, drop), bos=True)
        if len(ids) <= max_len:
            return ids, drop, False
    return ids[:1] + ids[len(ids) - max_len + 1:], len(q["shots"]), True


def letter_ids(tok):  # the token of each letter as it follows "Answer:", i.e. as the shots teach the model to write it
    base, full = tok.encode("Answer:"), [tok.encode("Answer: " + c) for c in LETTERS]
    if any(f[:-1] != base for f in full) or len({f[-1] for f in full}) != 4:
        raise InputError(f"{getattr(tok, 'path', 'tokenizer')}: 'A'..'D' after 'Answer:' are not four distinct single "
                         f"tokens (got {[f[len(base):] for f in full]})")
    return [f[-1] for f in full]


def evaluate(model, tok, questions, batch_size, device, max_len, autocast_ctx=None):
    # model(idx (B, T)) -> (logits (B, T, vocab), None). Batches are right-padded: with causal attention the
    # logits at a row's own last prompt token do not see the padding after it.
    t0, letters = time.time(), letter_ids(tok)
    prompts = [prompt_ids(q, tok, max_len) for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i][0]))  # similar lengths together: less padding
    preds, was_training = [0] * len(prompts), model.training
    model.eval()
    try:
        with torch.no_grad(), autocast_ctx or nullcontext():
            for s in range(0, len(order), batch_size):
                rows = order[s : s + batch_size]
                idx = pad_sequence([torch.tensor(prompts[i][0]) for i in rows], batch_first=True)  # pad id 0: never attended to
                logits, _ = model(idx.to(device))  # (B, T, vocab)
                for r, i in enumerate(rows):  # the four letters' logits at the row's last prompt token
                    preds[i] = logits[r, len(prompts[i][0]) - 1, letters].argmax().item()
    finally:
        model.train(was_training)
    subjects = {s: fmean(p == q["answer"] for q, p in zip(questions, preds) if q["subject"] == s)
                for s in sorted({q["subject"] for q in questions})}
    return {"accuracy": fmean(subjects.values()), "questions": len(questions), "subjects": subjects,
            "dropped_shots": sum(p[1] for p in prompts), "cut_prompts": sum(p[2] for p in prompts),
            "predictions": [LETTERS[p] for p in preds], "seconds": time.time() - t0}


def summary(it, split, r):
    extra = "".join(f", {r[k]} {what}" for k, what in (("dropped_shots", "shots dropped"), ("cut_prompts", "prompts cut")) if r[k])
    return f"iter {it}: mmlu {split} {r['accuracy']:.3f} ({len(r['subjects'])} subjects, {r['questions']} questions, {r['seconds']:.0f} s{extra})"


def append_log(out_dir, split, it, r):
    # one JSON object per evaluation, rewritten whole (atomic_write); from iter `it` on replaced: a resumed run's log goes on
    log, line = Path(out_dir) / f"mmlu_{split}.jsonl", {"iter": it, **{k: r[k] for k in ("accuracy", "questions", "subjects")}}
    keep = [e for _, e in (read_records(log) if log.exists() else []) if isinstance(e, dict) and e.get("iter") in range(it)]
    atomic_write_bytes(log, "".join(json.dumps(e) + "\n" for e in keep + [line]).encode())
