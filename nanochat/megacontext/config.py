"""
MegaContext settings: one dataclass, its command-line flags and its TOML keys.

A run is vanilla unless `--megacontext` (or `megacontext = true` in a `--config` preset) is given.
Every field below is also a flag `--mc-<field>` and a preset key `mc_<field>`; flags override the
preset, which overrides these defaults. configs/*_mc.toml hold a preset per model size.
"""

import math
import argparse
from dataclasses import dataclass, fields, asdict

from nanochat.common import UserError
from nanochat.megacontext import BLOCK_SIZE


TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
MAX_SIZES = dict(w_max=1 << 16, horizon=1 << 16, num_variants=1 << 10, gist_layers=64, lens_layers=64,
                 lens_hidden=1 << 16, lens_tail=1 << 16, n_diff=1 << 16)  # no real run comes near; past them a typo


@dataclass
class MegaContextConfig:
    # working context
    w_max: int = 512                 # WC budget in slots (a token costs 1, a gist of any level 1)
    max_level: int = 2               # deepest gist level built (LOD2 = 1024 tokens per gist)
    recent_tokens: int = 64          # the newest tokens always stay raw (LOD0)
    # GistNet
    gist_kind: str = "transformer"   # mean | linear | mlp | transformer
    gist_pooling: str = "query"      # mean | query | cls (transformer only)
    gist_layers: int = 2             # bidirectional blocks in the transformer GistNet
    gist_shared: bool = True         # one GistNet for every level (False: one per level)
    # LensNet
    lens_layers: int = 2
    lens_hidden: int = 256           # LensNet width (its input is projected from the model's dim)
    lens_tail: int = 4               # tail gists summarizing the newest content
    lens_recency_cap: int = 0        # entries more than this many back share one recency code (0: no cap), so
                                     # a LensNet trained on short histories scores old entries alike at any length
    # Focus allocator
    allocator: str = "greedy"        # greedy | stochastic
    temperature: float = 1.0         # stochastic: softmax temperature over |score|
    top_k: int = 4                   # stochastic: candidates of a kind it may draw from
    tau_expand: float = 0.1          # expand a gist scored above this; LensNet scores lie in (-1, 1), so >= 1: never expand
    tau_collapse: float = 0.1        # collapse a group whose mean score is below -this (>= 1: never collapse)
    n_diff: int = 4                  # edits per refocus
    cooldown: int = 2                # refocus steps before a node may flip back
    # training (base_train --megacontext)
    horizon: int = 64                # H: teacher-forced tokens scored after each WC (a multiple of 32)
    num_variants: int = 4            # WC variants per sequence, the recent-tokens baseline included
    alpha_lod1: float = 0.02         # weight of the LOD1 gist cosine loss
    alpha_lod2: float = 0.01         # weight of the LOD2 gist cosine loss
    lens_weight: float = 0.1         # weight of the LensNet loss
    lm_weight: float = 1.0           # weight of the vanilla next-token loss on the full rows (0: horizon loss only)
    horizon_weight: float = 1.0      # a scored horizon token (of any WC variant) weighs this x one LM token
    anneal_frac: float = 0.3         # variant budget C2 goes from the history length to w_max over this fraction of steps
    lens_loss: str = "pairwise"      # pairwise (Bradley-Terry) | regression (argmin targets) | both
    lens_lambda: float = 0.01        # regression targets: distance penalty per edit in the argmin
    lens_reg: float = 0.1            # weight of the legality + zero-sum budget + hysteresis regularizers
    gist_lr: float = 3e-3            # AdamW lr of GistNet (scheduled like the model's)
    lens_lr: float = 1e-3            # AdamW lr of LensNet
    eval_rows: int = 16              # validation rows scored on the MegaContext path at each eval
    # MegaPrediction (base_train --megaprediction): readouts predict the next block's gist (megaprediction.py)
    megaprediction: bool = False
    mp_alpha_lod1: float = 0.03      # weight of the LOD1 readout cosine loss
    mp_alpha_lod2: float = 0.02      # weight of the LOD2 readout cosine loss
    # cognitive core: Core-Knowledge memories beside the session's (composite.py)
    ck_min_session_share: float = 0.5  # the part of the WC budget kept for the session when CK memories are attached (>= 0.5)
    ck_diversity: float = 0.1        # an expansion's score penalty per w_max its memory already holds
    cognitive_core: bool = False     # base_train --cognitive-core: each history as a CK memory + a session (training.py)
    ck_margin: float = 0.1           # the reliance margin m (nats): L_drop > L_full + m
    ck_weight: float = 0.1           # weight of the reliance margin loss

    def validate(self):
        """Raise UserError (one line) for a setting that cannot work: a value of the wrong type (a
        preset's or a checkpoint's), not finite, past the sizes in MAX_SIZES, or out of its range."""
        for f in fields(self):
            value = getattr(self, f.name)
            ok = {bool: type(value) is bool, int: type(value) is int, str: isinstance(value, str),
                  float: type(value) in (int, float) and math.isfinite(value)}[f.type]
            if not ok:
                raise UserError(f"mc_{f.name} must be {TYPE_NAMES[f.type]}, got {value!r}")
            if f.name in MAX_SIZES and value > MAX_SIZES[f.name]:
                raise UserError(f"mc_{f.name} {value:,} is above {MAX_SIZES[f.name]:,}")
        checks = [
            (self.w_max >= 2 * BLOCK_SIZE, f"mc_w_max must be at least {2 * BLOCK_SIZE}, got {self.w_max}"),
            (1 <= self.max_level <= 6, f"mc_max_level must be in 1..6, got {self.max_level}"),
            (0 <= self.recent_tokens <= self.w_max - BLOCK_SIZE, f"mc_recent_tokens must be in 0..w_max-{BLOCK_SIZE}, got {self.recent_tokens}"),
            (self.gist_kind in ("mean", "linear", "mlp", "transformer"), f"mc_gist_kind must be mean, linear, mlp or transformer, got {self.gist_kind!r}"),
            (self.gist_pooling in ("mean", "query", "cls"), f"mc_gist_pooling must be mean, query or cls, got {self.gist_pooling!r}"),
            (self.gist_layers >= 1 and self.lens_layers >= 1, "mc_gist_layers and mc_lens_layers must be at least 1"),
            (self.lens_tail >= 0, f"mc_lens_tail must be >= 0, got {self.lens_tail}"),
            (self.lens_recency_cap >= 0, f"mc_lens_recency_cap must be >= 0 (0: no cap), got {self.lens_recency_cap}"),
            (self.lens_hidden >= 4 and self.lens_hidden % 4 == 0, f"mc_lens_hidden must be a positive multiple of 4, got {self.lens_hidden}"),
            (self.temperature > 0 and self.top_k >= 1, "mc_temperature must be > 0 and mc_top_k >= 1"),
            (self.lens_loss in ("pairwise", "regression", "both"), f"mc_lens_loss must be pairwise, regression or both, got {self.lens_loss!r}"),
            (0 <= self.anneal_frac <= 1, f"mc_anneal_frac must be in [0, 1], got {self.anneal_frac}"),
            (min(self.lm_weight, self.horizon_weight, self.lens_lambda, self.lens_reg) >= 0 and self.gist_lr > 0 and self.lens_lr > 0,
             "mc_lm_weight, mc_horizon_weight, mc_lens_lambda, mc_lens_reg must be >= 0 and the learning rates > 0"),
            (self.eval_rows >= 0, f"mc_eval_rows must be >= 0, got {self.eval_rows}"),
            (self.allocator in ("greedy", "stochastic"), f"mc_allocator must be greedy or stochastic, got {self.allocator!r}"),
            (self.tau_expand >= 0 and self.tau_collapse >= 0, "mc_tau_expand and mc_tau_collapse must be >= 0"),
            (self.n_diff >= 1 and self.cooldown >= 0, "mc_n_diff must be >= 1 and mc_cooldown >= 0"),
            (self.horizon >= BLOCK_SIZE and self.horizon % BLOCK_SIZE == 0, f"mc_horizon must be a positive multiple of {BLOCK_SIZE}, got {self.horizon}"),
            (self.num_variants >= 1, f"mc_num_variants must be at least 1, got {self.num_variants}"),
            (min(self.alpha_lod1, self.alpha_lod2, self.lens_weight) >= 0, "loss weights must be >= 0"),
            (min(self.mp_alpha_lod1, self.mp_alpha_lod2) >= 0, f"mc_mp_alpha_lod1 and mc_mp_alpha_lod2 must be >= 0, got {self.mp_alpha_lod1}, {self.mp_alpha_lod2}"),
            (self.ck_margin >= 0 and self.ck_weight >= 0, f"mc_ck_margin and mc_ck_weight must be >= 0, got {self.ck_margin}, {self.ck_weight}"),
            (0.5 <= self.ck_min_session_share < 1 and self.ck_diversity >= 0,
             f"mc_ck_min_session_share must be in [0.5, 1) and mc_ck_diversity >= 0, got {self.ck_min_session_share}, {self.ck_diversity}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self

    def to_dict(self):
        return asdict(self)


def _bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_args(parser):
    """One --mc-<field> flag per MegaContextConfig field (dest mc_<field>). The script itself
    defines --megacontext (store_true) and calls this only when it is on, so a vanilla run
    never imports this package."""
    group = parser.add_argument_group("MegaContext (with --megacontext)")
    for f in fields(MegaContextConfig):
        kind = _bool if f.type is bool else f.type
        group.add_argument(f"--mc-{f.name.replace('_', '-')}", dest=f"mc_{f.name}", type=kind, default=f.default)


def from_args(args):
    """The validated MegaContextConfig of parsed args, or None for a vanilla run."""
    if not args.megacontext:
        return None
    return MegaContextConfig(**{f.name: getattr(args, f"mc_{f.name}") for f in fields(MegaContextConfig)}).validate()
