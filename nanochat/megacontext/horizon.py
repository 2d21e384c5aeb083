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

import itertools

import torch
import torch.nn.functional as F

from nanochat.gpt import norm
from nanochat.megacontext import BLOCK_SIZE
from nanochat.megacontext.gistnet import build_gists_batch
from nanochat.megacontext.positions import slot_rotary
from nanochat.megacontext.working_context import OneMemory

K = BLOCK_SIZE


class SequenceSource(OneMemory):
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


def pack_horizon(model, wcs, sources, horizons, assembled=None, pad_multiple=1):
    """R WCs and their horizons (each (H,) long, the same H) -> (model inputs dict, assembled WCs).
    assembled: WorkingContext.assemble of some WCs already made (None where not), reused as they are.
    sources: SequenceSources (or CompositeSources of them): token slots are their own embeddings.
    inputs: idx (R, L), inputs_embeds (R, L, D), positions (R, L) float64, lod (R, L), logits_at (R, H);
    rows are right-padded to the longest, rounded up to pad_multiple (padding comes after every real
    slot, so causal attention never lets a real slot see it; a compiled forward sees few lengths).
    assembled: the WorkingContext.assemble dict of each row."""
    H = horizons[0].numel()
    assembled = [None] * len(wcs) if assembled is None else list(assembled)
    rows = []
    for i, (wc, src, hz) in enumerate(zip(wcs, sources, horizons)):
        if assembled[i] is None:
            assembled[i] = wc.assemble(src)  # token slots: the source's own embeddings
        a = assembled[i]
        offset = src.num_tokens - wc.origin(src)  # hz[0]'s position relative to the WC's first slot
        pos = a["positions"]
        rows.append(dict(
            inputs_embeds=torch.cat([a["embeds"], model.embed_tokens(hz[:-1]).to(a["embeds"].dtype)]),  # (T_wc + H - 1, D)
            idx=torch.cat([a["token_ids"], hz[:-1]]),
            lod=torch.cat([a["lod"], a["lod"].new_zeros(H - 1)]),
            positions=torch.cat([pos, offset + torch.arange(H - 1, dtype=pos.dtype, device=pos.device)]),
            logits_at=wc.cost - 1 + torch.arange(H, device=hz.device),
        ))
    L = -(-max(r["idx"].numel() for r in rows) // pad_multiple) * pad_multiple
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


def horizon_nll(model, wcs, sources, horizons, return_logits=False, assembled=None, forward=None, pad_multiple=1):
    """-> nll (R, H) float32 per horizon token (and the logits (R, H, V) and the assembled WCs when
    asked), one forward. assembled, pad_multiple: as pack_horizon takes them; forward: what runs the
    model (a torch.compile of it; default the model itself)."""
    batch, assembled = pack_horizon(model, wcs, sources, horizons, assembled, pad_multiple)
    logits = (model if forward is None else forward)(batch["idx"], inputs_embeds=batch["inputs_embeds"], rotary=slot_rotary(model, batch["positions"], batch["lod"]),
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


# -----------------------------------------------------------------------------
# the horizon of a packed row, the gist loss on it, and many WCs' horizon NLLs in chunks

MAX_SLOTS = 16384  # padded WC + horizon slots per forward


def split_point(row, bos_id, horizon, w_max):
    """row: (n,) one packed row (a list of ints or a tensor) -> c: history row[:c], horizon row[c : c+H].
    The horizon ends where the row's longest document ends, among the documents holding the horizon
    plus a block of context and leaving a history longer than w_max (something to compress);
    without one (or without bos_id) it is the row's last H tokens."""
    ids = row.tolist() if torch.is_tensor(row) else list(row)
    n = len(ids)
    if bos_id is None:
        return n - horizon
    starts = [i for i, t in enumerate(ids) if t == bos_id]
    if not starts or starts[0] != 0:
        starts = [0] + starts
    docs = [(e - s, e) for s, e in zip(starts, starts[1:] + [n]) if e - s >= horizon + K and e - horizon > w_max]
    return max(docs)[1] - horizon if docs else n - horizon


def gist_loss(model, gistnet, logits, targets, level):
    """logits (R, H, V), targets (R, H) true tokens -> (mean 1 - cos, mean cos detached) over the
    level-`level` gists of the first H // 32**level whole spans of the horizon, or None if H is shorter."""
    span = K ** level
    n = targets.size(1) // span * span
    if n == 0:
        return None
    V = logits.size(-1)
    dtype = model.transformer.wte.weight.dtype
    table = norm(model.transformer.wte.weight[:V].float())  # (V, D): every token's normalized embedding
    soft = torch.softmax(logits[:, :n], dim=-1) @ table  # (R, n, D) expected next embedding
    true = model.embed_tokens(targets[:, :n]).float()  # (R, n, D)

    # GistNet is the fixed measuring stick here: it runs on detached copies of its weights (its own
    # parameters untouched), so gradients reach the model through `soft` only
    fixed = {name: t.detach() for name, t in itertools.chain(gistnet.named_parameters(), gistnet.named_buffers())}

    def gists(x):  # (R, n, D) -> (R * n // span, D)
        x = x.to(dtype).reshape(-1, K, x.size(-1))
        for L in range(1, level + 1):
            x = torch.func.functional_call(gistnet, fixed, (x, L))
            if L < level:
                x = x.reshape(-1, K, x.size(-1))
        return x.float()

    cos = F.cosine_similarity(gists(soft), gists(true).detach(), dim=-1)
    return (1 - cos).mean(), cos.mean().detach()


def length_chunks(lengths, max_slots):
    """Index lists, sorted by length, each padding to at most max_slots (one row at least)."""
    chunk = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if chunk and (len(chunk) + 1) * lengths[i] > max_slots:
            yield chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield chunk


def horizon_nlls(model, wcs, sources, horizons, max_slots=MAX_SLOTS, gistnet=None, gist_levels=()):
    """-> (nll, cos): nll a list of R (H,) float CPU tensors, each WC's per-token horizon NLL; cos
    {level: R floats}, the gist cosine (gist_loss) of each row's forward, for the levels
    given (needs gistnet). The R forwards go in chunks (length_chunks) through horizon_nll."""
    H = horizons[0].numel()
    nll = [None] * len(wcs)
    cos = {level: [0.0] * len(wcs) for level in gist_levels}
    for idx in length_chunks([wc.cost + H - 1 for wc in wcs], max_slots):
        out = horizon_nll(model, [wcs[i] for i in idx], [sources[i] for i in idx], [horizons[i] for i in idx],
                          return_logits=bool(gist_levels))
        rows = (out[0] if gist_levels else out).float().cpu()  # (len(idx), H)
        for j, i in enumerate(idx):
            nll[i] = rows[j]
            for level in gist_levels:  # one row at a time, so every row gets its own cosine
                g = gist_loss(model, gistnet, out[1][j:j + 1], horizons[i][None], level)
                cos[level][i] = g[1].item()
    return nll, cos
