"""
Scoring working contexts by what comes next: the building blocks that training (training.py) and
evaluation (evaluation.py, scripts/mc_eval.py) share.

One sequence S is split at c: the history S[:c] is what a working context (WC) covers, the horizon
S[c : c+H] is what the model must predict from it. DeltaNLL@H compares two WCs of the same history
by the mean NLL of the horizon's H tokens under each.

- SequenceSource: the history as the `source` working_context.py needs (num_tokens, num_gists,
  tokens, gists), with the gists of `gistnet.build_gists` kept in the autograd graph, so a loss on
  a WC's horizon reaches GistNet (and the token embeddings) through every gist the WC uses.
- horizon_nll: many WCs (each over its own source) and their horizons in one padded forward:
  row r is [WC_r slots || horizon_r[:-1]], logits only at the H slots that predict horizon_r (the
  WC's last slot predicts horizon_r[0]: the targets are the true next tokens after the WC).
- lens_inputs: LensNet's per-entry inputs for a batch of WCs (a gist entry: its gist; an LOD0
  block: the mean of its token embeddings), the level of each entry, and the tail gists (the newest
  LOD1 gists of the history), all detached: the lens loss trains LensNet only.
"""

import torch
import torch.nn.functional as F

from nanochat.megacontext.gistnet import build_gists_batch


class SequenceSource:
    """One history in RAM / on the device, as a working-context source."""

    def __init__(self, token_ids, levels):
        self.token_ids = token_ids  # (N,) long
        self.levels = levels        # build_gists output: [token embeds (N, D), LOD1 (N // 32, D), LOD2 ...]

    @property
    def num_tokens(self):
        return self.token_ids.numel()

    def num_gists(self, level):
        return self.levels[level].size(0) if 1 <= level < len(self.levels) else 0

    def tokens(self, start, end):
        return self.token_ids[start:end]

    def token_embeds(self, start, end):
        """(end - start, D) the tokens' normalized embeddings, the very ones the gists were built from
        (in the autograd graph): what WorkingContext.assemble puts at token slots, not re-embedded."""
        return self.levels[0][start:end]

    def gists(self, level, i0, i1):
        return self.levels[level][i0:i1]


def build_source(model, gistnet, token_ids, max_level):
    """token_ids (N,) on the model's device -> SequenceSource with gists up to max_level."""
    return build_sources(model, gistnet, [token_ids], max_level)[0]


def build_sources(model, gistnet, histories, max_level):
    """build_source of each (N_i,) history, in one embedding call and one GistNet call per level."""
    embeds = model.embed_tokens(torch.cat(histories)).split([h.numel() for h in histories])
    return [SequenceSource(h, levels) for h, levels in zip(histories, build_gists_batch(list(embeds), gistnet, max_level))]


def pack_horizon(model, wcs, sources, horizons, assembled=None):
    """R WCs and their horizons (each (H,) long, the same H) -> (model inputs dict, assembled WCs).
    assembled: WorkingContext.assemble of some WCs already made (None where not), reused as they are.
    sources: SequenceSources (or CompositeSources of them): token slots are their own embeddings.
    inputs: idx (R, L), inputs_embeds (R, L, D), positions (R, L) float64, lod (R, L), logits_at (R, H);
    rows are right-padded to the longest (padding comes after every real slot, so causal attention
    never lets a real slot see it). assembled: the WorkingContext.assemble dict of each row."""
    H = horizons[0].numel()
    assembled = [None] * len(wcs) if assembled is None else list(assembled)
    rows = []
    for i, (wc, src, hz) in enumerate(zip(wcs, sources, horizons)):
        if assembled[i] is None:
            assembled[i] = wc.assemble(src)  # token slots: the source's own embeddings
        a = assembled[i]
        offset = src.num_tokens - wc.start  # hz[0]'s position relative to the WC's first token
        pos = a["positions"]
        rows.append(dict(
            inputs_embeds=torch.cat([a["embeds"], model.embed_tokens(hz[:-1]).to(a["embeds"].dtype)]),  # (T_wc + H - 1, D)
            idx=torch.cat([a["token_ids"], hz[:-1]]),
            lod=torch.cat([a["lod"], a["lod"].new_zeros(H - 1)]),
            positions=torch.cat([pos, offset + torch.arange(H - 1, dtype=pos.dtype, device=pos.device)]),
            logits_at=wc.cost - 1 + torch.arange(H, device=hz.device),
        ))
    L = max(r["idx"].numel() for r in rows)
    batch = {}
    for key in ("inputs_embeds", "idx", "lod", "positions"):
        padded = []
        for r in rows:
            x = r[key]
            pad = x.new_zeros((L - x.size(0),) + tuple(x.shape[1:]))
            padded.append(torch.cat([x, pad]))
        batch[key] = torch.stack(padded)
    batch["logits_at"] = torch.stack([r["logits_at"] for r in rows])  # (R, H)
    return batch, assembled


def horizon_nll(model, wcs, sources, horizons, return_logits=False, assembled=None):
    """-> nll (R, H) float32 per horizon token (and the logits (R, H, V) and the assembled WCs when
    asked), one forward. assembled: as pack_horizon takes it."""
    batch, assembled = pack_horizon(model, wcs, sources, horizons, assembled)
    logits = model(batch["idx"], inputs_embeds=batch["inputs_embeds"], positions=batch["positions"],
                   lod=batch["lod"], logits_at=batch["logits_at"])  # (R, H, V)
    targets = torch.stack(list(horizons))  # (R, H)
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    return (nll, logits, assembled) if return_logits else nll


def entry_vectors(assembled, n_entries):
    """One assembled WC -> (E, D) float32: each entry's mean slot embedding (a gist entry has one slot)."""
    emb, entry = assembled["embeds"].float(), assembled["entry"]
    total = torch.zeros(n_entries, emb.size(1), device=emb.device).index_add_(0, entry, emb)
    counts = torch.bincount(entry, minlength=n_entries).clamp(min=1)
    return total / counts[:, None]


def lens_inputs(wcs, sources, assembled, n_tail):
    """-> entry_embeds (B, E, D), levels (B, E) long, mask (B, E) bool, tail (B, n_tail, D) or None;
    B = len(wcs), E = the most entries of any WC (padding after the real entries). Detached."""
    E = max(len(wc) for wc in wcs)
    vecs, levels, masks, tails = [], [], [], []
    for wc, src, a in zip(wcs, sources, assembled):
        v = entry_vectors(a, len(wc)).detach()  # (E_wc, D)
        D = v.size(1)
        vecs.append(F.pad(v, (0, 0, 0, E - len(wc))))
        levels.append(torch.tensor([e.level for e in wc.entries] + [0] * (E - len(wc)), device=v.device))
        masks.append(torch.arange(E, device=v.device) < len(wc))
        if n_tail > 0:
            n1 = src.num_gists(1)
            newest = src.gists(1, max(0, n1 - n_tail), n1).detach().float().to(v.device)  # (<= n_tail, D)
            tails.append(F.pad(newest, (0, 0, n_tail - newest.size(0), 0)))  # zeros in front when short
    tail = torch.stack(tails) if n_tail > 0 else None
    return torch.stack(vecs), torch.stack(levels), torch.stack(masks), tail


def score_entries(lensnet, wcs, sources, assembled):
    """LensNet's scores of each WC's entries: (B, E) with 0 at padding, and the mask (B, E). Gists deeper
    than LensNet was trained for (a streaming tree past the trained depth, gistnet.AnyLevel) read as its
    deepest level."""
    entry_embeds, levels, mask, tail = lens_inputs(wcs, sources, assembled, lensnet.n_tail)
    levels = levels.clamp(max=lensnet.max_level)
    dtype = next(lensnet.parameters()).dtype
    scores = lensnet(entry_embeds.to(dtype), levels, None if tail is None else tail.to(dtype), mask)
    return scores, mask
