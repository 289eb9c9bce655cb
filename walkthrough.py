# %% [markdown]
# # Short data, long context: the idea in eight steps
#
# A walkthrough in cells, in the order a lecture builds the idea: rotary positions, the RoPE-base
# bound, packing, skipped positions (PoSE), the KD target, what the teacher attends to, and the passkey
# eval after the three phases.  Every number comes from the repository's own modules (`rope`, `data`, `model`, `loss`,
# `eval_retrieval`, `distill`, `tools/ablate`); the `assert`s are the facts each picture stands for.
#
#     python walkthrough.py                  # figures -> results/walkthrough/*.png
#     python walkthrough.py --models tiny    # always the one-minute tiny run, even when out/ holds the Quickstart's
#
# Open it as a notebook in VS Code or Jupyter (jupytext), from the repository root; there the flags
# are the environment variables WALKTHROUGH_MODELS, WALKTHROUGH_FIGURES, WALKTHROUGH_SCRATCH and
# WALKTHROUGH_FLAGS.  The student's shapes, windows and RoPE rule are the defaults of `distill.py`'s
# command line (cpu preset); `--flags "--rope yarn"` changes them as it would change a training run.

# %%
import argparse
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.getcwd()
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]

import matplotlib

matplotlib.use("Agg")  # files only: no window ever opens
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

import ablate
import checkpoint
import data
import distill
import eval_retrieval
import loss
import rope
from model import GPT, doc_causal_mask

env = os.environ.get
p = argparse.ArgumentParser(description="the course walkthrough: every figure to --figures", allow_abbrev=False)
p.add_argument("--models", default=env("WALKTHROUGH_MODELS", "auto"),
               help="tiny (train teacher, phase 1, phase 2 in under a minute), a folder of phase0.pt, phase1.pt, phase2.pt "
                    "(with phase0.pt alone: tiny students distilled from it), or auto: out/ if it holds phase0.pt, else tiny")
p.add_argument("--figures", default=env("WALKTHROUGH_FIGURES", os.path.join(ROOT, "results", "walkthrough")))
p.add_argument("--scratch", default=env("WALKTHROUGH_SCRATCH", os.path.join(ROOT, "scratch", "walkthrough")),
               help="where the tiny run writes its checkpoints (gitignored)")
p.add_argument("--flags", default=env("WALKTHROUGH_FLAGS", ""), help="extra distill.py flags, e.g. '--rope yarn'")
opt, _ = p.parse_known_args()  # known only: a notebook kernel passes its own arguments
FLAGS = shlex.split(opt.flags)
os.makedirs(opt.figures, exist_ok=True)


def show(path):
    """Print where a figure went (and show the file when running as a notebook)."""
    print(f"figure -> {os.path.relpath(path)}")
    if "ipykernel" in sys.modules:
        from IPython.display import Image, display
        display(Image(path))


def save(fig, name):
    path = os.path.join(opt.figures, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    show(path)


args = distill.parse_args(["--phase", "2", *FLAGS])  # the student's defaults, exactly as a training run reads them
head_dim = args.student_embd // args.student_heads
windows = [distill.window_of(args, k) for k in (1, 2)]
corpus = data.load_corpus(args.data)
print(f"student {args.student_layers}x{args.student_embd}, {args.student_heads} heads of {head_dim}, "
      f"windows {windows[0]} -> {windows[1]}, --rope {args.rope}")

# %% [markdown]
# ## 1. RoPE: how often each pair turns over the window
#
# Pair i of a head of size d turns by p·w_i at position p, w_i = θ^(-2i/d) (Su et al. 2021).  Over a
# window of L tokens it makes L·w_i / 2π turns: the fast pairs (small i) tell neighbours apart, the
# slow ones carry where in the window a token is.  A *rule* chooses the frequencies at each phase:
# `phasewise` makes the slowest pair turn exactly once over the window (our reading of the paper),
# `bound` takes the smallest base that still allows retrieval over it (section 2), `fixed` keeps
# phase 1's base, and `pi` / `ntk` / `yarn` stretch it by window / short window.  The specs are
# what `distill.model_config` (via `rope.schedule`) gives each phase: exactly what a run trains with.
# (YaRN also scales q and k by its attention factor: shown in the legend, not in the turns.)

# %%
specs = {}  # rule -> [(window, spec, inv_freq, attn_factor)] for phases 1 and 2
for rule in rope.RULES:
    rargs = distill.parse_args(["--phase", "2", *FLAGS, "--rope", rule])
    specs[rule] = []
    for k, L in zip((1, 2), windows):
        spec = distill.model_config(rargs, k, vocab_size=2).rope
        specs[rule].append((L, spec, *rope.frequencies(spec, head_dim)))
        print(f"{rule:9s} phase {k} (window {L:4d}): {rope.describe(spec):34s} slowest pair turns "
              f"{L / rope.wavelengths(specs[rule][-1][2])[-1]:.3g} times")
turns = {rule: [float(L / rope.wavelengths(w)[-1]) for L, _, w, _ in v] for rule, v in specs.items()}  # slowest pair
growth = windows[1] / windows[0]
assert all(abs(x - 1) < 1e-4 for x in turns["phasewise"]), "phase-wise: the slowest pair should turn once per window"
assert all(x < 1 for x in turns["bound"]), "the bound's base should be larger than the phase-wise one (under one turn)"
assert abs(turns["fixed"][1] / turns["fixed"][0] - growth) < 1e-4, "a fixed base turns window-ratio times more"
for rule in ("pi", "ntk", "yarn"):  # each stretches phase 1's spectrum so that its slowest pair keeps its turns
    assert abs(turns[rule][1] / turns[rule][0] - 1) < 1e-3, f"{rule}: the slowest pair should keep phase 1's turns"

fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
for ax, k in zip(axes, (0, 1)):
    shown = []  # rules with identical frequencies share a line (at phase 1, scale 1: pi = ntk = yarn = fixed)
    for rule in rope.RULES:
        L, spec, w, af = specs[rule][k]
        same = [s for s in shown if torch.equal(s[1], w)]
        if same:
            same[0][0].append(rule)
        else:
            shown.append(([rule], w))
    for rules, w in shown:
        _, spec, _, af = specs[rules[0]][k]
        base = f"θ {spec['theta']:.4g}" + (f", scale {spec['scale']:g}" if "scale" in spec else "") + \
            (f", q·k x{af ** 2:.3g}" if af != 1 else "")
        ax.plot((L / rope.wavelengths(w)).numpy(), marker=".", label=f"{' = '.join(rules)} ({base})")
    ax.axhline(1, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_title(f"phase {k + 1}: window {windows[k]} tokens, head dim {head_dim}")
    ax.set_xlabel("rotary pair index i (0 = fastest)")
    ax.legend(fontsize=8)
axes[0].set_ylabel("turns over the window, L·w_i / 2π (log)")
fig.suptitle("The rotational spectrum of each RoPE rule (dashed: one turn per window)")
save(fig, "rope_spectrum.png")

# %% [markdown]
# ## 2. The RoPE-base bound
#
# Men et al. 2024 ("Base of RoPE Bounds Context Length") show that the expected attention a query
# pays to a *similar* key at distance m is, up to a positive factor, B(m) = Σ_i cos(m·w_i).  Where
# B(m) < 0 a similar key scores below random ones: the model keeps its perplexity but cannot
# retrieve from that far.  `rope.bound_theta(d, L)` is the smallest base with B(m) >= 0 for every
# m <= L.  The phase-wise base spends the whole spectrum on the window, and pays for it here.

# %%
fig, axes = plt.subplots(1, len(windows), figsize=(12, 4), squeeze=False)
first_negative = []  # per window: the first distance where the phase-wise base's B(m) < 0
for ax, L in zip(axes[0], windows):
    m = np.arange(1, L + 1)
    for rule, color in (("phasewise", "tab:red"), ("bound", "tab:green")):
        theta = rope.bound_theta(head_dim, L) if rule == "bound" else rope.phasewise_theta(head_dim, L)
        B = rope.long_term_decay(head_dim, theta, L).numpy() / (head_dim // 2)
        cross = np.flatnonzero(np.sign(B[1:]) != np.sign(B[:-1])) + 1
        ax.plot(m, B, color=color, label=f"{rule}: θ = {theta:.4g}")
        ax.plot(m[cross], B[cross], "x", color=color, ms=5)
        if rule == "bound":
            assert (B >= 0).all(), f"the bound rule's base leaves B(m) < 0 below {L}"
        else:
            assert (B[m < L] < 0).any(), f"the phase-wise base keeps B(m) >= 0 below {L}"
            first_negative.append(int(m[B < 0][0]))
            print(f"window {L}: the phase-wise base (θ {theta:.4g}) first has B(m) < 0 at m = {m[B < 0][0]}, "
                  f"{len(cross)} zero crossings; the bound's base is {rope.bound_theta(head_dim, L):.4g}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_title(f"window {L}: B(m) for head dim {head_dim} (x: zero crossings)")
    ax.set_xlabel("distance m between query and key (tokens)")
    ax.legend(fontsize=8)
axes[0][0].set_ylabel("B(m) / (d/2)")
save(fig, "rope_bound.png")
if not FLAGS:  # the README's numbers for the default student (64-dim heads, windows 64 and 512)
    assert first_negative == [8, 46], f"B(m) < 0 first at {first_negative}, the README says 8 and 46"

# %% [markdown]
# ## 3. Packing: one window, many short documents
#
# The student never sees a document longer than the short window; the packer fills the long
# window with them and returns *document ids*, from which both the positions (`continuous`
# 0..T-1, or `reset` per document) and the attention mask derive.  Cross-document packing is plain
# causal attention over the window; the document mask lets a token see only its own document.
# Under the mask RoPE makes positions irrelevant: scores depend only on m - n within one document,
# so the window computes exactly what each document computes alone.

# %%
vocab = distill.vocab_for(args, corpus)  # the one vocabulary of teacher and students
pack_sampler, pack_short = distill.sampler_for(args, corpus, 2, split="val")
T_pack = windows[1]
packed = data.make_batch([data.pack(pack_sampler, np.random.default_rng(0), T_pack, pack_short)], vocab)
doc = packed["doc"]
cont, reset = (data.positions_from_docs(doc, mode) for mode in ("continuous", "reset"))
cross_mask = torch.ones(T_pack, T_pack, dtype=torch.bool).tril()
doc_mask = doc_causal_mask(doc)[0, 0]
t = torch.arange(T_pack)
reach = {name: int((t[:, None] - t[None, :])[mk].max()) for name, mk in (("cross_doc", cross_mask), ("doc_mask", doc_mask))}
assert reach["doc_mask"] < pack_short, "a document longer than the short window was packed"

fig = plt.figure(figsize=(12, 8.5))
gs = fig.add_gridspec(3, 2, height_ratios=[0.35, 1, 2.6], hspace=0.45)
ax = fig.add_subplot(gs[0, :])
ax.imshow(doc.numpy() % 20, cmap="tab20", vmin=0, vmax=19, aspect="auto", interpolation="nearest")
ax.set_yticks([])
ax.set_title(f"one packed window of {T_pack} tokens: {int(doc.max()) + 1} documents of <= {pack_short} tokens (colour = document id)")
ax = fig.add_subplot(gs[1, :])
ax.plot(cont[0], label="continuous")
ax.plot(reset[0], label="reset per document")
ax.set_xlim(0, T_pack - 1)
ax.set_ylabel("position id")
ax.set_xlabel("token in the window", fontsize=8)
ax.legend(fontsize=8)
for j, (name, mk) in enumerate((("cross-document (plain causal)", cross_mask), ("document-masked", doc_mask))):
    ax = fig.add_subplot(gs[2, j])
    ax.imshow(mk.numpy(), cmap="Greys", interpolation="nearest")
    ax.set_title(f"{name}, black = may attend: longest look-back {reach['cross_doc' if j == 0 else 'doc_mask']} tokens", fontsize=9)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
save(fig, "packing.png")

# The facts, on a random student of the default shape (a fact of the architecture, not of training).
torch.manual_seed(0)
net = GPT(distill.model_config(args, 2, len(vocab))).eval()
with torch.no_grad():
    masked = net(packed["idx"], cont, doc, hidden_only=True)[0]
    masked_reset = net(packed["idx"], reset, doc, hidden_only=True)[0]
    across = net(packed["idx"], cont, hidden_only=True)[0]
    gap_alone = gap_across = 0.0
    for d in range(int(doc.max()) + 1):
        span = (doc[0] == d).nonzero()[:, 0]
        alone = net(packed["idx"][:, span], torch.arange(len(span))[None], hidden_only=True)[0]
        gap_alone = max(gap_alone, float((masked[span] - alone).abs().max()))
        gap_across = max(gap_across, float((across[span] - alone).abs().max()))
gap_positions = float((masked - masked_reset).abs().max())
print(f"max |difference| of final hidden states: document-masked window vs each document alone {gap_alone:.1e}, "
      f"continuous vs reset positions under the mask {gap_positions:.1e}, cross-document vs alone {gap_across:.2f}")
assert gap_alone < 1e-4, "the document-masked window differs from its documents run alone"
assert gap_positions < 1e-4, "continuous and reset positions differ under the document mask"
assert gap_across > 1e-2, "without the mask, later documents should see the earlier ones"

# %% [markdown]
# ## 4. Skipped positions (PoSE): the long window's distances from short rows
#
# Packing shows the student long distances only *across* documents.  Positional skip-wise training
# (PoSE, Zhu et al. 2024) keeps each row as short as a document and moves its position ids instead:
# the row is cut into chunks (`--pose_chunks`, 2 by default) and each later chunk skips ahead, so a
# 64-token row can hold a key at position 20 and its question at position 480.  `data.pose_positions`
# draws the row's total skip uniformly up to window - row length, so every distance up to the window
# is trained about equally often (drawing each skip uniformly above the last makes long jumps rare).
# The teacher of `pose-kd` sees exactly these ids.  Left: the ids of one packed window and of the
# eight PoSE rows holding as many tokens; right: how often each distance is trained, over 4,000 rows.

# %%
pose_rows = windows[1] // windows[0]  # PoSE rows holding the tokens of one packed window
pose_pos = data.pose_positions(np.random.default_rng(0), pose_rows, windows[0], windows[1], args.pose_chunks)
spans = data.pose_positions(np.random.default_rng(1), 4000, windows[0], windows[1], args.pose_chunks)
spans = (spans[:, -1] - spans[:, 0]).numpy()  # the longest distance each row trains
naive_rng = np.random.default_rng(1)
u1 = naive_rng.integers(0, windows[1] - windows[0] + 1, 4000)
naive = naive_rng.integers(u1, windows[1] - windows[0] + 1) - u1 + windows[0] - 1  # u1 ~ U[0, F], u2 ~ U[u1, F]
edges = np.linspace(windows[0], windows[1], 8)
hist, hist_naive = np.histogram(spans, edges)[0], np.histogram(naive, edges)[0]
assert (pose_pos < windows[1]).all() and (pose_pos.diff(dim=1) >= 1).all(), "PoSE ids must increase and stay in the window"
assert hist.min() > 0.75 * hist.mean(), f"PoSE's longest distances should be about uniform, got {hist.tolist()}"
assert hist_naive[-1] < 0.3 * hist_naive[0], "the naive sampler should make long jumps rare"
print(f"rows of {windows[0]} in a {windows[1]} window: longest distance per row, {len(edges) - 1} bins from {windows[0]} to "
      f"{windows[1]}: ours {hist.tolist()}, naive {hist_naive.tolist()}")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
ax1.plot(np.arange(T_pack), cont[0], color="k", lw=2, label=f"packed: one window of {T_pack}, continuous ids")
for r in range(pose_rows):
    ax1.plot(np.arange(r * windows[0], (r + 1) * windows[0]), pose_pos[r], ".", ms=2, label="PoSE rows" if r == 0 else None)
ax1.set(xlabel="token (packed window / PoSE rows back to back)", ylabel="position id",
        title=f"{pose_rows} PoSE rows of {windows[0]} tokens, {args.pose_chunks} chunks each")
ax1.legend(fontsize=8)
ax2.bar(edges[:-1], hist, width=np.diff(edges) * 0.45, align="edge", label="ours: total skip ~ U[0, window - row]")
ax2.bar(edges[:-1] + np.diff(edges) * 0.45, hist_naive, width=np.diff(edges) * 0.45, align="edge",
        label="naive: each skip ~ U[previous, max]")
ax2.set(xlabel="longest distance a row trains (tokens)", ylabel="rows (of 4,000)", title="how often each distance is trained")
ax2.legend(fontsize=8)
save(fig, "pose_positions.png")

# %% [markdown]
# A row as short as a document never holds many keys, and a student trained on such rows alone loses
# retrieval as the prompt grows, even with the key close (results/roads).  Rows of two or four packed
# documents (`--pose_len`, attention across them as in a packed window) train the window's length too,
# at a price: a row of R tokens can skip only window - R, so one document inside it spans at most
# (document - 1) + window - R.  Drawing the row length per step (`--pose_len 64,128`, the `pose-rows`
# roads of `tools/ablate.py`) trains both the longest distances and longer rows.

# %%
doc = windows[0]  # the longest document
for R in (r for r in (doc, 2 * doc, 4 * doc) if r < windows[1]):
    ids = data.pose_positions(np.random.default_rng(2), 2000, R, windows[1], args.pose_chunks)
    inside = int((ids[:, doc - 1:] - ids[:, :R - doc + 1]).max())  # over every run of `doc` consecutive tokens
    bound = data.pose_span(doc, R, windows[1])
    assert bound - 8 <= inside <= bound, f"rows of {R}: a document spans up to {inside}, expected about {bound}"
    print(f"rows of {R} tokens: one {doc}-token document spans up to {inside} positions (bound {bound})")

# %% [markdown]
# ## 5. The models: teacher, phase 1, phase 2
#
# The pictures below need a teacher and the two student phases.  With the Quickstart's checkpoints
# (`python distill.py --phase 2`: out/phase0.pt .. phase2.pt) they show trained models and a teacher
# that retrieves; with only its teacher, tiny students are distilled from it.  Without any, this
# cell trains a tiny teacher and students through all three phases in under a minute (`distill.main`,
# the code path of a real run with smaller models and fewer steps): that teacher does not retrieve,
# so its pictures show the plumbing, not the effect.  The tiny student has one head of the default
# head dimension, so sections 1-2 describe its RoPE.

# %%
quickstart = os.path.join(ROOT, "out")
models = opt.models if opt.models != "auto" else quickstart if os.path.exists(os.path.join(quickstart, "phase0.pt")) else "tiny"
paths = [os.path.join(opt.scratch if models == "tiny" else models, f"phase{k}.pt") for k in range(3)]
if models == "tiny" or not all(map(os.path.exists, paths[1:])):
    given = [] if models == "tiny" else ["--teacher", paths[0]]  # a trained teacher: distil tiny students from it
    tiny = ["--teacher_layers", "2", "--teacher_heads", "2", "--teacher_embd", "64", "--teacher_steps", "150",
            "--teacher_batch", "4", "--student_layers", "1", "--student_heads", "1", "--student_embd", str(head_dim),
            "--steps", "40", "--batch", "16", "--warmup", "10", "--eval_n", "1", "--device", "cpu", *given]
    for k in range(1 if given else 0, 3):  # --force: a fresh run every time, never a stale checkpoint of other flags
        assert distill.main(["--phase", str(k), "--out", opt.scratch, "--force", *tiny, *FLAGS]) == 0, f"tiny phase {k} failed"
    paths[1:] = [os.path.join(opt.scratch, f"phase{k}.pt") for k in (1, 2)]
(teacher, vocab, tck), (student1, _, s1ck), (student2, vocab2, s2ck) = (checkpoint.load_model(pth) for pth in paths)
assert vocab == vocab2, "teacher and student use different vocabularies"
print(f"teacher {os.path.relpath(paths[0])} (window {tck['window']}), students {os.path.relpath(paths[1])}, "
      f"{os.path.relpath(paths[2])} (windows {s1ck['window']} -> {s2ck['window']})")

# %% [markdown]
# ## 6. KD vs CE: what the student is asked to match
#
# Cross-entropy shows the student one token: the label.  KD (MobileLLM-Pro's "implicit positional
# distillation") shows it the teacher's whole next-token distribution, and the loss is the forward
# KL Σ_v p_T(v) (log p_T(v) − log p_S(v)) (loss.py).  Below, on a packed window of short documents
# as phase 2 trains on (the teacher sees exactly the student's window, positions and mask), the
# teacher's top tokens at a passkey answer and at an ordinary text token, and the KL per token.

# %%
sargs = distill.parse_args(["--phase", "2", *FLAGS, "--short_len", str(s2ck["short_len"]), "--key_digits", str(s2ck["key_digits"])])
sampler, short = distill.sampler_for(sargs, corpus, 2, split="val")
T, question = s2ck["window"], torch.from_numpy(vocab(data.encode(data.QUESTION)))
packing, positions = s2ck["args"].get("packing", "cross_doc"), s2ck["args"].get("positions", "continuous")


def passkey_answers(b):
    """Every passkey answer of row 0: (position that predicts the key's first piece, the key's ids, document id).
    A copy document's repeat is weighted too; a passkey answer is the one right after the question."""
    idx, w, tgt, doc = b["idx"][0], b["weights"][0], b["targets"][0], b["doc"][0]
    out = []
    for u in ((w > 1) & (torch.cat([w[:1] * 0, w[:-1]]) <= 1)).nonzero()[:, 0].tolist():
        if u + 1 >= len(question) and torch.equal(idx[u + 1 - len(question):u + 1], question):
            rest = (doc == doc[u]) & (torch.arange(len(w)) >= u) & (w > 1)
            out.append((u, tgt[rest].tolist(), int(doc[u])))
    return out


rng = np.random.default_rng(0)
for draw in range(100):  # a window where an answer has >= 2 earlier passkey documents with other keys
    b = data.make_batch([data.pack(sampler, rng, T, short)], vocab)
    answers = passkey_answers(b)
    if answers and sum(a[1][0] != answers[-1][1][0] for a in answers[:-1]) >= (2 if draw < 50 else 1):
        break
assert answers, "no passkey document in 100 packed windows"
u, key, own = answers[-1]
pos = data.positions_from_docs(b["doc"], positions)
attn_doc = b["doc"] if packing == "doc_mask" else None
with torch.no_grad():
    h_t, h_s = teacher(b["idx"], pos, attn_doc, hidden_only=True), student2(b["idx"], pos, attn_doc, hidden_only=True)
    lt, ls = (h[0] @ m.head_weight().t() for h, m in ((h_t, teacher), (h_s, student2)))
tgt, wts = b["targets"][0], b["weights"][0]
valid = (tgt >= 0).nonzero()[:, 0]
kl = torch.zeros(T)  # the loss module's KL, one token at a time
for r in valid.tolist():
    kl[r] = loss.reference_loss(ls[r:r + 1], lt[r:r + 1], tgt[r:r + 1], torch.ones(1))[1]
logp_t, logp_s = F.log_softmax(lt, -1), F.log_softmax(ls, -1)
by_hand = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
assert torch.allclose(kl[valid], by_hand[valid], atol=1e-5), "per-token KL differs from sum p_T (log p_T - log p_S)"
with torch.no_grad():  # the chunked loss of distill.py's training step, here only its value
    batch_kd = float(loss.head_loss(h_s[0], student2.head_weight(), tgt, wts, h_t[0], teacher.head_weight())[1])
    self_kd = float(loss.head_loss(h_t[0], teacher.head_weight(), tgt, wts, h_t[0], teacher.head_weight())[1])
assert abs(float((wts * kl).sum() / wts.sum()) - batch_kd) < 1e-4 * max(1.0, batch_kd), "figure's KL != the training loss's KD"
assert float(loss.reference_loss(lt, lt, tgt, wts)[1]) == 0.0, "KL of the teacher with itself is not 0"
assert abs(self_kd) < 1e-6, "the chunked loss of the teacher with itself is not 0"
print(f"KD of this window (the training loss, loss.head_loss): {batch_kd:.4f} nats/token; KL(teacher || teacher) = 0")

# the ordinary token: in a plain text document, where the teacher is as unsure as its median
plain = [r for r in valid.tolist() if wts[r] == 1 and not (wts[b["doc"][0] == b["doc"][0, r]] > 1).any()
         and pos[0, r] - pos[0, b["doc"][0] == b["doc"][0, r]].min() >= 8] or [r for r in valid.tolist() if wts[r] == 1]
entropy = -(logp_t.exp() * logp_t).sum(-1)
text_tok = sorted(plain, key=lambda r: float(entropy[r]))[len(plain) // 2]


def token_text(i):
    return "<unk>" if vocab.unk and i == 0 else repr(data.tokenizer().decode([int(vocab.ids[i])]))


fig, axes = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [1, 1, 1.6]})
for ax, (r, what) in zip(axes, ((u, "passkey answer (first key piece)"), (text_tok, "ordinary text token"))):
    top = torch.topk(logp_t[r], 8).indices.tolist()
    top += [] if int(tgt[r]) in top else [int(tgt[r])]
    x = np.arange(len(top))
    ax.bar(x - 0.27, [float(tgt[r] == i) for i in top], 0.27, color="k", label="CE target (one-hot label)")
    ax.bar(x, logp_t[r, top].exp(), 0.27, color="tab:blue", label="KD target (teacher)")
    ax.bar(x + 0.27, logp_s[r, top].exp(), 0.27, color="tab:orange", label="student (phase 2)")
    ax.set_xticks(x, [token_text(i) for i in top], rotation=60, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{what}, position {r}\nKL(teacher || student) = {kl[r]:.3f} nats", fontsize=9)
axes[0].set_ylabel("probability")
axes[0].legend(fontsize=7)
ax = axes[2]
ax.plot(valid, kl[valid], lw=0.6, color="tab:gray")
ax.plot([u, text_tok], kl[[u, text_tok]], "o", color="tab:red")
ax.set_yscale("log")
ax.set_xlabel("position in the packed window")
ax.set_ylabel("KL per token (nats, log)")
ax.set_title(f"per-token KL over the window (weighted mean {batch_kd:.3f} = the training step's KD)", fontsize=9)
save(fig, "kd_vs_ce.png")

# %% [markdown]
# ## 7. Where the teacher looks
#
# KD can only pass on what the teacher's targets depend on.  At a passkey answer of a packed window
# the teacher should look at *its own document's* key; if it looks at *other documents'* keys its
# soft targets put mass on keys the label never names, and KD copies that cross-document habit
# (the README's findings).  Attention is recomputed from the rotated queries and keys that forward hooks
# catch on `attn.rotary` (as tools/analyze.py does; model.py stays untouched), and checked against
# the model's own attention output.  Right: the transfer-channel numbers of tools/ablate.py over
# 16 windows (p of the own key and of other documents' keys, full window vs own document only).

# %%
def key_positions(idx, key, span):
    """Positions in `span` (a tensor of positions) where the key's tokens occur, as a whole key."""
    hits = [int(span[i]) + j for i in range(len(span) - len(key) + 1) if idx[span[i:i + len(key)]].tolist() == key
            for j in range(len(key))]
    return hits


caught = [{} for _ in teacher.blocks]
hooks = []
for blk, c in zip(teacher.blocks, caught):
    hooks += [blk.attn.qkv.register_forward_hook(lambda m, a, out, c=c: c.update(qkv=out)),
              blk.attn.rotary.register_forward_hook(lambda m, a, out, c=c: c.update(q=out[0], k=out[1])),
              blk.attn.register_forward_hook(lambda m, a, out, c=c: c.update(out=out))]
with torch.no_grad():
    teacher(b["idx"], pos, attn_doc)
for hk in hooks:
    hk.remove()
allowed = doc_causal_mask(b["doc"])[0, 0] if packing == "doc_mask" else torch.ones(T, T, dtype=torch.bool).tril()
att = []  # [layer] -> [heads, T, T]
for blk, c in zip(teacher.blocks, caught):
    q, k = c["q"][0], c["k"][0]
    a = torch.softmax((q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~allowed, float("-inf")), -1)
    v = c["qkv"][0].split(teacher.cfg.n_embd, -1)[2].view(T, teacher.cfg.n_head, -1).transpose(0, 1)
    with torch.no_grad():
        again = blk.attn.proj((a @ v).transpose(0, 1).reshape(T, -1))
    assert torch.allclose(again, c["out"][0], atol=1e-5), "recomputed attention differs from the model's"
    att.append(a)

idx, docs = b["idx"][0], b["doc"][0]
own_keys = key_positions(idx, key, ((docs == own) & (torch.arange(T) < u)).nonzero()[:, 0])
other_keys = [p for a in answers[:-1] if a[1] != key for p in key_positions(idx, a[1], (docs == a[2]).nonzero()[:, 0])]
p_ans = logp_t[u].exp()
p_own, p_other = float(p_ans[key[0]]), float(p_ans[sorted({a[1][0] for a in answers[:-1]} - {key[0]})].sum())
channel = ablate.transfer_channel(teacher, vocab, sampler, T, short, rows=16, seed=1)["answers"]
print(f"answer at {u}: p(own key) {p_own:.3f}, p(other documents' keys) {p_other:.3f}; over 16 windows "
      f"({channel['n']} answers): " + ", ".join(f"{k} {channel[k] or 0:.3f}" for k in
                                               ("own_key_full", "own_key_doc", "other_keys_full", "other_keys_doc")))

fig = plt.figure(figsize=(14, 2.2 + 2.2 * len(att)))
gs = fig.add_gridspec(len(att), 2, width_ratios=[3, 1], wspace=0.2, hspace=0.45)
starts = [0] + (torch.nonzero(docs[1:] != docs[:-1])[:, 0] + 1).tolist()
masses = []  # per layer: the most attention one head pays the own key, and the other documents' keys
for layer, a in enumerate(att):
    ax = fig.add_subplot(gs[layer, 0])
    for j, s0 in enumerate(starts):
        s1 = starts[j + 1] if j + 1 < len(starts) else T
        ax.axvspan(s0, s1, color="tab:green" if j == own else "0.9" if j % 2 else "white", alpha=0.25, lw=0)
    for h in range(a.shape[0]):
        ax.plot(a[h, u, :u + 1], lw=0.8, label=f"head {h}")
    peak = float(a[:, u].max())
    ax.plot(own_keys, [peak * 1.05] * len(own_keys), "v", color="tab:green", label="own document's key")
    ax.plot(other_keys, [peak * 1.05] * len(other_keys), "v", color="tab:red", label="other documents' keys")
    mass = [float(a[:, u, ps].sum(-1).max()) if ps else 0.0 for ps in (own_keys, other_keys)]
    masses.append(mass)
    ax.set_title(f"layer {layer}: attention of the answer query at {u}; most on own key (one head) {mass[0]:.2f}, "
                 f"on other documents' keys {mass[1]:.2f}", fontsize=9)
    ax.set_xlim(0, T - 1)
    ax.set_ylabel("attention weight")
    if layer == 0:
        ax.legend(fontsize=7, ncol=4)
ax.set_xlabel("key position (green band: the answer's own document)")
ax = fig.add_subplot(gs[:, 1])
names = ["own key\nfull", "own key\nown doc", "other keys\nfull", "other keys\nown doc"]
vals = [channel[k] or 0.0 for k in ("own_key_full", "own_key_doc", "other_keys_full", "other_keys_doc")]
ax.bar(range(4), vals, color=["tab:green", "tab:green", "tab:red", "tab:red"], alpha=0.8)
ax.set_xticks(range(4), names, fontsize=8)
ax.set_ylabel("teacher's probability at an answer (mean)")
ax.set_title(f"transfer channel, {channel['n']} answers\n(full window vs own document only)\n"
             f"this answer: own {p_own:.2f}, other {p_other:.2f}", fontsize=9)
save(fig, "teacher_attention.png")
# The answer is read out in the last layer (in two layers: an induction circuit's second half); lower layers may
# match key pieces anywhere, in other documents too.
own_mass, other_mass = masses[-1]
print(f"last layer: at most {own_mass:.2f} of one head's attention on the own document's key, {other_mass:.2f} on "
      f"other documents' keys")
if models != "tiny":  # a trained teacher (the tiny one does not retrieve): it keeps the packed documents apart
    assert own_mass > 0.5 and own_mass > other_mass, "the teacher's last layer should look at the answer's own key"

# %% [markdown]
# ## 8. Did the long range reach the student?  Passkey retrieval after each phase
#
# The classic prompt (instruction, filler, the needle at an explicit depth, the question) at prompt
# lengths from 64 up to twice the last window, scored by teacher-forced exact match of every key
# piece (`eval_retrieval.passkey`, the same prompts for every model).  With the Quickstart's
# checkpoints: the teacher retrieves across its window, phase 1 inside its own, and phase 2 shows
# how far KD on short documents carried retrieval (the README's tables).  The tiny run scores 0.

# %%
lengths = eval_retrieval.default_lengths(max(tck["window"], s2ck["window"]))
n = 2 if models == "tiny" else 10  # prompts per cell
results = [eval_retrieval.passkey(m, vocab, lengths, n=n, digits=tck["key_digits"]) for m in (teacher, student1, student2)]
labels = [f"{os.path.basename(pth)} (window {ck['window']})" for pth, ck in zip(paths, (tck, s1ck, s2ck))]
print(eval_retrieval.format_table([os.path.basename(pth) for pth in paths], results, lengths, eval_retrieval.DEPTHS))
assert all(len(r) == n * len(lengths) * len(eval_retrieval.DEPTHS) for r in results)
one_back = [eval_retrieval.by_distance(r, [(64, 128)])["64-128"] for r in results]  # one document back
print("exact match one document back (key distance 64-128): " + ", ".join(f"{os.path.basename(p)} {a:.2f}" for p, a in zip(paths, one_back)))
if models != "tiny":  # trained checkpoints: the extension carried retrieval beyond the documents
    assert one_back[2] > one_back[1], "phase 2 should retrieve more than phase 1 one document back"
eval_retrieval.save_heatmap(os.path.join(opt.figures, "passkey.png"), labels, results, lengths, eval_retrieval.DEPTHS)
show(os.path.join(opt.figures, "passkey.png"))
print("walkthrough done: every assertion held")
