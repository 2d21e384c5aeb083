"""
Saving and opening a chat session (runtime.Session.save / Session.open): <path>/session.json beside
the session's disk tree, written atomically after the tree's rows are flushed.

session.json (format SESSION_FORMAT): w_max, gist_first, wc (the session WC's entries as [level,
start, end]), plan (the live gist-first plan: [start, vector] or null), allocator (the FocusAllocator's
cooldowns of the session's nodes: steps, last_toggled), memories (each attached Core-Knowledge memory:
name, path, allocator (its nodes' cooldowns), wc: its WC segment's entries), rng (the sampling
generator's state, base64), focus_rng (the stochastic allocator's CPU generator's state, base64; absent in
older files: it starts from the seed), stats, tree (the session tree's meta.json as of this save: the one
commit point of a save, tree.load reads the tree at its counts; absent in older files), checksum
(sha256 of the rest: a changed byte is refused, not used; absent in older files).
"""

import os
import json
import math
import base64

import torch

from nanochat.common import UserError, json_checksum
from nanochat.megacontext.working_context import Entry, WorkingContext, WorkingContextError, check_working_context

SESSION_FILE = "session.json"
SESSION_FORMAT = 1


def allocator_state(a, memory):
    """The FocusAllocator's cooldown state of one memory's nodes, as JSON (Session.save / open)."""
    return dict(steps=a.steps, last_toggled=[[lvl, s, t] for (m, lvl, s), t in a.last_toggled.items() if m == memory])


def segment_entries(session, m):
    """Memory m's WC entries as [level, start, end] lists ([] before the first token)."""
    return [] if session.wc is None else [[e.level, e.start, e.end] for e in session.wc.segment(m).entries]


def encode_generator(generator):
    """A torch.Generator's state as base64 text (session.json's rng fields)."""
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode("ascii")


def decode_generator(text):
    """The inverse of encode_generator: a uint8 state tensor (its size tells the generator's device type)."""
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def session_state(session):
    """A session's state as session.json holds it (JSON-ready), with its checksum."""
    last = len(session.memories)  # the session's own memory
    state = dict(
        format=SESSION_FORMAT, w_max=session.w_max, gist_first=session.gist_first,
        wc=segment_entries(session, last),
        plan=None if session.plan is None else [session.plan[0], session.plan[1].float().cpu().tolist()],
        allocator=allocator_state(session.allocator, last),
        memories=[dict(name=name, path=path, allocator=allocator_state(session.allocator, m), wc=segment_entries(session, m))
                  for m, (name, _, path) in enumerate(session.memories)],
        rng=encode_generator(session.generator),
        focus_rng=encode_generator(session.focus_generator),
        stats=session.stats,
        tree=session.tree._meta(),  # the tree's commit record: Session.open reads the tree at these counts
    )
    state["checksum"] = json_checksum(state)
    return state


def _is_int(x, low=0):
    return type(x) is int and x >= low


def _is_entries(x):
    return isinstance(x, list) and all(isinstance(e, list) and len(e) == 3 and all(_is_int(v) for v in e) for e in x)


def _is_allocator(x):
    return isinstance(x, dict) and _is_int(x.get("steps")) and _is_entries(x.get("last_toggled"))


FIELDS = ("format", "w_max", "gist_first", "wc", "plan", "allocator", "memories", "rng", "focus_rng", "stats", "tree", "checksum")


def _check_fields(state):
    """The first field of a session.json that is missing or of the wrong type / size, or None."""
    if not isinstance(state, dict):
        return "the file", "not a JSON object"
    if state.get("format") != SESSION_FORMAT:
        return "format", f"{state.get('format')!r}, this code reads {SESSION_FORMAT}"
    missing = [f for f in ("w_max", "gist_first", "wc", "plan", "allocator", "memories", "rng", "stats") if f not in state]
    if missing:
        return missing[0], "missing"
    unknown = sorted(set(state) - set(FIELDS))
    if unknown:
        return unknown[0], "not a session.json field"
    if "tree" in state and "checksum" not in state:  # written by a save that records the tree: it has a checksum
        return "checksum", "missing"
    plan, rng = state.get("plan"), state.get("rng")
    checks = [
        ("w_max", _is_int(state.get("w_max"), 1)),
        ("gist_first", isinstance(state.get("gist_first"), bool)),
        ("wc", _is_entries(state.get("wc"))),
        ("plan", plan is None or (isinstance(plan, list) and len(plan) == 2 and _is_int(plan[0]) and isinstance(plan[1], list)
                                  and all(type(v) in (int, float) and math.isfinite(v) for v in plan[1]))),
        ("allocator", _is_allocator(state.get("allocator"))),
        ("memories", isinstance(state.get("memories"), list) and all(
            isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("path"), str)
            and _is_allocator(m.get("allocator")) and _is_entries(m.get("wc")) for m in state["memories"])),
        ("rng", isinstance(rng, str) and len(rng) > 0),
        ("focus_rng", "focus_rng" not in state or (isinstance(state["focus_rng"], str) and len(state["focus_rng"]) > 0)),
        ("stats", isinstance(state.get("stats"), dict) and all(
            isinstance(k, str) and (_is_int(v) or (isinstance(v, list) and all(_is_int(x) for x in v)))
            for k, v in state["stats"].items())),
        ("tree", state.get("tree") is None or isinstance(state.get("tree"), dict)),
    ]
    return next(((field, "missing or of the wrong type or size") for field, ok in checks if not ok), None)


def read_session(path):
    """<path>/session.json -> (state dict, the session WC's entries), or a one-line UserError naming
    the field that does not fit."""
    file = os.path.join(path, SESSION_FILE)
    if not os.path.exists(file):
        raise UserError(f"{path}: no {SESSION_FILE}, not a saved MegaContext session")
    try:
        with open(file, encoding="utf-8") as f:
            state = json.load(f)
    except (ValueError, RecursionError) as e:
        raise UserError(f"{file}: unreadable session ({type(e).__name__}: {str(e)[:120]})") from None
    if isinstance(state, dict) and "checksum" in state and state["checksum"] != json_checksum(state):
        raise UserError(f"{file}: the session's content does not match its checksum (changed or damaged since it was saved)")
    bad = _check_fields(state)
    if bad is not None:
        raise UserError(f"{file}: unreadable session (field {bad[0]}: {bad[1]})")
    for field in ("rng", "focus_rng"):  # generators' states (the sampling one: any device's, restore_session)
        try:
            if field in state:
                base64.b64decode(state[field], validate=True)
        except ValueError as e:
            raise UserError(f"{file}: unreadable session (field {field}: {e})") from None
    return state, [Entry(*e) for e in state["wc"]]


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
        if len(state["plan"][1]) != session.model.config.n_embd:
            raise UserError(f"{os.path.join(session.tree.path, SESSION_FILE)}: unreadable session (field plan: a "
                            f"{len(state['plan'][1])}-wide gist, the model's are {session.model.config.n_embd})")
        session.plan = (state["plan"][0], torch.tensor(state["plan"][1], dtype=torch.float32))
    rng = decode_generator(state["rng"])
    if rng.numel() == session.generator.get_state().numel():
        session.generator.set_state(rng)
    # else it was saved on another kind of device (a CPU generator's state is 5056 bytes, a CUDA one's 16):
    # the session reads on as saved, only its sampling starts again from the seed
    if "focus_rng" in state:  # a CPU generator on every device
        focus = decode_generator(state["focus_rng"])
        if focus.numel() != session.focus_generator.get_state().numel():
            raise UserError(f"{os.path.join(session.tree.path, SESSION_FILE)}: unreadable session (field focus_rng: "
                            f"{focus.numel()} bytes, not a CPU generator's state)")
        session.focus_generator.set_state(focus)
    session.stats.update(state["stats"])
