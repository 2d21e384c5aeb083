"""session.json (nanochat/megacontext/session_file.py): what read_session accepts and refuses. Saving and
reopening whole sessions is tested with the Session (tests/test_runtime.py)."""

import json
import base64
import random

import pytest
import torch

from nanochat.common import UserError, json_checksum as checksum
from nanochat.megacontext.session_file import SESSION_FILE, SESSION_FORMAT, read_session
from nanochat.megacontext.working_context import Entry


def write(path, state):
    (path / SESSION_FILE).write_text(state if isinstance(state, str) else json.dumps(state))


def valid_state():
    state = dict(format=SESSION_FORMAT, w_max=128, gist_first=False, wc=[[1, 0, 32], [0, 32, 40]], plan=None,
                 allocator=dict(steps=3, last_toggled=[[1, 0, 2]]), memories=[], stats=dict(refocuses=1, memory_edits=[0]),
                 rng=base64.b64encode(torch.Generator().get_state().numpy().tobytes()).decode("ascii"))
    state["checksum"] = checksum(state)
    return state


def test_read_session_gives_the_state_and_the_wc_entries(tmp_path):
    state = valid_state()
    write(tmp_path, state)
    got, entries = read_session(str(tmp_path))
    assert got == state and entries == [Entry(1, 0, 32), Entry(0, 32, 40)]


@pytest.mark.parametrize("state,message", [
    (None, "no session.json"),
    ("{not json", "unreadable session"),
    ("[" * 100_000, "unreadable session"),
    ("[1, 2]", "not a JSON object"),
    (dict(format=SESSION_FORMAT + 1, wc=[]), "this code reads"),
    (dict(wc=[]), "unreadable session"),
    (dict(format=SESSION_FORMAT, wc=[[1, 0]]), "unreadable session"),
    (dict(format=SESSION_FORMAT, wc=[["a", 0, 32]]), "unreadable session"),
])
def test_bad_session_files_are_one_line_errors(tmp_path, state, message):
    if state is not None:
        write(tmp_path, state)
    with pytest.raises(UserError, match=message) as e:
        read_session(str(tmp_path))
    assert "\n" not in str(e.value)


# values read_session lets through: valid ones, and a tree record (a dict), which tree.load validates at open
VALID_TOO = [("gist_first", True), ("plan", None), ("wc", []), ("memories", []), ("stats", {}), ("tree", None), ("tree", {}),
             ("tree", dict(steps="3"))]


@pytest.mark.parametrize("field", ["w_max", "gist_first", "wc", "plan", "allocator", "memories", "rng", "stats", "tree"])
def test_each_field_of_the_wrong_type_is_named(tmp_path, field):
    """Every field, missing or given a value of another type (its checksum recomputed, as a careless
    edit by hand would not but a tool might): a one-line error naming that field."""
    for value in ["missing", None, "x", 1.5, -1, True, [], {}, [[1, 2]], dict(steps="3")]:
        if any(field == f and value == v and type(value) is type(v) for f, v in VALID_TOO):
            continue
        state = valid_state()
        if value == "missing":
            if field == "tree":
                continue  # older files have none
            del state[field]
        else:
            state[field] = value
        state["checksum"] = checksum(state)
        write(tmp_path, state)
        with pytest.raises(UserError, match=f"field {field}") as e:
            read_session(str(tmp_path))
        assert "\n" not in str(e.value), (field, value)


def test_truncated_or_flipped_session_files_are_refused_never_misread(tmp_path):
    """Seeded fuzz: the file cut at random offsets and single bytes flipped. Each read ends in the one-line
    error, or (a flip in the layout's whitespace that JSON ignores) in exactly the saved state."""
    state = valid_state()
    text = json.dumps(state, indent=2).encode("utf-8")
    rng = random.Random(0)
    cases = [text[:rng.randrange(len(text))] for _ in range(60)]
    for _ in range(120):
        b = bytearray(text)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        cases.append(bytes(b))
    for data in cases:
        (tmp_path / SESSION_FILE).write_bytes(data)
        try:
            got, _ = read_session(str(tmp_path))
        except UserError as e:
            assert "\n" not in str(e)
            continue
        assert got == state
