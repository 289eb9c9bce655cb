"""
The distillation loss: forward KL from teacher to student on the full next-token
distribution (the "implicit positional distillation" of MobileLLM-Pro, arXiv 2511.06719,
used for context extension in arXiv 2604.06070), optionally mixed with cross-entropy.

  KD(t)  = tau^2 * sum_v p_T(v) * (log p_T(v) - log p_S(v)),   p = softmax(logits / tau)
  loss   = mix * KD + (1 - mix) * CE,      each a weighted mean over rows

This is the *true* KL (teacher entropy included), so it is exactly 0 when the student
reproduces the teacher; the tau^2 factor keeps gradient sizes comparable across
temperatures (Hinton et al. 2015).  Log-softmaxes are always taken in float32.

Two implementations of the same number:
  reference_loss  full [N, V] logits of both models + F.kl_div / F.cross_entropy; easy to
                  read, and the definition the tests check against.
  head_loss       never holds more than `chunk` rows of logits: it takes final hidden states
                  (the teacher's [N, C_t] is far smaller than its [N, V] logits) and applies
                  both output heads chunk by chunk, computing each chunk's gradient in
                  closed form inside the forward pass (Liger-style), so nothing has to be
                  recomputed or stored for the backward.  At T=8192 and the GPT-2 vocabulary
                  one fp32 logits tensor is 1.5 GiB; a chunk of 4096 rows holds 3 x 0.77 GiB, in
                  buffers that the CPU keeps between steps (scratch()).
"""

import torch
import torch.nn.functional as F


# Reusable [chunk, V] float32 buffers, kept between steps on the CPU: a fresh tensor that size is
# mmapped and every one of its pages faults on first touch, which cost more than the softmaxes
# themselves (measured, tools/bench.py).  CUDA's caching allocator already reuses its blocks, and
# holding them here would only keep them from the model's activations.
_buffers = {}
reuse_buffers = True  # False: fresh buffers every chunk (tools/bench.py --options times the difference)


def scratch(slot, n, V, device):
    """The `slot`-th reusable float32 [n, V] buffer (CPU), or a fresh one (other devices)."""
    if not reuse_buffers or torch.device(device).type != "cpu":
        return torch.empty(n, V, device=device)
    key = (slot, str(device))
    if key not in _buffers or _buffers[key].numel() < n * V:
        _buffers.pop(key, None)  # release the small one first: the peak holds one of them, not both
        _buffers[key] = torch.empty(n * V, device=device)
    return _buffers[key][: n * V].view(n, V)


def free_buffers():
    """Return the reusable buffers' memory (e.g. after training, or before measuring a step's peak)."""
    _buffers.clear()


def _log_softmax_(x):
    torch._log_softmax(x, 1, False, out=x)  # in place: the kernel reads each row's max and sum first
    return x


def _chunk_loss_and_grad(s, t, p, targets, w, mix, tau):
    """
    One chunk of rows: weighted sums (kd, ce) and d(loss)/d(student logits) in closed form,
        dKD/ds = tau * w * (softmax(s/tau) - softmax(t/tau))        (the tau^2 factor included)
        dCE/ds = w * (softmax(s) - onehot(target)),
    returned as (kd, ce, g, scale) with d(loss)/ds = scale[:, None] * g: the caller applies the row
    scale to the small [n, C] products instead of the [n, V] gradient (one pass fewer).
    s, t, p: float32 [n, V]: the student's and teacher's logits and a scratch buffer, all
    overwritten (s becomes g); t and p are None for pure CE; w [n] row weights.
    Everything happens in place: with tau = 1, KD and CE share log softmax(s).
    """
    kd = ce = s.new_zeros(())
    tgt = targets.clamp_min(0)[:, None]
    g_ce = None
    if mix < 1 and (mix == 0 or tau != 1):  # CE's softmax is not KD's: its own pass (and buffer)
        log_p = torch.log_softmax(s, -1) if mix > 0 else _log_softmax_(s)
        ce = -(w * log_p.gather(1, tgt)[:, 0]).sum()
        g_ce = log_p.exp_().scatter_add_(1, tgt, log_p.new_full(tgt.shape, -1.0))  # softmax(s) - onehot
        if mix == 0:
            return kd, ce, g_ce, w
    if tau != 1:
        s.div_(tau)
        t.div_(tau)
    log_pt, log_ps = _log_softmax_(t), _log_softmax_(s)
    p_t = torch.exp(log_pt, out=p)
    # sum_v p_t (log p_t - log p_s) per row, in t's buffer (three cheap passes, fewer than two
    # row-wise dot products); the difference is exactly 0 where the student equals the teacher
    kd_rows = log_pt.sub_(log_ps).mul_(p_t).sum(1)
    kd = tau ** 2 * (w * kd_rows).sum()
    if g_ce is None and mix < 1:  # tau = 1: CE reads the same log softmax(s)
        ce = -(w * log_ps.gather(1, tgt)[:, 0]).sum()
        g = log_ps.exp_().sub_(p_t, alpha=mix)  # softmax(s) - mix * p_t - (1 - mix) * onehot
        return kd, ce, g.scatter_add_(1, tgt, log_ps.new_full(tgt.shape, mix - 1)), w
    g = log_ps.exp_().sub_(p_t)
    if g_ce is not None:
        g.add_(g_ce, alpha=(1 - mix) / (mix * tau))
    return kd, ce, g, mix * tau * w


def reference_loss(s_logits, t_logits, targets, weights, mix=1.0, tau=1.0):
    """
    The readable definition on full logits [N, V]. Rows with weight 0 (no target) are ignored.
    Returns a [3] tensor: (loss, kd, ce), each a weighted mean.
    """
    w = weights.float()
    total = w.sum().clamp_min(1e-12)
    kd = ce = s_logits.new_zeros((), dtype=torch.float32)
    if mix > 0:
        per_row = F.kl_div(F.log_softmax(s_logits.float() / tau, -1), F.log_softmax(t_logits.float() / tau, -1),
                           reduction="none", log_target=True).sum(-1)
        kd = (w * per_row).sum() / total * tau ** 2
    if mix < 1:
        ce = (w * F.cross_entropy(s_logits.float(), targets.clamp_min(0), reduction="none")).sum() / total
    return torch.stack([mix * kd + (1 - mix) * ce, kd, ce])


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, h_t, W_t, targets, weights, mix, tau, chunk, total):
        out = torch.zeros(3, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        grad_W = torch.zeros(W.shape, dtype=torch.float32, device=W.device)
        Wf = W.detach().float()
        Wt = W_t.detach().float() if W_t is not None else None
        w_all = weights.float() / total
        V = W.shape[0]
        for i in range(0, h.shape[0], chunk):
            rows = slice(i, i + chunk)
            hc = h[rows].detach().float()
            n = hc.shape[0]
            s = torch.mm(hc, Wf.t(), out=scratch(0, n, V, h.device))
            t = p = None
            if Wt is not None:
                t = torch.mm(h_t[rows].float(), Wt.t(), out=scratch(1, n, V, h.device))
                p = scratch(2, n, V, h.device)
            kd, ce, g, scale = _chunk_loss_and_grad(s, t, p, targets[rows], w_all[rows], mix, tau)
            grad_h[rows] = ((g @ Wf) * scale[:, None]).to(h.dtype)
            if W.requires_grad:
                grad_W.addmm_(g.t(), hc * scale[:, None])
            out += torch.stack([mix * kd + (1 - mix) * ce, kd, ce])
        ctx.save_for_backward(grad_h, grad_W.to(W.dtype))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_W = ctx.saved_tensors
        g = grad_out[0]  # only the combined loss (element 0) carries gradient
        return grad_h * g, grad_W * g, None, None, None, None, None, None, None, None


def head_loss(h, W, targets, weights, h_t=None, W_t=None, mix=1.0, tau=1.0, chunk=2048, total=None):
    """
    Chunked, memory-bounded loss from final hidden states.
      h [N, C] student hidden (requires grad), W [V, C] student output matrix (tied embedding),
      h_t [N, C_t] teacher hidden (no grad), W_t [V, C_t] teacher output matrix,
      targets [N] (-1 = none), weights [N] (0 = ignore; >1 up-weights e.g. passkey answers).
      total: the normaliser of the weighted means (default: weights.sum(); data-parallel
             ranks pass the global sum divided by the world size, so that DDP's gradient
             average equals the single-process gradient exactly).
    Returns a [3] tensor (loss, kd, ce) of weighted means; backward flows through element 0.
    """
    total = weights.float().sum().clamp_min(1e-12) if total is None else torch.as_tensor(float(total))
    if mix > 0 and (h_t is None or W_t is None):
        raise ValueError("KD needs the teacher's hidden states and output matrix")
    if W_t is not None and W_t.shape[0] != W.shape[0]:
        raise ValueError(f"teacher vocabulary {W_t.shape[0]} != student vocabulary {W.shape[0]}")
    return _ChunkedHeadLoss.apply(h, W, h_t if mix > 0 else None, W_t if mix > 0 else None,
                                  targets, weights, float(mix), float(tau), int(chunk), total)
