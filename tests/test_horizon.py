"""Scoring working contexts by their horizon (nanochat/megacontext/horizon.py), against the real GPT."""

import torch
import torch.nn.functional as F

from nanochat.megacontext.positions import slot_rotary
from nanochat.gpt import GPT, GPTConfig
from nanochat.megacontext.gistnet import GistNet
from nanochat.megacontext.horizon import build_source, gist_loss, horizon_nll, lens_inputs, pack_horizon, split_point
from nanochat.megacontext.working_context import WorkingContext

H = 32


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=256, vocab_size=97, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="L"))
    model.init_weights()
    with torch.no_grad():  # non-trivial residual paths, so a wrong position or target shows up in the loss
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(std=0.05)
            block.mlp.c_proj.weight.normal_(std=0.05)
        model.lm_head.weight.normal_(std=0.05)
    return model


def setup(n=200, seed=0):
    model = tiny_model(seed)
    gistnet = GistNet(64, kind="mlp", max_level=2)
    with torch.no_grad():
        gistnet.encoders[0].head.c_proj.weight.normal_(std=0.05)
    seq = torch.randint(0, 97, (n + H,), generator=torch.Generator().manual_seed(seed))
    source = build_source(model, gistnet, seq[:n], max_level=2)
    return model, gistnet, seq, source


def vanilla_horizon_nll(model, seq, start, c):
    """NLL of seq[c:c+H] from the vanilla forward over seq[start:c+H-1] (the model's own positions 0..)."""
    logits = model(seq[None, start:c + H - 1])[0]  # (c + H - 1 - start, V)
    return F.cross_entropy(logits[-H:], seq[c:c + H], reduction="none")


def test_targets_are_the_true_next_tokens_after_the_wc_full_and_truncated():
    # failure mode 1: the loss must score each horizon slot against the token that follows it in the
    # sequence (not its own input, not a gist-shifted one), checked against the real GPT's vanilla forward
    model, _, seq, source = setup()
    c = source.num_tokens
    full = WorkingContext.recent(source, c + 32)  # every history token, raw
    trunc = WorkingContext.recent(source, 64)  # the newest whole blocks within 64 slots
    assert full.start == 0 and trunc.start > 0
    with torch.no_grad():
        nll = horizon_nll(model, [full, trunc], [source, source], [seq[c:], seq[c:]])  # (2, H)
        torch.testing.assert_close(nll[0], vanilla_horizon_nll(model, seq, 0, c), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(nll[1], vanilla_horizon_nll(model, seq, trunc.start, c), rtol=1e-5, atol=1e-5)
        shifted = F.cross_entropy(model(seq[None, :c + H - 1])[0][-H:], seq[c - 1:c + H - 1], reduction="none")
        assert not torch.allclose(nll[0], shifted, atol=1e-3)  # scoring inputs instead of next tokens differs


def test_padding_never_reaches_a_real_slot():
    model, _, seq, source = setup()
    c = source.num_tokens
    short, long = WorkingContext.recent(source, 64), WorkingContext.coarsest(source, 32).expand(0).expand(1)
    with torch.no_grad():
        both = horizon_nll(model, [short, long], [source, source], [seq[c:], seq[c:]])
        alone = [horizon_nll(model, [wc], [source], [seq[c:]])[0] for wc in (short, long)]
    torch.testing.assert_close(both[0], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1], alone[1], rtol=1e-5, atol=1e-5)


def test_token_slots_are_the_sources_own_embeddings_not_embedded_again():
    model, gistnet, seq, source = setup()
    wc = WorkingContext.recency_filled(source, 96, 32, 2)
    a = wc.assemble(source)
    slots = (a["lod"] == 0).nonzero().flatten()
    ids = a["token_ids"][slots]
    assert torch.equal(a["embeds"][slots], model.embed_tokens(ids))  # the same values as embedding again...
    calls = []
    model.embed_tokens = lambda idx: calls.append(idx) or GPT.embed_tokens(model, idx)
    batch, assembled = pack_horizon(model, [wc], [source], [seq[200:200 + H]])
    assert [c.numel() for c in calls] == [H - 1]  # ...but only the horizon's tokens are embedded here
    assert torch.equal(assembled[0]["embeds"], a["embeds"])
    # and the horizon loss reaches wte through the source's embeddings (the gists' inputs too)
    source.levels[0].retain_grad()
    logits = model(batch["idx"], inputs_embeds=batch["inputs_embeds"], rotary=slot_rotary(model, batch["positions"], batch["lod"]), lod=batch["lod"],
                   logits_at=batch["logits_at"])
    logits.sum().backward()
    first_raw = wc.entries[[e.level for e in wc.entries].index(0)].start
    assert source.levels[0].grad[first_raw:].abs().sum() > 0


def test_pack_horizon_positions_lods_and_logit_slots():
    model, _, seq, source = setup()
    c = source.num_tokens
    wc = WorkingContext.coarsest(source, recent_tokens=32)  # LOD1 gists, then the newest blocks raw
    batch, (a,) = pack_horizon(model, [wc], [source], [seq[c:]])
    T = wc.cost + H - 1
    assert batch["idx"].shape == (1, T)
    assert batch["logits_at"].tolist() == [list(range(wc.cost - 1, wc.cost - 1 + H))]
    assert batch["positions"][0, wc.cost:].tolist() == [float(c - wc.start + j) for j in range(H - 1)]
    assert batch["lod"][0, :len(wc) - 2].tolist() == [1] * (len(wc) - 2)  # every entry but the raw tail is a gist
    assert batch["positions"][0, 0].item() == 15.5  # the first gist sits at the centre of tokens 0..31
    assert torch.equal(batch["idx"][0, wc.cost:], seq[c:c + H - 1])


def test_horizon_loss_reaches_gistnet_only_through_gists():
    model, gistnet, seq, source = setup()
    c = source.num_tokens
    raw = WorkingContext.recent(source, c + 32)
    horizon_nll(model, [raw], [source], [seq[c:]]).mean().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in gistnet.parameters())
    source = build_source(model, gistnet, seq[:c], max_level=2)  # a fresh graph
    mixed = WorkingContext.coarsest(source, recent_tokens=32)
    horizon_nll(model, [mixed], [source], [seq[c:]]).mean().backward()
    assert gistnet.encoders[0].head.c_proj.weight.grad.abs().sum() > 0


def test_lens_inputs_entry_vectors_levels_mask_and_tail():
    model, _, seq, source = setup()
    a_wc = WorkingContext.coarsest(source, recent_tokens=32)
    b_wc = WorkingContext.recent(source, 64)
    assembled = [a_wc.assemble(source, model.embed_tokens), b_wc.assemble(source, model.embed_tokens)]
    vecs, levels, mask, tail = lens_inputs([a_wc, b_wc], [source, source], assembled, n_tail=8)
    E = max(len(a_wc), len(b_wc))
    assert vecs.shape == (2, E, 64) and levels.shape == (2, E) and tail.shape == (2, 8, 64)
    assert mask[1].tolist() == [True] * len(b_wc) + [False] * (E - len(b_wc))
    torch.testing.assert_close(vecs[0, 0], source.gists(1, 0, 1)[0])  # a gist entry: its gist
    last = b_wc.entries[0]
    torch.testing.assert_close(vecs[1, 0], model.embed_tokens(seq[last.start:last.end]).mean(0))  # a block: mean embed
    assert levels[0, 0] == 1 and levels[1, 0] == 0
    n1 = source.num_gists(1)  # 6 LOD1 gists < 8 tail slots: zeros in front, the newest gists at the end
    assert torch.all(tail[0, :8 - n1] == 0)
    torch.testing.assert_close(tail[0, -1], source.gists(1, n1 - 1, n1)[0])
    assert not vecs.requires_grad and not tail.requires_grad


# the horizon of a packed row and the gist loss

def test_the_horizon_ends_the_rows_longest_document():
    B_ = 0  # BOS
    row = [B_] + [5] * 99 + [B_] + [6] * 299 + [B_] + [7] * 20  # docs of 100, 300 and 21 tokens: 421 tokens
    assert split_point(row, B_, 32, 128) == 400 - 32  # the horizon: the last 32 tokens of the 300-token document
    assert split_point(row, None, 32, 128) == 421 - 32  # no BOS given: the row's end
    assert split_point(row, B_, 32, 380) == 421 - 32  # no document leaves a history longer than w_max: the row's end
    assert split_point([5] * 80 + [B_] + [6] * 10, B_, 32, 16) == 80 - 32  # a row that starts inside a cropped document


def test_gist_loss_is_zero_for_a_perfect_prediction_and_none_below_a_block():
    model, gistnet, _, _ = setup()
    targets = torch.randint(0, 97, (2, 32))
    perfect = torch.full((2, 32, 97), -50.0).scatter(2, targets[..., None], 50.0)
    loss, cos = gist_loss(model, gistnet, perfect, targets, 1)
    assert loss.item() < 1e-5 and cos.item() > 1 - 1e-5
    loss, _ = gist_loss(model, gistnet, torch.randn(2, 32, 97, requires_grad=True), targets, 1)
    assert loss.item() > 0.01
    assert gist_loss(model, gistnet, perfect, targets, 2) is None  # LOD2 needs a 1024-token horizon
    # it trains the model (through the soft prediction), never GistNet: a constant GistNet would make cos = 1
    logits = torch.randn(2, 32, 97, requires_grad=True)
    gist_loss(model, gistnet, logits, targets, 1)[0].backward()
    assert logits.grad.abs().sum() > 0 and model.transformer.wte.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in gistnet.parameters()) and all(p.requires_grad for p in gistnet.parameters())


def test_training_gists_match_the_trees_to_the_embeddings_rounding():
    """Training builds gists from the model's embeddings in their dtype (build_source); the tree casts them to
    fp32 first and stores fp16 bits (tree.py). fp32 embeddings: the same gists up to fp16 storage; bf16 ones
    (as on an Ampere+ GPU): GistNet then computes in bf16 in training, a difference of bf16 rounding, no more."""
    from nanochat.megacontext.tree import MegaContextTree
    for dtype, tol in ((torch.float32, 2 ** -10), (torch.bfloat16, 2 ** -6)):
        model, gistnet, seq, _ = setup(n=256)
        model.cast_embeddings(dtype)
        with torch.no_grad():
            trained = build_source(model, gistnet, seq[:256], max_level=2).levels
        tree = MegaContextTree(64, gistnet, model.embed_tokens, max_level=2)
        tree.ingest(seq[:256].tolist())
        for level, n in ((1, 8), (2, 0)):
            assert trained[level].shape == (n, 64)
        stored = tree.gists(1, 0, 8)
        assert trained[1].dtype == dtype and stored.dtype == torch.float32
        torch.testing.assert_close(trained[1].float(), stored, rtol=tol, atol=tol)
        assert (trained[1].float() - stored).abs().max() > 0  # rounding, not two copies of one tensor
