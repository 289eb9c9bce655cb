import numpy as np
import pytest
import torch

import data


def test_tokenizer_is_gpt2_offline():
    enc = data.tokenizer()
    assert enc.n_vocab == 50257
    assert data.encode("Hello world") == [15496, 995]
    assert data.encode(" The pass key is 71432.") == [383, 1208, 1994, 318, 767, 1415, 2624, 13]
    assert data.encode("<|endoftext|>") != [data.EOT]  # special tokens never slip in from text


def test_packer_respects_short_window_and_derives_ids_and_positions(tiny_corpus):
    rng = np.random.default_rng(0)
    sampler = data.DocSampler(tiny_corpus, 8, 64, passkey_frac=0.5, key_digits=5, answer_weight=5.0)
    for _ in range(20):
        tok, w, doc = data.pack(sampler, rng, 256, max_doc_len=64)
        assert len(tok) == len(w) == len(doc) == 256
        ids, counts = np.unique(doc, return_counts=True)
        assert (counts <= 64).all() and (np.diff(doc) >= 0).all() and (ids == np.arange(len(ids))).all()
        starts = np.r_[0, np.flatnonzero(np.diff(doc)) + 1]
        assert (tok[starts] == data.EOT).all()  # every document starts with BOS
        pos = data.positions_from_docs(torch.from_numpy(doc)[None], "reset")[0].numpy()
        for s, n in zip(starts, counts):
            assert (pos[s:s + n] == np.arange(n)).all()
        cont = data.positions_from_docs(torch.from_numpy(doc)[None], "continuous")[0].numpy()
        assert (cont == np.arange(256)).all()


def test_packer_assertion_fires_on_a_long_document(tiny_corpus):
    sampler = data.DocSampler(tiny_corpus, 100, 120)
    with pytest.raises(AssertionError, match="exceeds the short window"):
        data.pack(sampler, np.random.default_rng(0), 256, max_doc_len=64)


def test_targets_never_cross_documents(tiny_corpus):
    rng = np.random.default_rng(3)
    sampler = data.DocSampler(tiny_corpus, 8, 32, passkey_frac=0.0)
    vocab = data.Vocab.gpt2()
    b = data.make_batch([data.pack(sampler, rng, 128) for _ in range(3)], vocab)
    doc, tgt, idx, w = b["doc"], b["targets"], b["idx"], b["weights"]
    last = torch.ones_like(doc, dtype=torch.bool)
    last[:, :-1] = doc[:, 1:] != doc[:, :-1]
    assert (tgt[last] == -1).all() and (w[last] == 0).all()
    assert (tgt[:, :-1][~last[:, :-1]] == idx[:, 1:][~last[:, :-1]]).all()


@pytest.mark.parametrize("length", [96, 200, 513])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_eval_prompt_has_the_key_exactly_at_the_requested_depth(length, depth):
    key = 40321
    tokens, answer, needle_key = data.eval_prompt(length, depth, key)
    key_ids = data.key_tokens(key)
    assert len(tokens) == length
    assert tokens[answer:].tolist() == key_ids  # the answer is the key, token for token
    assert tokens[needle_key:needle_key + len(key_ids)].tolist() == key_ids
    prefix = 1 + len(data.encode(data.INSTRUCTION))
    n_hay = length - len(data.encode(data.INSTRUCTION)) - data.passkey_len(key_ids)
    needle_start = needle_key - len(data.encode(" The pass key is"))
    assert needle_start - prefix == round(depth * n_hay)
    assert data.EOT not in tokens[1:].tolist()


def test_eval_prompt_too_short_is_a_clear_error():
    with pytest.raises(data.DataError, match="too short"):
        data.eval_prompt(20, 0.5, 12345)


def test_short_passkey_documents_fit_and_weight_the_answer(tiny_corpus):
    rng = np.random.default_rng(1)
    sampler = data.DocSampler(tiny_corpus, 60, 64, passkey_frac=1.0, key_digits=5, answer_weight=5.0)
    tok, w = sampler(rng, 64)
    assert len(tok) <= 64 and w[-1] == 0
    n_answer = (w == 5.0).sum()
    assert 1 <= n_answer <= data.max_key_len(5)
    q = data.encode(data.QUESTION)
    first = int(np.flatnonzero(w == 5.0)[0])
    assert tok[first - len(q) + 1:first + 1].tolist() == q  # weights sit on the positions predicting the key


def test_compact_vocab_round_trip(tiny_corpus):
    v = data.Vocab.compact(tiny_corpus, key_digits=3, max_size=None)
    prompt, _, _ = data.eval_prompt(128, 0.5, 123)
    ids = v(prompt)
    assert (ids > 0).all()  # no <unk> in a passkey prompt
    assert v.decode(ids) == data.tokenizer().decode(prompt.tolist())
    assert v(np.array([data.encode(" zebra")[0]]))[0] == 0  # unseen -> <unk>
    assert data.Vocab.from_state(v.state()) == v
    small = data.Vocab.compact(tiny_corpus, key_digits=3, max_size=700)
    assert len(small) <= 700
    with pytest.raises(data.DataError, match="vocab_size"):
        data.Vocab.compact(tiny_corpus, key_digits=3, max_size=50)


def test_bad_data_folders(tmp_path):
    with pytest.raises(data.DataError, match="no .txt files"):
        data.load_corpus(str(tmp_path))
    with pytest.raises(data.DataError, match="not a folder"):
        data.load_corpus(str(tmp_path / "missing"))
    (tmp_path / "a.txt").write_text("too short")
    with pytest.raises(data.DataError, match="only"):
        data.load_corpus(str(tmp_path))


def test_default_corpus_loads():
    corpus = data.load_corpus()
    assert len(corpus) > 1_000_000 and len(corpus.bounds) == 38
    s = corpus.snippet(np.random.default_rng(0), 50, "val")
    assert len(s) == 50


@pytest.mark.parametrize("mode", ["random", "same_source", "consecutive", "repeat"])
def test_snippet_modes_keep_documents_short(tiny_corpus, mode):
    rng = np.random.default_rng(2)
    sampler = data.DocSampler(tiny_corpus, 8, 48, passkey_frac=0.3, key_digits=3, snippets=mode)
    for _ in range(5):
        tok, w, doc = data.pack(sampler, rng, 160, max_doc_len=48)
        assert len(tok) == 160 and np.bincount(doc).max() <= 48


def test_consecutive_snippets_are_one_text_cut_up(tiny_corpus):
    rng = np.random.default_rng(0)
    sampler = data.DocSampler(tiny_corpus, 8, 16, snippets="consecutive")
    tok, _, doc = data.pack(sampler, rng, 64)
    body = np.concatenate([tok[doc == d][1:] for d in range(doc.max() + 1)])  # drop each BOS
    flat = np.asarray(tiny_corpus.tokens)
    starts = np.flatnonzero(flat == body[0])
    assert any((flat[s:s + len(body)] == body).all() for s in starts)


def test_consecutive_windows_start_at_random_places(tiny_corpus):
    """Each window's cut-up text starts anywhere in its source; always at the start would be memorised."""
    rng = np.random.default_rng(0)
    sampler = data.DocSampler(tiny_corpus, 8, 16, snippets="consecutive")
    firsts = {tuple(data.pack(sampler, rng, 64)[0][1:9]) for _ in range(30)}
    assert len(firsts) > 2 * len(tiny_corpus.segments["train"])


def test_repeat_snippets_repeat_earlier_documents(tiny_corpus):
    rng = np.random.default_rng(0)
    sampler = data.DocSampler(tiny_corpus, 8, 16, snippets="repeat")
    tok, _, doc = data.pack(sampler, rng, 256)
    docs = [tuple(tok[doc == d]) for d in range(doc.max() + 1)]
    assert len(set(docs)) < len(docs)


def test_curriculum_keeps_documents_short_then_grows(tiny_corpus):
    sampler = data.DocSampler(tiny_corpus, 40, 400, curriculum=0.5)
    sampler.progress = 0.1
    assert sampler.longest() == 56
    sampler.progress = 0.375
    assert 56 < sampler.longest() < 400
    sampler.progress = 0.6
    assert sampler.longest() == 400


def test_copy_documents_repeat_a_span(tiny_corpus):
    tok, second = data.copy_doc(tiny_corpus, np.random.default_rng(0), 90, 30)
    assert len(tok) == 90 and tok[0] == data.EOT
    span = tok[second:]
    assert any((tok[i:i + 30] == span).all() for i in range(1, second - 29))


def test_filler_haystack_offsets():
    unit = data.encode(data.FILLER)
    assert data.filler_haystack(10, 3) == (unit * 2)[3:13]
