"""MegaContext settings (nanochat/megacontext/config.py) and the one switch in base_train."""

import os
import glob
import tomllib

import pytest

from nanochat.common import UserError
from conftest import run_fresh_python
from nanochat.megacontext.config import MegaContextConfig, from_args
from scripts import base_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MC_PRESETS = sorted(glob.glob(os.path.join(REPO, "configs", "*_mc.toml")))


def test_every_size_has_a_vanilla_and_a_megacontext_preset_with_the_same_trunk_and_budget():
    assert len(MC_PRESETS) >= 3
    for mc_path in MC_PRESETS:
        vanilla_path = mc_path.replace("_mc.toml", ".toml")
        assert os.path.exists(vanilla_path), vanilla_path
        with open(mc_path, "rb") as f:
            mc = tomllib.load(f)
        with open(vanilla_path, "rb") as f:
            vanilla = tomllib.load(f)
        shared = {k: v for k, v in mc.items() if k != "megacontext" and not k.startswith("mc_")}
        assert shared == vanilla, f"{mc_path} must differ from {vanilla_path} only in MegaContext keys"
        args = base_train.parse_args(["--config", mc_path])
        config = from_args(args)
        assert args.megacontext and isinstance(config, MegaContextConfig)
        assert config.w_max * 4 <= args.max_seq_len  # the history is several times the working context
        assert {f"mc_{k}" for k in config.to_dict()} <= set(mc), f"{mc_path} must list every mc_* setting"
        assert from_args(base_train.parse_args(["--config", vanilla_path])) is None


def test_flags_override_the_preset_and_bad_values_are_one_line_errors():
    args = base_train.parse_args(["--config", MC_PRESETS[0], "--mc-w-max", "96", "--mc-gist-shared", "false"])
    config = from_args(args)
    assert config.w_max == 96 and config.gist_shared is False
    args = base_train.parse_args(["--megacontext"])  # the switch alone: the defaults
    assert from_args(args) == MegaContextConfig()
    for flag, value, message in [("--mc-w-max", "16", "w_max"), ("--mc-horizon", "50", "horizon"),
                                 ("--mc-gist-kind", "rnn", "gist_kind"), ("--mc-allocator", "best", "allocator")]:
        with pytest.raises(UserError, match=message):
            from_args(base_train.parse_args(["--megacontext", flag, value]))


def test_vanilla_runs_reject_megacontext_settings(tmp_path):
    with pytest.raises(SystemExit):
        base_train.parse_args(["--mc-w-max", "64"])  # no --megacontext: the flag does not exist
    cfg = tmp_path / "p.toml"
    cfg.write_text("depth = 3\nmc_w_max = 64\n")
    with pytest.raises(UserError, match="need megacontext = true"):
        base_train.parse_args(["--config", str(cfg)])


def test_vanilla_parsing_never_imports_megacontext():
    code = ("import sys\nfrom scripts import base_train\nbase_train.parse_args(['--config', 'configs/d12.toml'])\n"
            "assert not any(k.startswith('nanochat.megacontext') for k in sys.modules)\n"
            "base_train.parse_args(['--config', 'configs/d12_mc.toml'])\n"
            "assert 'nanochat.megacontext.config' in sys.modules\n")
    r = run_fresh_python(code)
    assert r.returncode == 0, r.stderr


def test_megaprediction_is_a_megacontext_setting_with_a_shorthand_flag():
    assert from_args(base_train.parse_args(["--megacontext"])).megaprediction is False
    assert from_args(base_train.parse_args(["--megacontext", "--megaprediction"])).megaprediction is True
    assert from_args(base_train.parse_args(["--megacontext", "--mc-megaprediction", "true"])).megaprediction is True
    assert from_args(base_train.parse_args(["--config", MC_PRESETS[0], "--megaprediction"])).megaprediction is True  # the preset's switch
    with pytest.raises(UserError, match="--megaprediction needs --megacontext"):
        base_train.parse_args(["--megaprediction"])
    with pytest.raises(UserError, match="mc_mp_alpha_lod1 and mc_mp_alpha_lod2 must be >= 0"):
        from_args(base_train.parse_args(["--megacontext", "--megaprediction", "--mc-mp-alpha-lod2", "-0.01"]))
