"""
MegaContext weights beside a base checkpoint, and the one place that builds GistNet, LensNet and the MegaPredictor.

A MegaContext run writes the base model exactly as a vanilla run does (model_<step>.pt holds the
spec's key set, so vanilla loaders and upstream nanochat load it unchanged), plus
    mc_<step:06d>.pt   {"mc_config": dict, "gistnet": state_dict, "lensnet": state_dict,
                        "optimizer": the MC AdamW state_dict or None,
                        "predictor": the MegaPredictor state_dict, or None (megaprediction off)}
written atomically before the meta (meta_<step>.json, written last, also carries "megacontext":
the config), so a step with a meta is complete. Vanilla code never looks for mc_*.pt.
"""

import os

from nanochat.common import UserError, atomic_torch_save, check_state_dict, load_torch_file
from nanochat.megacontext.config import MegaContextConfig
from nanochat.megacontext.gistnet import GistNet
from nanochat.megacontext.lensnet import LensNet
from nanochat.megacontext.megaprediction import MegaPredictor


def build_modules(mc_config, model_config, device=None):
    """(GistNet, LensNet) for a base model of `model_config` (GPTConfig), initialized, on device."""
    dim = model_config.n_embd
    gistnet = GistNet(dim, kind=mc_config.gist_kind, pooling=mc_config.gist_pooling, n_layer=mc_config.gist_layers,
                      n_head=model_config.n_head, shared=mc_config.gist_shared, max_level=mc_config.max_level)
    hidden = mc_config.lens_hidden
    lensnet = LensNet(dim, n_layer=mc_config.lens_layers, n_head=4, hidden=hidden,
                      n_tail=mc_config.lens_tail, max_level=mc_config.max_level, recency_cap=mc_config.lens_recency_cap)
    return gistnet.to(device), lensnet.to(device)


def build_predictor(mc_config, model_config, device=None):
    """The MegaPredictor of a --megaprediction run (initialized, on device), None when it is off."""
    if not mc_config.megaprediction:
        return None
    return MegaPredictor(model_config.n_embd, mc_config.max_level).to(device)


def mc_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"mc_{step:06d}.pt")


def save_megacontext(checkpoint_dir, step, mc_config, gistnet, lensnet, optimizer=None, predictor=None):
    os.makedirs(checkpoint_dir, exist_ok=True)
    atomic_torch_save(dict(mc_config=mc_config.to_dict(), gistnet=gistnet.state_dict(), lensnet=lensnet.state_dict(),
                           optimizer=None if optimizer is None else optimizer.state_dict(),
                           predictor=None if predictor is None else predictor.state_dict()), mc_path(checkpoint_dir, step))


def saved_config(data, path):
    """The validated MegaContextConfig a weights file holds; a bad field is one line naming the file."""
    try:
        return MegaContextConfig(**data["mc_config"]).validate()
    except UserError as e:
        raise UserError(f"{path}: mc_config: {e}") from None


def load_megacontext(checkpoint_dir, step, model_config, device):
    """-> (MegaContextConfig, GistNet, LensNet, optimizer state or None) saved at `step`."""
    path = mc_path(checkpoint_dir, step)
    if not os.path.exists(path):
        raise UserError(f"no MegaContext weights at {path} (was this a --megacontext run?)")
    data = load_torch_file(path, device, what="MegaContext weights")
    try:
        mc_config = saved_config(data, path)
        gistnet, lensnet = build_modules(mc_config, model_config, device)
        gistnet.load_state_dict(check_state_dict(data["gistnet"], f"{path} gistnet"), strict=True)
        lensnet.load_state_dict(check_state_dict(data["lensnet"], f"{path} lensnet"), strict=True)
    except UserError:
        raise
    except Exception as e:  # truncated file, foreign keys, shapes of another model
        raise UserError(f"cannot load MegaContext weights {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return mc_config, gistnet, lensnet, data.get("optimizer")


def load_predictor(checkpoint_dir, step, model_config, device):
    """-> the MegaPredictor saved at `step`, or None when that run trained none (files from before
    MegaPrediction included)."""
    path = mc_path(checkpoint_dir, step)
    if not os.path.exists(path):
        raise UserError(f"no MegaContext weights at {path} (was this a --megacontext run?)")
    data = load_torch_file(path, device, what="MegaContext weights")
    try:
        if data.get("predictor") is None:
            return None
        predictor = build_predictor(saved_config(data, path), model_config, device)
        predictor.load_state_dict(check_state_dict(data["predictor"], f"{path} predictor"), strict=True)  # (None.load_state_dict: a config saying megaprediction off)
    except UserError:
        raise
    except Exception as e:  # truncated file, foreign keys, shapes of another model
        raise UserError(f"cannot load MegaPrediction weights {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return predictor


def find_megacontext(source, model_tag, step):
    """(directory, step) of the MegaContext weights for a chat model: mc_<step>.pt beside the loaded
    checkpoint, else those of the checkpoint it was fine-tuned from, followed back through each
    meta's "source" (SFT / RL fine-tune the base model and leave GistNet and LensNet as base training
    made them at that step). Never another step's: weights of a later, incomplete save are not paired."""
    import json
    from nanochat.checkpoint_manager import SOURCE_DIRS
    from nanochat.common import get_base_dir
    kind, tag, at, seen = source, model_tag, step, []
    while True:
        directory = os.path.join(get_base_dir(), SOURCE_DIRS[kind], tag)
        seen.append(mc_path(directory, at))
        if os.path.exists(seen[-1]):
            return directory, at
        meta_path = os.path.join(directory, f"meta_{at:06d}.json")
        try:
            with open(meta_path, encoding="utf-8") as f:
                parent = json.load(f).get("source")
            if parent is None or len(seen) > 4:
                break
            kind, tag, at = parent["kind"], parent.get("model_tag") or tag, int(parent["step"])
            if kind not in SOURCE_DIRS:
                raise ValueError(f"unknown source kind {kind!r}")
        except FileNotFoundError:
            break
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{meta_path}: unreadable source of this checkpoint ({type(e).__name__}: {e})") from None
    raise UserError(f"no MegaContext weights saved with this checkpoint (looked for {', '.join(seen)}): "
                    f"train the base model with --megacontext")


def chat_model_name(source, model_tag, step):
    """The model a chat session's tree or a Core-Knowledge memory is built for (recorded in its files, checked on
    load): its tokens are embedded and its gists made by this checkpoint's weights, so another step of the same
    tag (a later save, an SFT continued) is another model."""
    return f"{source}/{model_tag} step {step}"


def load_for_chat(source, model_tag, step, model, device):
    """-> (MegaContextConfig, GistNet, LensNet, MegaPredictor or None) for a chat model loaded from
    `source`/`model_tag`/`step`, in eval mode; prints where the weights came from."""
    from nanochat.common import print0
    directory, mc_step = find_megacontext(source, model_tag, step)
    mc_config, gistnet, lensnet, _ = load_megacontext(directory, mc_step, model.config, device)
    predictor = load_predictor(directory, mc_step, model.config, device)
    print0(f"megacontext: weights from {mc_path(directory, mc_step)} (w_max {mc_config.w_max}, "
           f"MegaPrediction {'on' if predictor is not None else 'off'})")
    for module in (gistnet, lensnet, predictor):
        if module is not None:
            module.eval()
    return mc_config, gistnet, lensnet, predictor
