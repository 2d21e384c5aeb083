"""The package's imports run one way: no cycle among nanochat's modules, counting the imports inside
functions too, and the inference side (runtime, composite, checkpoint) never reaches training or evaluation."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph():
    """{module: set of nanochat modules it imports}, anywhere in its file; importing a.b.c also imports a.b."""
    files = {module_name(p): p for p in (ROOT / "nanochat").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import x`: x is a module of pkg or a name in pkg's __init__
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module for a in node.names]
            else:
                continue
            for t in targets:
                while t:
                    if t in files and t != name:
                        deps.add(t)
                    t = t.rpartition(".")[0]
        graph[name] = deps
    return graph


def find_cycle(graph):
    """A list of modules m0 -> m1 -> ... -> m0, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for d in graph[todo.pop()]:
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "nanochat.megacontext.horizon" in graph["nanochat.megacontext.training"]  # the walk sees real edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_model_and_the_inference_side_stay_below_training_and_evaluation():
    graph = import_graph()
    mc = "nanochat.megacontext"
    assert not any(m.startswith(mc) for m in reachable(graph, "nanochat.gpt"))
    for m in ("runtime", "slots", "session_file", "composite", "checkpoint", "megaprediction"):
        reached = reachable(graph, f"{mc}.{m}")
        assert not reached & {f"{mc}.training", f"{mc}.evaluation"}, (m, sorted(reached))
