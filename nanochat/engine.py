"""
Inference: a KV cache, batched sampling and the calculator tool.

- KVCache holds keys/values as [n_layer, B, T, n_kv_head, D] with a length per row, plus the
  last token's pre-smear embedding per row (the smear mixes in the previous token).
- Engine.generate prefills the prompt once with batch 1, clones that cache to num_samples
  rows, then samples all rows together (temperature / top-k, seeded generator).
- Tool use: when a row emits <|python_end|>, the expression since <|python_start|> is
  evaluated by a small arithmetic evaluator (no eval, no builtins, a time limit) and
  <|output_start|> result <|output_end|> is forced into that row's stream.
"""

import ast
import re
import math
import time
import operator
from collections import deque

import torch
import torch.nn.functional as F


class KVCache:
    def __init__(self, batch_size, seq_len, n_kv_head, head_dim, n_layer, n_embd, device, dtype):
        self.k = torch.zeros(n_layer, batch_size, seq_len, n_kv_head, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens cached per row
        self.smear_prev = torch.zeros(batch_size, 1, n_embd, device=device, dtype=dtype)  # (B, 1, C)
        self._pos = None  # (B, T) positions of the tokens in the current forward
        self._tk, self._kpos, self._masks = 0, None, {}  # key range, key positions, masks per window

    @classmethod
    def for_model(cls, model, batch_size, seq_len):
        c = model.config
        dtype = model.transformer.wte.weight.dtype  # activations run in the embedding (compute) dtype
        return cls(batch_size, seq_len, c.n_kv_head, c.n_embd // c.n_head, c.n_layer, c.n_embd, model.get_device(), dtype)

    def expand_from(self, other):
        """Copy a batch-1 cache into every row of this one (prefill once, sample N)."""
        assert other.k.size(1) == 1 and other.k.size(2) <= self.k.size(2)
        n = int(other.lengths[0])
        self.k[:, :, :n] = other.k[:, :, :n]
        self.v[:, :, :n] = other.v[:, :, :n]
        self.lengths.fill_(n)
        self.smear_prev.copy_(other.smear_prev.expand_as(self.smear_prev))

    def positions(self, T):
        """Absolute positions of T new tokens per row; called once at the start of a forward.
        Also fixes the key range and the key positions every layer's mask is cut from."""
        self._pos = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)  # (B, T)
        self._tk = int(self._pos.max()) + 1  # one host sync per forward, not per layer
        if self._tk > self.k.size(2):
            raise RuntimeError(f"KV cache full ({self.k.size(2)} tokens)")
        self._kpos = torch.arange(self._tk, device=self._pos.device)  # (Tk,)
        self._masks = {}  # window -> (B, 1, T, Tk) bool
        return self._pos

    def attend(self, layer, q, k, v, window):
        """Write this layer's new k, v at each row's positions and attend over the cache.
        q: (B, H, T, D); k, v: (B, Hkv, T, D). Query at position p sees key j iff 0 <= p-j <= window."""
        pos, Tk = self._pos, self._tk
        rows = torch.arange(pos.size(0), device=pos.device)[:, None]  # (B, 1)
        self.k[layer][rows, pos] = k.transpose(1, 2).to(self.k.dtype)  # (B, T, Hkv, D) into [B, T_max, Hkv, D]
        self.v[layer][rows, pos] = v.transpose(1, 2).to(self.v.dtype)
        keys = self.k[layer, :, :Tk].transpose(1, 2)    # (B, Hkv, Tk, D)
        values = self.v[layer, :, :Tk].transpose(1, 2)
        if window not in self._masks:  # straight from bool comparisons: no (B, T, Tk) int64 table (~8x the mask)
            p = pos[:, :, None]  # (B, T, 1)
            self._masks[window] = ((self._kpos <= p) & (self._kpos >= p - window))[:, None]
        mask = self._masks[window]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=q.size(1) != keys.size(1))

    def truncate(self, n, prev_emb):
        """Keep the first n cached positions of every row (MegaContext: the WC's unchanged prefix);
        prev_emb (B, 1, C): the pre-smear embedding at position n-1 (zeros for none, or a gist)."""
        assert 0 <= n <= int(self.lengths.min()), f"cannot keep {n} positions of {self.lengths.tolist()}"
        self.lengths.fill_(n)
        self.smear_prev = prev_emb.to(self.smear_prev.dtype).expand_as(self.smear_prev).clone()

    def advance(self, T, last_emb):
        self.lengths += T
        self.smear_prev = last_emb.to(self.smear_prev.dtype)


# -----------------------------------------------------------------------------
# The calculator tool

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPR_CHARS = 200
MAX_MAGNITUDE = 1e18


def calculator(expr, time_limit=0.1):
    """Evaluate an arithmetic expression (numbers, + - * / // % **, parentheses) or a letter
    count "'strawberry'.count('r')"; anything else, or anything slow or huge, gives None.
    Walks the syntax tree itself: no eval, no names, no builtins."""
    # "1,234" -> "1234" outside string literals ("f(1, 2)" and "'1,000'.count(',')" untouched)
    pieces = re.split(r"""('[^']*'|"[^"]*")""", expr.strip())
    expr = "".join(p if i % 2 else re.sub(r"(?<=\d),(?=\d{3}\b)", "", p) for i, p in enumerate(pieces))
    if not expr or len(expr) > MAX_EXPR_CHARS:
        return None
    deadline = time.monotonic() + time_limit
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError):
        return None

    def ev(node):
        if time.monotonic() > deadline:
            raise ValueError("too slow")
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            if abs(node.value) > MAX_MAGNITUDE:
                raise ValueError("number too large")
            return node.value
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
            return _UNOPS[type(node.op)](ev(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            a, b = ev(node.left), ev(node.right)
            if not all(isinstance(t, (int, float)) for t in (a, b)):
                raise ValueError("arithmetic on non-numbers")
            if isinstance(node.op, ast.Pow) and (abs(b) > 64 or abs(a) > 1e6):
                raise ValueError("power too large")
            out = _BINOPS[type(node.op)](a, b)
            if abs(out) > MAX_MAGNITUDE:
                raise ValueError("result too large")
            return out
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
                and len(node.args) == 1 and not node.keywords):
            s, sub = ev(node.func.value), ev(node.args[0])
            if isinstance(s, str) and isinstance(sub, str):
                return s.count(sub)
        raise ValueError(f"not allowed: {type(node).__name__}")

    try:
        value = ev(tree)
    except (ValueError, ZeroDivisionError, OverflowError, TypeError):
        return None
    if isinstance(value, float):
        if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
            return None
        value = float(f"{value:.10g}")  # 10 significant digits: 0.1 + 0.2 -> 0.3, 1 / 3e6 -> 3.333333333e-07 (not 0.0)
        value = int(value) if value.is_integer() else value  # whole numbers as GSM8K writes them: 24, not 24.0 (-0.0 -> 0)
    return value if isinstance(value, (int, float)) else None


# -----------------------------------------------------------------------------

# a temperature is 0 (greedy) or in [TEMPERATURE_MIN, TEMPERATURE_MAX]: below the minimum, logits / temperature
# leaves float32 (softcapped logits reach 15; 15 / 1e-38 does not fit) and softmax gives NaN
TEMPERATURE_MIN, TEMPERATURE_MAX = 1e-2, 2.0


def temperature_problem(temperature):
    """None for a usable temperature, else the one-line reason it is not."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            temperature == 0 or TEMPERATURE_MIN <= temperature <= TEMPERATURE_MAX):
        return f"temperature must be 0 (greedy) or in [{TEMPERATURE_MIN:g}, {TEMPERATURE_MAX:g}], got {temperature!r}"
    return None


def sample_next(logits, generator, temperature=1.0, top_k=None):
    """logits: (B, V) -> (B,) token ids; temperature 0 is greedy (else see TEMPERATURE_MIN)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    if temperature_problem(temperature):
        raise ValueError(temperature_problem(temperature))
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 (or None: no cut), got {top_k}")
    if top_k is not None:  # a draw among the k best ids only, as upstream's engine: the same seed, the same tokens
        vals, ids = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)  # (B, k)
        choice = torch.multinomial(F.softmax(vals / temperature, dim=-1), num_samples=1, generator=generator)  # (B, 1)
        return ids.gather(1, choice).squeeze(1)
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


class RowState:
    """Per-sample bookkeeping: forced tool tokens, the python expression being written, done."""

    def __init__(self):
        self.forced = deque()
        self.python_tokens = None  # list while inside <|python_start|> ... <|python_end|>
        self.done = False


class ToolUse:
    """The calculator protocol over one stream of tokens (a row of Engine, a MegaContext session):
    track(row, token) ends the row at a stop token, and after <|python_end|> queues the forced
    <|output_start|> result <|output_end|> tokens in row.forced."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.turn_end = special("<|assistant_end|>")  # how the chat format closes a reply, whichever stop ended it
        self.stop_tokens = {self.turn_end, tokenizer.get_bos_token_id()}

    def track(self, row, token):
        if token in self.stop_tokens:
            row.done = True
        elif token == self.python_start:
            row.python_tokens = []
        elif token == self.python_end and row.python_tokens is not None:
            result = calculator(self.tokenizer.decode(row.python_tokens))
            row.python_tokens = None
            if result is not None:
                row.forced.extend([self.output_start, *self.tokenizer.encode(str(result)), self.output_end])
        elif row.python_tokens is not None:
            row.python_tokens.append(token)


class Engine:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.tools = ToolUse(tokenizer)
        self.stop_tokens = self.tools.stop_tokens

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Yields (token_column, token_masks): one token per sample per step; mask 0 marks a
        token forced by the calculator tool. A row stops at <|assistant_end|> or <|bos|>."""
        assert isinstance(tokens, list) and tokens and isinstance(tokens[0], int)
        model, device = self.model, self.model.get_device()
        limit = model.config.sequence_len if max_tokens is None else len(tokens) + max_tokens
        limit = min(limit, model.cos.size(1))
        if len(tokens) >= limit:
            return
        generator = torch.Generator(device=device).manual_seed(seed)

        prefill = KVCache.for_model(model, 1, len(tokens))
        logits = model(torch.tensor([tokens], dtype=torch.long, device=device), kv_cache=prefill)[:, -1]  # (1, V)
        cache = KVCache.for_model(model, num_samples, limit)
        cache.expand_from(prefill)
        logits = logits.expand(num_samples, -1)  # (N, V)

        rows = [RowState() for _ in range(num_samples)]
        steps = limit - len(tokens)
        for step in range(steps):
            sampled = sample_next(logits, generator, temperature, top_k).tolist()
            column, masks = [], []
            for row, token in zip(rows, sampled):
                if row.done:  # finished rows keep feeding their last token; nobody reads them
                    column.append(token)
                    masks.append(1)
                    continue
                forced = bool(row.forced)
                token = row.forced.popleft() if forced else token
                column.append(token)
                masks.append(0 if forced else 1)
                self.tools.track(row, token)
            yield column, masks
            if all(row.done for row in rows) or step == steps - 1:
                return
            logits = model(torch.tensor(column, dtype=torch.long, device=device)[:, None], kv_cache=cache)[:, -1]

    def generate_batch(self, tokens, num_samples=1, keep_stop=False, **kwargs):
        """-> (results, masks): prompt + generated tokens per sample. The stop token that ended
        a row is left out, or kept (mask 1: it was sampled) with keep_stop=True."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if done[i]:
                    continue
                done[i] = token in self.stop_tokens
                if keep_stop or not done[i]:
                    results[i].append(token)
                    masks[i].append(mask)
        return results, masks
