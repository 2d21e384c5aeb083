"""
BPE tokenizer in the style of GPT-4: trained with rustbpe, served with tiktoken.

On disk a tokenizer is <dir>/tokenizer.pkl, a pickled tiktoken.Encoding (the same file
upstream nanochat writes, so tokenizer dirs move both ways), plus token_bytes.pt written by
scripts/tok_train.py for the bits-per-byte metric.
The pickle is untrusted input: it is read by a restricted unpickler that runs no code from it.
"""

import io
import os
import hashlib
import copy
import pickle

import torch
import tiktoken

from nanochat.common import UserError, check_digest, commit_with_digest, get_base_dir, load_torch_file

# The 9 special tokens take the last 9 ids, in this order.
SPECIAL_TOKENS = [
    "<|bos|>",  # every document / conversation starts with it
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool's output comes back
]

# GPT-4 split pattern, except numbers split in runs of 1-2 digits (not 1-3): wastes fewer
# tokens on numbers when the vocab is small.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

# -----------------------------------------------------------------------------
# Restricted loading of tokenizer.pkl
# A pickled tiktoken.Encoding needs exactly one global, tiktoken.core.Encoding, created by
# NEWOBJ and filled by BUILD with a dict {name, pat_str, mergeable_ranks, special_tokens}.
# Everything else (os.system, builtins, copyreg, ...) is refused. We don't even let the real
# Encoding.__setstate__ run: given a bare name it fetches a registered encoding (network).

class _EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling; only records the state."""
    def __setstate__(self, state):
        self.state = state


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a tokenizer pickle")


def _encoding_from_state(state):
    """Check the recorded state field by field and build the real tiktoken.Encoding."""
    if not isinstance(state, dict):
        raise ValueError(f"Encoding state is a {type(state).__name__}, expected a dict")
    required = {"name", "pat_str", "mergeable_ranks", "special_tokens"}
    if not required <= set(state) <= required | {"explicit_n_vocab"}:
        raise ValueError(f"Encoding state has keys {sorted(state)}, expected {sorted(required)}")
    if not isinstance(state["name"], str) or not isinstance(state["pat_str"], str):
        raise ValueError("Encoding name and pat_str must be strings")
    ranks, specials = state["mergeable_ranks"], state["special_tokens"]
    if not isinstance(ranks, dict) or not all(type(k) is bytes and type(v) is int for k, v in ranks.items()):
        raise ValueError("mergeable_ranks must map bytes to int")
    if not isinstance(specials, dict) or not all(type(k) is str and type(v) is int for k, v in specials.items()):
        raise ValueError("special_tokens must map str to int")
    n_vocab = state.get("explicit_n_vocab")
    if n_vocab is not None and type(n_vocab) is not int:
        raise ValueError("explicit_n_vocab must be an int")
    # the ids: every token 0..n-1 once (a duplicate rank panics inside tiktoken; a lost id loads and fails at the
    # first decode of it), all 256 bytes among them, then the special tokens right after, as tok_train writes them
    n = len(ranks)
    lost = sorted(set(range(n)) - set(ranks.values()))  # n ids, none lost: each once
    if lost:
        raise ValueError(f"mergeable_ranks must hold each id 0..{n - 1} once (id {lost[0]} is missing)")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"mergeable_ranks lacks the byte {bytes([missing[0]])!r} (a byte-level BPE needs all 256)")
    if sorted(specials.values()) != list(range(n, n + len(specials))):
        raise ValueError(f"special token ids must be {n}..{n + len(specials) - 1}, right after the {n} mergeable ranks, "
                         f"got {sorted(specials.values())}")
    return tiktoken.Encoding(name=state["name"], pat_str=state["pat_str"], mergeable_ranks=ranks,
                             special_tokens=specials, explicit_n_vocab=n_vocab)


def load_encoding(path):
    """Read a tokenizer.pkl safely -> tiktoken.Encoding. UserError on anything unexpected."""
    if not os.path.isfile(path):
        raise UserError(f"no tokenizer at {path} (train one with: python -m scripts.tok_train)")
    check_digest(path, "tokenizer")
    with open(path, "rb") as f:
        data = f.read()
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data)).load()
        if not isinstance(obj, _EncodingState) or not hasattr(obj, "state"):
            raise ValueError(f"pickle holds a {type(obj).__name__}, not a tiktoken.Encoding")
        return _encoding_from_state(obj.state)
    except Exception as e:  # corrupt, truncated or malicious: all user-fixable
        raise UserError(f"{path} is not a valid tokenizer pickle ({type(e).__name__}: {e})") from None

# -----------------------------------------------------------------------------

class RustBPETokenizer:
    """A tiktoken.Encoding plus the chat conventions (special tokens, conversation rendering)."""

    def __init__(self, enc, bos_token="<|bos|>"):
        self.enc = enc
        missing = [t for t in SPECIAL_TOKENS if t not in enc.special_tokens_set]
        if missing:
            raise UserError(f"tokenizer lacks the special tokens {missing}")
        self.bos_token_id = self.encode_special(bos_token)

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        import rustbpe  # only needed for training
        n_special = len(SPECIAL_TOKENS)
        if vocab_size < 256 + n_special:
            raise UserError(f"vocab_size must be at least {256 + n_special} (256 bytes + {n_special} special tokens), got {vocab_size}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, vocab_size - n_special, pattern=SPLIT_PATTERN)
        mergeable_ranks = {token_bytes: rank for token_bytes, rank in trainer.get_mergeable_ranks()}  # list of (bytes, id)
        # if the text ran out of pairs to merge there are fewer ranks than asked: specials follow them directly
        offset = len(mergeable_ranks)
        special_tokens = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(name="rustbpe", pat_str=trainer.get_pattern(),
                                mergeable_ranks=mergeable_ranks, special_tokens=special_tokens)
        return cls(enc)

    @classmethod
    def from_directory(cls, tokenizer_dir):
        return cls(load_encoding(os.path.join(tokenizer_dir, "tokenizer.pkl")))

    def save(self, tokenizer_dir):
        path = os.path.join(tokenizer_dir, "tokenizer.pkl")

        def write(tmp):
            with open(tmp, "wb") as f:
                pickle.dump(self.enc, f)
        commit_with_digest(write, path)
        return path

    # --- vocabulary -----------------------------------------------------------

    def get_vocab_size(self):
        return self.enc.n_vocab

    def fingerprint(self):
        """sha256 (16 hex digits) of what the ids mean: every token's bytes in id order, the special tokens and the
        split pattern. Checkpoints record it (meta "tokenizer_fingerprint"), so a tokenizer retrained at the same
        vocab size is refused at load instead of turning the model's ids into other text."""
        enc, h = self.enc, hashlib.sha256()
        special = {enc.encode_single_token(name): name for name in enc.special_tokens_set}
        for i in range(enc.n_vocab):
            token = special[i].encode("utf-8") if i in special else enc.decode_single_token_bytes(i)
            h.update(len(token).to_bytes(4, "little") + token)
        h.update(enc._pat_str.encode("utf-8"))
        return h.hexdigest()[:16]

    def get_special_tokens(self):
        return self.enc.special_tokens_set

    def id_to_token(self, id):
        return self.enc.decode([id])

    def encode_special(self, text):
        return self.enc.encode_single_token(text)

    def get_bos_token_id(self):
        return self.bos_token_id

    # --- encode / decode ------------------------------------------------------

    def _token_id(self, token):
        """A special token given by name or by id -> id."""
        if isinstance(token, str):
            return self.encode_special(token)
        if isinstance(token, int):
            return token
        raise TypeError(f"prepend/append must be a special token string or an int id, got {type(token).__name__}")

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """str -> list[int], or list[str] -> list[list[int]]. Special-token text inside `text`
        is encoded as ordinary text; add specials explicitly with prepend / append."""
        prepend_id = None if prepend is None else self._token_id(prepend)
        append_id = None if append is None else self._token_id(append)
        if isinstance(text, str):
            rows = [self.enc.encode_ordinary(text)]
        elif isinstance(text, list):
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
        else:
            raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")
        for ids in rows:
            if prepend_id is not None:
                ids.insert(0, prepend_id)
            if append_id is not None:
                ids.append(append_id)
        return rows[0] if isinstance(text, str) else rows

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids):
        return self.enc.decode(ids)

    # --- chat -----------------------------------------------------------------

    def render_conversation(self, conversation, max_tokens=2048):
        """
        conversation = {"messages": [{"role": ..., "content": ...}, ...]} -> (ids, mask), two
        lists of equal length. mask[i] = 1 where the token is something the assistant must learn
        to produce (its text, its python calls, <|assistant_end|>), else 0 (BOS, user turns,
        <|assistant_start|>, tool output, which comes from the tool, not the model).
        """
        messages = copy.deepcopy(conversation["messages"])
        if messages and messages[0].get("role") == "system":
            # no system role in the token format: prefix it onto the first user message
            if len(messages) < 2 or messages[1].get("role") != "user":
                raise ValueError("a system message must be followed by a user message")
            if not isinstance(messages[0]["content"], str) or not isinstance(messages[1]["content"], str):
                raise ValueError("system and user message content must be strings")
            messages[1]["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = messages[1:]
        if not messages:
            raise ValueError("conversation has no messages")

        ids, mask = [], []
        def add(token_ids, m):
            if isinstance(token_ids, int):
                token_ids = [token_ids]
            ids.extend(token_ids)
            mask.extend([m] * len(token_ids))

        user_start, user_end = self.encode_special("<|user_start|>"), self.encode_special("<|user_end|>")
        assistant_start, assistant_end = self.encode_special("<|assistant_start|>"), self.encode_special("<|assistant_end|>")
        python_start, python_end = self.encode_special("<|python_start|>"), self.encode_special("<|python_end|>")
        output_start, output_end = self.encode_special("<|output_start|>"), self.encode_special("<|output_end|>")

        add(self.get_bos_token_id(), 0)
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            role, content = message.get("role"), message.get("content")
            if role != expected:
                raise ValueError(f"message {i} has role {role!r}, expected {expected!r} (roles must alternate user/assistant, starting with user)")
            if role == "user":
                if not isinstance(content, str):
                    raise ValueError(f"user message {i} content must be a string")
                add(user_start, 0)
                add(self.encode(content), 0)
                add(user_end, 0)
                continue
            add(assistant_start, 0)
            if isinstance(content, str):
                add(self.encode(content), 1)
            elif isinstance(content, list):
                for part in content:
                    kind, text = part.get("type"), part.get("text")
                    if not isinstance(text, str):
                        raise ValueError(f"assistant message {i}: part text must be a string")
                    if kind == "text":
                        add(self.encode(text), 1)
                    elif kind == "python":  # the model writes the tool call: supervised
                        add(python_start, 1)
                        add(self.encode(text), 1)
                        add(python_end, 1)
                    elif kind == "python_output":  # the tool writes this at inference: not supervised
                        add(output_start, 0)
                        add(self.encode(text), 0)
                        add(output_end, 0)
                    else:
                        raise ValueError(f"assistant message {i}: unknown part type {kind!r} (expected text, python or python_output)")
            else:
                raise ValueError(f"assistant message {i} content must be a string or a list of parts")
            add(assistant_end, 1)

        return ids[:max_tokens], mask[:max_tokens]

    def parse_assistant(self, tokens):
        """The inverse of an assistant turn's rendering: generated ids (no <|assistant_end|>)
        -> message content, a str, or a list of text / python / python_output parts when the
        reply used the calculator, so the history re-renders to the same tokens."""
        kinds = {self.encode_special("<|python_start|>"): ("python", self.encode_special("<|python_end|>")),
                 self.encode_special("<|output_start|>"): ("python_output", self.encode_special("<|output_end|>"))}
        parts, chunk, kind, end = [], [], "text", None
        for t in tokens:
            if kind == "text" and t in kinds:
                if chunk:
                    parts.append({"type": "text", "text": self.decode(chunk)})
                (kind, end), chunk = kinds[t], []
            elif kind != "text" and t == end:
                parts.append({"type": kind, "text": self.decode(chunk)})
                kind, end, chunk = "text", None, []
            else:
                chunk.append(t)
        if chunk or kind != "text":  # an unclosed call (the reply was cut off) keeps its text
            parts.append({"type": "text" if kind == "text" else kind, "text": self.decode(chunk)})
        if all(p["type"] == "text" for p in parts):
            return "".join(p["text"] for p in parts)
        return parts

    def render_for_completion(self, conversation):
        """Prompt for sampling the last assistant turn: drop it, end with <|assistant_start|>."""
        messages = conversation["messages"]
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("render_for_completion needs a conversation that ends with an assistant message")
        conversation = dict(conversation, messages=messages[:-1])
        ids, _ = self.render_conversation(conversation, max_tokens=2**62)  # never truncate a prompt
        ids.append(self.encode_special("<|assistant_start|>"))
        return ids

# -----------------------------------------------------------------------------

def compute_token_bytes(tokenizer, as_upstream=False):
    """int32 [vocab]: UTF-8 byte length of each token's bytes, 0 for special tokens (they are
    not text, so bits-per-byte leaves them out). as_upstream: counted as upstream's tok_train counts
    them, the UTF-8 length of each token decoded on its own (one ending mid-character decodes to
    U+FFFD, 3 bytes)."""
    enc = tokenizer.enc
    special_ids = {enc.encode_single_token(name) for name in enc.special_tokens_set}
    length = (lambda i: len(enc.decode([i]).encode("utf-8"))) if as_upstream else (lambda i: len(enc.decode_single_token_bytes(i)))
    return torch.tensor([0 if i in special_ids else length(i) for i in range(enc.n_vocab)], dtype=torch.int32)


def get_tokenizer():
    return RustBPETokenizer.from_directory(os.path.join(get_base_dir(), "tokenizer"))


def get_token_bytes(device="cpu", tokenizer=None):
    """The tokenizer directory's token_bytes.pt (int32 [vocab]); with `tokenizer`, checked to be this
    tokenizer's (ours, or upstream's count): another tokenizer's table makes every bpb figure wrong."""
    path = os.path.join(get_base_dir(), "tokenizer", "token_bytes.pt")
    if not os.path.isfile(path):
        raise UserError(f"no {path} (train a tokenizer with: python -m scripts.tok_train)")
    token_bytes = load_torch_file(path, device, what="token_bytes file")
    if not isinstance(token_bytes, torch.Tensor) or token_bytes.ndim != 1 or token_bytes.is_floating_point():
        raise UserError(f"{path} does not hold a 1-D integer tensor")
    if len(token_bytes) and not 0 <= int(token_bytes.min()) <= int(token_bytes.max()) <= 256:
        raise UserError(f"{path}: token byte lengths must be in 0..256")
    token_bytes = token_bytes.to(torch.int32)
    if tokenizer is not None:
        vocab_size = tokenizer.get_vocab_size()
        if token_bytes.numel() != vocab_size:
            raise UserError(f"{path} has {token_bytes.numel()} entries but the tokenizer has {vocab_size} tokens "
                            "(python -m scripts.tok_train writes both)")
        table = token_bytes.cpu()
        if not any(torch.equal(table, compute_token_bytes(tokenizer, as_upstream=u)) for u in (False, True)):
            raise UserError(f"{path} does not hold this tokenizer's token lengths: it belongs to another tokenizer "
                            "(python -m scripts.tok_train writes both)")
    return token_bytes
