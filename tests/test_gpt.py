import math

import pytest
import torch
import torch.nn.functional as F

from nanochat.megacontext.positions import slot_rotary
from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig, attend, window_sizes, has_value_embedding
from conftest import jitter, run_fresh_python


def tiny_config(**kw):
    base = dict(sequence_len=256, vocab_size=300, n_layer=3, n_head=2, n_kv_head=1, n_embd=128, window_pattern="SL")
    base.update(kw)
    return GPTConfig(**base)


def make_model(seed=0, perturb=True, **kw):
    torch.manual_seed(seed)
    model = GPT(tiny_config(**kw))
    model.init_weights()
    if perturb:  # spec init zeroes c_proj and smear_lambda; make every term matter
        jitter(model.parameters(), 0.02)
    return model


def test_logits_shape_dtype_and_softcap():
    model = make_model()
    idx = torch.randint(0, 300, (2, 40))
    logits = model(idx)
    assert logits.shape == (2, 40, 300) and logits.dtype == torch.float32
    assert logits.abs().max() < 15.0


def test_loss_matches_cross_entropy_and_ignore_index():
    model = make_model()
    idx = torch.randint(0, 300, (2, 30))
    targets = torch.randint(0, 300, (2, 30))
    targets[0, :5] = -1
    logits = model(idx)
    expected = F.cross_entropy(logits.view(-1, 300), targets.view(-1), ignore_index=-1)
    assert torch.allclose(model(idx, targets), expected, atol=1e-6)
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (2, 30)
    assert torch.all(per_token[0, :5] == 0)
    assert torch.allclose(per_token.sum() / (targets >= 0).sum(), expected, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])  # base_train's recall rows / chat_sft
def test_scored_only_gives_the_same_loss_and_gradients_from_the_scored_targets_alone(reduction):
    model = make_model()
    idx = torch.randint(0, 300, (2, 30))
    targets = torch.full((2, 30), -1)
    targets[0, 3:6], targets[1, 20:22] = torch.randint(0, 300, (3,)), torch.randint(0, 300, (2,))
    full = model(idx, targets, loss_reduction=reduction)
    full.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sparse = model(idx, targets, loss_reduction=reduction, scored_only=True)
    sparse.backward()
    assert sparse.item() == pytest.approx(full.item(), rel=1e-6)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)


def test_causal_future_tokens_do_not_change_past_logits():
    model = make_model()
    idx = torch.randint(0, 300, (1, 50))
    changed = idx.clone()
    changed[0, 30:] = (changed[0, 30:] + 7) % 300
    a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :30], b[:, :30], atol=1e-5)
    assert not torch.allclose(a[:, 30:], b[:, 30:], atol=1e-3)


def test_window_sizes_rule():
    assert window_sizes(tiny_config(sequence_len=2048, n_layer=5, window_pattern="SSSL")) == [512, 512, 512, 2048, 2048]
    assert window_sizes(tiny_config(sequence_len=256, n_layer=3, window_pattern="SL")) == [128, 256, 256]
    assert window_sizes(tiny_config(sequence_len=1000, n_layer=2, window_pattern="S")) == [256, 1000]


def test_attend_matches_explicit_window_softmax():
    torch.manual_seed(0)
    B, H, Hkv, T, D, w = 2, 4, 2, 20, 8, 5
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    out = attend(q, k, v, w)
    kr, vr = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    scores = q @ kr.transpose(-1, -2) / math.sqrt(D)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    scores = scores.masked_fill(~((i >= j) & (i - j <= w)), float("-inf"))
    expected = scores.softmax(-1) @ vr
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(attend(q, k, v, 10 * T), F.scaled_dot_product_attention(q, kr, vr, is_causal=True), atol=1e-5)



@pytest.mark.filterwarnings("ignore:.*flex_attention.*")
@pytest.mark.parametrize("Tq, Tk, window, heads", [(256, 256, 64, (4, 2)), (200, 200, 37, (2, 2)), (1, 300, 128, (4, 1)),
                                                   (64, 320, 128, (4, 2)), (130, 130, 128, (2, 1))])
def test_flex_window_path_equals_the_mask_path(monkeypatch, Tq, Tk, window, heads):
    """The CUDA path (flex_attention with a block mask) against the SDPA mask path, forward, on a CPU
    (flex_attention has no CPU backward: its gradients are checked on CUDA only, below). Full and
    ragged blocks, decode (Tq 1), a query chunk at the end of a longer cache, GQA and MQA."""
    torch.manual_seed(0)
    H, Hkv = heads
    q, k, v = torch.randn(2, H, Tq, 32), torch.randn(2, Hkv, Tk, 32), torch.randn(2, Hkv, Tk, 32)
    monkeypatch.setenv("NANOCHAT_FLEX", "0")
    want = attend(q, k, v, window)
    monkeypatch.setenv("NANOCHAT_FLEX", "1")
    import nanochat.gpt as gpt_module
    calls, kernel = [], gpt_module.flex_kernel
    monkeypatch.setattr(gpt_module, "flex_kernel", lambda device_type: calls.append(device_type) or kernel(device_type))
    got = attend(q, k, v, window)
    assert calls == ["cpu"]  # the flex path ran, not the mask path again
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:.*flex_attention.*")
def test_a_model_with_short_windows_gives_the_same_logits_through_flex(monkeypatch):
    model = make_model(n_layer=4, window_pattern="SSSL")
    x = torch.randint(0, 300, (2, 256))
    with torch.no_grad():
        monkeypatch.setenv("NANOCHAT_FLEX", "0")
        want = model(x)
        monkeypatch.setenv("NANOCHAT_FLEX", "1")
        got = model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention's backward needs CUDA")
def test_flex_window_path_gradients_equal_the_mask_path_on_cuda(monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, h, 512, 64, device="cuda", requires_grad=True) for h in (4, 2, 2))
    grads = []
    for flag in ("0", "1"):
        monkeypatch.setenv("NANOCHAT_FLEX", flag)
        y = attend(q, k, v, 128)
        grads.append((y, *torch.autograd.grad(y.square().sum(), (q, k, v))))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


def test_value_embedding_layers_and_state_dict_keys():
    assert [has_value_embedding(i, 4) for i in range(4)] == [False, True, False, True]
    assert [has_value_embedding(i, 3) for i in range(3)] == [True, False, True]
    model = make_model(perturb=False)
    sd = model.state_dict()
    assert set(k for k in sd if k.startswith("value_embeds")) == {"value_embeds.0.weight", "value_embeds.2.weight"}
    assert sd["lm_head.weight"].shape == (320, 128) and sd["transformer.wte.weight"].shape == (320, 128)  # padded to 64
    assert sd["transformer.h.0.attn.ve_gate.weight"].shape == (1, 12)
    assert "transformer.h.1.attn.ve_gate.weight" not in sd
    assert sd["smear_gate.weight"].shape == (1, 24)
    assert not any("cos" in k or "sin" in k or "bias" in k for k in sd)


def test_init_matches_spec():
    model = make_model(perturb=False, n_layer=4)
    for block in model.transformer.h:
        assert torch.all(block.attn.c_proj.weight == 0) and torch.all(block.mlp.c_proj.weight == 0)
        bound = math.sqrt(3 / 128)
        assert block.attn.c_q.weight.abs().max() <= bound and block.mlp.c_fc.weight.abs().max() <= 0.4 * bound
    assert torch.allclose(model.resid_lambdas, torch.tensor([1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05]))
    assert torch.allclose(model.x0_lambdas, torch.tensor([0.20, 0.15, 0.10, 0.05]))
    assert model.smear_lambda.item() == 0 and abs(model.backout_lambda.item() - 0.2) < 1e-7
    assert abs(model.transformer.wte.weight.std().item() - 0.8) < 0.05


def test_meta_device_build_then_init_equals_direct():
    torch.manual_seed(1)
    direct = GPT(tiny_config())
    direct.init_weights()
    with torch.device("meta"):
        meta = GPT(tiny_config())
    meta.to_empty(device="cpu")
    torch.manual_seed(1)
    meta.init_weights()
    idx = torch.randint(0, 300, (1, 16))
    assert torch.allclose(meta.cos, direct.cos) and torch.allclose(meta.sin, direct.sin)
    direct.load_state_dict(meta.state_dict())
    assert torch.equal(direct(idx), meta(idx))


def test_a_direct_build_draws_the_same_random_numbers_as_before():
    # the meta-skipping Embedding must leave a real-device build's default init (and so the RNG
    # stream every later draw sees) exactly as nn.Embedding's
    from nanochat.gpt import Embedding
    torch.manual_seed(3)
    ours, after_ours = Embedding(50, 8).weight, torch.rand(4)
    torch.manual_seed(3)
    theirs, after_theirs = torch.nn.Embedding(50, 8).weight, torch.rand(4)
    assert torch.equal(ours, theirs) and torch.equal(after_ours, after_theirs)


def test_a_meta_device_build_never_imports_torch_dynamo():
    # a meta normal_ / arange runs through torch._refs, whose first call imports torch._dynamo
    # (~2 s of a script's start on a CPU, and it pins a process group past destroy)
    code = ("import sys, torch\nfrom nanochat.gpt import GPT, GPTConfig\n"
            "with torch.device('meta'):\n"
            "    m = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))\n"
            "m.to_empty(device='cpu'); m.init_weights(); m(torch.zeros(1, 8, dtype=torch.long))\n"
            "assert 'torch._dynamo' not in sys.modules, 'imported'\n")
    r = run_fresh_python(code)
    assert r.returncode == 0, r.stderr


def test_estimate_flops_formula():
    model = make_model(perturb=False)
    c = model.config
    head_dim = c.n_embd // c.n_head
    kv = c.n_kv_head * head_dim
    per_layer = c.n_embd * c.n_embd + 2 * c.n_embd * kv + c.n_embd * c.n_embd + 8 * c.n_embd * c.n_embd
    ve_gates = 2 * 12 * c.n_kv_head
    matmul = c.n_layer * per_layer + ve_gates + 320 * c.n_embd + 24
    attn = sum(12 * c.n_head * head_dim * min(w, c.sequence_len) for w in [128, 256, 256])
    assert model.estimate_flops() == 6 * matmul + attn
    assert model.num_scaling_params() == c.n_layer * per_layer + ve_gates + 320 * c.n_embd


def test_optimizers_cover_every_parameter_once_and_train():
    model = make_model(perturb=False)
    adamw, muon = model.setup_optimizers()
    ids = [id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    torch.manual_seed(0)
    idx = torch.randint(0, 300, (4, 33))
    first = None
    for _ in range(15):
        loss = model(idx[:, :-1], idx[:, 1:])
        first = first if first is not None else loss.item()
        loss.backward()
        adamw.step(); muon.step()
        model.zero_grad(set_to_none=True)
    assert loss.item() < first - 1.0  # memorizes a fixed batch


def test_smear_lr_sets_the_smear_and_backout_group_alone():
    """smear_lr is the rate of {smear_gate, smear_lambda, backout_lambda}: upstream's fixed 0.2 by default,
    times lr_multiplier like every group, and no other group moves with it."""
    model = make_model()
    group_of = lambda opt, p: next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    base = model.setup_optimizers(lr_multiplier=0.5)
    slow = model.setup_optimizers(smear_lr=0.025, lr_multiplier=0.5)
    for p in (model.smear_gate.weight, model.smear_lambda, model.backout_lambda):
        assert group_of(base[0], p)["lr"] == group_of(base[0], p)["initial_lr"] == 0.1
        assert group_of(slow[0], p)["lr"] == group_of(slow[0], p)["initial_lr"] == 0.0125
    others = lambda opts: [g["lr"] for opt in opts for g in opt.param_groups if not any(q is model.backout_lambda for q in g["params"])]
    assert others(base) == others(slow)
    # Adam's first step moves each parameter by about its rate: the backout lambda by 0.0125, not 0.1
    idx = torch.randint(0, 300, (2, 17))
    model(idx[:, :-1], idx[:, 1:]).backward()
    before = model.backout_lambda.item()
    slow[0].step()
    assert abs(model.backout_lambda.item() - before) == pytest.approx(0.0125, rel=1e-3)


def test_fp16_embeddings_serve_inference_and_refuse_to_train(monkeypatch):
    """NANOCHAT_DTYPE=float16: the model runs (finite logits), but an optimizer over fp16 embeddings
    would turn them to NaN in one AdamW step (eps 1e-10 rounds to 0 in fp16), so it is refused."""
    monkeypatch.setenv("NANOCHAT_DTYPE", "float16")
    model = make_model()
    assert model.transformer.wte.weight.dtype == torch.float16
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 300, (1, 16)))).all()
    with pytest.raises(UserError, match="float16 serves inference only"):
        model.setup_optimizers()


def test_generate_greedy_is_deterministic_and_matches_argmax():
    model = make_model()
    prompt = [1, 2, 3, 4]
    out = list(model.generate(prompt, 5, temperature=0))
    assert out == list(model.generate(prompt, 5, temperature=0))
    ids = prompt + out
    logits = model(torch.tensor([ids]))
    assert [logits[0, len(prompt) - 1 + i].argmax().item() for i in range(5)] == out
    sampled = list(model.generate(prompt, 8, temperature=1.0, top_k=5, seed=3))
    assert sampled == list(model.generate(prompt, 8, temperature=1.0, top_k=5, seed=3))
    for bad in (dict(tokens=prompt, temperature=-1.0), dict(tokens=prompt, top_k=0), dict(tokens=[])):  # -1 sampled the least likely
        with pytest.raises(ValueError, match="need a non-empty prompt"):
            next(model.generate(bad.pop("tokens"), 1, **bad))


def test_sequence_longer_than_rotary_table_is_refused():
    model = make_model(sequence_len=8)
    with pytest.raises(AssertionError):
        model(torch.zeros(1, 81, dtype=torch.long))


def test_lr_multiplier_scales_every_group_and_schedules_follow_initial_lr():
    from nanochat.optim import set_lr_multiplier
    model = make_model(perturb=False)
    full = model.setup_optimizers()
    half = model.setup_optimizers(lr_multiplier=0.5)
    for a, b in zip(full, half):
        for ga, gb in zip(a.param_groups, b.param_groups):
            assert gb["lr"] == gb["initial_lr"] == pytest.approx(0.5 * ga["initial_lr"])
    set_lr_multiplier(half, 0.1)
    assert all(g["lr"] == pytest.approx(0.1 * g["initial_lr"]) for opt in half for g in opt.param_groups)


# -----------------------------------------------------------------------------
# the MegaContext hook: model(idx, inputs_embeds=..., rotary=..., lod=...), rotary from positions.slot_rotary

def mixed_inputs(model, idx):
    T = idx.size(1)
    return mixed(model, model.embed_tokens(idx), torch.arange(T, dtype=torch.float32), torch.zeros(T, dtype=torch.long))


def mixed(model, embeds, positions, lod):
    return dict(inputs_embeds=embeds, rotary=slot_rotary(model, positions, lod), lod=lod)


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=1, window_pattern="SL", sequence_len=256)])
def test_hook_on_pure_tokens_equals_vanilla_exactly(kw):
    model = make_model(**kw)
    idx = torch.randint(0, model.config.vocab_size, (2, model.config.sequence_len))
    targets = torch.randint(0, model.config.vocab_size, idx.shape)
    assert torch.equal(model(idx, **mixed_inputs(model, idx)), model(idx))
    assert torch.equal(model(idx, targets, **mixed_inputs(model, idx)), model(idx, targets))


def test_vanilla_path_never_imports_megacontext():
    code = ("import sys, torch\nfrom nanochat.gpt import GPT, GPTConfig\n"
            "m = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)); m.init_weights()\n"
            "m(torch.zeros(1, 8, dtype=torch.long))\n"
            "assert not any(k.startswith('nanochat.megacontext') for k in sys.modules), 'imported'\n")
    r = run_fresh_python(code)
    assert r.returncode == 0, r.stderr


def test_gist_slots_ignore_their_placeholder_id_and_get_no_smear():
    model = make_model()
    model.smear_lambda.data.fill_(0.5)  # make the smear matter
    T = 24
    idx = torch.randint(0, model.config.vocab_size, (1, T))
    inputs = mixed_inputs(model, idx)
    emb = inputs["inputs_embeds"].clone()
    emb[0, 10] = torch.nn.functional.rms_norm(torch.randn(model.config.n_embd), (model.config.n_embd,))  # a "gist"
    lod = inputs["lod"].clone()
    lod[10] = 1
    a, b = idx.clone(), idx.clone()
    a[0, 10], b[0, 10] = -1, 7  # the id at a gist slot is a placeholder: no value embedding is looked up
    positions = torch.arange(T, dtype=torch.float32)
    out_a = model(a, **mixed(model, emb, positions, lod))
    assert torch.equal(out_a, model(b, **mixed(model, emb, positions, lod)))
    # smear: a slot next to a gist keeps its own embedding; tokens elsewhere still smear
    keep = torch.ones(1, T - 1, 1)
    keep[0, 9] = keep[0, 10] = 0  # pairs (9, 10) and (10, 11)
    x = model.smear(emb, keep=keep)
    assert torch.equal(x[0, 10], emb[0, 10]) and torch.equal(x[0, 11], emb[0, 11])
    assert not torch.equal(x[0, 12], emb[0, 12])


def test_hook_takes_positions_beyond_any_table_and_is_shift_invariant():
    model = make_model()
    T = 16
    idx = torch.randint(0, model.config.vocab_size, (1, T))
    inputs = mixed_inputs(model, idx)
    base = model(idx, **inputs)
    positions = torch.arange(T, dtype=torch.float32)
    far = mixed(model, inputs["inputs_embeds"], positions + 1000.0, inputs["lod"])  # rotary is relative: a shift changes nothing
    assert torch.allclose(model(idx, **far), base, atol=2e-3)
    huge = mixed(model, inputs["inputs_embeds"], positions + 5_000_000.0, inputs["lod"])  # far past the rotary table: no assert
    assert torch.isfinite(model(idx, **huge)).all()


def test_hook_rejects_missing_metadata():
    model = make_model()
    idx = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError):
        model(idx, inputs_embeds=model.embed_tokens(idx))


def test_hook_wiring_lod_changes_rotary_smear_is_cut_and_gists_get_gradients(monkeypatch):
    """The hook itself must pass lod to Gaussian RoPE, cut the smear around gists, and keep gists
    in the graph (a test of the pieces alone would pass with any of these broken)."""
    model = make_model()
    model.smear_lambda.data.fill_(0.5)
    T = 24
    idx = torch.randint(0, model.config.vocab_size, (1, T))
    emb = model.embed_tokens(idx).detach().clone()
    emb[0, 10] = torch.nn.functional.rms_norm(torch.randn(model.config.n_embd), (model.config.n_embd,))
    emb.requires_grad_(True)
    positions = torch.arange(T, dtype=torch.float64)
    lod1 = torch.zeros(T, dtype=torch.long)
    lod1[10] = 1
    lod2 = lod1.clone()
    lod2[10] = 2
    seen = {}
    smear = model.smear
    monkeypatch.setattr(model, "smear", lambda x, prev=None, keep=None: seen.setdefault("keep", keep) is not None and smear(x, prev, keep))
    out1 = model(idx, inputs_embeds=emb, rotary=slot_rotary(model, positions, lod1), lod=lod1)
    keep = seen["keep"][0, :, 0]
    assert keep[9] == 0 and keep[10] == 0 and keep.sum() == T - 3  # pairs (9, 10) and (10, 11) cut, the rest kept
    out2 = model(idx, inputs_embeds=emb, rotary=slot_rotary(model, positions, lod2), lod=lod2)
    assert not torch.allclose(out1[0, 11:], out2[0, 11:])  # the gist's level changes how later slots see it
    out1[0, -1].sum().backward()
    assert emb.grad[0, 10].abs().sum() > 0  # the gist is in the graph


def test_hook_with_a_kv_cache_equals_the_full_forward_chunk_by_chunk():
    """Decoding a WC of tokens and gists through the cache (a prefix, then pieces, one slot at a
    time, and a rewind to an earlier slot) gives the logits of one full forward."""
    from nanochat.engine import KVCache
    model = make_model()
    model.smear_lambda.data.fill_(0.5)
    T = 40
    idx = torch.randint(0, model.config.vocab_size, (1, T))
    emb = model.embed_tokens(idx).clone()
    lod = torch.zeros(T, dtype=torch.long)
    for s in (3, 4, 17):  # gists, two of them adjacent, none at a chunk edge only
        emb[0, s] = F.rms_norm(torch.randn(model.config.n_embd), (model.config.n_embd,))
        lod[s] = 1
    idx[0, lod == 1] = -1
    pos = torch.arange(T, dtype=torch.float64) * 3 + 1e6  # any origin and spacing: rotary reads the positions
    full, hidden = model(idx, inputs_embeds=emb, rotary=slot_rotary(model, pos, lod), lod=lod, return_hidden=True)
    assert hidden.shape == (1, T, model.config.n_embd)
    cache = KVCache.for_model(model, 1, T)
    outs = []
    for a, b in [(0, 4), (4, 5), (5, 18), (18, 19), (19, 40)]:
        outs.append(model(idx[:, a:b], kv_cache=cache, inputs_embeds=emb[:, a:b], rotary=slot_rotary(model, pos[a:b], lod[a:b]), lod=lod[a:b]))
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-4)
    # rewind to slot 17 (a gist follows slot 16, a token) and recompute the rest
    cache.truncate(17, emb[:, 16:17])
    again = model(idx[:, 17:], kv_cache=cache, inputs_embeds=emb[:, 17:], rotary=slot_rotary(model, pos[17:], lod[17:]), lod=lod[17:])
    assert torch.allclose(again, full[:, 17:], atol=1e-4)
    cache.truncate(5, emb[:, 4:5] * 0)  # slot 4 is a gist: nothing smears into slot 5
    again = model(idx[:, 5:], kv_cache=cache, inputs_embeds=emb[:, 5:], rotary=slot_rotary(model, pos[5:], lod[5:]), lod=lod[5:])
    assert torch.allclose(again, full[:, 5:], atol=1e-4)


def test_return_hidden_is_the_residual_the_head_reads():
    model = make_model()
    idx = torch.randint(0, model.config.vocab_size, (2, 20))
    logits, hidden = model(idx, return_hidden=True)
    assert torch.equal(logits, model(idx))
    assert torch.allclose(model._head(hidden, None, "mean"), logits)
