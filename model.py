"""
A small GPT used for both teacher and student (nanoGPT-style, pre-norm, tied embeddings,
no biases), with rotary positions from rope.py instead of learned position embeddings.

Inputs always carry explicit position ids and, optionally, document ids:
  pos [B, T]  position of each token (continuous over the window, or reset per document)
  doc [B, T]  document id of each token; when given, attention is document-causal
              (a token sees only earlier tokens of its own document), else plain causal.
Both come from the packer in data.py, which derives positions from the same document ids.

`hidden()` returns the final normalised hidden states so that the (large) vocabulary head
and the loss can be applied in row chunks (loss.py); `forward()` returns full logits for
evaluation of short inputs.
"""

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import rope


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    rope: dict = field(default_factory=lambda: {"rule": "fixed", "theta": 10000.0})

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    def as_dict(self):
        return asdict(self)


def _flash_attn():
    """flash-attn is optional (no CPU wheel): import lazily and return the module or None."""
    try:
        import flash_attn
        return flash_attn
    except ImportError:
        return None


def doc_causal_mask(doc):
    """Boolean [B, 1, T, T]: True where query t may attend key s (s <= t and same document)."""
    T = doc.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def attention(q, k, v, doc):
    """
    Causal attention over [B, H, T, d]; document-causal when doc ids [B, T] are given.
    `doc` may also be a ready boolean mask [B, 1, T, T]: the transfer-channel diagnostic of
    tools/ablate.py compares a model's predictions under several masks (a sliding window).
    """
    if doc is not None and doc.dtype == torch.bool:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=doc)
    fa = _flash_attn() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if fa is not None:
        return _flash_attention(fa, q, k, v, doc)
    if doc is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=doc_causal_mask(doc))


def _flash_attention(fa, q, k, v, doc):
    """CUDA path: flash_attn_func, or its varlen form with cu_seqlens for packed documents."""
    B, H, T, D = q.shape
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # flash-attn wants [B, T, H, D]
    if doc is None:
        return fa.flash_attn_func(q, k, v, causal=True).transpose(1, 2)
    # Every change of document id (and every row start) begins a new sequence.
    starts = torch.ones(B, T, dtype=torch.bool, device=doc.device)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    idx = torch.nonzero(starts.flatten()).flatten()
    cu = torch.cat([idx, idx.new_tensor([B * T])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    out = fa.flash_attn_varlen_func(q.reshape(B * T, H, D), k.reshape(B * T, H, D), v.reshape(B * T, H, D),
                                    cu, cu, max_len, max_len, causal=True)
    return out.reshape(B, T, H, D).transpose(1, 2)


class Rotary(nn.Module):
    """
    RoPE on queries and keys.  A (parameter-free) module of its own only so that analyses can
    observe or perturb the rotated q and k with forward hooks (tools/analyze.py), without any
    extra argument threading through the model.
    """

    def forward(self, q, k, cos, sin):
        return rope.apply_rotary(q, cos, sin), rope.apply_rotary(k, cos, sin)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.rotary = Rotary()
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, doc):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        q, k = self.rotary(q, k, cos, sin)
        y = attention(q, k, v, doc).transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, doc):
        x = x + self.attn(self.ln1(x), cos, sin, doc)
        x = x + self.mlp(self.ln2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.n_embd % cfg.n_head or cfg.head_dim % 2:
            raise ValueError(f"n_embd {cfg.n_embd} must split into {cfg.n_head} heads of even size")
        self.cfg = cfg
        # Embedding rows padded to a multiple of 64 (faster matmuls); the head slices them off.
        self.wte = nn.Embedding(64 * math.ceil(cfg.vocab_size / 64), cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=False)
        self.set_rope(cfg.rope)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def set_rope(self, spec):
        """Switch the RoPE rule/base (a new phase); a plain attribute, never a castable buffer."""
        self.cfg.rope = dict(spec)
        self.inv_freq, self.attn_factor = rope.frequencies(spec, self.cfg.head_dim)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def head_weight(self):
        """The tied output matrix [V, C], padding rows removed so they never enter a softmax."""
        return self.wte.weight[: self.cfg.vocab_size]

    def rotations(self, pos):
        """(cos, sin) [B, 1, T, d/2] for positions pos [B, T], broadcast over heads."""
        cos, sin = rope.cos_sin(pos, self.inv_freq, self.attn_factor)
        return cos[:, None], sin[:, None]

    def hidden(self, idx, pos, doc=None):
        """Final normalised hidden states [B, T, C]."""
        cos, sin = self.rotations(pos)
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x, cos, sin, doc)
        return self.ln_f(x)

    def forward(self, idx, pos, doc=None, hidden_only=False):
        """Full logits [B, T, V] in float32 (evaluation of short inputs), or the hidden states (training)."""
        h = self.hidden(idx, pos, doc)
        return h if hidden_only else (h @ self.head_weight().t()).float()

    def configure_optimizer(self, lr, weight_decay, betas=(0.9, 0.95), fused=None):
        """AdamW; decay only 2-D weights (matrices, embeddings), as in nanoGPT."""
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
