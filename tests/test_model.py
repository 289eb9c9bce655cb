import torch

import data
from model import GPT, GPTConfig, doc_causal_mask


def tiny(vocab=97, theta=50.0, **kw):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, rope={"rule": "fixed", "theta": theta}, **kw)
    return GPT(cfg).eval()


def packed_example(lengths=(5, 9, 3, 7), vocab=97):
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    idx = torch.cat(docs)[None]
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    return docs, idx, doc


def test_doc_causal_mask():
    m = doc_causal_mask(torch.tensor([[0, 0, 1, 1, 1]]))[0, 0]
    assert m.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]


def test_packed_document_masked_equals_each_document_alone():
    model = tiny()
    docs, idx, doc = packed_example()
    pos = data.positions_from_docs(doc, "reset")
    packed = model(idx, pos, doc)[0]
    start = 0
    for d in docs:
        alone = model(d[None], torch.arange(len(d))[None])[0]
        assert torch.allclose(packed[start:start + len(d)], alone, atol=1e-5)
        start += len(d)


def test_continuous_and_reset_positions_agree_under_the_document_mask():
    """RoPE scores depend only on m - n and the mask pairs only tokens of one document."""
    model = tiny()
    _, idx, doc = packed_example()
    cont = model(idx, data.positions_from_docs(doc, "continuous"), doc)
    reset = model(idx, data.positions_from_docs(doc, "reset"), doc)
    assert torch.allclose(cont, reset, atol=1e-4)


def test_cross_document_attention_does_see_earlier_documents():
    """The contrast: without the mask, later documents depend on earlier ones (the KD channel)."""
    model = tiny()
    _, idx, doc = packed_example()
    pos = data.positions_from_docs(doc, "continuous")
    a = model(idx, pos)
    idx2 = idx.clone()
    idx2[0, 0] = (idx2[0, 0] + 1) % 97  # change a token of the first document
    b = model(idx2, pos)
    assert (a[0, -1] - b[0, -1]).abs().max() > 1e-4
    masked_a, masked_b = model(idx, pos, doc), model(idx2, pos, doc)
    assert torch.allclose(masked_a[0, 5:], masked_b[0, 5:], atol=1e-6)


def test_hidden_and_logits_consistent_and_padding_rows_sliced():
    model = tiny(vocab=97)
    assert model.wte.weight.shape[0] == 128 and model.head_weight().shape[0] == 97
    _, idx, doc = packed_example()
    pos = torch.arange(idx.shape[1])[None]
    h = model(idx, pos, hidden_only=True)
    assert torch.allclose(h @ model.head_weight().t(), model(idx, pos), atol=1e-5)


def test_rope_is_not_a_buffer_and_survives_bf16_cast():
    model = tiny()
    assert not any("freq" in name for name, _ in model.named_buffers())
    model.to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32
    _, idx, _ = packed_example()
    out = model(idx, torch.arange(idx.shape[1])[None])
    assert torch.isfinite(out).all()
