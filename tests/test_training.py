"""End-to-end MegaContext training (nanochat/megacontext/training.py) on a tiny real GPT."""

import random

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.megacontext.allocator import Edit
from nanochat.megacontext.checkpoint import build_modules
from nanochat.megacontext.config import MegaContextConfig
from nanochat.megacontext.lensnet import variant_utilities
from nanochat.megacontext.slate import allocator_edits
from nanochat.megacontext.training import MegaContextTrainer
from nanochat.megacontext.working_context import Entry, check_working_context

from conftest import heavy_op_dtypes

T, V = 384, 97  # rows of T + 1 = 385 tokens: a 353-token history and a 32-token horizon


def make(num_variants=4, seed=0, **overrides):
    torch.manual_seed(seed)
    model_config = GPTConfig(sequence_len=T, vocab_size=V, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="L")
    model = GPT(model_config)
    model.init_weights()
    with torch.no_grad():  # as after some training: attention and MLP outputs are no longer zero, so slots see each other
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(std=0.05)
            block.mlp.c_proj.weight.normal_(std=0.05)
    settings = dict(w_max=128, max_level=1, recent_tokens=32, gist_layers=1, lens_layers=1, lens_hidden=64, horizon=32,
                    num_variants=num_variants, tau_expand=0.0, tau_collapse=0.0, anneal_frac=0.0)
    mc = MegaContextConfig(**{**settings, **overrides}).validate()
    gistnet, lensnet = build_modules(mc, model_config)
    return model, gistnet, lensnet, mc


def batch(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, V, (B, T + 1), generator=g)
    return rows[:, :-1], rows[:, 1:]


def test_a_collapse_edit_scores_minus_the_mean_of_its_members_like_the_allocator():
    members = tuple(Entry(1, 32 * i, 32 * i + 32) for i in range(32))
    edits = allocator_edits([Edit("collapse", members, (Entry(2, 0, 1024),)), Edit("expand", (Entry(1, 1024, 1056),), ())])
    assert all(edits[m] == -1 / 32 for m in members) and edits[Entry(1, 1024, 1056)] == 1.0
    entries = list(members) + [Entry(1, 1024, 1056)]
    scores = torch.randn(1, len(entries))
    row = torch.tensor([[edits[e] for e in entries]])  # (1, E)
    u = variant_utilities(scores, row[:, None, :])[0, 0]
    torch.testing.assert_close(u, -scores[0, :32].mean() + scores[0, 32])


def test_a_training_step_changes_gistnet_and_lensnet_weights():
    # failure mode 2: GistNet and LensNet must get gradients and be in an optimizer
    model, gistnet, lensnet, mc = make()
    trainer = MegaContextTrainer(model, gistnet, lensnet, mc)
    opt = trainer.make_optimizer()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in trainer.parameters()}
    before = [p.detach().clone() for p in trainer.parameters()]
    x, y = batch()
    stats = trainer.backward(x, y, step=10, num_iterations=10)
    assert stats["variants"] > 2 and stats["budget"] == 128 and stats["budget_util"] <= 1.0
    assert stats["lens_loss"] > 0 and 0 < stats["gist_cos_lod1"] <= 1 and -1 < stats["gist_pair_cos"] < 1
    assert gistnet.encoders[0].head.weight.grad.abs().sum() > 0
    assert lensnet.head.weight.grad.abs().sum() > 0 and lensnet.in_proj.weight.grad.abs().sum() > 0
    opt.step()
    changed = [not torch.equal(b, p) for b, p in zip(before, trainer.parameters())]
    assert sum(changed) >= len(changed) // 2
    assert not torch.equal(before[-1], list(trainer.parameters())[-1])  # LensNet's head moved


def test_a_cpu_training_step_runs_every_matmul_in_fp32_optimizers_included():
    # the CPU dtype policy (common.py): no heavy op in bf16, where many CPUs run it 35-100x slower
    model, gistnet, lensnet, mc = make(num_variants=4)
    trainer = MegaContextTrainer(model, gistnet, lensnet, mc)
    optimizers = model.setup_optimizers() + [trainer.make_optimizer()]
    x, y = batch()

    def step():
        model(x, y).backward()
        trainer.backward(x, y, step=10, num_iterations=10)
        for opt in optimizers:
            opt.step()

    seen = heavy_op_dtypes(step)
    assert {name for name, _ in seen} >= {"mm", "bmm"}  # the model's matmuls and Muon's batched Newton-Schulz
    assert {dt for _, dt in seen} == {torch.float32}, seen


def test_slates_are_deterministic_and_chunking_does_not_change_the_gradients():
    grads = []
    for max_slots in (None, 1):  # one chunk of 3 rows / one row per chunk
        model, gistnet, lensnet, mc = make()
        trainer = MegaContextTrainer(model, gistnet, lensnet, mc)
        x, y = batch()
        stats = trainer.backward(x, y, step=5, num_iterations=10, max_slots=max_slots)
        grads.append(([p.grad.clone() for p in model.parameters() if p.grad is not None],
                      [p.grad.clone() for p in trainer.parameters() if p.grad is not None], stats))
    (g_model_a, g_mc_a, s_a), (g_model_b, g_mc_b, s_b) = grads
    assert len(g_mc_a) == len(g_mc_b) and len(g_model_a) == len(g_model_b)
    for a, b in zip(g_model_a + g_mc_a, g_model_b + g_mc_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert s_a["horizon_loss"] == pytest.approx(s_b["horizon_loss"], rel=1e-5)


def test_while_the_budget_covers_the_history_only_the_raw_baseline_is_scored():
    model, gistnet, lensnet, mc = make(anneal_frac=1.0)
    trainer = MegaContextTrainer(model, gistnet, lensnet, mc)
    x, y = batch()
    stats = trainer.backward(x, y, step=0, num_iterations=10)  # C2 covers the 353-token history
    assert stats["budget"] == 384
    assert stats["variants"] == 1  # every variant would be the raw history: the baseline alone is scored
    stats = trainer.backward(x, y, step=5, num_iterations=10)
    assert 128 < stats["budget"] < 384 and stats["variants"] > 1


def test_no_annealing_step_costs_more_variant_slots_than_one_after_it():
    model, gistnet, lensnet, mc = make(anneal_frac=1.0)
    trainer = MegaContextTrainer(model, gistnet, lensnet, mc)
    x, y = batch(B=4)
    after = 4 * 4 * (128 + 32 - 1)  # B rows x 4 variants x (w_max + H - 1) slots
    for step in (0, 3, 6, 10):
        stats = trainer.backward(x, y, step=step, num_iterations=10)
        assert 1 <= stats["rows"] <= 4 and stats["rows"] * stats["slots"] <= after, (step, stats)
    assert stats["budget"] == 128 and stats["rows"] == 4  # annealed: every row is scored


@pytest.mark.parametrize("masked", [False, True])
def test_the_scored_subset_of_an_annealing_batch_stands_for_every_row(masked):
    # B copies of one row, the deterministic baseline only: a micro-batch that scores 2 of its 4 rows must
    # give the gradient of the whole batch, which is the single row's (the LM loss is a mean over rows)
    grads = []
    for B in (1, 4):
        model, gistnet, lensnet, mc = make(num_variants=1, anneal_frac=1.0)
        trainer = MegaContextTrainer(model, gistnet, lensnet, mc)
        x, y = batch(B=1)
        if masked:  # recall rows: only a few targets count, three of them in the horizon
            y = torch.where(torch.isin(torch.arange(T), torch.tensor([40, 200, T - 20, T - 10, T - 1])), y, -1)
        stats = trainer.backward(x.repeat(B, 1), y.repeat(B, 1), step=5, num_iterations=10)  # C2 256: 2 of 4 rows fit
        assert stats["rows"] == (1 if B == 1 else 2)
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_horizon_loss_is_the_mean_nll_of_the_variants():
    model, gistnet, lensnet, mc = make(num_variants=1, alpha_lod1=0.0)  # the baseline only: a truncated window of 128 tokens
    trainer = MegaContextTrainer(model, gistnet, lensnet, mc)
    x, y = batch(B=1)
    loss, stats = trainer.loss(torch.cat([x, y[:, -1:]], 1), 128, [random.Random(0)])
    rows = torch.cat([x, y[:, -1:]], 1)[0]
    c = T + 1 - 32
    start = 256  # recent(128) of a 353-token history: whole blocks 256..351 + the 1-token tail block (97 slots)
    logits = model(rows[None, start:-1])[0, -32:]
    expected = torch.nn.functional.cross_entropy(logits, rows[c:])
    assert stats["nll_baseline"] == pytest.approx(expected.item(), rel=1e-5)
    assert stats["horizon_loss"] == pytest.approx(expected.item(), rel=1e-5)
    # what is backpropagated: each of the 32 horizon tokens weighs as one of the row's T next-token (LM) tokens
    assert loss.item() == pytest.approx(expected.item() * 32 / T, rel=1e-5)


def test_a_baseline_beside_other_variants_is_scored_without_a_gradient():
    """The truncated window is the reference point of a slate: its NLL is measured (in variant order,
    where the stats read it), its forward runs without autograd, and every other variant trains."""
    model, gistnet, lensnet, mc = make(num_variants=4, alpha_lod1=0.0)
    with torch.no_grad():
        model.lm_head.weight.normal_(std=0.5)  # confident logits: each variant's NLL its own, not ~log V for all
    trainer = MegaContextTrainer(model, gistnet, lensnet, mc)
    calls = []  # (rows, grad enabled) of each variant forward: the LM head runs on the H scored slots alone
    model.lm_head.register_forward_hook(lambda m, inp, out: calls.append((out.size(0), torch.is_grad_enabled())))
    x, y = batch(B=2)
    rows = torch.cat([x, y[:, -1:]], 1)
    loss, stats = trainer.loss(rows, 128, [random.Random(0), random.Random(1)])
    assert stats["variants"] == 4 and stats["frozen_slots"] == 97 + 32 - 1  # recent(128): 97 slots, + H - 1
    assert sorted(calls) == [(2, False), (6, True)]  # 2 baselines without autograd, 2 x 3 variants with it
    c = T + 1 - 32
    # the baselines' NLLs, back in their places among the variants, are what nll_baseline averages
    expected = torch.stack([torch.nn.functional.cross_entropy(model(rows[b:b + 1, 256:-1])[0, -32:], rows[b, c:]) for b in range(2)])
    assert stats["nll_baseline"] == pytest.approx(expected.mean().item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.transformer.h.parameters())


def test_one_row_of_a_micro_batch_measures_its_baseline_and_the_gradient_is_that_of_all():
    """A baseline beside other variants trains nothing, so backward() runs one row's (the first scored)
    and leaves the others out: every gradient, the gist losses' included, is the one of the whole slate."""
    x, y = batch(B=3)
    rows = torch.cat([x, y[:, -1:]], 1)
    runs = []
    for measured, alpha in ((None, 0.5), ([True, False, False], 0.5), ([True, False, False], 0.0)):
        model, gistnet, lensnet, mc = make(num_variants=4, alpha_lod1=alpha)
        with torch.no_grad():
            model.lm_head.weight.normal_(std=0.5)
        trainer = MegaContextTrainer(model, gistnet, lensnet, mc)
        calls = []
        hook = model.lm_head.register_forward_hook(lambda m, inp, out: calls.append((out.size(0), torch.is_grad_enabled())))
        loss, stats = trainer.loss(rows, 128, [random.Random(b) for b in range(3)], measured=measured)
        loss.backward()
        hook.remove()
        stats["loss"] = loss.item()
        runs.append(([p.grad for p in list(model.parameters()) + trainer.parameters() if p.grad is not None], stats, calls))
    (g_all, s_all, c_all), (g_one, s_one, c_one), (_, s_no_gist, _) = runs
    # the gist loss: a sum over the 9 variants that train (its cosine their mean), divided by the slate's 12
    assert s_one["loss"] - s_no_gist["loss"] == pytest.approx(0.5 * 9 * (1 - s_one["gist_cos_lod1"]) / 12, rel=1e-4)
    assert sorted(c_all) == [(3, False), (9, True)] and sorted(c_one) == [(1, False), (9, True)]
    assert s_all["variants"] == 4 and s_one["variants"] == 4 - 2 / 3
    assert len(g_all) == len(g_one) > 0
    for a, b in zip(g_all, g_one):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    c = T + 1 - 32
    with torch.no_grad():  # row 0's truncated window (recent(128): 97 slots) is what nll_baseline now reads
        expected = torch.nn.functional.cross_entropy(model(rows[:1, 256:-1])[0, -32:], rows[0, c:])
    assert s_one["nll_baseline"] == pytest.approx(expected.item(), rel=1e-5)
    # backward() measures the first row's baseline alone
    calls = []
    model.lm_head.register_forward_hook(lambda m, inp, out: calls.append((out.size(0), torch.is_grad_enabled())))
    trainer.backward(x, y, step=5, num_iterations=10)
    assert [n for n, grad in calls if not grad] == [1]


def test_masked_targets_score_only_their_tokens_in_the_horizon():
    """Recall rows (targets -1 off the answers): the horizon NLL counts the scored tokens alone, and the
    loss divides their sum by the rows' scored targets, as the LM loss does."""
    model, gistnet, lensnet, mc = make(num_variants=1, alpha_lod1=0.0)
    trainer = MegaContextTrainer(model, gistnet, lensnet, mc)
    x, y = batch(B=1)
    rows = torch.cat([x, y[:, -1:]], 1)
    weights = torch.zeros(1, T)
    weights[0, -8:-3] = 1  # five scored targets, all in the horizon
    loss, stats = trainer.loss(rows, 128, [random.Random(0)], weights=weights, lm_tokens=5)
    c = T + 1 - 32
    logits = model(rows[None, 0, 256:-1])[0, -32:]
    nll = torch.nn.functional.cross_entropy(logits, rows[0, c:], reduction="none")  # (32,)
    assert stats["horizon_loss"] == pytest.approx(nll[-8:-3].mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(nll[-8:-3].sum().item() / 5, rel=1e-5)
    changed = rows.clone()
    changed[0, -1] = (changed[0, -1] + 1) % V  # an unscored target (the row's last token, no one's input)
    assert trainer.loss(changed, 128, [random.Random(0)], weights=weights, lm_tokens=5)[0].item() == pytest.approx(loss.item())
    weights[0, -1] = 1
    assert trainer.loss(changed, 128, [random.Random(0)], weights=weights, lm_tokens=6)[0].item() != pytest.approx(
        trainer.loss(rows, 128, [random.Random(0)], weights=weights, lm_tokens=6)[0].item())
    # backward(): -1 targets are read as a mask; all-scored rows give the unmasked numbers exactly
    y_masked = torch.full_like(y, -1)
    y_masked[0, -8:-3] = y[0, -8:-3]
    s_masked = trainer.backward(x, y_masked, step=5, num_iterations=10)
    assert s_masked["horizon_loss"] == pytest.approx(stats["horizon_loss"], rel=1e-5)
    assert trainer.loss(rows, 128, [random.Random(0)], weights=torch.ones(1, T))[0].item() == pytest.approx(
        trainer.loss(rows, 128, [random.Random(0)])[0].item(), rel=1e-6)


# -----------------------------------------------------------------------------
# --cognitive-core: each history as a Core-Knowledge memory and a session

def test_cognitive_core_slates_are_legal_and_each_row_has_its_drop_variant():
    from nanochat.megacontext.slate import split_memories
    model, gistnet, lensnet, mc = make(cognitive_core=True, num_variants=4)
    trainer = MegaContextTrainer(model, gistnet, lensnet, mc)
    rngs = [random.Random(r) for r in range(4)]
    sources = [split_memories(model, gistnet, torch.randint(0, V, (353,)), 1, rng) for rng in rngs]
    variants, refs, lens_rows, scores, swaps, _ = trainer.slate(sources, 128, rngs)
    assert lens_rows == [0, 1, 2, 3] and len(swaps) == 4
    for b, src in enumerate(sources):
        mine = [v for v in variants if v.row == b]
        assert [v.kind for v in mine][:2] == ["baseline", "reference"] and mine[-1].kind == "drop"
        assert mine[-1].wc == refs[b].segments[-1] and mine[-1].source is src.session  # the CK removed
        base = mine[0]  # the truncated window: the newest 128 tokens of the unsplit history, raw
        assert all(e.level == 0 for e in base.wc.entries) and 96 < base.wc.cost <= 128
        for v in mine[1:]:
            check_working_context(v.wc, v.source or src, 128, mc.recent_tokens, mc.ck_min_session_share)
        for v in mine[2:-1]:  # perturbed / lens: edits of the reference's entries (each naming its memory)
            assert v.edits and set(v.edits) <= set(refs[b].entries)
        assert {e.memory for v in mine[2:-1] for e in v.edits} <= {0, 1} and refs[b].num_memories == 2


def test_cognitive_core_training_step_adds_the_reliance_margin_and_trains_lensnet_over_both_memories():
    x, y = batch()
    losses = {}
    for weight in (0.0, 2.0):
        model, gistnet, lensnet, mc = make(cognitive_core=True, ck_weight=weight, ck_margin=5.0)  # a margin never met
        trainer = MegaContextTrainer(model, gistnet, lensnet, mc)
        rows = torch.cat([x, y[:, -1:]], 1)
        losses[weight] = trainer.loss(rows, 128, [random.Random(r) for r in range(3)])
    (loss0, _), (loss2, stats2) = losses[0.0], losses[2.0]
    assert stats2["ck_margin_loss"] == pytest.approx(max(0.0, stats2["nll_reference"] - stats2["nll_drop"] + 5.0), rel=1e-4)
    assert loss2.item() - loss0.item() == pytest.approx(2.0 * stats2["ck_margin_loss"], rel=1e-4)
    assert stats2["ckri"] == stats2["ckri"] and stats2["lens_loss"] > 0  # finite
    model, gistnet, lensnet, mc = make(cognitive_core=True)
    trainer = MegaContextTrainer(model, gistnet, lensnet, mc)
    stats = trainer.backward(x, y, step=10, num_iterations=10)
    assert lensnet.head.weight.grad.abs().sum() > 0 and gistnet.encoders[0].head.weight.grad.abs().sum() > 0
    assert stats["nll_drop"] == stats["nll_drop"] and stats["variants"] >= 4


def test_the_drop_variant_is_measured_without_autograd_so_it_does_not_train_the_model_to_do_without_the_ck():
    """L_drop is the reliance margin's reference point (detached there); in the horizon loss it would
    pull the model's loss without the CK down, against the margin."""
    x, y = batch()
    model, gistnet, lensnet, mc = make(cognitive_core=True, num_variants=4)
    trainer = MegaContextTrainer(model, gistnet, lensnet, mc)
    seen, score = [], trainer.score
    def spy(variants, sources, horizons, assembled_refs, frozen):
        seen.extend((v.kind, f) for v, f in zip(variants, frozen))
        return score(variants, sources, horizons, assembled_refs, frozen)
    trainer.score = spy
    loss, stats = trainer.loss(torch.cat([x, y[:, -1:]], 1), 128, [random.Random(r) for r in range(len(x))])
    drops = [f for kind, f in seen if kind == "drop"]
    assert drops and all(drops) and not all(f for kind, f in seen if kind == "reference")
    assert stats["nll_drop"] == stats["nll_drop"] and stats["frozen_slots"] > 0


def grads_of_a_step(trainer, seed=0):
    x, y = batch(seed=seed)
    stats = trainer.backward(x, y, step=5, num_iterations=10)
    return [p.grad.clone() for p in list(trainer.model.parameters()) + trainer.parameters() if p.grad is not None], stats


@pytest.mark.parametrize("compiled", [False, True])
def test_the_compiled_and_padded_variant_forward_gives_the_eager_loss_and_gradients(compiled):
    """trainer.compile(): rows padded to COMPILE_PAD slots (after every real slot: causal attention
    hides them) and the variant forward run by torch.compile -> the eager step's loss and gradients."""
    model, gistnet, lensnet, mc = make()
    want, want_stats = grads_of_a_step(MegaContextTrainer(model, gistnet, lensnet, mc))
    model, gistnet, lensnet, mc = make()
    trainer = MegaContextTrainer(model, gistnet, lensnet, mc)
    if compiled:
        trainer.compile()
    else:
        trainer.pad_multiple = 128  # the padding alone, eager
    got, stats = grads_of_a_step(trainer)
    assert trainer.pad_multiple == 128 and (trainer.forward is not model) == compiled
    assert stats["horizon_loss"] == pytest.approx(want_stats["horizon_loss"], rel=1e-5)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
