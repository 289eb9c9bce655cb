"""eval_retrieval: the eval prompt, and the memory-bounded passkey / text-loss evals against full logits."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import eval_retrieval
from model import GPT, GPTConfig


@pytest.mark.parametrize("length", [96, 200, 513])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_eval_prompt_has_the_key_exactly_at_the_requested_depth(length, depth):
    key = 40321
    tokens, answer, needle_key = eval_retrieval.eval_prompt(length, depth, key)
    key_ids = data.key_tokens(key)
    assert len(tokens) == length
    assert tokens[answer:].tolist() == key_ids  # the answer is the key, token for token
    assert tokens[needle_key:needle_key + len(key_ids)].tolist() == key_ids
    prefix = 1 + len(data.encode(data.INSTRUCTION))
    n_hay = length - len(data.encode(data.INSTRUCTION)) - data.passkey_len(key_ids)
    needle_start = needle_key - len(data.encode(" The pass key is"))
    assert needle_start - prefix == round(depth * n_hay)
    assert data.EOT not in tokens[1:].tolist()


def test_text_haystack_hides_the_same_needle_in_held_out_text(tiny_corpus):
    """--haystack text: the prompts keep their length, key, depth and answer, but the haystack is a passage of a
    held-out document (never training text, never the filler), and every model gets the very same prompts."""
    filler = eval_retrieval._prompts(300, (0.0, 0.5, 1.0), 2, 7, 4)
    text = eval_retrieval._prompts(300, (0.0, 0.5, 1.0), 2, 7, 4, tiny_corpus)
    assert [(len(a[0]), a[1:]) for a in filler] == [(len(b[0]), b[1:]) for b in text]  # same shape and key positions
    val = set(tiny_corpus.splits["val"].tokens.tolist())
    train_only = set(tiny_corpus.splits["train"].tokens.tolist()) - val
    for (f, *_), (t, answer, needle, _) in zip(filler, text):
        assert t[answer:].tolist() == f[answer:].tolist()
        start = needle - len(data.encode(" The pass key is"))
        end = start + len(data.needle_tokens(t[answer:].tolist()))
        hay = t[1 + len(data.encode(data.INSTRUCTION)):start].tolist() + t[end:answer - len(data.encode(data.QUESTION))].tolist()
        assert len(hay) == 300 - len(data.encode(data.INSTRUCTION)) - data.passkey_len(t[answer:].tolist())
        assert hay and not set(hay) & train_only and not set(hay) <= set(data.encode(data.FILLER))
    again = eval_retrieval._prompts(300, (0.0, 0.5, 1.0), 2, 7, 4, tiny_corpus)
    assert all((a[0] == b[0]).all() for a, b in zip(text, again))


def test_eval_prompt_too_short_is_a_clear_error():
    with pytest.raises(data.DataError, match="too short"):
        eval_retrieval.eval_prompt(20, 0.5, 12345)


def test_passkey_defaults_to_the_pipelines_four_digit_keys():
    import inspect
    assert inspect.signature(eval_retrieval.passkey).parameters["digits"].default == 4


# ---- memory-bounded evals == the full-logit computation --------------------------------

@pytest.fixture(scope="module")
def vocab(tiny_corpus):
    return data.Vocab.compact(tiny_corpus, key_digits=3)


@pytest.fixture(scope="module")
def tiny_model(vocab):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=len(vocab), n_layer=2, n_head=2, n_embd=32)).eval()


class Oracle(torch.nn.Module):
    """Predicts the true next token (it peeks), except at positions that are multiples of 3: mixed records."""

    def __init__(self, V):
        super().__init__()
        self.V = V

    def head_weight(self):
        return torch.eye(self.V)

    def forward(self, idx, pos, doc=None, hidden_only=False):
        nxt = torch.where(pos % 3 == 0, torch.zeros_like(idx), torch.roll(idx, -1, dims=1))
        h = F.one_hot(nxt, self.V).float()
        return h if hidden_only else h @ self.head_weight().t()


@torch.no_grad()
def full_logit_passkey(model, vocab, lengths, n, digits, greedy):
    """The former computation: full [rows, T, V] logits, one prompt at a time."""
    out = []
    for length in lengths:
        for tokens, answer, needle, depth in eval_retrieval._prompts(length, eval_retrieval.DEPTHS, n, 1234, digits):
            idx = torch.from_numpy(vocab(tokens))[None]
            logits = model(idx, torch.arange(length)[None])
            rec = {"correct": bool((logits[0, answer - 1:length - 1].argmax(-1) == idx[0, answer:]).all())}
            if greedy:
                seq = idx[:, :answer]
                for _ in range(length - answer):
                    nxt = model(seq, torch.arange(seq.shape[1])[None])[:, -1].argmax(-1, keepdim=True)
                    seq = torch.cat([seq, nxt], 1)
                rec["greedy"] = seq[0, answer:].tolist() == idx[0, answer:].tolist()
            out.append(rec)
    return out


@pytest.mark.parametrize("which", ["oracle", "gpt"])
def test_passkey_from_answer_positions_equals_full_logits(vocab, tiny_model, which):
    model = Oracle(len(vocab)) if which == "oracle" else tiny_model
    lengths, n = ([64, 100, 131], 2) if which == "oracle" else ([64, 100], 1)
    recs = eval_retrieval.passkey(model, vocab, lengths, n=n, digits=3, greedy=which == "gpt", batch_tokens=300)
    ref = full_logit_passkey(model, vocab, lengths, n, 3, greedy=which == "gpt")
    assert [r["correct"] for r in recs] == [r["correct"] for r in ref]
    assert [r.get("greedy") for r in recs] == [r.get("greedy") for r in ref]
    if which == "oracle":  # the comparison is not vacuous: both outcomes occur
        assert {r["correct"] for r in recs} == {True, False}


@pytest.mark.parametrize("depth", [0.0, 0.4, 1.0])
def test_span_skips_ids_inside_the_haystack_after_the_needle(depth):
    """--span: the ids cover `span` positions, the needle and the question keep consecutive ids, the jump falls
    in the haystack between them, and the key's distance in positions grows by exactly the skip."""
    tokens, answer, needle = eval_retrieval.eval_prompt(128, depth, 4321)
    pos, skip = eval_retrieval.prompt_positions(tokens, answer, needle, span=512)
    assert skip == 384 and pos[-1] == 511 and (np.diff(pos) >= 1).all()
    jump = int(np.flatnonzero(np.diff(pos) > 1)[0]) + 1
    needle_end = needle - len(data.encode(" The pass key is")) + len(data.needle_tokens(tokens[answer:].tolist()))
    assert needle_end <= jump <= answer - len(data.encode(data.QUESTION))
    assert pos[answer] - pos[needle] == answer - needle + skip
    assert (eval_retrieval.prompt_positions(tokens, answer, needle, span=128)[0] == np.arange(128)).all()
    with pytest.raises(ValueError, match="shorter"):
        eval_retrieval.prompt_positions(tokens, answer, needle, span=100)


def test_span_records_positions_apart_and_tokens_between(vocab):
    """The Oracle misses where the answer's position is a multiple of 3, so the skip changes which prompts it gets
    right: proof that passkey() feeds the skipped ids to the model, not 0..length-1."""
    model = Oracle(len(vocab))
    plain = eval_retrieval.passkey(model, vocab, [64], n=2, digits=3)
    for span in (65, 66):
        skipped = eval_retrieval.passkey(model, vocab, [64], n=2, digits=3, span=span)
        assert [r["distance"] + 64 - span for r in skipped] == [r["tokens"] for r in skipped] == [r["distance"] for r in plain]
    shift = [r["correct"] for r in eval_retrieval.passkey(model, vocab, [64], n=2, digits=3, span=65)]
    assert shift != [r["correct"] for r in plain]


@torch.no_grad()
def full_logit_text_loss(model, vocab, corpus, window, n_windows, buckets=4, seed=0):
    rng = np.random.default_rng(seed)
    idx = torch.from_numpy(vocab(np.stack([data.text_doc(corpus, rng, window + 1, "val") for _ in range(n_windows)])))
    logits = model(idx[:, :-1], torch.arange(window).expand(n_windows, window))
    nll = F.cross_entropy(logits.transpose(1, 2), idx[:, 1:], reduction="none")[:, 1:]
    return [float(c.mean()) for c in nll.chunk(buckets, dim=1)]


@pytest.mark.parametrize("window,chunk", [(50, 7), (64, 4096), (96, 64)])  # 3 x 50 rows: 7 does not divide them
def test_chunked_text_loss_equals_full_logits(vocab, tiny_model, tiny_corpus, window, chunk):
    ours = eval_retrieval.text_loss_by_position(tiny_model, vocab, tiny_corpus, window, n_windows=3, chunk=chunk)
    ref = full_logit_text_loss(tiny_model, vocab, tiny_corpus, window, 3)
    assert len(ours) == 4 and np.allclose(ours, ref, rtol=0, atol=1e-5)


def test_text_loss_on_short_val_documents_uses_the_stream(tmp_path, monkeypatch, capsys):
    from conftest import TEXT
    words = TEXT.split()
    for i in range(80):
        (tmp_path / f"d{i:02d}.txt").write_text(" ".join(words[(i * 5 + j) % len(words)] for j in range(25)))
    corpus = data.load_corpus(str(tmp_path))
    val = corpus.splits["val"]
    window = 128
    assert (val.bounds[:, 1] - val.bounds[:, 0]).max() < window < len(val.tokens)
    vocab = data.Vocab.compact(corpus, key_digits=3)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(vocab), n_layer=1, n_head=2, n_embd=16)).eval()
    monkeypatch.setattr(data.Corpus, "stream_warned", False)
    losses = eval_retrieval.text_loss_by_position(model, vocab, corpus, window, n_windows=2)
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert capsys.readouterr().out.count("warning: no val document has") == 1
