"""
MegaContext weights beside a base checkpoint, and the one place that builds GistNet + LensNet.

A MegaContext run writes the base model exactly as a vanilla run does (model_<step>.pt holds the
spec's key set, so vanilla loaders and upstream nanochat load it unchanged), plus
    mc_<step:06d>.pt   {"mc_config": dict, "gistnet": state_dict, "lensnet": state_dict,
                        "optimizer": the MC AdamW state_dict or None}
written atomically before the meta (meta_<step>.json, written last, also carries "megacontext":
the config), so a step with a meta is complete. Vanilla code never looks for mc_*.pt.
"""

import os

import torch

from nanochat.common import UserError, atomic_torch_save
from nanochat.megacontext.config import MegaContextConfig
from nanochat.megacontext.gistnet import GistNet
from nanochat.megacontext.lensnet import LensNet


def build_modules(mc_config, model_config, device=None):
    """(GistNet, LensNet) for a base model of `model_config` (GPTConfig), initialized, on device."""
    dim = model_config.n_embd
    gistnet = GistNet(dim, kind=mc_config.gist_kind, pooling=mc_config.gist_pooling, n_layer=mc_config.gist_layers,
                      n_head=model_config.n_head, shared=mc_config.gist_shared, max_level=mc_config.max_level)
    hidden = mc_config.lens_hidden
    lensnet = LensNet(dim, n_layer=mc_config.lens_layers, n_head=4, hidden=hidden,
                      n_tail=mc_config.lens_tail, max_level=mc_config.max_level)
    return gistnet.to(device), lensnet.to(device)


def mc_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"mc_{step:06d}.pt")


def save_megacontext(checkpoint_dir, step, mc_config, gistnet, lensnet, optimizer=None):
    os.makedirs(checkpoint_dir, exist_ok=True)
    atomic_torch_save(dict(mc_config=mc_config.to_dict(), gistnet=gistnet.state_dict(), lensnet=lensnet.state_dict(),
                           optimizer=None if optimizer is None else optimizer.state_dict()), mc_path(checkpoint_dir, step))


def load_megacontext(checkpoint_dir, step, model_config, device):
    """-> (MegaContextConfig, GistNet, LensNet, optimizer state or None) saved at `step`."""
    path = mc_path(checkpoint_dir, step)
    if not os.path.exists(path):
        raise UserError(f"no MegaContext weights at {path} (was this a --megacontext run?)")
    try:
        data = torch.load(path, map_location=device, weights_only=True)
        mc_config = MegaContextConfig(**data["mc_config"]).validate()
        gistnet, lensnet = build_modules(mc_config, model_config, device)
        gistnet.load_state_dict(data["gistnet"], strict=True)
        lensnet.load_state_dict(data["lensnet"], strict=True)
    except UserError:
        raise
    except Exception as e:  # truncated file, foreign keys, shapes of another model
        raise UserError(f"cannot load MegaContext weights {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return mc_config, gistnet, lensnet, data.get("optimizer")
