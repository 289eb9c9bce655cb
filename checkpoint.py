"""
Checkpoints: written atomically, loaded without ever executing pickled code.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that
`torch.load(..., weights_only=True)` can read it: a file carrying a pickled object of any
other kind is refused before anything in it runs.  Writes go to a temporary file in the
same folder, are flushed to disk, then renamed over the target: a crash at any moment
leaves either the old file or the new one, never half a file.
"""

import os
import pickle

import torch

from data import Vocab
from model import GPT, GPTConfig

FORMAT = 1


class CheckpointError(ValueError):
    """A missing, unreadable, unsafe or incompatible checkpoint (reported in one line)."""


def save(path, obj):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save({"format": FORMAT, **obj}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds objects a safe load refuses (not a checkpoint of this project?): {str(e).splitlines()[0][:120]}") from None
    except Exception as e:  # truncated file, not a zip, wrong magic number, ...
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT or "model" not in ck:
        raise CheckpointError(f"{path} is not a checkpoint of this project (format {FORMAT})")
    return ck


def build_model(ck, device="cpu"):
    cfg = GPTConfig(**ck["model_config"])
    model = GPT(cfg)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise CheckpointError(f"weights do not match the stored model config: {str(e).splitlines()[0][:160]}") from None
    return model.to(device)


def load_model(path, device="cpu"):
    """(model in eval mode, its Vocab, the checkpoint dict)."""
    ck = load(path)
    model = build_model(ck, device)
    model.eval()
    return model, Vocab.from_state(ck["vocab"]), ck


# ---- what a phase may start from (compatibility checks between phases) --------------------

def load_teacher(path, key_digits, device="cpu"):
    """A frozen teacher (phase 0) for KD, with its vocabulary and training window."""
    teacher, vocab, ck = load_model(path, device)
    if ck.get("phase") != 0:
        raise CheckpointError(f"{path} is a phase-{ck.get('phase')} student checkpoint, not a teacher (phase 0)")
    if ck["key_digits"] != key_digits:
        raise CheckpointError(f"teacher {path} was trained with --key_digits {ck['key_digits']}, not {key_digits}")
    if teacher.cfg.vocab_size != len(vocab):
        raise CheckpointError(f"teacher {path} is inconsistent (vocab size)")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, vocab, ck["window"]


def check_student(ck, path, shape, short_len, key_digits):
    """A student checkpoint that the requested student phase can start from: (layers, heads, width), windows, keys."""
    prev = GPTConfig(**ck["model_config"])
    if ck.get("phase", 0) < 1:
        raise CheckpointError(f"{path} is the teacher; a student phase must start from a student checkpoint (no cloning)")
    if (prev.n_layer, prev.n_head, prev.n_embd) != tuple(shape):
        raise CheckpointError(f"{path} has a {prev.n_layer}x{prev.n_head}x{prev.n_embd} student, "
                              f"not the requested {'x'.join(map(str, shape))} (--student_*)")
    if ck["short_len"] != short_len or ck["key_digits"] != key_digits:
        raise CheckpointError(f"{path} was trained with --short_len {ck['short_len']} --key_digits {ck['key_digits']}; "
                              f"pass the same values to continue from it")


def load_student(path, cfg, vocab, short_len, key_digits, window, device="cpu"):
    """The previous phase's student, checked against this phase (shape, vocabulary, windows), with cfg's RoPE."""
    ck = load(path)
    check_student(ck, path, (cfg.n_layer, cfg.n_head, cfg.n_embd), short_len, key_digits)
    if Vocab.from_state(ck["vocab"]) != vocab:
        raise CheckpointError(f"{path} uses another vocabulary than the teacher; retrain it with this teacher")
    if ck["window"] > window:  # equal: the control of an extension, more steps at the same window
        raise CheckpointError(f"{path} was trained at window {ck['window']} > this phase's window {window}")
    model = build_model(ck, device)
    model.set_rope(cfg.rope)
    return model
