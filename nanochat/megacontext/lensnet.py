"""
LensNet: one signed focus score per working-context entry, and its losses
(design: shared/spec/megacontext.md, "LensNet"). Score > 0: expand the entry (more detail),
< 0: collapse it; tanh-bounded in (-1, 1).

The network is a small bidirectional transformer (gistnet.BidirectionalBlock) over
[entries || tail gists]. Each entry row is in_proj(norm(vector)) + a level embedding + a fixed
sinusoid of how many entries back from the newest it sits (at most recency_cap, when set); each tail row (a few gists summarizing
the newest content) is in_proj(norm(gist)) + a learned tail-slot embedding. Attention is never
causal: the first entry's score sees every later entry and the tail (failure mode 8 of the spec).

Training signal: a slate of V working-context variants, each a set of edits applied to the WC that
LensNet scored, evaluated by the base model (DeltaNLL, lower is better). A variant is described
by per-entry edits[v, e]: +1 = entry e expanded, -1/n = entry e collapsed with its group of n
siblings (each of the n marked), 0 = untouched. The predicted benefit of a variant is additive:
utility[v] = sum_e edits[v, e] * scores[e], so a collapse counts its group's mean score, as the
allocator does (it collapses a group whose mean score is below -tau_collapse). Losses:
- pairwise_lens_loss: Bradley-Terry over every pair of variants whose edits differ, the variant
  with the lower DeltaNLL preferred; all pairs at once as a (B, V, V) tensor, no Python loop.
- regression_lens_loss: masked MSE to target scores; lens_targets makes the targets from the
  slate: WC* = argmin_v DeltaNLL[v] + lam * D(v), D(v) = sum_e |edits[v, e]| (edits away from the
  current WC: one collapse counts 1, whatever its group's size), and the target of entry e is the
  sign of WC*'s edit of e (+1 / -1 / 0: each member of a collapsed group -1, so scores fitted to
  the targets pass the allocator's -tau_collapse), supervised only where some variant edited e. temperature > 0 replaces the argmin by a softmin (targets in [-1, 1]).
- lens_regularizer: legality (no expanding an LOD0 block, no collapsing what cannot collapse), a
  zero-sum budget term (each WC's mean score near 0: expansions paid for by collapses) and
  hysteresis (entries no evaluated variant edited are pulled to 0, so only evidence moves a score
  past the allocator's thresholds). The allocator still enforces legality and budget on its edits.
- lens_agreement: how often the predicted utilities order two variants as the measured DeltaNLL does.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.gpt import Linear, norm
from nanochat.megacontext.gistnet import BidirectionalBlock


def recency_features(mask, dim, cap=0):
    """mask (B, E) bool, True = real entry (real entries first) -> (B, E, dim) sin/cos of the number
    of entries back from the row's newest entry (0 for the newest; padding clamps to 0; cap > 0:
    clamped to cap, so every entry at least cap back reads the same code)."""
    B, E = mask.shape
    n = mask.sum(dim=1, keepdim=True)  # (B, 1)
    back = (n - 1 - torch.arange(E, device=mask.device)).clamp(min=0)  # (B, E)
    back = (back.clamp(max=cap) if cap > 0 else back).float()
    half = dim // 2
    freqs = 1000.0 ** (-torch.arange(half, device=mask.device, dtype=torch.float32) / max(half, 1))  # (half,)
    angles = back[..., None] * freqs  # (B, E, half)
    return F.pad(torch.cat([angles.sin(), angles.cos()], dim=-1), (0, dim - 2 * half))  # (B, E, dim)


class LensNet(nn.Module):
    def __init__(self, dim, n_layer=2, n_head=4, hidden=None, n_tail=4, max_level=3, recency_cap=0):
        super().__init__()
        hidden = dim if hidden is None else hidden
        self.dim, self.hidden, self.n_tail, self.max_level, self.recency_cap = dim, hidden, n_tail, max_level, recency_cap
        self.in_proj = Linear(dim, hidden)
        self.level_embed = nn.Embedding(max_level + 1, hidden)  # levels 0 (LOD0 block) .. max_level
        self.tail_embed = nn.Parameter(torch.zeros(n_tail, hidden))
        self.blocks = nn.ModuleList([BidirectionalBlock(hidden, n_head) for _ in range(n_layer)])
        self.head = Linear(hidden, 1)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Small random scores at step 0 (no zero init anywhere, so every weight gets a gradient)."""
        nn.init.uniform_(self.in_proj.weight, -math.sqrt(3.0 / self.dim), math.sqrt(3.0 / self.dim))
        nn.init.normal_(self.level_embed.weight, std=0.5)
        nn.init.normal_(self.tail_embed, std=0.5)
        for block in self.blocks:
            block.init_weights()
        bound = math.sqrt(3.0 / self.hidden)
        nn.init.uniform_(self.head.weight, -0.5 * bound, 0.5 * bound)

    def forward(self, entry_embeds, levels, tail_gists=None, mask=None):
        """entry_embeds: (B, E, D) one vector per WC entry (a gist; an LOD0 block's mean token embed)
        levels: (B, E) long in 0..max_level; tail_gists: (B, n_tail, D) or None
        mask: (B, E) bool, True = real entry (padding after the real entries), None = all real
        -> scores (B, E) in (-1, 1), 0 at padding."""
        B, E, D = entry_embeds.shape
        assert D == self.dim and levels.shape == (B, E), \
            f"LensNet wants (B, E, {self.dim}) and levels (B, E), got {tuple(entry_embeds.shape)}, {tuple(levels.shape)}"
        lo, hi = int(levels.min()), int(levels.max())
        if lo < 0 or hi > self.max_level:
            raise ValueError(f"LensNet levels must be in 0..{self.max_level}, got {lo}..{hi}")
        mask = torch.ones(B, E, dtype=torch.bool, device=entry_embeds.device) if mask is None else mask
        x = self.in_proj(norm(entry_embeds))  # (B, E, H)
        x = x + self.level_embed(levels).to(x.dtype) + recency_features(mask, self.hidden, self.recency_cap).to(x.dtype)
        key_mask = mask
        if tail_gists is not None:
            assert tail_gists.shape == (B, self.n_tail, D), \
                f"tail_gists must be ({B}, {self.n_tail}, {D}), got {tuple(tail_gists.shape)}"
            tail = self.in_proj(norm(tail_gists)) + self.tail_embed.to(x.dtype)  # (B, n_tail, H)
            x = torch.cat([x, tail], dim=1)  # (B, E + n_tail, H)
            key_mask = torch.cat([mask, mask.new_ones(B, self.n_tail)], dim=1)
        for block in self.blocks:
            x = block(x, key_mask=key_mask)
        scores = torch.tanh(self.head(norm(x[:, :E])).squeeze(-1)).float()  # (B, E)
        return torch.where(mask, scores, 0.0)


def variant_utilities(scores, edits):
    """scores (B, E), edits (B, V, E) in {-1, 0, +1} -> (B, V) predicted benefit of each variant."""
    return torch.einsum("bve,be->bv", edits.to(scores.dtype), scores)


def pairwise_lens_loss(scores, edits, delta_nll, valid=None, beta=2.0, margin=0.0, weighted=True):
    """Bradley-Terry preference loss over the evaluated slate, all pairs at once.
    scores (B, E) from LensNet; edits (B, V, E) in {-1, 0, +1}; delta_nll (B, V) measured (lower =
    better; treated as a constant); valid (B, V) bool or None (padding variants).
    For every pair (i, j) whose edits differ and delta_nll[i] < delta_nll[j] - margin:
    -log sigmoid(beta * (utility[i] - utility[j])), weighted by delta_nll[j] - delta_nll[i] when
    weighted (clear wins count more), averaged over the weights. With no such pair the loss is 0
    (there is nothing to prefer), still a function of scores."""
    assert scores.ndim == 2 and edits.ndim == 3 and delta_nll.shape == edits.shape[:2], \
        f"want scores (B, E), edits (B, V, E), delta_nll (B, V); got " \
        f"{tuple(scores.shape)}, {tuple(edits.shape)}, {tuple(delta_nll.shape)}"
    delta_nll = delta_nll.detach().float()
    u = variant_utilities(scores.float(), edits)  # (B, V)
    gap = delta_nll[:, None, :] - delta_nll[:, :, None]  # (B, V, V): [b, i, j] = dnll[j] - dnll[i]
    differ = (edits[:, :, None, :] != edits[:, None, :, :]).any(dim=-1)  # (B, V, V)
    pair = (gap > margin) & differ  # (B, V, V): [b, i, j] = i beats j
    if valid is not None:
        pair = pair & valid[:, :, None] & valid[:, None, :]
    weight = torch.where(pair, gap if weighted else torch.ones_like(gap), 0.0)  # (B, V, V)
    logits = beta * (u[:, :, None] - u[:, None, :])  # (B, V, V)
    return (weight * F.softplus(-logits)).sum() / weight.sum().clamp(min=1e-12)


def regression_lens_loss(scores, targets, mask):
    """Mean squared error between scores (B, E) and targets (B, E) in [-1, 1] over mask (B, E) bool;
    entries outside the mask get exactly zero gradient (their targets may be anything, even NaN)."""
    diff = torch.where(mask, scores.float() - targets.float(), 0.0)
    return diff.square().sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def lens_targets(edits, delta_nll, lam=0.01, valid=None, temperature=0.0):
    """Regression targets from an evaluated slate via the distance-regularized argmin
    WC* = argmin_v delta_nll[v] + lam * sum_e |edits[v, e]|.
    edits (B, V, E): +1 expanded, -1/n collapsed in a group of n, 0 untouched; delta_nll (B, V);
    valid (B, V) bool or None. Include the current WC itself (an all-zero edit row) in the slate so
    "change nothing" can win.
    -> targets (B, E) = the sign of WC*'s edit of each entry (softmin-weighted mean of the variants'
    signs when temperature > 0), mask (B, E) bool = entries that some valid variant edited."""
    edits = edits.float()
    cost = delta_nll.float() + lam * edits.abs().sum(dim=-1)  # (B, V)
    if valid is not None:
        cost = cost.masked_fill(~valid, float("inf"))
        edits = edits * valid[..., None]
    if temperature > 0:
        weights = torch.softmax(-cost / temperature, dim=-1)  # (B, V)
    else:
        weights = F.one_hot(cost.argmin(dim=-1), cost.size(-1)).float()  # (B, V)
    targets = torch.einsum("bv,bve->be", weights, edits.sign())  # (B, E): a collapsed member's -1/n -> -1
    mask = (edits != 0).any(dim=1)  # (B, E)
    return targets, mask


def lens_regularizer(scores, mask, can_expand, can_collapse, supervised):
    """scores (B, E); mask, can_expand, can_collapse, supervised (B, E) bool -> scalar:
    legality: relu(score)^2 where expanding is illegal + relu(-score)^2 where collapsing is illegal;
    budget: the square of each WC's mean score; hysteresis: score^2 where no variant edited the entry."""
    s, m = scores.float(), mask.float()
    n = m.sum().clamp(min=1)
    illegal = F.relu(s).square() * (~can_expand).float() + F.relu(-s).square() * (~can_collapse).float()
    legality = (illegal * m).sum() / n
    row_mean = (s * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)  # (B,)
    budget = row_mean.square().mean()
    hysteresis = (s.square() * m * (~supervised).float()).sum() / n
    return legality + budget + hysteresis


@torch.no_grad()
def lens_agreement(utilities, delta_nll, valid, tol=1e-3):
    """utilities, delta_nll (B, V), valid (B, V) bool -> (agreeing pairs, pairs): over the pairs of valid
    variants whose measured DeltaNLL differs by more than tol, those where the variant LensNet
    predicts better (higher utility) is the one measured better (lower DeltaNLL)."""
    better = (delta_nll[:, None, :] - delta_nll[:, :, None]) > tol  # (B, V, V): [b, i, j] = i measured better than j
    pair = better & valid[:, :, None] & valid[:, None, :]
    agree = pair & (utilities[:, :, None] > utilities[:, None, :])
    return int(agree.sum()), int(pair.sum())
