"""
nanochat.execution: programs run in a limited child process; the parent survives whatever
they do. Timing assertions are only generous upper bounds that prove a timeout fired.
"""

import os
import sys
import time
import textwrap

import pytest

from nanochat.execution import execute_code, ExecutionResult

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resource limits / process groups")


def pid_gone(pid):
    """True when pid no longer runs (absent, or a zombie awaiting a reaper that is not us)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return True


def test_passing_program_and_stdout():
    r = execute_code("import math\nprint('hello', math.factorial(5))\n")
    assert isinstance(r, ExecutionResult)
    assert r.success and r.error is None
    assert r.stdout == "hello 120\n"
    assert not r.timed_out and not r.memory_exceeded


def test_stderr_and_exit_codes():
    r = execute_code("import sys\nsys.stderr.write('warn\\n')\n")
    assert r.success and r.stderr == "warn\n"
    r = execute_code("import sys\nprint('partial')\nsys.exit(3)\n")
    assert not r.success and r.error == "exit code 3" and r.stdout == "partial\n"


def test_a_program_that_closes_its_stdout_still_completes():
    """The bootstrap's own flush after the program raised on the closed stream: a pass reported as exit code 1."""
    r = execute_code("import sys\nprint('done')\nsys.stdout.close()\nsys.stderr.close()\n")
    assert r.success and r.error is None, (r.error, r.stderr)


@pytest.mark.parametrize("exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)", "import posix; posix._exit(0)",
                                       "raise SystemExit", "import sys; sys.exit()"])
def test_an_early_exit_is_not_a_pass(exit_call):
    """HumanEval's check() must run to its end: exiting 0 before a failing assert fails."""
    r = execute_code(humaneval_program(WRONG_COMPLETION).replace("check(has_close_elements)", exit_call + "\ncheck(has_close_elements)"))
    assert not r.success and r.error.startswith("exited before the end of the program"), r.error


def test_the_outcome_cannot_be_forged_through_a_status_file():
    """The program writes what a status file beside it would have said, then fails: its real end is reported."""
    forge = ("import json, os\nfor p in ('../status.json', 'status.json'):\n"
             "    json.dump({'type': 'MemoryError', 'memory': True, 'message': 'forged'}, open(p, 'w'))\n")
    r = execute_code(forge + "assert 1 == 2, 'real failure'\n")
    assert not r.success and r.error == "AssertionError: real failure" and not r.memory_exceeded
    r = execute_code(forge + "import posix\nposix._exit(1)\n")
    assert not r.success and r.error == "exit code 1" and not r.memory_exceeded


@linux_only
def test_no_process_outlives_execute_code_not_even_in_a_new_session():
    """fork + setsid (its own session and process group, past killpg) and a double fork: every
    one of them is gone when execute_code returns, after a normal exit and after a timeout."""
    program = textwrap.dedent("""
        import os, posix, sys, time
        for _ in range(2):
            pid = posix.fork()
            if pid == 0:
                posix.setsid()
                if posix.fork() == 0:  # a grandchild, orphaned at once
                    print("pid", os.getpid(), flush=True)
                    time.sleep(60)
                print("pid", os.getpid(), flush=True)
                time.sleep(60)
        time.sleep(0.3)
    """)
    for timeout in (5.0, 0.2):
        r = execute_code(program + ("" if timeout > 1 else "time.sleep(60)\n"), timeout=timeout)
        pids = [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("pid ")]
        assert len(pids) == 4, r.stdout + r.stderr
        assert all(pid_gone(pid) for pid in pids), [p for p in pids if not pid_gone(p)]
        assert r.success == (timeout > 1), r.error


def test_failing_assert_reports_error():
    r = execute_code("def f(x):\n    return x + 1\nassert f(1) == 3, 'f(1) should be 3'\n")
    assert not r.success
    assert r.error == "AssertionError: f(1) should be 3"
    assert "AssertionError" in r.stderr and "program.py" in r.stderr
    assert not r.timed_out and not r.memory_exceeded
    r = execute_code("def broken(:\n")
    assert not r.success and r.error.startswith("SyntaxError")


@linux_only
def test_infinite_loop_times_out_and_group_is_killed():
    # the program forks past the guard (posix.fork), so two busy processes must both die
    program = textwrap.dedent("""
        import os, time, posix
        child = posix.fork()
        if child == 0:
            print("child", os.getpid(), flush=True)
            time.sleep(600)  # sleeps: only the group kill (not the CPU-time backstop) can end it
        else:
            print("parent", os.getpid(), flush=True)
            while True:
                pass
    """)
    t0 = time.monotonic()
    r = execute_code(program, timeout=1.0)
    elapsed = time.monotonic() - t0
    assert r.timed_out and not r.success
    assert "timed out" in r.error
    assert elapsed < 1.0 + 10.0  # generous: only proves the timeout fired
    pids = [int(line.split()[1]) for line in r.stdout.splitlines()]
    assert len(pids) == 2, r.stdout
    deadline = time.monotonic() + 1.0  # a re-parented orphan may take a moment to be reaped
    while not all(pid_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(pid_gone(p) for p in pids)


def test_sleeping_program_times_out():
    r = execute_code("import time\nprint('start', flush=True)\ntime.sleep(60)\n", timeout=0.5)
    assert r.timed_out and not r.success and r.stdout == "start\n"


@linux_only
def test_memory_limit():
    r = execute_code("x = bytearray(2 * 1024 ** 3)\nprint('allocated')\n", memory_limit_mb=256)
    assert not r.success and r.memory_exceeded
    assert "allocated" not in r.stdout
    assert r.error.startswith("MemoryError")
    # the parent is alive and the next run works
    assert execute_code("print(sum(range(10)))").stdout == "45\n"
    # a modest allocation fits under the limit
    assert execute_code("x = bytearray(32 * 1024 ** 2)\nprint(len(x))\n", memory_limit_mb=256).success


@pytest.mark.parametrize("call,blocked", [
    ("import os; os.system('echo hi')", "os.system"),
    ("import os; os.kill(os.getpid(), 9)", "os.kill"),
    ("import os; os.fork()", "os.fork"),
    ("import subprocess; subprocess.run(['echo', 'hi'])", "subprocess.run"),
    ("import subprocess; subprocess.Popen(['echo', 'hi'])", "subprocess.Popen"),
    ("import shutil; shutil.rmtree(VICTIM)", "shutil.rmtree"),
    ("import os; os.remove(os.path.join(VICTIM, 'keep.txt'))", "os.remove"),
    ("import os; os.unlink(os.path.join(VICTIM, 'keep.txt'))", "os.unlink"),
    ("import os; os.rmdir(VICTIM)", "os.rmdir"),
])
def test_destructive_calls_are_blocked(call, blocked, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    r = execute_code(f"VICTIM = {str(victim)!r}\n{call}\nprint('not reached')\n")
    assert not r.success
    assert r.error == f"PermissionError: {blocked} is disabled in nanochat.execution"
    assert "not reached" not in r.stdout and "hi" not in r.stdout
    assert (victim / "keep.txt").read_text() == "precious"


def test_output_is_capped():
    r = execute_code("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 100_000)\n", max_output_bytes=10_000)
    assert r.success
    assert r.stdout.startswith("x" * 10_000) and "truncated" in r.stdout
    assert len(r.stdout) < 20_000


def test_temp_dir_is_removed_and_is_cwd():
    r = execute_code("import os\nopen('scratch.txt', 'w').write('data')\nprint(os.getcwd())\n")
    assert r.success
    cwd = r.stdout.strip()
    assert os.path.basename(cwd) == "work"
    assert not os.path.exists(cwd) and not os.path.exists(os.path.dirname(cwd))
    r = execute_code("import os\nprint(os.getcwd())\nwhile True: pass\n", timeout=0.5)  # removed after a timeout too
    assert r.timed_out and not os.path.exists(os.path.dirname(r.stdout.strip()))


HUMANEVAL_PROMPT = '''from typing import List


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    """ Check if in given list of numbers, are any two numbers closer to each other than
    given threshold.
    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)
    False
    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)
    True
    """
'''

HUMANEVAL_TEST = '''

METADATA = {'author': 'test'}


def check(candidate):
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False
    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True
    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 1.0) == True
    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 0.5) == False
'''

GOOD_COMPLETION = '''    for i, a in enumerate(numbers):
        for j, b in enumerate(numbers):
            if i != j and abs(a - b) < threshold:
                return True
    return False
'''

WRONG_COMPLETION = '''    return False
'''


def humaneval_program(completion):
    return HUMANEVAL_PROMPT + completion + "\n\n" + HUMANEVAL_TEST + "\n\n" + "check(has_close_elements)\n"


def test_humaneval_style_program():
    good = execute_code(humaneval_program(GOOD_COMPLETION))
    assert good.success, good.stderr
    wrong = execute_code(humaneval_program(WRONG_COMPLETION))
    assert not wrong.success and wrong.error.startswith("AssertionError")
    hangs = execute_code(humaneval_program("    while True:\n        pass\n"), timeout=0.5)
    assert not hangs.success and hangs.timed_out


def test_humaneval_task_uses_execution():
    from tasks.humaneval import build_program
    conv = {"prompt": HUMANEVAL_PROMPT, "test": HUMANEVAL_TEST, "entry_point": "has_close_elements"}
    assert execute_code(build_program(conv, GOOD_COMPLETION)).success
    assert not execute_code(build_program(conv, WRONG_COMPLETION)).success


def test_the_program_is_main_for_pickle_doctest_and_type_hints():
    """It ran in a bare dict while sys.modules["__main__"] stayed the sandbox's bootstrap."""
    program = '''
import pickle, doctest, typing

def twice(x: "int") -> "int":
    """
    >>> twice(2)
    4
    """
    return 2 * x

assert pickle.loads(pickle.dumps(twice))(3) == 6
assert typing.get_type_hints(twice) == {"x": int, "return": int}
assert doctest.testmod().attempted == 1
'''
    result = execute_code(program, timeout=10.0)
    assert result.success, (result.error, result.stderr)


def test_a_thread_pool_runs_under_the_default_memory_limit():
    """glibc's per-thread malloc arenas (64 MB of address space each) ran 8 threads past the 256 MB limit."""
    program = ("from concurrent.futures import ThreadPoolExecutor\n"
               "with ThreadPoolExecutor(8) as ex:\n"
               "    r = list(ex.map(lambda x: [x] * 1000, range(64)))\n"
               "assert len(r) == 64\n")
    result = execute_code(program, timeout=10.0)
    assert result.success, (result.error, result.stderr)
