"""
Run model-written Python (HumanEval completions) in a separate, limited process.

    result = execute_code(program, timeout=5.0, memory_limit_mb=256)
    result.success  # True iff the program exited 0 within its limits

How a run goes:
- A fresh temporary directory holds program.py and work/ (the program's cwd, HOME and TMPDIR);
  the whole directory is removed afterwards, whatever happened.
- Two processes: a supervisor (`sys.executable -I -c SUPERVISOR ...`, in a new session) and,
  under it, the program's interpreter (`-I -c BOOTSTRAP ...`), stdin from /dev/null, a small
  environment. -I: no PYTHON* variables, no user site, no cwd on sys.path. On Linux the
  supervisor is a child subreaper (prctl PR_SET_CHILD_SUBREAPER): whatever the program starts,
  in new sessions and process groups too, stays its descendant even once orphaned. It enforces
  the wall-clock timeout, and when the program ends or times out it SIGKILLs every descendant
  (found through /proc) until none is left, so no process outlives execute_code. Elsewhere it
  kills the program's process group.
- The bootstrap, before it runs the program: sets resource limits on itself (Linux/POSIX:
  RLIMIT_AS and RLIMIT_DATA = memory_limit_mb, RLIMIT_CPU = timeout + 1 s as a backstop,
  RLIMIT_FSIZE = max_file_mb, RLIMIT_CORE = 0; a limit the platform refuses is skipped, and
  without the `resource` module none is set), then replaces destructive functions (os.system,
  os.kill, os.fork, os.remove, shutil.rmtree, subprocess.Popen, ...) with functions that raise
  PermissionError. How the program ended goes to the parent over a pipe (not a file the program
  could write): "completed" once its last statement ran, or its uncaught exception (type and
  message: how the parent tells a MemoryError from other failures), or the SystemExit it raised.
  Success is exit code 0 *and* "completed": a program that exits early (sys.exit(0),
  os._exit(0) before a failing assert) has not passed.
- The parent reads stdout and stderr on two threads, keeping the first max_output_bytes of
  each (the rest is read and dropped, so a chatty program never blocks or floods memory).

WARNING: this is NOT a security sandbox. It guards against accidents (a runaway loop, a huge
allocation, a completion that calls shutil.rmtree, a stray daemon, an early exit), not against
code written to escape: the disabled functions are reachable again through `posix`, ctypes,
importlib.reload and many other routes, a program that finds the report pipe (/proc/self/fd) or
kills its supervisor by pid can still lie or leave a process behind, and the child can read and
write anything the user running it can. Like
upstream nanochat (and OpenAI's human-eval) warns: run untrusted model code only inside a
real isolation boundary (a container or VM without credentials or network).
RLIMIT_NPROC is not set: it counts every process of the user (and threads), so a value that
stops forks would depend on what else the user runs, and it does not apply to root anyway.
"""

import os
import sys
import json
import math
import shutil
import signal
import tempfile
import threading
import subprocess
from dataclasses import dataclass


@dataclass
class ExecutionResult:
    success: bool            # exited 0 within the time and memory limits
    stdout: str
    stderr: str
    error: str | None        # one line: "AssertionError: ...", "timed out after 5.0s", "exit code 2", ...
    timed_out: bool          # wall-clock timeout or the CPU-time backstop fired
    memory_exceeded: bool    # the program died of a MemoryError (the address-space limit)


# The supervisor: the program's interpreter as its child, the wall clock, the sweep of every
# descendant. Arguments (argv[1]): the program's JSON config (BOOTSTRAP below), plus timeout and
# report_fd. It writes one JSON line to report_fd: {"returncode", "timed_out", "strays"}.
SUPERVISOR = r'''
import os, sys, json, time, signal, subprocess
cfg = json.loads(sys.argv[1])
try:  # Linux: orphans of the program (double fork, setsid) are reparented here, not to init
    import ctypes
    subreaper = ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
except (OSError, AttributeError):
    subreaper = False

def descendants():
    """Live descendants of this process (/proc): pid -> ppid walk from here; zombies left out."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            except (OSError, ValueError, IndexError):
                continue
            if state != "Z":
                children.setdefault(int(ppid), []).append(int(d))
    out, todo = [], [os.getpid()]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out

def reap():
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return

child = subprocess.Popen([sys.executable, "-I", "-c", BOOTSTRAP, sys.argv[1]], stdin=subprocess.DEVNULL,
                         pass_fds=(cfg["report_fd"],), start_new_session=True)
timed_out = False
try:
    returncode = child.wait(timeout=cfg["timeout"])
except subprocess.TimeoutExpired:
    timed_out = True
strays = 0
try:
    os.killpg(child.pid, signal.SIGKILL)  # the program's group (all there is without /proc)
except OSError:
    pass
if timed_out:
    returncode = child.wait()
if subreaper:
    for _ in range(1000):  # a fork loop refills the tree: kill what is there, reap, look again
        pids = descendants()
        if not pids:
            break
        strays += len(pids)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        reap()
        time.sleep(0.001)
reap()
os.write(cfg["report_fd"], (json.dumps(dict(returncode=returncode, timed_out=timed_out, strays=strays)) + "\n").encode())
'''

# The program's interpreter: it runs before the program. Arguments (argv[1]): JSON
# {program_path, report_fd, memory_bytes, cpu_seconds, fsize_bytes, ...}. How the program ended
# goes to report_fd as one JSON line: {"end": "completed" | "exception" | "exit", ...}.
BOOTSTRAP = r'''
import os, sys, json, traceback
cfg = json.loads(sys.argv[1])
sys.stdout.reconfigure(encoding="utf-8", errors="backslashreplace")
sys.stderr.reconfigure(encoding="utf-8", errors="backslashreplace")

# 1) resource limits on this process (inherited by anything it manages to start)
try:
    import resource
except ImportError:  # not POSIX: no limits but the parent's wall clock
    resource = None
if resource is not None:
    def limit(name, soft, hard=None):
        which = getattr(resource, name, None)
        if which is None:
            return
        try:
            cur_soft, cur_hard = resource.getrlimit(which)
            hard = soft if hard is None else hard
            if cur_hard != resource.RLIM_INFINITY:  # cannot raise a hard limit, only lower it
                soft, hard = min(soft, cur_hard), min(hard, cur_hard)
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            pass  # e.g. macOS refuses RLIMIT_AS below the current mapping: skip, degrade gracefully
    if cfg["memory_bytes"]:
        limit("RLIMIT_AS", cfg["memory_bytes"])
        limit("RLIMIT_DATA", cfg["memory_bytes"])
    limit("RLIMIT_CPU", cfg["cpu_seconds"], cfg["cpu_seconds"] + 1)  # soft: SIGXCPU, hard: SIGKILL
    limit("RLIMIT_FSIZE", cfg["fsize_bytes"])
    limit("RLIMIT_CORE", 0)

# 2) best-effort guard: destructive functions raise instead (NOT a security boundary)
def disable(module, names):
    for name in names:
        if hasattr(module, name):
            def refuse(*args, _what=module.__name__ + "." + name, **kwargs):
                raise PermissionError(_what + " is disabled in nanochat.execution")
            setattr(module, name, refuse)
import shutil, subprocess, builtins
disable(os, ["system", "popen", "kill", "killpg", "fork", "forkpty", "vfork", "setsid", "setpgid",
             "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
             "ftruncate", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "link",
             "symlink", "setuid", "setgid", "seteuid", "setegid",
             "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
             "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
             "posix_spawn", "posix_spawnp", "startfile"])
disable(shutil, ["rmtree", "move", "chown"])
disable(subprocess, ["Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"])
_report_fd, _write = cfg.pop("report_fd"), os.write

def _report(**end):
    try:
        _write(_report_fd, (json.dumps(end) + "\n").encode())
    except BaseException:
        pass

# 3) run the program as __main__; report how it ended to the parent
with open(cfg["program_path"], encoding="utf-8") as f:
    source = f.read()
import linecache
linecache.cache["program.py"] = (len(source), None, source.splitlines(True), "program.py")  # source lines in tracebacks
try:
    code = compile(source, "program.py", "exec")
    import types
    program = types.ModuleType("__main__")  # the program is __main__ itself (this code runs on: its frame holds its globals)
    program.__builtins__ = builtins  # (pickle, doctest.testmod and get_type_hints look it up in sys.modules)
    sys.modules["__main__"] = program
    exec(code, program.__dict__)
except SystemExit as e:
    _report(end="exit", code=str(e.code)[:100])
    raise
except BaseException as e:
    _report(end="exception", type=type(e).__name__, memory=isinstance(e, MemoryError), message=str(e)[:2000])
    traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # skip the bootstrap's frame
    sys.stderr.flush()
    raise SystemExit(1)
for _stream in (sys.stdout, sys.stderr):  # a program may have closed them: it still completed
    try:
        _stream.flush()
    except (ValueError, OSError):
        pass
_report(end="completed")
'''
SUPERVISOR = SUPERVISOR.replace("BOOTSTRAP", repr(BOOTSTRAP), 1)


def _drain(stream, max_bytes, chunks):
    """Read a pipe to EOF, keeping the first max_bytes (the rest is read and dropped)."""
    kept = 0
    dropped = 0
    while True:
        data = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
        if not data:
            break
        if kept < max_bytes:
            chunks.append(data[:max_bytes - kept])
            kept += len(chunks[-1])
            dropped += len(data) - len(chunks[-1])
        else:
            dropped += len(data)
    if dropped:
        chunks.append(f"\n... [{dropped} more bytes truncated]\n".encode())
    stream.close()


def _kill_group(proc):
    """SIGKILL the supervisor's process group (it leads its group: start_new_session): the last
    resort when the supervisor itself does not finish."""
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()  # no process groups here: the child alone
    except OSError:
        pass  # already gone


def execute_code(program, timeout=5.0, memory_limit_mb=256, max_output_bytes=1 << 20, max_file_mb=16):
    """Run `program` (Python source) in a limited child process; see the module docstring.
    memory_limit_mb=None or 0 sets no memory limit. Never raises for anything the program does."""
    root = tempfile.mkdtemp(prefix="nanochat_exec_")
    report_r, report_w = os.pipe()
    try:
        workdir = os.path.join(root, "work")
        os.mkdir(workdir)
        program_path = os.path.join(root, "program.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(program)
        cfg = {
            "program_path": program_path,
            "report_fd": report_w,
            "timeout": timeout,
            "memory_bytes": int(memory_limit_mb * 1024 * 1024) if memory_limit_mb else 0,
            "cpu_seconds": int(math.ceil(timeout)) + 1,  # backstop only; the wall clock rules
            "fsize_bytes": int(max_file_mb * 1024 * 1024),
        }
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir, "TMPDIR": workdir,
               "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
               "MALLOC_ARENA_MAX": "2"}  # glibc reserves 64 MB of address space per thread's arena: 8 threads passed the limit
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", SUPERVISOR, json.dumps(cfg)],
            cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(report_w,), start_new_session=(os.name == "posix"),
        )
        os.close(report_w)
        report_w = None
        out_chunks, err_chunks, report_chunks = [], [], []
        report = os.fdopen(report_r, "rb")
        report_r = None
        readers = [threading.Thread(target=_drain, args=(proc.stdout, max_output_bytes, out_chunks), daemon=True),
                   threading.Thread(target=_drain, args=(proc.stderr, max_output_bytes, err_chunks), daemon=True),
                   threading.Thread(target=_drain, args=(report, 1 << 16, report_chunks), daemon=True)]
        for t in readers:
            t.start()
        try:
            proc.wait(timeout=timeout + 10)  # the supervisor keeps the clock; this only guards against it hanging
        except subprocess.TimeoutExpired:
            _kill_group(proc)
        proc.wait()
        for t in readers:
            t.join(timeout=2.0)
        stdout = b"".join(out_chunks).decode("utf-8", errors="replace")
        stderr = b"".join(err_chunks).decode("utf-8", errors="replace")
        ends, supervisor = [], None  # the program's report lines, then the supervisor's
        for line in b"".join(report_chunks).decode("utf-8", errors="replace").splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict) and "returncode" in item:
                supervisor = item
            elif isinstance(item, dict) and "end" in item and supervisor is None:
                ends.append(item)
        end = ends[0] if ends else {}  # the first: what the bootstrap said when the program stopped
        if supervisor is None:  # the supervisor died (killed, or hung past the guard)
            supervisor = dict(returncode=proc.returncode if proc.returncode else -signal.SIGKILL, timed_out=False, strays=0)
        returncode, wall_timeout = supervisor["returncode"], supervisor["timed_out"]

        cpu_signals = {getattr(signal, "SIGXCPU", None)}
        cpu_timeout = not wall_timeout and returncode < 0 and -returncode in cpu_signals
        timed_out = wall_timeout or cpu_timeout
        memory_exceeded = end.get("end") == "exception" and bool(end.get("memory")) and not timed_out
        success = returncode == 0 and not timed_out and end.get("end") == "completed"
        if success:
            error = None
        elif wall_timeout:
            error = f"timed out after {timeout}s"
        elif cpu_timeout:
            error = f"CPU time limit exceeded ({cfg['cpu_seconds'] - 1}s)"
        elif end.get("end") == "exception":
            error = f"{end.get('type')}: {end['message']}" if end.get("message") else str(end.get("type"))
        elif returncode < 0:
            try:
                error = f"killed by signal {signal.Signals(-returncode).name}"
            except ValueError:
                error = f"killed by signal {-returncode}"
        elif returncode != 0:
            error = f"exit code {returncode}"
        elif end.get("end") == "exit":
            error = f"exited before the end of the program (SystemExit: {end.get('code')})"
        else:
            error = "exited before the end of the program (exit code 0, its last statement never ran)"
        return ExecutionResult(success=success, stdout=stdout, stderr=stderr, error=error,
                               timed_out=timed_out, memory_exceeded=memory_exceeded)
    finally:
        for fd in (report_r, report_w):
            if fd is not None:
                os.close(fd)
        shutil.rmtree(root, ignore_errors=True)
