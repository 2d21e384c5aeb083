"""
Saving and opening a chat session (runtime.Session.save / Session.open): <path>/session.json beside
the session's disk tree, written atomically after the tree's rows are flushed.

session.json (format SESSION_FORMAT): w_max, gist_first, wc (the session WC's entries as [level,
start, end]), plan (the live gist-first plan: [start, vector] or null), allocator (the FocusAllocator's
cooldowns: steps, last_toggled), memories (each attached Core-Knowledge memory: name, path,
allocator, wc: its WC segment's entries), rng (the sampling generator's state, base64), stats.
"""

import os
import json
import base64

import torch

from nanochat.common import UserError
from nanochat.megacontext.working_context import Entry, WorkingContext, WorkingContextError, check_working_context

SESSION_FILE = "session.json"
SESSION_FORMAT = 1


def allocator_state(a, memory):
    """The FocusAllocator's cooldown state of one memory's nodes, as JSON (Session.save / open)."""
    return dict(steps=a.steps, last_toggled=[[lvl, s, t] for (m, lvl, s), t in a.last_toggled.items() if m == memory])


def segment_entries(session, m):
    """Memory m's WC entries as [level, start, end] lists ([] before the first token)."""
    return [] if session.wc is None else [[e.level, e.start, e.end] for e in session.wc.segment(m).entries]


def session_state(session):
    """A session's state as session.json holds it (JSON-ready)."""
    last = len(session.memories)  # the session's own memory
    return dict(
        format=SESSION_FORMAT, w_max=session.w_max, gist_first=session.gist_first,
        wc=segment_entries(session, last),
        plan=None if session.plan is None else [session.plan[0], session.plan[1].float().cpu().tolist()],
        allocator=allocator_state(session.allocator, last),
        memories=[dict(name=name, path=path, allocator=allocator_state(session.allocator, m), wc=segment_entries(session, m))
                  for m, (name, _, path) in enumerate(session.memories)],
        rng=base64.b64encode(session.generator.get_state().numpy().tobytes()).decode("ascii"),
        stats=session.stats,
    )


def read_session(path):
    """<path>/session.json -> (state dict, the session WC's entries), or a one-line UserError."""
    file = os.path.join(path, SESSION_FILE)
    if not os.path.exists(file):
        raise UserError(f"{path}: no {SESSION_FILE}, not a saved MegaContext session")
    try:
        with open(file, encoding="utf-8") as f:
            state = json.load(f)
        if state["format"] != SESSION_FORMAT:
            raise ValueError(f"format {state['format']}, this code reads {SESSION_FORMAT}")
        entries = [Entry(*map(int, e)) for e in state["wc"]]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{file}: unreadable session ({type(e).__name__}: {e})")
    return state, entries


def restore_session(session, state, entries):
    """Put a freshly constructed session (over the saved tree) back where save() left it: the memories
    reattached, the WC and its segments checked against the trees, allocator cooldowns, plan, RNG, stats."""
    memories = state.get("memories", [])
    try:
        for memory in memories:
            session._attach(memory["path"], memory["name"])
        if entries:
            segments = [WorkingContext(Entry(*map(int, e)) for e in memory["wc"]) for memory in memories] + [WorkingContext(entries)]
            session.wc = check_working_context(WorkingContext.joined(segments), session.source, session.w_max,
                                               session.config.recent_tokens, session.config.ck_min_session_share)
        saved = [memory["allocator"] for memory in memories] + [state["allocator"]]
        session.allocator.steps = saved[-1]["steps"]
        session.allocator.last_toggled = {(m, lvl, start): t for m, a in enumerate(saved) for lvl, start, t in a["last_toggled"]}
    except (WorkingContextError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{os.path.join(session.tree.path, SESSION_FILE)}: the saved working context does not fit this "
                        f"session's trees (a memory rebuilt since it was saved?): {type(e).__name__}: {e}") from None
    if state["plan"] is not None:
        session.plan = (state["plan"][0], torch.tensor(state["plan"][1], dtype=torch.float32))
    session.generator.set_state(torch.frombuffer(bytearray(base64.b64decode(state["rng"])), dtype=torch.uint8))
    session.stats.update(state["stats"])
