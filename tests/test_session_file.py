"""session.json (nanochat/megacontext/session_file.py): what read_session accepts and refuses. Saving and
reopening whole sessions is tested with the Session (tests/test_runtime.py)."""

import json

import pytest

from nanochat.common import UserError
from nanochat.megacontext.session_file import SESSION_FILE, SESSION_FORMAT, read_session
from nanochat.megacontext.working_context import Entry


def write(path, state):
    (path / SESSION_FILE).write_text(state if isinstance(state, str) else json.dumps(state))


def test_read_session_gives_the_state_and_the_wc_entries(tmp_path):
    state = dict(format=SESSION_FORMAT, w_max=128, wc=[[1, 0, 32], [0, 32, 40]])
    write(tmp_path, state)
    got, entries = read_session(str(tmp_path))
    assert got == state and entries == [Entry(1, 0, 32), Entry(0, 32, 40)]


@pytest.mark.parametrize("state,message", [
    (None, "no session.json"),
    ("{not json", "unreadable session"),
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
