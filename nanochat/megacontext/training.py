"""
End-to-end MegaContext training (design: shared/spec/megacontext.md, "End-to-end training").

`MegaContextTrainer.backward(x, y, ...)` takes one pretraining micro-batch, the very (B, T) rows a
vanilla run sees, and backpropagates, on top of the caller's lm_weight * (vanilla next-token loss):
    horizon_weight * horizon loss         the NLL of the next H true tokens after every WC variant, each
                                          such token weighted like one LM token (a sum over the scored
                                          horizon tokens / the rows' LM tokens: otherwise a few dozen
                                          horizon tokens per row would pull as hard as the whole row)
  + alpha_lod1 * LOD1 gist loss (+ alpha_lod2 * LOD2 gist loss, active when H >= 1024)
  + lens_weight * LensNet loss
Per row S of T + 1 tokens: the history is S[:c], the horizon S[c : c+H], where c = split_point(S): the
horizon is the last H tokens of the row's longest document, so that it continues the document most of
the history belongs to (a packed row usually ends in the crop of some short document that just began,
whose next tokens no distant history could help predict).
1. source: the history's gist pyramid, built in the autograd graph (horizon.build_source), so the
   horizon loss reaches GistNet and the token embeddings through every gist a variant uses.
2. slate, every variant of cost <= C2 (variant_budget: annealed from the history length down to w_max):
     baseline   the newest C2 tokens, raw (WorkingContext.recent): a truncated window
     reference  the WC inference starts from (WorkingContext.recency_filled: the history as gists, the
                newest tokens raw as far as C2 allows) for half the rows, a random legal mix (the
                coarsest WC, then random expansions until none fits) for the others
     perturbed  the reference plus 1-2 random edits of its own entries (collapse a group and/or
                expand a gist), within C2; redrawn when it duplicates a variant already in the slate
     lens       (num_variants >= 4, the last slot) LensNet + allocator's own refocus of the reference
   While C2 covers the whole history every variant would be the raw baseline, so only it is scored.
3. one forward of every variant of every row (horizon.horizon_nll): [WC || S[c : c+H-1]], logits only at
   the H slots that predict S[c : c+H]. A baseline beside other variants trains nothing (it feeds no
   LensNet pair): its NLL is the truncation figure, a stat (nll_baseline), so backward() measures it on
   one row per micro-batch, in a forward without autograd; the other rows' baselines are not run (MC
   step 77.0 -> 73.0 GFLOP at cpu_tiny_mc without autograd, -> 71.2 measuring one row in four). A lone
   baseline (C2 holds the whole history) trains.
4. gist losses: 1 - cos(GistNet(soft predicted horizon blocks), GistNet(true horizon blocks)), where
   soft = softmax(logits) @ norm(wte), the embedding the model expects next, in the space gists live
   in, over the variants that train, each weighing 1 / (the slate's variants, baselines included). The
   loss trains the base model only: GistNet is held fixed in it (no gradient to its weights),
   since a constant GistNet would satisfy it trivially (cos = 1) by collapsing every gist to one vector.
5. LensNet scores the reference's entries. The reference and its perturbed / lens variants are the
   reference plus per-entry edits (expanded +1; each member of a collapsed group -1/len(group), so the
   predicted utility of a collapse is minus the mean of its members' scores, what the allocator ranks
   by), measured by DeltaNLL = NLL(variant) - NLL(reference); the loss is pairwise Bradley-Terry and/or
   regression on argmin targets (mc_lens_loss) + lens_reg * lensnet.lens_regularizer.
Masked targets (recall rows, nanochat/recall.py: y is -1 off the answers): only the scored horizon tokens
count, in the horizon loss (their NLL sum over the micro-batch's scored targets, as the LM loss is a
mean over them), in each variant's NLL and so in DeltaNLL; fact_stats then logs where each asked fact
sits (raw in which variants, LensNet's top gist or not), the probes of issue 15.
Compute and memory: a micro-batch's variant slots never exceed their count after annealing (while C2
anneals, a random subset of the rows is scored, weighted up to stand for all of them), so no step costs
more than one after annealing; rows go through in chunks, each backpropagated on its own, so peak memory
stays near the vanilla run's. The cap follows C2 alone, never the row length: on the recall curriculum's
short rows, scoring 3 of 16 left a d2 trunk that never learned to copy in 500 steps (all 16: by step 200).
Randomness: each row's slate RNG is seeded from (seed, step, stream, row), and the rows scored while C2
anneals from (seed, step, stream), so a resumed run draws the same slates, and so does any chunking.
"""

import json
import time
import random

import torch
import torch.nn.functional as F

from nanochat.common import UserError
from nanochat.dataloader import bos_bestfit_loader
from nanochat.optim import load_optimizer_state
from nanochat.megacontext import BLOCK_SIZE
from nanochat.megacontext.allocator import FocusAllocator
from nanochat.megacontext.checkpoint import (build_modules, build_predictor, load_megacontext, load_predictor, mc_path,
                                             save_megacontext)
from nanochat.megacontext.horizon import build_sources, gist_loss, horizon_nll, score_entries, split_point
from nanochat.megacontext.evaluation import validate
from nanochat.megacontext.retrieval import measure_retrieval, retrieval_summary
from nanochat.megacontext.lensnet import (pairwise_lens_loss, regression_lens_loss, lens_targets, lens_regularizer,
                                          lens_agreement, variant_utilities)
from nanochat.megacontext.megaprediction import level_weights, megaprediction_loss, predicted_gist_dnll
from nanochat.megacontext.slate import (Variant, allocator_edits, baseline, fact_stats, gist_pair_cos, perturb_any, reference,
                                        split_memories, variant_budget)

K = BLOCK_SIZE
COMPILE_PAD = 128  # compiled variant forwards pad rows to a multiple of this many slots


class MegaContextTrainer:
    def __init__(self, model, gistnet, lensnet, config, seed=0, bos_id=None, predictor=None):
        """bos_id: the tokenizer's BOS, to find documents in packed rows (None: every horizon is its row's end).
        predictor: the MegaPredictor of a --megaprediction run (its readout loss joins the LM loss in micro_step)."""
        self.model, self.gistnet, self.lensnet, self.config, self.seed = model, gistnet, lensnet, config, seed
        self.bos_id, self.predictor = bos_id, predictor
        self.mp_weights = level_weights(config) if predictor is not None else {}  # {level: alpha}
        self.flops_per_token = model.estimate_flops()  # the trunk's, per slot of a variant forward
        self.gist_flops = 6 * sum(p.numel() for p in gistnet.parameters())  # per history token gisted
        self.forward, self.pad_multiple = model, 1  # the variant forward: eager until compile()

    def compile(self):
        """torch.compile the variant forward (the model over WC slots + horizon): rows padded to a
        multiple of COMPILE_PAD slots, so a run sees few lengths (they vary with the variant budget's
        anneal, then stay at w_max + H - 1 rounded up); the row count varies by chunk, so torch.compile
        makes what changes dynamic after its first recompile. Eager numerics are untouched: only a
        compiled run pads."""
        self.forward, self.pad_multiple = torch.compile(self.model), COMPILE_PAD
        return self

    @classmethod
    def build(cls, model, config, device, bos_id=None, seed=0):
        """A trainer with fresh GistNet, LensNet (and MegaPredictor with config.megaprediction) on device."""
        gistnet, lensnet = build_modules(config, model.config, device)
        return cls(model, gistnet, lensnet, config, seed, bos_id, build_predictor(config, model.config, device))

    def modules(self):
        return [m for m in (self.gistnet, self.lensnet, self.predictor) if m is not None]

    def parameters(self):
        return [p for m in self.modules() for p in m.parameters()]

    def make_optimizer(self):
        """AdamW for every GistNet and LensNet parameter (2-D or not), and the MegaPredictor's at
        GistNet's lr, scheduled like the model's."""
        groups = [dict(params=list(self.gistnet.parameters()), lr=self.config.gist_lr),
                  dict(params=list(self.lensnet.parameters()), lr=self.config.lens_lr)]
        fused = next(self.lensnet.parameters()).device.type == "cuda"  # a mean GistNet has no parameters
        opt = torch.optim.AdamW(groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0, fused=fused)
        if self.predictor is not None:
            opt.add_param_group(dict(params=list(self.predictor.parameters()), lr=self.config.gist_lr))
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
        return opt

    def describe(self, history):
        """The lines base_train prints about this run's MegaContext modules, for histories of `history` tokens."""
        n = lambda m: sum(p.numel() for p in m.parameters())
        lines = [f"megacontext: {json.dumps(self.config.to_dict())}",
                 f"megacontext: GistNet {n(self.gistnet):,} params | LensNet {n(self.lensnet):,} params | history "
                 f"{history} tokens = {history / self.config.w_max:.1f}x w_max"]
        if self.predictor is not None:
            lines.insert(0, f"megaprediction: MegaPredictor {n(self.predictor):,} params | loss weights {self.mp_weights}")
        return lines

    # -------------------------------------------------------------------------
    # what base_train's loop calls: a micro-batch, its log line, validation, saving and resuming

    def micro_step(self, forward, x, y, step, num_iterations, grad_accum_steps=1, stream=0, scored_only=False):
        """One pretraining micro-batch x, y (B, T): the LM loss through `forward` (the model, compiled or
        not) times lm_weight (+ MegaPrediction's readout loss with a predictor), backpropagated, then
        backward() on the same rows. -> (LM loss detached, stats, FLOPs of this rank's micro-batch).
        scored_only: recall rows score only their answers, so the LM head runs there alone."""
        cfg = self.config
        B, T = x.shape
        flops = 0.0
        if self.predictor is None:
            loss = forward(x, y, scored_only=scored_only)
            (cfg.lm_weight * loss / grad_accum_steps).backward()
            mp_cos = {}
        else:  # + sum_L alpha_L * (1 - cos) of the readouts, in the LM loss's backward
            loss, hidden = forward(x, y, return_hidden=True)  # the same forward, also returning the hidden states (B, T, C)
            mp_losses, mp_cos = megaprediction_loss(self.predictor, self.gistnet, self.model, hidden, x, self.mp_weights)
            mp_loss = sum(self.mp_weights[L] * l for L, l in mp_losses.items())
            ((cfg.lm_weight * loss + mp_loss) / grad_accum_steps).backward()
            flops += B * T * (self.gist_flops / 3 + 6 * self.predictor.dim ** 2 / 32)  # per token: the targets' GistNet forward, 1/32 readout
        stats = self.backward(x, y, step, num_iterations, grad_scale=1 / grad_accum_steps, stream=stream)
        slots = stats.get("slots", 0.0) - 2 / 3 * stats.get("frozen_slots", 0.0)  # a frozen slot: its forward, 1/3 of the cost
        flops += stats["rows"] * (slots * self.flops_per_token + (T + 1 - cfg.horizon) * self.gist_flops)
        stats.update({f"mp_cos_lod{L}": c for L, c in mp_cos.items()})
        return loss.detach(), stats, flops

    @staticmethod
    def summarize(micro_stats):
        """The micro-batches' stats -> (their means as {"mc/<key>": float} (NaN: none measured it), the
        text the step's log line adds)."""
        metrics = {}
        for k in micro_stats[0]:
            vals = [st[k] for st in micro_stats if k in st and st[k] == st[k]]
            metrics[f"mc/{k}"] = sum(vals) / len(vals) if vals else float("nan")
        m = metrics
        line = (f" | C2 {m['mc/budget']:.0f} | hz {m['mc/horizon_loss']:.3f} | lens {m['mc/lens_loss']:.3f}"
                f" agree {m['mc/lens_agree']:.2f} | gist cos {m['mc/gist_cos_lod1']:.2f}")
        if "mc/mp_cos_lod1" in m:
            line += f" | mp cos {m['mc/mp_cos_lod1']:.2f}"
        if "mc/fact_lens_top" in m:  # recall rows: is the asked fact raw in a variant, LensNet's top gist?
            line += (f" | fact raw ref {m['mc/fact_raw_reference']:.2f} pert {m['mc/fact_raw_perturbed']:.2f}"
                     f" lens {m['mc/fact_raw_lens']:.2f} top {m['mc/fact_lens_top']:.2f} | pair cos {m['mc/gist_pair_cos']:.2f}")
        if "mc/ckri" in m:
            line += f" | ckri {m['mc/ckri']:.3f}"
        return metrics, line

    @torch.no_grad()
    def validate(self, tokenizer, B, T, device):
        """evaluation.validate on the first config.eval_rows rows of the val split (with a predictor also
        mp_dnll_lod{L}, megaprediction.predicted_gist_dnll on the same rows), the modules in eval mode
        meanwhile. -> ({"mc_val/<key>": float}, the log line's text)."""
        cfg, bos = self.config, tokenizer.get_bos_token_id()
        loader = bos_bestfit_loader(tokenizer, B, T, "val", device=device)
        rows = []
        while sum(len(r) for r in rows) < cfg.eval_rows:
            x, y, _ = next(loader)
            rows.append(torch.cat([x, y[:, -1:]], dim=1))  # (B, T + 1)
        rows = torch.cat(rows)[:cfg.eval_rows]
        modules = [self.model] + self.modules()
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        result = validate(self.model, self.gistnet, self.lensnet, cfg, rows, bos_id=bos)
        if self.predictor is not None:
            dnll = predicted_gist_dnll(self.predictor, self.gistnet, self.model, cfg, rows, bos_id=bos)
            result.update({f"mp_dnll_lod{L}": v for L, v in dnll.items()})
        for m, mode in zip(modules, modes):
            m.train(mode)
        r = result
        line = (f"mc val: NLL trunc {r['nll_trunc']:.3f} | mc {r['nll_mc']:.3f} | full {r['nll_full']:.3f} "
                f"| gap closed {r['gap_closed']:.3f} | LOD1 substitution {r['dnll_lod1']:+.3f} nats"
                + (f" | predicted LOD1 {r['mp_dnll_lod1']:+.3f} nats" if "mp_dnll_lod1" in r else ""))
        return {f"mc_val/{k}": v for k, v in result.items()}, line

    @torch.no_grad()
    def recall(self, docs, device):
        """Exact recall of docs ([(history ids, answer ids)], recall.recall_eval_docs) by
        evaluation.measure_retrieval's three methods -> {"recall/full", "recall/truncation",
        "recall/megacontext", "recall/fact_raw" (the WC held the fact block raw)}."""
        for m in self.modules():
            m.eval()
        histories = [torch.tensor(h, dtype=torch.long, device=device) for h, _ in docs]
        answers = [torch.tensor(a, dtype=torch.long, device=device) for _, a in docs]
        records, _ = measure_retrieval(self.model, self.gistnet, self.lensnet, self.config, histories, answers)
        cells = {m: retrieval_summary(records[m]) for m in ("full", "truncation", "megacontext")}
        out = {f"recall/{m}": cell["acc"] for m, cell in cells.items()}
        out["recall/fact_raw"] = cells["megacontext"].get("fact_raw", float("nan"))
        for m in self.modules():
            m.train()
        return out

    def save(self, checkpoint_dir, step, optimizer):
        save_megacontext(checkpoint_dir, step, self.config, self.gistnet, self.lensnet, optimizer, self.predictor)

    def resume(self, checkpoint_dir, step, optimizer):
        """Load the weights and optimizer state saved at `step`; refuses a checkpoint of other MC settings."""
        saved, gistnet, lensnet, optimizer_state = load_megacontext(checkpoint_dir, step, self.model.config, self.model.get_device())
        if saved != self.config:
            changed = sorted(k for k, v in self.config.to_dict().items() if saved.to_dict()[k] != v)
            raise UserError(f"cannot resume: the checkpoint's MegaContext settings differ in {', '.join(changed)}")
        self.gistnet.load_state_dict(gistnet.state_dict())
        self.lensnet.load_state_dict(lensnet.state_dict())
        if self.predictor is not None:
            self.predictor.load_state_dict(load_predictor(checkpoint_dir, step, self.model.config, self.model.get_device()).state_dict())
        load_optimizer_state(optimizer, optimizer_state, mc_path(checkpoint_dir, step))

    def backward(self, x, y, step, num_iterations, grad_scale=1.0, stream=0, max_slots=None):
        """x, y: (B, T) one loader micro-batch. Backpropagates grad_scale x the MegaContext losses;
        -> stats: dict of floats (row-weighted means over the chunks; "rows": how many were scored).
        While C2 anneals, the variant slots of a micro-batch are capped at their level after annealing:
        only as many rows as fit are scored (one at least, drawn at random), each weighing B / scored,
        so that the loss is an unbiased estimate of every row's. Beside other variants, the first scored
        row's baseline alone is run (nll_baseline). Rows go in chunks of at most max_slots variant slots
        (default B * T)."""
        masked = bool((y < 0).any())  # targets -1 off the answers (recall rows): the horizon is scored where y is
        rows = torch.cat([x, y[:, -1:].clamp(min=0)], dim=1)  # (B, T + 1): the packed rows (a masked last token reads 0)
        weights = (y >= 0).float() if masked else None  # (B, T): target j, row token j + 1, counts or not
        B, n = rows.shape
        H = self.config.horizon
        budget = variant_budget(step, num_iterations, n - H, self.config)
        row_slots = (self.config.num_variants + self.config.cognitive_core) * (budget + H)  # a row's variant slots at most (+ the drop variant)
        scored = min(B, max(1, B * (self.config.w_max + H) // (budget + H)))
        picked = list(range(B)) if scored == B else sorted(random.Random(f"{self.seed}:{step}:{stream}:rows").sample(range(B), scored))
        max_slots = B * (n - 1) if max_slots is None else max_slots
        chunk = max(1, max_slots // row_slots)
        cuts = [split_point(rows[b].tolist(), self.bos_id, H, self.config.w_max) for b in picked]
        totals = {}
        for c0 in range(0, scored, chunk):
            ids = picked[c0:c0 + chunk]
            part = rows[ids]  # (R, T + 1)
            rngs = [random.Random(f"{self.seed}:{step}:{stream}:{b}") for b in ids]  # one per row
            # the caller's LM loss is a mean over its scored targets; each chunk's horizon sum is divided by
            # its share of them, so that the chunks' losses, scaled by R / scored below, add up right
            lm_tokens = None if weights is None else weights.sum().clamp(min=1) * len(ids) / B
            measured = [b == picked[0] for b in ids]  # the truncation baseline, a stat: one row's a micro-batch
            loss, stats = self.loss(part, budget, rngs, cuts[c0:c0 + chunk], None if weights is None else weights[ids], lm_tokens,
                                    measured)
            (loss * grad_scale * len(ids) / scored).backward()
            for k, v in stats.items():
                w = len(ids) if v == v else 0  # a NaN (nothing measured in this chunk) counts for nothing
                s, ws = totals.get(k, (0.0, 0))
                totals[k] = (s + (v * w if w else 0.0), ws + w)
        out = {k: s / w if w else float("nan") for k, (s, w) in totals.items()}
        out.update(budget=budget, rows=scored)
        return out

    def slate(self, sources, budget, rngs):
        """-> (variants, refs, lens_rows, scores, swaps, assembled_refs): variants of every row (baseline
        first, then the reference and its edits; a split row, --cognitive-core, also drop: the
        reference's session segment alone, the CK removed, L_drop of the reliance margin), each row's
        reference WC (None when it is the baseline), the rows that have a reference, LensNet's scores
        (len(lens_rows), E) of their references, the number of edits of each allocator step, and
        {row: its assembled reference}."""
        cfg = self.config
        baselines = [baseline(b, src, budget) for b, src in enumerate(sources)]
        refs = [None] * len(sources)
        if cfg.num_variants >= 2:
            refs = [reference(src, budget, cfg, rng, base.wc) for src, rng, base in zip(sources, rngs, baselines)]
        lens_rows, scores, assembled_refs = self.lens_scores(refs, sources)
        variants, swaps = [], []
        for b, (src, rng, base) in enumerate(zip(sources, rngs, baselines)):
            variants.append(base)
            ref = refs[b]
            if ref is None:
                continue
            variants.append(Variant(b, "reference", ref, {}))
            variants += self.edited_variants(
                b, ref, src, scores[lens_rows.index(b), :len(ref)], {base.wc, ref}, swaps, rng,
                lambda: FocusAllocator.from_config(cfg, w_max=budget, cooldown=0),
                lambda: perturb_any(ref, src, budget, cfg, rng, n_edits=rng.choice((1, 2))))
            if len(src.memories) > 1:
                variants.append(Variant(b, "drop", ref.segment(ref.num_memories - 1), None, src.memories[-1]))
        return variants, refs, lens_rows, scores, swaps, assembled_refs

    def lens_scores(self, refs, sources):
        """-> (lens_rows, scores, assembled): the rows that have a reference, LensNet's scores
        (len(lens_rows), E) of their references' entries (None when no row has one), and {row: its
        reference assembled}, in the autograd graph: the horizon forward reuses it (LensNet's inputs
        are detached by lens_inputs)."""
        lens_rows = [b for b, r in enumerate(refs) if r is not None]
        if not lens_rows:
            return lens_rows, None, {}
        assembled = {b: refs[b].assemble(sources[b]) for b in lens_rows}
        scores, _ = score_entries(self.lensnet, [refs[b] for b in lens_rows], [sources[b] for b in lens_rows],
                                  [assembled[b] for b in lens_rows])
        return lens_rows, scores, assembled

    def edited_variants(self, b, ref, source, row_scores, seen, swaps, rng, make_allocator, perturb_once):
        """The num_variants - 2 edits of row b's reference: in the last slot (num_variants >= 4) one step
        of make_allocator() on LensNet's scores (kind lens, its edit count appended to swaps), elsewhere,
        or when that gives a WC already in `seen`, perturb_once() (up to 4 draws for a new one). -> Variants."""
        cfg, out = self.config, []
        for k in range(cfg.num_variants - 2):
            wc = None
            if cfg.num_variants >= 4 and k == cfg.num_variants - 3:  # the last slot: LensNet + allocator
                wc, steps = make_allocator().step(ref, row_scores, source, generator=torch.Generator().manual_seed(rng.getrandbits(62)))
                swaps.append(len(steps))
                kind, edits = "lens", allocator_edits(steps)
            if wc is None or wc in seen:
                for _ in range(4):
                    wc, edits = perturb_once()
                    if wc not in seen:
                        break
                kind = "perturbed"
            if wc not in seen:
                seen.add(wc)
                out.append(Variant(b, kind, wc, edits))
        return out

    def loss(self, rows, budget, rngs, cuts=None, weights=None, lm_tokens=None, measured=None):
        """rows (R, T + 1), rngs: one random.Random per row, cuts: each row's split point (default: the
        row's last H tokens are the horizon), weights (R, T): 1 where row token j + 1 is a scored target
        (None: all are), lm_tokens: the LM tokens the horizon sum is divided by (default R * T), measured:
        R bools, the rows whose baseline is run beside their other variants (default: every row)
        -> (scalar loss to backpropagate, stats dict of floats, NaN = nothing measured)."""
        cfg, model = self.config, self.model
        H = cfg.horizon
        cuts = [rows.size(1) - H] * len(rows) if cuts is None else cuts
        if cfg.cognitive_core:  # each history as a Core-Knowledge memory and a session
            sources = [split_memories(model, self.gistnet, row[:c], cfg.max_level, rng) for row, c, rng in zip(rows, cuts, rngs)]
        else:
            sources = build_sources(model, self.gistnet, [row[:c] for row, c in zip(rows, cuts)], cfg.max_level)
        horizons = [row[c:c + H] for row, c in zip(rows, cuts)]
        t0 = time.perf_counter()
        variants, refs, lens_rows, scores, swaps, assembled_refs = self.slate(sources, budget, rngs)
        controller_s = time.perf_counter() - t0

        # a lone baseline (C2 holds the whole history) trains; beside other variants it is a stat, measured
        # without autograd where asked (step 3). The drop variant (--cognitive-core) is a measurement too:
        # trained, it would teach the model to do without the CK, against the reliance margin below
        in_slate = len(variants)
        beside = lambda v: v.kind == "baseline" and refs[v.row] is not None
        if measured is not None:
            variants = [v for v in variants if not beside(v) or measured[v.row]]
        frozen = [beside(v) or v.kind == "drop" for v in variants]
        nll, logits = self.score(variants, sources, horizons, assembled_refs, frozen)  # (Rv, H), (Rt, H, V)
        if weights is None:
            item_nll = nll.mean(dim=1)  # (Rv,)
        else:  # only the scored horizon tokens count: horizon token i of row b is target c_b - 1 + i
            w = torch.stack([weights[v.row, cuts[v.row] - 1:cuts[v.row] - 1 + H] for v in variants])  # (Rv, H)
            nll = nll * w
            item_nll = nll.sum(dim=1) / w.sum(dim=1).clamp(min=1)  # (Rv,)
        row_of = torch.tensor([v.row for v in variants], device=item_nll.device)
        per_row = torch.zeros(len(rows), device=item_nll.device).index_add(0, row_of, item_nll)
        per_row = per_row / torch.bincount(row_of, minlength=len(rows))
        # every scored horizon token weighs horizon_weight x one next-token (LM) token of these rows: the
        # caller's LM loss is a mean over R * (n - 1) tokens, so divide this sum by the same count
        lm_tokens = len(rows) * (rows.size(1) - 1) if lm_tokens is None else lm_tokens
        loss = cfg.horizon_weight * nll.sum() / lm_tokens
        nan = float("nan")
        stats = dict(horizon_loss=per_row.mean().item(), history=sum(cuts) / len(cuts),
                     gist_pair_cos=gist_pair_cos([m for src in sources for m in src.memories]))
        for kind in ("baseline", "reference", "perturbed", "lens", "drop"):
            sel = [i for i, v in enumerate(variants) if v.kind == kind]
            stats[f"nll_{kind}"] = item_nll[sel].mean().item() if sel else nan
        if cfg.cognitive_core:  # CK reliance: L_drop > L_full + margin, pushed by lowering L_full (L_drop detached)
            full = [i for i, v in enumerate(variants) if v.kind == "reference"]
            drop = [i for i, v in enumerate(variants) if v.kind == "drop"]  # the same rows, in the same order
            stats.update(ck_margin_loss=nan, ckri=nan)
            if full:
                l_full, l_drop = item_nll[full], item_nll[drop].detach()
                margin_loss = F.relu(l_full - l_drop + cfg.ck_margin).mean()
                loss = loss + cfg.ck_weight * margin_loss
                mean_full, mean_drop = l_full.mean().item(), l_drop.mean().item()
                stats.update(ck_margin_loss=margin_loss.item(), ckri=(mean_drop - mean_full) / mean_full)  # as mc_eval --task ck

        # the gist losses of the variants that train, each weighing 1 / in_slate: their scale does not depend
        # on how many baselines were measured
        trained = [i for i, f in enumerate(frozen) if not f]
        targets = torch.stack([horizons[variants[i].row] for i in trained])  # (Rt, H)
        for level, alpha in ((1, cfg.alpha_lod1), (2, cfg.alpha_lod2)):
            g = gist_loss(model, self.gistnet, logits, targets, level) if level <= cfg.max_level else None
            stats[f"gist_cos_lod{level}"] = g[1].item() if g is not None else nan
            if g is not None and alpha > 0:
                loss = loss + alpha * g[0] * len(trained) / in_slate

        slots = [v.wc.cost + H - 1 for v in variants]  # each variant's forward slots
        stats.update(lens_loss=nan, lens_agree=nan, swap_rate=sum(swaps) / len(swaps) if swaps else nan,
                     variants=len(variants) / len(rows), slots=sum(slots) / len(rows),
                     frozen_slots=sum(n for n, f in zip(slots, frozen) if f) / len(rows),
                     budget_util=sum(v.wc.cost for v in variants) / len(variants) / budget,
                     controller_ms=1000 * controller_s)
        if weights is not None and not cfg.cognitive_core:
            stats.update(fact_stats(rows, cuts, weights, H, variants, refs, lens_rows, scores))
        if lens_rows:
            lens_loss, lens_stats = self.lens_loss(variants, refs, lens_rows, scores, item_nll.detach(), sources)
            stats.update(lens_stats)
            loss = loss + cfg.lens_weight * lens_loss
        return loss, stats

    def score(self, variants, sources, horizons, assembled_refs, frozen):
        """-> (every variant's horizon NLL (Rv, H), in variant order; the logits (Rt, H, V) of the variants
        that train, in variant order). The frozen ones (a list of bools) run in a forward without
        autograd, the others in one that backpropagates; only the latter's logits feed a loss."""
        out = []
        for grad in (True, False):
            idx = [i for i, f in enumerate(frozen) if f != grad]
            if not idx:
                continue
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                vs = [variants[i] for i in idx]
                nll, logits, _ = horizon_nll(self.model, [v.wc for v in vs], [v.source or sources[v.row] for v in vs],
                                             [horizons[v.row] for v in vs], return_logits=True,
                                             assembled=[assembled_refs[v.row] if v.kind == "reference" else None for v in vs],
                                             forward=self.forward, pad_multiple=self.pad_multiple)
            out.append((idx, nll, logits))
        trained_logits = out[0][2]  # every slate has a variant that trains: a lone baseline, or the reference
        if len(out) == 1:
            return out[0][1], trained_logits
        order = torch.tensor([i for idx, _, _ in out for i in idx], device=out[0][1].device).argsort()
        return torch.cat([o[1] for o in out])[order], trained_logits

    def lens_loss(self, variants, refs, lens_rows, scores, item_nll, sources):
        """The LensNet loss over the rows that have a reference, and its stats."""
        cfg = self.config
        device = scores.device
        per_row = [[i for i, v in enumerate(variants) if v.row == b and v.kind not in ("baseline", "drop")] for b in lens_rows]
        L, V, E = len(lens_rows), max(len(p) for p in per_row), scores.size(1)
        edits = torch.zeros(L, V, E, device=device)
        delta = torch.zeros(L, V, device=device)
        valid = torch.zeros(L, V, dtype=torch.bool, device=device)
        mask = torch.zeros(L, E, dtype=torch.bool, device=device)
        can_expand, can_collapse = mask.clone(), mask.clone()
        mix = {}
        for j, (b, items) in enumerate(zip(lens_rows, per_row)):
            ref = refs[b]
            where = {e: i for i, e in enumerate(ref.entries)}
            session = len(sources[b].memories) - 1  # recent tokens are the session's
            protect_from = sources[b].memories[-1].num_tokens - cfg.recent_tokens
            for i, e in enumerate(ref.entries):
                protected = e.parent.end > protect_from and e.memory == session
                mask[j, i] = True
                can_expand[j, i] = e.level > 0
                can_collapse[j, i] = e.level < cfg.max_level and not protected and e.cost in (1, K)
                mix[e.level] = mix.get(e.level, 0) + 1
            for s, i in enumerate(items):  # items[0] is the reference itself (no edits)
                for entry, value in variants[i].edits.items():
                    edits[j, s, where[entry]] = value
                delta[j, s] = item_nll[i] - item_nll[items[0]]
                valid[j, s] = True
        if cfg.lens_loss in ("pairwise", "both"):
            loss = pairwise_lens_loss(scores, edits, delta, valid)
        else:
            loss = scores.new_zeros(())
        if cfg.lens_loss in ("regression", "both"):
            targets, supervised = lens_targets(edits, delta, lam=cfg.lens_lambda, valid=valid)
            loss = loss + regression_lens_loss(scores, targets, supervised & mask)
        supervised = (edits != 0).any(dim=1)
        loss = loss + cfg.lens_reg * lens_regularizer(scores, mask, can_expand, can_collapse, supervised)
        agree, pairs = lens_agreement(variant_utilities(scores.detach().float(), edits), delta, valid)
        n_entries = sum(mix.values())
        stats = dict(lens_loss=loss.item(), lens_agree=agree / pairs if pairs else float("nan"),
                     **{f"lod{lvl}_frac": mix.get(lvl, 0) / n_entries for lvl in range(cfg.max_level + 1)})
        return loss, stats
