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
    prompt = data.passkey_doc(data.key_tokens(123), data.filler_haystack(60), 0.5, data.encode(data.INSTRUCTION))[0]
    ids = v(prompt)
    assert (ids > 0).all()  # no <unk> in a passkey prompt
    assert (v.ids[ids] == prompt).all()  # GPT-2 -> compact -> GPT-2 is the identity on the prompt
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


def test_default_corpus_holds_out_whole_plays_long_enough_for_the_gpu_eval(capsys):
    corpus = data.load_corpus()
    train, val = corpus.splits["train"], corpus.splits["val"]
    assert (len(train.bounds), len(val.bounds)) == (36, 2) and train.n_tokens + val.n_tokens > 1_700_000
    assert 0.05 <= val.n_tokens / (train.n_tokens + val.n_tokens) < 0.06
    assert (val.bounds[:, 1] - val.bounds[:, 0]).max() > 2 * 8192 + 1  # eval lengths up to twice the 8192 window
    assert len(corpus.snippet(np.random.default_rng(0), 2 * 8192 + 1, "val")) == 2 * 8192 + 1
    assert "warning" not in capsys.readouterr().out


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
    assert len(firsts) > 2 * len(tiny_corpus.splits["train"].bounds)


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


# ---- the held-out split, bring-your-own data, the stream fallback, epochs, passkey share ------

def docs_of(split):
    return [tuple(split.tokens[s:e]) for s, e in split.bounds]


def test_whole_documents_are_held_out_and_train_and_val_share_nothing(tiny_corpus):
    train, val = tiny_corpus.splits["train"], tiny_corpus.splits["val"]
    whole = data.Split(tiny_corpus.tokens, "all")
    # the two splits are consecutive pieces of one stream: no offset in both, no document cut in two
    assert len(train.tokens) + len(val.tokens) == len(tiny_corpus.tokens)
    assert np.array_equal(np.concatenate([train.tokens, val.tokens]), tiny_corpus.tokens)
    assert docs_of(train) + docs_of(val) == docs_of(whole) and not set(docs_of(train)) & set(docs_of(val))
    # val = the fewest trailing documents that hold >= 5% of the tokens
    total = whole.n_tokens
    assert val.n_tokens >= 0.05 * total and val.n_tokens - (val.bounds[0, 1] - val.bounds[0, 0]) < 0.05 * total
    assert len(train.bounds) >= 1


def test_a_single_document_corpus_splits_inside_the_document(tmp_path):
    from conftest import TEXT
    words = TEXT.split()
    (tmp_path / "one.txt").write_text(" ".join(words[i % len(words)] for i in range(3000)))
    corpus = data.load_corpus(str(tmp_path))
    train, val = corpus.splits["train"], corpus.splits["val"]
    n = train.n_tokens + val.n_tokens
    assert len(train.bounds) == len(val.bounds) == 1 and val.n_tokens == int(0.05 * n)
    assert np.array_equal(np.concatenate([train.tokens, val.tokens]), corpus.tokens)


def write_bin(path, docs, lead_eot=False):
    """nanoGPT's layout: uint16 GPT-2 ids, each document followed by <|endoftext|>."""
    parts = ([[data.EOT]] if lead_eot else []) + [list(d) + [data.EOT] for d in docs]
    np.asarray(sum(parts, []), dtype=np.uint16).tofile(path)


def test_nanogpt_bins_load_as_memmaps_with_their_documents(tmp_path):
    rng = np.random.default_rng(0)
    train_docs = [tuple(rng.integers(0, 50000, int(rng.integers(5, 300)))) for _ in range(40)]
    val_docs = [tuple(rng.integers(0, 50000, int(rng.integers(5, 300)))) for _ in range(4)]
    write_bin(tmp_path / "train.bin", train_docs, lead_eot=True)
    write_bin(tmp_path / "val.bin", val_docs)
    (tmp_path / "ignored.txt").write_text("train.bin and val.bin take precedence over .txt files")
    corpus = data.load_corpus(str(tmp_path))
    assert corpus.tokens is None
    for name, docs in (("train", train_docs), ("val", val_docs)):
        sp = corpus.splits[name]
        assert isinstance(sp.tokens, np.memmap) and docs_of(sp) == docs
        assert sp.n_tokens == sum(map(len, docs))
    rng = np.random.default_rng(1)
    assert data.EOT not in corpus.random_tokens(rng, 2000, "train")
    s = corpus.snippet(rng, 200, "val")
    assert any(tuple(s) == d[i:i + 200] for d in val_docs for i in range(len(d) - 199))
    vocab = data.Vocab.compact(corpus, key_digits=3, max_size=2000)
    counts = np.bincount(np.concatenate(train_docs + val_docs), minlength=data.EOT + 1)
    assert vocab(np.array([np.argmax(counts)]))[0] > 0  # the most frequent id made it into the vocabulary


@pytest.mark.parametrize("case,match", [
    ("only_train", "val.bin is missing"), ("odd", "not a non-empty array"), ("big_id", "not a GPT-2 id"),
    ("only_eot", "no documents")])
def test_bad_nanogpt_bins_are_one_line_errors(tmp_path, case, match):
    write_bin(tmp_path / "train.bin", [range(100, 400)])
    if case == "odd":
        (tmp_path / "val.bin").write_bytes(b"\x01\x02\x03")
    elif case == "big_id":
        np.asarray([5, 50257, 7], dtype=np.uint16).tofile(tmp_path / "val.bin")
    elif case == "only_eot":
        np.asarray([data.EOT] * 3, dtype=np.uint16).tofile(tmp_path / "val.bin")
    with pytest.raises(data.DataError, match=match) as e:
        data.load_corpus(str(tmp_path))
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def short_doc_corpus(tmp_path_factory):
    """Many documents of about 30 tokens each: shorter than any window the tests ask for."""
    from conftest import TEXT
    d = tmp_path_factory.mktemp("short_docs")
    words = TEXT.split()
    for i in range(80):
        (d / f"d{i:02d}.txt").write_text(" ".join(words[(i * 5 + j) % len(words)] for j in range(25)))
    return data.load_corpus(str(d))


def test_stream_fallback_spans_documents_and_warns_once(short_doc_corpus, monkeypatch, capsys):
    monkeypatch.setattr(data.Corpus, "stream_warned", False)
    val = short_doc_corpus.splits["val"]
    n = 2 * int((val.bounds[:, 1] - val.bounds[:, 0]).max())
    rng = np.random.default_rng(0)
    snippets = [short_doc_corpus.snippet(rng, n, "val") for _ in range(5)]
    assert all(len(s) == n for s in snippets) and any(data.EOT in s for s in snippets)
    assert all(any(np.array_equal(s, val.tokens[i:i + n]) for i in range(len(val.tokens) - n + 1)) for s in snippets)
    out = capsys.readouterr().out
    assert out.count("warning") == 1 and out.count("\n") == 1
    assert len(data.text_doc(short_doc_corpus, rng, n + 1, "val")) == n + 1
    assert capsys.readouterr().out == ""  # once per process
    with pytest.raises(data.DataError, match="val split holds only"):
        short_doc_corpus.snippet(rng, len(val.tokens) + 1, "val")


def test_epoch_warning(tiny_corpus):
    n = tiny_corpus.splits["train"].n_tokens
    assert data.epoch_warning(tiny_corpus, 10 * n) is None
    msg = data.epoch_warning(tiny_corpus, 25 * n)
    assert "25 epochs" in msg and f"{n:,}" in msg and "\n" not in msg
    assert data.epoch_warning(tiny_corpus, 3 * n, limit=2) is not None


def passkey_share(sampler, rng, draws, room=None, window=None):
    """Share of passkey documents (the only ones weighted 5.0) among `draws` sampled documents or windows."""
    if window:
        rows = [data.pack(sampler, rng, window) for _ in range(draws)]
        docs = [w[doc == d] for _, w, doc in rows for d in range(doc.max() + 1)]
    else:
        docs = [sampler(rng, room)[1] for _ in range(draws)]
    return np.mean([(w == 5.0).any() for w in docs])


@pytest.mark.parametrize("frac", [0.2, 0.5])
def test_passkey_share_equals_the_flag(tiny_corpus, frac):
    rng = np.random.default_rng(0)
    student = data.DocSampler(tiny_corpus, 16, 64, passkey_frac=frac, key_digits=5, answer_weight=5.0)
    assert abs(passkey_share(student, rng, 1500, room=64) - frac) < 0.04  # was ~0.6 x frac
    shortest = student.shortest_pk
    teacher = data.DocSampler(tiny_corpus, shortest, 512, passkey_frac=frac, key_digits=5, answer_weight=5.0)
    assert abs(passkey_share(teacher, rng, 1000, room=512) - frac) < 0.04
    # packed into windows, only a window's last document can lack the room for a passkey
    assert abs(passkey_share(student, rng, 40, window=1024) - frac) < 0.05


@pytest.mark.parametrize("mode", ["short", "long"])
def test_student_recipe_flags_reach_the_sampler(tiny_corpus, monkeypatch, mode):
    """--copy_frac and --filler_frac shape the documents of a student phase, short or long."""
    import distill
    calls = {"copy_doc": 0, "filler_haystack": 0}
    for name in calls:
        def counted(*a, _f=getattr(data, name), _n=name, **k):
            calls[_n] += 1
            return _f(*a, **k)
        monkeypatch.setattr(data, name, counted)
    args = distill.parse_args(["--phase", "2", "--data_mode", mode, "--passkey_frac", "0.5", "--copy_frac", "0.3",
                               "--filler_frac", "1"])
    sampler, _ = distill.sampler_for(args, tiny_corpus, 2)
    rng = np.random.default_rng(0)
    for _ in range(1000):
        sampler(rng, 64)
    assert abs(calls["filler_haystack"] / 1000 - 0.5) < 0.05  # every passkey document in the eval's format
    assert abs(calls["copy_doc"] / 1000 - 0.3) < 0.05


def test_pose_positions_increase_stay_below_the_window_and_jump_only_at_chunk_boundaries():
    rng = np.random.default_rng(0)
    for chunks in (2, 3, 5):
        pos = data.pose_positions(rng, 200, 64, 512, chunks).numpy()
        assert pos.shape == (200, 64) and pos.min() >= 0 and pos.max() <= 511
        steps = np.diff(pos, axis=1)
        assert (steps >= 1).all()  # strictly increasing: order kept, nothing shares a position
        jumps = (steps > 1).sum(1)
        assert (jumps <= chunks - 1).all() and jumps.max() == chunks - 1  # inside a chunk the ids are consecutive
    with pytest.raises(ValueError, match="PoSE needs"):
        data.pose_positions(rng, 1, 64, 32, 2)


def test_pose_trains_every_distance_up_to_the_window_about_equally_often():
    """The histogram of relative distances between a row's first and later chunks: flat over the window,
    where drawing each skip uniformly above the previous one (u1 ~ U[0, F], u2 ~ U[u1, F]) is not."""
    L, W, rows = 64, 512, 4000
    pos = data.pose_positions(np.random.default_rng(1), rows, L, W, 2).numpy()
    span = pos[:, -1] - pos[:, 0]  # the longest distance each row trains
    hist = np.histogram(span, bins=np.arange(L, W + 1, L))[0]
    assert hist.min() > 0.75 * hist.mean() and hist.max() < 1.25 * hist.mean()  # 7 bins of 64 tokens, about equal
    rng = np.random.default_rng(1)
    u1 = rng.integers(0, W - L + 1, rows)
    naive = np.histogram(rng.integers(u1, W - L + 1) - u1 + L - 1, bins=np.arange(L, W + 1, L))[0]
    assert naive[-1] < 0.3 * naive[0]  # the naive sampler's long jumps are rare: the test can tell them apart
    # every (query, earlier key) pair of a row, pooled: beyond the row's own length the 64-token bins are about
    # equal, but for the last, which only the longest skips reach (a ramp down to the window's edge)
    i, j = np.tril_indices(L, -1)
    pooled = np.histogram(pos[:500, i] - pos[:500, j], bins=np.arange(0, W + 1, L))[0][1:]
    mid = pooled[:-1]
    assert mid.min() > 0.75 * mid.mean() and mid.max() < 1.25 * mid.mean() and pooled[-1] > 0.4 * mid.mean()
