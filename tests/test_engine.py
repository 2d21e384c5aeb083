import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.engine import Engine, KVCache, calculator
from nanochat.tokenizer import RustBPETokenizer
from conftest import jitter


@pytest.fixture(scope="module")
def tokenizer():
    text = "the quick brown fox jumps over the lazy dog 0123456789 + - * / = ( ) " * 50
    return RustBPETokenizer.train_from_iterator(iter([text]), 300)


def tiny_model(vocab_size, seed=0, window_pattern="SL", sequence_len=128, n_kv_head=1):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=3, n_head=2, n_kv_head=n_kv_head,
                          n_embd=64, window_pattern=window_pattern))
    model.init_weights()
    jitter(model.parameters(), 0.05)  # make every term (smear, c_proj, value embeddings) matter
    model.eval()
    return model


@pytest.mark.parametrize("window_pattern,sequence_len", [("L", 128), ("SL", 128)])
def test_cached_logits_equal_uncached(tokenizer, window_pattern, sequence_len):
    """Prefill 150 tokens in chunks, then one at a time: every step's logits equal the full
    forward's. With sequence_len 128 the S window is 128 < 150, so windows matter."""
    model = tiny_model(tokenizer.get_vocab_size(), window_pattern=window_pattern, sequence_len=sequence_len)
    ids = torch.randint(0, tokenizer.get_vocab_size(), (1, 150))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, 1, 200)
        parts = [model(ids[:, :60], kv_cache=cache), model(ids[:, 60:100], kv_cache=cache)]
        parts += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(100, 150)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-4)
    assert int(cache.lengths[0]) == 150


def test_cached_greedy_decoding_equals_uncached(tokenizer):
    model = tiny_model(tokenizer.get_vocab_size())
    prompt = tokenizer.encode("the quick brown", prepend=tokenizer.get_bos_token_id())
    uncached = list(model.generate(prompt, 40, temperature=0))
    engine = Engine(model, tokenizer)
    results, masks = engine.generate_batch(prompt, num_samples=1, max_tokens=40, temperature=0)
    stops = engine.stop_tokens
    expected = []
    for t in uncached:  # the engine stops at <|assistant_end|> / <|bos|>
        if t in stops:
            break
        expected.append(t)
    assert results[0] == prompt + expected


def test_ragged_rows_match_single_row_decoding(tokenizer):
    """Rows of different lengths in one cache each decode as they would alone."""
    model = tiny_model(tokenizer.get_vocab_size())
    a = torch.randint(0, 300, (1, 10))
    b = torch.randint(0, 300, (1, 14))
    with torch.no_grad():
        cache = KVCache.for_model(model, 2, 32)
        cache_a, cache_b = KVCache.for_model(model, 1, 32), KVCache.for_model(model, 1, 32)
        model(a, kv_cache=cache_a)
        model(b, kv_cache=cache_b)
        # fill the shared cache row by row through single-row views of the same prompts
        cache.k[:, 0:1], cache.v[:, 0:1] = cache_a.k, cache_a.v
        cache.k[:, 1:2], cache.v[:, 1:2] = cache_b.k, cache_b.v
        cache.lengths = torch.tensor([10, 14])
        cache.smear_prev = torch.cat([cache_a.smear_prev, cache_b.smear_prev])
        nxt = torch.tensor([[5], [7]])
        both = model(nxt, kv_cache=cache)
        alone_a = model(nxt[:1], kv_cache=cache_a)
        alone_b = model(nxt[1:], kv_cache=cache_b)
    assert torch.allclose(both[0], alone_a[0], atol=1e-5) and torch.allclose(both[1], alone_b[0], atol=1e-5)


def test_samples_are_seeded_and_rows_differ(tokenizer):
    model = tiny_model(tokenizer.get_vocab_size())
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("the lazy", prepend=tokenizer.get_bos_token_id())
    r1, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=20, temperature=1.0, top_k=50, seed=7)
    r2, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=20, temperature=1.0, top_k=50, seed=7)
    assert r1 == r2
    assert len({tuple(r) for r in r1}) > 1  # the 4 samples are not clones of each other
    r3, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=20, temperature=1.0, top_k=50, seed=8)
    assert r3 != r1


def test_calculator():
    assert calculator("2 + 3 * 4") == 14
    assert calculator("1,234 + 1") == 1235 and calculator("1,234,567 + 1") == 1234568
    assert calculator("1,2") is None  # a tuple, not 12
    assert calculator("7 / 2") == 3.5
    assert calculator("10 / 4 * 2") == 5
    assert calculator("'strawberry'.count('r')") == 3
    assert calculator("2 ** 10") == 1024
    # small results keep their digits (rounding to 6 decimals gave 0.0 and -0.0); float noise is cut
    assert calculator("1/3000000") == 3.333333333e-07 and str(calculator("-1/3000000")) == "-3.333333333e-07"
    assert str(calculator("0.1 + 0.2")) == "0.3" and str(calculator("2 ** -20")) == "9.536743164e-07"
    assert str(calculator("-0.0 * 1")) == "0"
    # commas inside a string are text, not thousands separators; a huge constant is refused like a huge result
    assert calculator("'1,000,000'.count(',')") == 2 and calculator('"a,b".count(",")') == 1
    assert calculator("1e300") is None and calculator("1e300 / 1e290") is None
    for bad in ["__import__('os').system('ls')", "open('x')", "x + 1", "9 ** 9 ** 9", "1 / 0", "[1, 2]", "'a' * 10**9", "", "2 +"]:
        assert calculator(bad) is None, bad


class ScriptedModel(torch.nn.Module):
    """Emits a fixed script of tokens (by position), whatever it is fed; records what it was fed."""

    def __init__(self, script, vocab_size, prompt_len):
        super().__init__()
        self.config = GPTConfig(sequence_len=256, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.transformer = torch.nn.ModuleDict(dict(wte=torch.nn.Embedding(vocab_size, 8)))
        self.cos = torch.zeros(1, 1000, 1, 4)
        self.script, self.prompt_len, self.fed = script, prompt_len, []

    def get_device(self):
        return torch.device("cpu")

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        start = int(kv_cache.lengths[0])
        kv_cache.lengths += T
        self.fed.append(idx[0].tolist())
        logits = torch.zeros(B, T, self.config.vocab_size)
        for t in range(T):
            i = start + t + 1 - self.prompt_len  # index into the script of the token to predict next
            if 0 <= i < len(self.script):
                logits[:, t, self.script[i]] = 10.0
        return logits


def test_calculator_tool_forces_output_tokens(tokenizer):
    sp = tokenizer.encode_special
    expr = tokenizer.encode("12 * 3")
    script = [*tokenizer.encode("so"), sp("<|python_start|>"), *expr, sp("<|python_end|>")]
    n_forced = 2 + len(tokenizer.encode("36"))
    script += [0] * n_forced + tokenizer.encode(" done") + [sp("<|assistant_end|>")]
    prompt = [tokenizer.get_bos_token_id(), sp("<|assistant_start|>")]
    model = ScriptedModel(script, tokenizer.get_vocab_size(), len(prompt))
    engine = Engine(model, tokenizer)
    results, masks = engine.generate_batch(prompt, num_samples=1, max_tokens=60, temperature=0)
    out = results[0][len(prompt):]
    forced = [sp("<|output_start|>"), *tokenizer.encode("36"), sp("<|output_end|>")]
    k = out.index(sp("<|python_end|>")) + 1
    assert out[k:k + len(forced)] == forced
    assert masks[0][len(prompt) + k:len(prompt) + k + len(forced)] == [0] * len(forced)
    assert all(m == 1 for m in masks[0][len(prompt):len(prompt) + k])
    assert tokenizer.decode(out).endswith(" done")
    fed = [t for chunk in model.fed for t in chunk]
    assert fed[len(prompt) + k:len(prompt) + k + len(forced)] == forced  # the forced tokens go back into the model
    model.fed.clear()
    kept, kept_masks = engine.generate_batch(prompt, num_samples=1, max_tokens=60, temperature=0, keep_stop=True)
    assert kept[0] == results[0] + [sp("<|assistant_end|>")] and kept_masks[0] == masks[0] + [1]


def test_max_tokens_and_stop(tokenizer):
    model = tiny_model(tokenizer.get_vocab_size())
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("the", prepend=tokenizer.get_bos_token_id())
    steps = list(engine.generate(prompt, num_samples=2, max_tokens=5, temperature=0))
    assert len(steps) <= 5 and all(len(col) == 2 for col, _ in steps)


def test_a_temperature_that_would_overflow_the_logits_is_refused():
    """logits / 1e-300 leaves float32 (softmax then NaN): 0 is greedy, the rest must be in range."""
    from nanochat.engine import sample_next, temperature_problem
    logits = torch.tensor([[15.0, -15.0, 3.0]])
    gen = torch.Generator().manual_seed(0)
    assert sample_next(logits, gen, 0).item() == 0 and sample_next(logits, gen, 0.01).item() == 0
    for t in (1e-300, 1e-45, 1e-3, 2.5, float("nan"), float("inf"), -1.0, True):
        assert temperature_problem(t) is not None
        with pytest.raises(ValueError, match="temperature must be 0"):
            sample_next(logits, gen, t)
    with pytest.raises(ValueError, match="top_k must be at least 1"):  # was a raw torch.topk error
        sample_next(logits, gen, 1.0, top_k=0)


def test_top_k_sampling_draws_among_the_k_best_ids_as_upstreams_engine_does():
    """Upstream's engine draws from softmax(topk values / T) and maps the draw back to its id, so
    one seed gives one token stream there and here; a draw over the whole masked vocabulary reads
    the generator differently."""
    from nanochat.engine import sample_next
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    for k, t in ((1, 1.0), (5, 0.7), (50, 1.3), (80, 1.0)):
        got = [sample_next(logits, g, t, top_k=k) for g in [torch.Generator().manual_seed(7)] for _ in range(20)]
        g = torch.Generator().manual_seed(7)
        for ids in got:
            vals, best = torch.topk(logits, min(k, 50), dim=-1)
            draw = torch.multinomial(torch.softmax(vals / t, dim=-1), 1, generator=g)
            assert ids.tolist() == best.gather(1, draw).squeeze(1).tolist()
            assert all(i in row for i, row in zip(ids.tolist(), best.tolist()))
