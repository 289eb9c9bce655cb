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
                  one fp32 logits tensor is 1.5 GiB; a chunk of 2048 rows holds ~4 x 0.4 GiB.
"""

import torch
import torch.nn.functional as F


def _chunk_loss_and_grad(s, t, targets, w, mix, tau):
    """
    One chunk of rows: weighted sums (kd, ce) and d(loss)/d(student logits), in closed form:
        dKD/ds = tau * w * (softmax(s/tau) - softmax(t/tau))        (the tau^2 factor included)
        dCE/ds = w * (softmax(s) - onehot(target))
    s, t: float32 logits [n, V] that this function may overwrite (the caller keeps no other
    reference); t is None for pure CE; w [n] row weights.  Softmaxes are turned into gradients
    in place, so a chunk needs about four [n, V] buffers at its peak.
    """
    kd = ce = s.new_zeros(())
    grad = None
    if mix < 1:
        log_p = torch.log_softmax(s, -1)
        tgt = targets.clamp_min(0)[:, None]
        ce = -(w * log_p.gather(1, tgt)[:, 0]).sum()
        grad = log_p.exp_()  # softmax(s), in place
        grad.scatter_add_(1, tgt, grad.new_full(tgt.shape, -1.0))
        grad.mul_(((1 - mix) * w)[:, None])
    if mix > 0:
        log_pt = torch.log_softmax(t / tau if tau != 1 else t, -1)
        del t
        log_ps = torch.log_softmax(s / tau if tau != 1 else s, -1)
        del s
        p_t = log_pt.exp()
        # sum_v p_t (log p_t - log p_s) per row, as two row-wise dot products (no [n, V] temporary)
        kd_rows = torch.einsum("nv,nv->n", p_t, log_pt) - torch.einsum("nv,nv->n", p_t, log_ps)
        kd = tau ** 2 * (w * kd_rows).sum()
        del log_pt
        g_kd = log_ps.exp_().sub_(p_t).mul_((mix * tau * w)[:, None])
        grad = g_kd if grad is None else grad.add_(g_kd)
    return kd, ce, grad


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
        for i in range(0, h.shape[0], chunk):
            rows = slice(i, i + chunk)
            hc = h[rows].detach().float()
            kd, ce, g = _chunk_loss_and_grad(hc @ Wf.t(), h_t[rows].float() @ Wt.t() if Wt is not None else None,
                                             targets[rows], w_all[rows], mix, tau)
            grad_h[rows] = (g @ Wf).to(h.dtype)
            if W.requires_grad:
                grad_W.addmm_(g.t(), hc)
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
