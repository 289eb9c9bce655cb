import pytest
import torch
import torch.nn.functional as F

from loss import head_loss, reference_loss


def case(N=37, C=16, Ct=24, V=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g, requires_grad=True)
    W = torch.randn(V, C, generator=g, requires_grad=True)
    ht, Wt = torch.randn(N, Ct, generator=g), torch.randn(V, Ct, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    weights = torch.rand(N, generator=g) + 0.5
    targets[[3, 20]] = -1
    weights[[3, 20]] = 0.0
    return h, W, ht, Wt, targets, weights


def test_kd_matches_kl_div_reference():
    h, W, ht, Wt, tg, w = case()
    s, t = h @ W.t(), ht @ Wt.t()
    ours = reference_loss(s, t, tg, w, mix=1.0)[1]
    p_t = F.softmax(t, -1)
    per_row = (p_t * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1)
    assert ours.item() == pytest.approx(((w * per_row).sum() / w.sum()).item(), rel=1e-5)
    # unweighted: the same as F.kl_div(batchmean) over the rows that have targets
    keep = w > 0
    ones = keep.float()
    ref = F.kl_div(F.log_softmax(s[keep], -1), F.log_softmax(t[keep], -1), reduction="batchmean", log_target=True)
    assert reference_loss(s, t, tg, ones)[1].item() == pytest.approx(ref.item(), rel=1e-5)


def test_kd_is_zero_for_identical_models_and_positive_otherwise():
    h, W, ht, Wt, tg, w = case()
    t = ht @ Wt.t()
    assert reference_loss(t, t, tg, w)[0].item() == 0.0
    assert head_loss(ht.clone().requires_grad_(), Wt.clone().requires_grad_(), tg, w, ht, Wt)[0].abs().item() < 1e-6
    assert reference_loss(h @ W.t(), t, tg, w)[0].item() > 0.1


@pytest.mark.parametrize("mix,tau", [(1.0, 1.0), (0.0, 1.0), (0.5, 1.0), (1.0, 2.0), (0.3, 0.5)])
@pytest.mark.parametrize("chunk", [5, 16, 1000])  # 37 rows: 5 and 16 do not divide it
def test_chunked_equals_unchunked_values_and_gradients(mix, tau, chunk):
    h, W, ht, Wt, tg, w = case()
    ours = head_loss(h, W, tg, w, ht, Wt, mix, tau, chunk=chunk)
    ours[0].backward()
    g_ours = h.grad.clone(), W.grad.clone()
    h.grad = W.grad = None
    ref = reference_loss(h @ W.t(), ht @ Wt.t(), tg, w, mix, tau)
    ref[0].backward()
    assert torch.allclose(ours.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(g_ours[0], h.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(g_ours[1], W.grad, rtol=1e-4, atol=1e-6)


def test_rows_with_zero_weight_are_ignored():
    h, W, ht, Wt, tg, w = case()
    a = head_loss(h, W, tg, w, ht, Wt, 0.5)
    h2 = h.detach().clone()
    h2[[3, 20]] = 100.0  # garbage in ignored rows changes nothing
    b = head_loss(h2.requires_grad_(), W, tg, w, ht, Wt, 0.5)
    assert torch.allclose(a, b)


def test_explicit_normaliser_scales_the_loss():
    h, W, ht, Wt, tg, w = case()
    a = head_loss(h, W, tg, w, ht, Wt, 1.0)
    b = head_loss(h, W, tg, w, ht, Wt, 1.0, total=2 * w.sum())
    assert torch.allclose(a / 2, b)


def test_kd_without_teacher_is_an_error():
    h, W, _, _, tg, w = case()
    with pytest.raises(ValueError, match="teacher"):
        head_loss(h, W, tg, w, mix=1.0)


@pytest.mark.parametrize("mix,tau", [(1.0, 1.0), (0.5, 1.0), (0.0, 1.0), (0.3, 2.0)])
def test_reused_buffers_give_the_same_loss_and_gradients_as_fresh_ones(mix, tau):
    """The reusable chunk buffers hold stale values from earlier (larger) calls: nothing may leak."""
    import loss
    results = []
    for reuse in (False, True, True):  # the second reuse finds buffers full of the first one's values
        loss.reuse_buffers = reuse
        try:
            h, W, ht, Wt, tg, w = case(seed=1)
            out = head_loss(h, W, tg, w, ht, Wt, mix, tau, chunk=16)  # 37 rows: chunks of 16, 16, 5
            out[0].backward()
            results.append((out.detach(), h.grad, W.grad))
        finally:
            loss.reuse_buffers = True
        if not reuse:
            big = case(N=64, seed=2)  # fill the buffers with other values first
            head_loss(*big[:2], big[4], big[5], big[2], big[3], mix, tau, chunk=64)
    for got in results[1:]:
        for a, b in zip(results[0], got):
            assert torch.equal(a, b)


def test_buffers_are_reused_across_calls_and_freed_on_request():
    import loss
    h, W, ht, Wt, tg, w = case()
    head_loss(h, W, tg, w, ht, Wt, chunk=16)
    ptrs = {k: b.data_ptr() for k, b in loss._buffers.items()}
    assert len(ptrs) == 3  # student logits, teacher logits, teacher probabilities
    head_loss(h, W, tg, w, ht, Wt, chunk=8)  # smaller chunks: views of the same memory
    assert {k: b.data_ptr() for k, b in loss._buffers.items()} == ptrs
    loss.free_buffers()
    assert not loss._buffers


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_head_loss_is_exactly_zero_for_a_student_equal_to_its_teacher(tau):
    h, W, ht, Wt, tg, w = case()
    out = head_loss(ht.clone().requires_grad_(), Wt.clone().requires_grad_(), tg, w, ht, Wt, 1.0, tau, chunk=16)
    assert out[0].item() == 0.0 and out[1].item() == 0.0
