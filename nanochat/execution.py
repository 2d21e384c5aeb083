"""
Run model-written Python (HumanEval completions) in a separate, limited process.

    result = execute_code(program, timeout=5.0, memory_limit_mb=256)
    result.success  # True iff the program exited 0 within its limits

How a run goes:
- A fresh temporary directory holds program.py, status.json and work/ (the program's cwd,
  HOME and TMPDIR); the whole directory is removed afterwards, whatever happened.
- The child is `sys.executable -I -c BOOTSTRAP ...` in a new session (its own process group),
  stdin from /dev/null, a small environment. -I: no PYTHON* variables, no user site, no cwd
  on sys.path.
- The bootstrap, before it runs the program: sets resource limits on itself (Linux/POSIX:
  RLIMIT_AS and RLIMIT_DATA = memory_limit_mb, RLIMIT_CPU = timeout + 1 s as a backstop,
  RLIMIT_FSIZE = max_file_mb, RLIMIT_CORE = 0; a limit the platform refuses is skipped, and
  without the `resource` module none is set), then replaces destructive functions (os.system,
  os.kill, os.fork, os.remove, shutil.rmtree, subprocess.Popen, ...) with functions that raise
  PermissionError. An uncaught exception is printed as usual and its type and message are
  written to status.json, which is how the parent tells a MemoryError from other failures.
- The parent reads stdout and stderr on two threads, keeping the first max_output_bytes of
  each (the rest is read and dropped, so a chatty program never blocks or floods memory), and
  waits at most `timeout` seconds of wall clock; then it SIGKILLs the whole process group.
  The group is killed after a normal exit too, so stray descendants die with the program.

WARNING: this is NOT a security sandbox. It guards against accidents (a runaway loop, a huge
allocation, a completion that calls shutil.rmtree), not against code written to escape: the
disabled functions are reachable again through `posix`, ctypes, importlib.reload and many
other routes, and the child can read and write anything the user running it can. Like
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


# The child's code. It runs before the program, as the program's own interpreter. Arguments
# (argv[1]): JSON {program_path, status_path, memory_bytes, cpu_seconds, fsize_bytes}.
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
status_path = cfg["status_path"]

# 3) run the program as __main__; report an uncaught exception to the parent
with open(cfg["program_path"], encoding="utf-8") as f:
    source = f.read()
import linecache
linecache.cache["program.py"] = (len(source), None, source.splitlines(True), "program.py")  # source lines in tracebacks
try:
    code = compile(source, "program.py", "exec")
    exec(code, {"__name__": "__main__", "__builtins__": builtins})
except (SystemExit, KeyboardInterrupt):
    raise
except BaseException as e:
    try:
        with open(status_path, "w") as f:
            json.dump({"type": type(e).__name__, "memory": isinstance(e, MemoryError),
                       "message": str(e)[:2000]}, f)
    except BaseException:
        pass
    traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # skip the bootstrap's frame
    sys.stderr.flush()
    raise SystemExit(1)
'''


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
    """SIGKILL the child's whole process group (it leads its group: start_new_session)."""
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
    try:
        workdir = os.path.join(root, "work")
        os.mkdir(workdir)
        program_path = os.path.join(root, "program.py")
        status_path = os.path.join(root, "status.json")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(program)
        cfg = {
            "program_path": program_path,
            "status_path": status_path,
            "memory_bytes": int(memory_limit_mb * 1024 * 1024) if memory_limit_mb else 0,
            "cpu_seconds": int(math.ceil(timeout)) + 1,  # backstop only; the wall clock rules
            "fsize_bytes": int(max_file_mb * 1024 * 1024),
        }
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir, "TMPDIR": workdir,
               "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", BOOTSTRAP, json.dumps(cfg)],
            cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=(os.name == "posix"),  # own process group: one killpg ends it all
        )
        out_chunks, err_chunks = [], []
        readers = [threading.Thread(target=_drain, args=(proc.stdout, max_output_bytes, out_chunks), daemon=True),
                   threading.Thread(target=_drain, args=(proc.stderr, max_output_bytes, err_chunks), daemon=True)]
        for t in readers:
            t.start()
        wall_timeout = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            wall_timeout = True
        _kill_group(proc)  # on timeout the program; otherwise any descendant it left behind
        returncode = proc.wait()
        for t in readers:
            t.join(timeout=2.0)  # a descendant that escaped the group could hold a pipe open
        stdout = b"".join(out_chunks).decode("utf-8", errors="replace")
        stderr = b"".join(err_chunks).decode("utf-8", errors="replace")

        status = None
        if os.path.isfile(status_path):
            try:
                with open(status_path, encoding="utf-8") as f:
                    status = json.load(f)
            except (OSError, ValueError):
                status = None

        cpu_signals = {getattr(signal, "SIGXCPU", None)}
        cpu_timeout = not wall_timeout and returncode < 0 and -returncode in cpu_signals
        timed_out = wall_timeout or cpu_timeout
        memory_exceeded = bool(status and status.get("memory")) and not timed_out
        success = returncode == 0 and not timed_out
        if success:
            error = None
        elif wall_timeout:
            error = f"timed out after {timeout}s"
        elif cpu_timeout:
            error = f"CPU time limit exceeded ({cfg['cpu_seconds'] - 1}s)"
        elif status is not None:
            error = f"{status['type']}: {status['message']}" if status.get("message") else status["type"]
        elif returncode < 0:
            try:
                error = f"killed by signal {signal.Signals(-returncode).name}"
            except ValueError:
                error = f"killed by signal {-returncode}"
        else:
            error = f"exit code {returncode}"
        return ExecutionResult(success=success, stdout=stdout, stderr=stderr, error=error,
                               timed_out=timed_out, memory_exceeded=memory_exceeded)
    finally:
        shutil.rmtree(root, ignore_errors=True)
