"""
GistNet: compresses one block of K=32 embeddings into one gist vector in the base model's
normalized token-embedding space (design: shared/spec/megacontext.md, "GistNet").

Input at level 1 is 32 normalized token embeddings (`model.embed_tokens`), at level L >= 2 the 32
child gists of level L-1; both live in the same space, so one network can serve every level.
Kinds:
- mean:        the normalized mean of the 32 inputs, no weights at all (GistPool, arXiv 2504.08934, finds
               plain mean pooling beats learned gist tokens at long context; and it cannot collapse)
- linear:      mean-pool + Linear head
- mlp:         mean-pool + relu^2 MLP head (nanochat.gpt.MLP)
- transformer: n_layer bidirectional blocks (pre-norm attention + relu^2 MLP, QK-norm, a learned
               position-in-block embedding instead of rotary) + pooling (mean / learned query /
               CLS token) + Linear head
Every other kind is a residual around mean pooling: gist = norm(mean(x) + head(summary)). The head's
last projection starts at zero, so at step 0 a gist is exactly the normalized mean of its
children, a sane stand-in for them. The inner blocks start small-random (not zero like the base
model's c_proj) so that query/CLS pooling depends on the block from step 0.
Attention is never causal here: a CLS token in front of a causal block would see only itself and
return the same vector for every block (failure mode 8 of the spec).
shared=True: one encoder for all levels plus a learned per-level embedding (zero at init) added to
every input row; shared=False: one encoder per level 1..max_level, no level embedding.
`BidirectionalBlock` is reused by LensNet.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.gpt import GPTConfig, Linear, MLP, QK_SCALE, norm
from nanochat.megacontext import BLOCK_SIZE


class BidirectionalAttention(nn.Module):
    """Multi-head attention without a causal mask. Queries come from x, keys/values from
    context (default: x itself, i.e. self-attention)."""

    def __init__(self, dim, n_head):
        super().__init__()
        assert dim % n_head == 0, f"dim {dim} must be divisible by n_head {n_head}"
        self.n_head = n_head
        self.head_dim = dim // n_head
        self.c_q = Linear(dim, dim)
        self.c_k = Linear(dim, dim)
        self.c_v = Linear(dim, dim)
        self.c_proj = Linear(dim, dim)

    def forward(self, x, context=None, key_mask=None):
        # x: (B, Tq, C); context: (B, Tk, C) or None; key_mask: (B, Tk) bool, True = may be attended
        context = x if context is None else context
        B, Tq, C = x.shape
        Tk = context.size(1)
        q = self.c_q(x).view(B, Tq, self.n_head, self.head_dim)        # (B, Tq, H, D)
        k = self.c_k(context).view(B, Tk, self.n_head, self.head_dim)  # (B, Tk, H, D)
        v = self.c_v(context).view(B, Tk, self.n_head, self.head_dim)  # (B, Tk, H, D)
        q, k = norm(q) * QK_SCALE, norm(k) * QK_SCALE
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Tk)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        y = y.transpose(1, 2).reshape(B, Tq, C)
        return self.c_proj(y)


class BidirectionalBlock(nn.Module):
    """nanochat.gpt.Block without the causal mask, rotary, value embeddings or windows."""

    def __init__(self, dim, n_head):
        super().__init__()
        self.attn = BidirectionalAttention(dim, n_head)
        self.mlp = MLP(GPTConfig(n_embd=dim))  # c_fc (dim -> 4 dim), relu^2, c_proj

    def forward(self, x, key_mask=None):
        x = x + self.attn(norm(x), key_mask=key_mask)
        x = x + self.mlp(norm(x))
        return x

    @torch.no_grad()
    def init_weights(self):
        bound = math.sqrt(3.0 / self.mlp.c_fc.in_features)  # uniform with std 1/sqrt(dim)
        for lin in (self.attn.c_q, self.attn.c_k, self.attn.c_v):
            nn.init.uniform_(lin.weight, -bound, bound)
        nn.init.uniform_(self.mlp.c_fc.weight, -0.4 * bound, 0.4 * bound)
        nn.init.uniform_(self.attn.c_proj.weight, -0.2 * bound, 0.2 * bound)  # small, not zero (see top)
        nn.init.uniform_(self.mlp.c_proj.weight, -0.1 * bound, 0.1 * bound)


class GistEncoder(nn.Module):
    """One set of GistNet weights: (N, 32, D) -> (N, D), before the final norm."""

    def __init__(self, dim, kind, pooling, n_layer, n_head):
        super().__init__()
        self.dim, self.kind, self.pooling = dim, kind, pooling
        if kind == "mean":
            return
        if kind == "mlp":
            self.head = MLP(GPTConfig(n_embd=dim))
        else:
            self.head = Linear(dim, dim)
        if kind == "transformer":
            self.pos_embed = nn.Parameter(torch.zeros(BLOCK_SIZE, dim))  # position inside the block
            self.blocks = nn.ModuleList([BidirectionalBlock(dim, n_head) for _ in range(n_layer)])
            if pooling == "cls":
                self.cls = nn.Parameter(torch.zeros(dim))
            if pooling == "query":
                self.query = nn.Parameter(torch.zeros(dim))
                self.query_attn = BidirectionalAttention(dim, n_head)

    def summarize(self, x):
        """(N, 32, D) -> (N, D): what the head reads (mean pool, or the transformer's pooled state)."""
        if self.kind != "transformer":
            return x.mean(dim=1)
        N, T, D = x.shape
        h = x + self.pos_embed.to(x.dtype)  # (N, 32, D)
        if self.pooling == "cls":
            h = torch.cat([self.cls.to(x.dtype).expand(N, 1, D), h], dim=1)  # (N, 33, D)
        for block in self.blocks:
            h = block(h)
        h = norm(h)
        if self.pooling == "cls":
            return h[:, 0]
        if self.pooling == "query":
            q = norm(self.query.to(x.dtype)).expand(N, 1, D)  # (N, 1, D)
            return self.query_attn(q, context=h)[:, 0]
        return h.mean(dim=1)

    def forward(self, x):
        if self.kind == "mean":
            return x.mean(dim=1)  # (N, D)
        return x.mean(dim=1) + self.head(norm(self.summarize(x)))  # (N, D)

    @torch.no_grad()
    def init_weights(self):
        bound = math.sqrt(3.0 / self.dim)
        if self.kind == "mean":
            return
        if self.kind == "mlp":
            nn.init.uniform_(self.head.c_fc.weight, -bound, bound)
            nn.init.zeros_(self.head.c_proj.weight)  # step 0: gist = norm(mean)
        else:
            nn.init.zeros_(self.head.weight)
        if self.kind == "transformer":
            nn.init.normal_(self.pos_embed, std=0.1)
            for block in self.blocks:
                block.init_weights()
            if self.pooling == "cls":
                nn.init.normal_(self.cls, std=1.0)
            if self.pooling == "query":
                nn.init.normal_(self.query, std=1.0)
                for lin in (self.query_attn.c_q, self.query_attn.c_k, self.query_attn.c_v, self.query_attn.c_proj):
                    nn.init.uniform_(lin.weight, -bound, bound)


class GistNet(nn.Module):
    """blocks (N, 32, D) at a level 1..max_level -> gists (N, D), normalized like token embeddings."""

    def __init__(self, dim, kind="mlp", pooling="mean", n_layer=2, n_head=4, shared=True, max_level=2):
        super().__init__()
        if kind not in ("mean", "linear", "mlp", "transformer"):
            raise ValueError(f"GistNet kind must be mean, linear, mlp or transformer, got {kind!r}")
        if pooling not in ("mean", "query", "cls"):
            raise ValueError(f"GistNet pooling must be mean, query or cls, got {pooling!r}")
        if kind != "transformer" and pooling != "mean":
            raise ValueError(f"GistNet kind {kind!r} mean-pools; pooling {pooling!r} needs kind='transformer'")
        if max_level < 1:
            raise ValueError(f"GistNet max_level must be >= 1, got {max_level}")
        shared = shared and kind != "mean"  # a weightless mean has no level embedding either: nothing learned, nothing to collapse
        self.dim, self.kind, self.pooling, self.shared, self.max_level = dim, kind, pooling, shared, max_level
        n_encoders = 1 if shared else max_level
        self.encoders = nn.ModuleList([GistEncoder(dim, kind, pooling, n_layer, n_head) for _ in range(n_encoders)])
        if shared:
            self.level_embed = nn.Parameter(torch.zeros(max_level, dim))  # row L-1 is added at level L
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Step 0: every gist is norm(mean of its children). Callable again after to_empty()."""
        for encoder in self.encoders:
            encoder.init_weights()
        if self.shared:
            self.level_embed.zero_()

    def inputs(self, blocks, level):
        """The encoder for `level` and its input rows (the level embedding added when shared)."""
        if not 1 <= level <= self.max_level:
            raise ValueError(f"GistNet level must be in 1..{self.max_level}, got {level}")
        assert blocks.ndim == 3 and blocks.shape[1:] == (BLOCK_SIZE, self.dim), \
            f"GistNet expects blocks (N, {BLOCK_SIZE}, {self.dim}), got {tuple(blocks.shape)}"
        if self.shared:
            return self.encoders[0], blocks + self.level_embed[level - 1].to(blocks.dtype)
        return self.encoders[level - 1], blocks

    def summarize(self, blocks, level):
        """(N, 32, D) -> (N, D): the pooled summary the head reads (exposed for tests and probes)."""
        encoder, x = self.inputs(blocks, level)
        return encoder.summarize(x)

    def forward(self, blocks, level):
        encoder, x = self.inputs(blocks, level)
        return norm(encoder(x))  # (N, D)


def build_gists(token_embeds, gistnet, max_level):
    """Differentiable gist pyramid of one sequence: token_embeds (N, D) -> list of max_level + 1
    tensors, index 0 = token_embeds, index L = (N // 32**L, D) gists of the complete blocks of level
    L-1 (a level with no complete block is an empty (0, D))."""
    return build_gists_batch([token_embeds], gistnet, max_level)[0]


def build_gists_batch(token_embeds, gistnet, max_level):
    """build_gists of several sequences (a list of (N_i, D)) with one GistNet call per level over all
    of their complete blocks (blocks never straddle sequences, and GistNet reads each block on its
    own, so this is build_gists of each, in bigger matmuls). -> one pyramid list per sequence."""
    for x in token_embeds:
        assert x.ndim == 2, f"token_embeds must be (N, D), got {tuple(x.shape)}"
    pyramids = [[x] for x in token_embeds]
    for level in range(1, max_level + 1):
        below = [p[-1] for p in pyramids]
        counts = [x.size(0) // BLOCK_SIZE for x in below]
        if sum(counts) == 0:
            for p, x in zip(pyramids, below):
                p.append(x.new_zeros(0, x.size(1)))
            continue
        blocks = torch.cat([x[:n * BLOCK_SIZE].reshape(n, BLOCK_SIZE, x.size(1)) for x, n in zip(below, counts)])  # (sum n, 32, D)
        for p, gists in zip(pyramids, gistnet(blocks, level).split(counts)):
            p.append(gists)  # (n_i, D)
    return pyramids


class AnyLevel(nn.Module):
    """A trained GistNet serving every level, for streaming trees with no depth limit (runtime.py):
    a level past the deepest one it was trained on reuses that deepest level's weights. Gists of gists
    live in the same space as gists of tokens, so this is a fair extrapolation, but an untrained one:
    a history needs levels past the trained depth only when its coarsest WC would not fit W_max."""

    max_level = None  # a tree built with this serves any depth

    def __init__(self, gistnet):
        super().__init__()
        self.gistnet, self.dim = gistnet, gistnet.dim

    def forward(self, blocks, level):
        return self.gistnet(blocks, min(level, self.gistnet.max_level))  # (N, D)
