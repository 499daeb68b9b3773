"""Built-in tools the model can call: a calculator and a Python sandbox.

    run_tool("calculator", {"expression": "12 * (3 + 4)"})   -> "84"
    run_tool("python", {"code": "print(sum(range(10)))"})    -> "45\n"

The engine loop executes the model's `<|tool_call|>` and feeds the returned string back as
a `<|tool_result|>`. A tool never raises for bad arguments or failing code: the model gets an
"error: ..." string it can read. Only a tool name nobody registered raises (UnknownToolError,
a UserError), so an API request naming one becomes a 400.

Python sandbox isolation, strongest first (`sandbox_isolation()` says which is in force):
  "namespaces"   (root + util-linux `unshare`/`setpriv`): fresh network namespace (no
                 interfaces up, so not even the host's loopback), fresh PID namespace with its
                 own /proc (no other process is visible; killing its first process kills
                 everything the code spawned), fresh mount namespace where every mount is
                 read-only except the sandbox's own directory and /root, /home are empty (the
                 interpreter's own folders are bound back), and the code runs as `nobody` with
                 no capabilities, so it can neither undo any of it nor read root-only files.
  "python-guard" (anything else): a preamble replaces `socket.socket` and refuses file writes
                 outside the sandbox directory through `open`/`os.open`. Best effort only:
                 code using ctypes or os.system can get around it.
Both also apply rlimits (address space, CPU seconds, file size, open files, process count), a
wall-clock timeout that kills the process group, its own temporary directory as cwd/HOME/TMPDIR,
and a cap on the bytes of output returned. `hide_paths([...])` (the server passes its feedback
store's and checkpoint's folders) makes folders unreadable to the code: covered by an empty
read-only tmpfs under namespaces; refused by the Python-level guard otherwise (best effort).
RLIMIT_NPROC counts the user's processes, so it binds the `nobody` of namespace mode, but not a
root server in python-guard mode (the kernel lets root exceed it).

`enable_cgroup()` (the server calls it) adds a cgroup where the machine allows one (infer/cgroup.py):
all tool processes together get `SandboxTotals` (CPU quota, memory, process count), and each call
a sub-cgroup with its own memory (`memory_bytes` for all its processes, not per process) and
process count (pids.max, which binds root too). Whatever a call leaves behind is killed when it
ends, however it detached itself. `sandbox_description()` says which of all this is in force.
"""
from __future__ import annotations

import ast
import atexit
import functools
import importlib
import inspect
import json
import math
import operator
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

from llmforge.errors import UserError
from llmforge.infer.cgroup import Cgroup, remove_stale
from llmforge.tasks.python_doc import MODULES as PYTHON_DOC_MODULES


class UnknownToolError(UserError):
    """A tool name that is not registered (an API client's typo, or a model's invention)."""


# ---------------------------------------------------------------- calculator

MAX_EXPRESSION_CHARS = 256
MAX_RESULT_BITS = 4096          # an int result larger than this is refused (2**4096 ~ 1e1233)

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"abs": abs, "round": round, "min": min, "max": max, "sqrt": math.sqrt,
              "log": math.log, "exp": math.exp, "sin": math.sin, "cos": math.cos}
_CONSTANTS = {"pi": math.pi, "e": math.e}


class CalculatorError(ValueError):
    pass


def _check_size(value):
    if isinstance(value, int) and value.bit_length() > MAX_RESULT_BITS:
        raise CalculatorError(f"result too large (more than {MAX_RESULT_BITS} bits)")
    return value


def _power(base, exponent):
    # Refuse before computing: 9**9**9 would otherwise hang the server.
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if exponent * math.log2(abs(base)) > MAX_RESULT_BITS:
            raise CalculatorError(f"result too large (more than {MAX_RESULT_BITS} bits)")
    if abs(exponent) > 10_000:
        raise CalculatorError("exponent too large")
    return base ** exponent


def _evaluate(node):
    """Walk the parsed expression; anything that is not arithmetic on numbers is refused."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            return _check_size(_power(left, right))
        if isinstance(node.op, ast.Mult) and isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_RESULT_BITS:
                raise CalculatorError(f"result too large (more than {MAX_RESULT_BITS} bits)")
        return _check_size(_BINARY[type(node.op)](left, right))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
            and not node.keywords and len(node.args) <= 4):
        return _FUNCTIONS[node.func.id](*[_evaluate(a) for a in node.args])
    raise CalculatorError(f"unsupported syntax: {ast.unparse(node)!r}")


def calculate(expression: str) -> str:
    """Evaluate arithmetic (+ - * / // % **, parentheses, a few math functions) without eval."""
    if not isinstance(expression, str) or not expression.strip():
        return "error: 'expression' must be a non-empty string, e.g. {\"expression\": \"2 + 2\"}"
    if len(expression) > MAX_EXPRESSION_CHARS:
        return f"error: expression longer than {MAX_EXPRESSION_CHARS} characters"
    try:
        with warnings.catch_warnings():   # a model's "3x4" is a SyntaxWarning before it is an error
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(expression.strip(), mode="eval")
        value = _evaluate(tree)
    except SyntaxError:
        return f"error: not an arithmetic expression: {expression!r}"
    except ZeroDivisionError:
        return "error: division by zero"
    except (CalculatorError, ValueError, TypeError, OverflowError) as e:
        return f"error: {e}"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return format(value, ".12g")
    return str(value)


# ---------------------------------------------------------------- python fast path

class _NotPure(Exception):
    pass


MAX_PURE_LEN = 1024      # longest string or list a pure expression may hold
_PURE_FUNCTIONS = {"sorted": sorted, "len": len, "min": min, "max": max, "sum": sum, "abs": abs,
                   "str": str, "list": list}
_PURE_STR_METHODS = {"count", "upper", "lower", "strip", "startswith", "endswith", "find", "index", "title"}


def _pure(node):
    """The value of an expression made only of literals, lists/tuples of them, indexing and
    slicing, a few builtins (sorted(..., reverse=...), len, min, max, sum, abs, str, list) and
    read-only str methods; anything else raises _NotPure."""
    if isinstance(node, ast.Constant) and type(node.value) in (str, int, float, bool):
        if isinstance(node.value, str) and len(node.value) > MAX_PURE_LEN:
            raise _NotPure
        if isinstance(node.value, int) and node.value.bit_length() > 64:
            raise _NotPure
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)) and len(node.elts) <= MAX_PURE_LEN:
        items = [_pure(e) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _pure(node.operand)
        if type(value) not in (int, float):
            raise _NotPure
        return -value
    if isinstance(node, ast.Subscript):
        value = _pure(node.value)
        if not isinstance(value, (str, list, tuple)):
            raise _NotPure
        if isinstance(node.slice, ast.Slice):
            bounds = [None if b is None else _pure(b) for b in (node.slice.lower, node.slice.upper, node.slice.step)]
            if any(b is not None and type(b) is not int for b in bounds):
                raise _NotPure
            return value[slice(*bounds)]
        index = _pure(node.slice)
        if type(index) is not int:
            raise _NotPure
        return value[index]
    if isinstance(node, ast.Call):
        args = [_pure(a) for a in node.args]
        kwargs = {k.arg: _pure(k.value) for k in node.keywords}
        if isinstance(node.func, ast.Name) and node.func.id in _PURE_FUNCTIONS:
            if kwargs and (node.func.id != "sorted" or set(kwargs) != {"reverse"}
                           or type(kwargs["reverse"]) is not bool):
                raise _NotPure
            return _PURE_FUNCTIONS[node.func.id](*args, **kwargs)
        if (isinstance(node.func, ast.Attribute) and node.func.attr in _PURE_STR_METHODS and not kwargs
                and all(isinstance(a, (str, int)) for a in args)):
            target = _pure(node.func.value)
            if isinstance(target, str):
                return getattr(target, node.func.attr)(*args)
    raise _NotPure


def pure_print(code: str) -> str | None:
    """What the sandbox would print for code that is one `print(EXPR)` of a pure expression
    (`print(sorted([9, 2, 7]))`, `print('mirror'[::-1])`, `print('mirror'.count('r'))`), computed
    in-process in microseconds instead of ~130 ms for a sandboxed interpreter; None for any
    other code, and for an expression that fails (the sandbox then shows the real traceback).
    Nothing it accepts can reach a name, an attribute other than those str methods, or I/O."""
    try:
        tree = ast.parse(code.strip(), mode="exec")
    except (SyntaxError, ValueError):
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr):
        return None
    call = tree.body[0].value
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "print"
            and len(call.args) == 1 and not call.keywords):
        return None
    try:
        printed = f"{_pure(call.args[0])}\n"
    except (_NotPure, TypeError, ValueError, IndexError, RecursionError):
        return None
    return printed if len(printed.encode("utf-8")) <= SandboxLimits.output_bytes else None


# ---------------------------------------------------------------- documentation look-up fast path

# Pure-Python standard-library modules whose import has no side effect beyond defining the
# module: the ones the python_doc task asks about, and the only ones a look-up may import in-process.
INSPECTABLE_MODULES = frozenset(PYTHON_DOC_MODULES)
_LOOKUP = re.compile(r"(?:# [a-z]+\n)?import inspect(?:, ([A-Za-z_][\w.]*))?\n"
                     r"print\(inspect\.(signature|getdoc)\(([A-Za-z_][\w.]*)\.([A-Za-z]\w*)\)(\.splitlines\(\)\[0\])?\)")


def doc_lookup(code: str) -> str | None:
    """What the sandbox would print for a documentation look-up of a public function of an
    INSPECTABLE_MODULES module, computed in-process (the python_doc task's answers):

        # signature\nimport inspect, textwrap\nprint(inspect.signature(textwrap.dedent))
        # doc\nimport inspect, textwrap\nprint(inspect.getdoc(textwrap.dedent).splitlines()[0])

    Nothing else is accepted: no other statement, module, or private name; no call of the
    function itself. None where the look-up would fail, so the sandbox shows the traceback."""
    m = _LOOKUP.fullmatch(code.strip())
    if m is None:
        return None
    imported, what, module, name, first_line = m.groups()
    if module not in INSPECTABLE_MODULES or module != (imported or "inspect") or (what == "signature" and first_line):
        return None
    try:
        obj = getattr(importlib.import_module(module), name)
        value = inspect.signature(obj) if what == "signature" else inspect.getdoc(obj)
        if value is None:
            return None
        printed = f"{value.splitlines()[0] if first_line else value}\n"
    except (AttributeError, ImportError, TypeError, ValueError, IndexError):
        return None
    return printed if len(printed.encode("utf-8")) <= SandboxLimits.output_bytes else None


# ---------------------------------------------------------------- python sandbox

@dataclass
class SandboxLimits:
    wall_seconds: float = 10.0      # killed (with everything it spawned) after this
    cpu_seconds: int = 5            # RLIMIT_CPU
    memory_bytes: int = 512 << 20   # RLIMIT_AS: address space of the interpreter
    file_bytes: int = 16 << 20      # RLIMIT_FSIZE: largest file it may write
    open_files: int = 64            # RLIMIT_NOFILE
    processes: int = 32             # processes/threads the code may add: RLIMIT_NPROC, and pids.max with a cgroup
    output_bytes: int = 16_384      # stdout+stderr returned; the process is killed past it


@dataclass
class SandboxTotals:
    """What all Python tool calls together may use, enforced by a cgroup where one can be made."""
    cpus: float = max(1.0, (os.cpu_count() or 2) / 2)   # CPU quota, in cores
    memory_bytes: int = 2 << 30
    processes: int = 128


# Runs inside the namespaces as root (before any user code): make every mount read-only except
# the sandbox directory, set rlimits, then exec the user's code with all capabilities dropped.
_LAUNCHER = r'''
import json, os, resource, subprocess, sys
cfg = json.loads(sys.argv[1])
box, keep = cfg["dir"], cfg["keep"]
def mount(*args):
    return subprocess.run(["mount", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
def fail(why):
    sys.exit(f"sandbox: {why}")
if mount("--make-rprivate", "/") or mount("--bind", box, box):
    fail("could not set up the mount namespace")
for hidden in cfg["hide"]:   # the feedback store, checkpoints: an empty read-only folder instead
    if os.path.isdir(hidden) and mount("-t", "tmpfs", "-o", "ro,size=4k,mode=755", "tmpfs", hidden):
        fail(f"could not hide {hidden}")
# Hide home directories behind empty tmpfs, then bind the interpreter's own folders back
# (pyenv/venv interpreters often live under /root), staged on a private /dev/shm meanwhile.
stage = "/dev/shm"
if mount("-t", "tmpfs", "-o", "size=1m,mode=755", "tmpfs", stage):
    fail("could not mount a staging tmpfs")
for i, path in enumerate(keep):
    os.makedirs(f"{stage}/{i}")
    if mount("--rbind", path, f"{stage}/{i}"):
        fail(f"could not keep {path}")
for hidden in ("/root", "/home"):
    if os.path.isdir(hidden) and mount("-t", "tmpfs", "-o", "size=1m,mode=755", "tmpfs", hidden):
        fail(f"could not hide {hidden}")
for i, path in enumerate(keep):
    if path.startswith(("/root/", "/home/")):
        os.makedirs(path, exist_ok=True)
        if mount("--move", f"{stage}/{i}", path):
            fail(f"could not restore {path}")
os.chown(box, 65534, 65534)
points = []
with open("/proc/self/mountinfo") as f:
    for line in f:
        points.append(line.split()[4].replace("\\040", " "))
for point in points:
    if point != box and not point.startswith(("/proc", "/sys")):
        if mount("-o", "remount,bind,ro", point) and point in ("/", "/tmp", "/dev/shm", "/root", "/home"):
            fail(f"could not make {point} read-only")
def limit():
    for name, value in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, name), tuple(value))
# This launcher is PID 1 of the namespace: it waits (reaping orphans) and turns a fatal signal
# into exit code 128+N, since unshare itself reports signalled children poorly. The code runs as
# nobody with no capabilities, so it can neither undo the mounts nor read root-only files.
proc = subprocess.run([cfg["setpriv"], "--reuid=65534", "--regid=65534", "--clear-groups",
                       "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs",
                       "--", cfg["python"], "-I", "main.py"], cwd=box, env=cfg["env"], preexec_fn=limit)
sys.exit(128 - proc.returncode if proc.returncode < 0 else proc.returncode)
'''

# Prepended to the user's code when namespaces are unavailable. Best effort (see docstring).
_GUARD = r'''
import builtins as _b, os as _os, socket as _socket
_BOX = _os.path.realpath(_os.getcwd())
def _no_network(*a, **k):
    raise PermissionError("network access is disabled in this sandbox")
_socket.socket = _no_network
_socket.create_connection = _no_network
_socket.getaddrinfo = _no_network
def _inside(path):
    p = _os.path.realpath(_os.fspath(path))
    return p == _BOX or p.startswith(_BOX + _os.sep)
def _hidden(path):
    p = _os.path.realpath(_os.fspath(path))
    return any(p == h or p.startswith(h + _os.sep) for h in _HIDE)
_open, _osopen, _listdir, _scandir = _b.open, _os.open, _os.listdir, _os.scandir
def _guarded_open(file, mode="r", *a, **k):
    if not isinstance(file, int) and _hidden(file):
        raise PermissionError(f"this path is hidden from the sandbox: {file}")
    if isinstance(file, int) or not any(c in mode for c in "wax+") or _inside(file):
        return _open(file, mode, *a, **k)
    raise PermissionError(f"writing outside the sandbox directory is disabled: {file}")
def _guarded_osopen(path, flags, *a, **k):
    if _hidden(path):
        raise PermissionError(f"this path is hidden from the sandbox: {path}")
    if flags & (_os.O_WRONLY | _os.O_RDWR | _os.O_CREAT) and not _inside(path):
        raise PermissionError(f"writing outside the sandbox directory is disabled: {path}")
    return _osopen(path, flags, *a, **k)
def _guarded_listdir(path="."):
    if _hidden(path):
        raise PermissionError(f"this path is hidden from the sandbox: {path}")
    return _listdir(path)
_b.open, _os.open, _os.listdir = _guarded_open, _guarded_osopen, _guarded_listdir
del _b, _socket
'''


_HIDDEN_PATHS: list[str] = []


def hide_paths(paths) -> None:
    """Folders the sandboxed code must not read (the server's feedback store, its checkpoints).
    A folder holding the interpreter or the temporary directory cannot be hidden and is skipped."""
    keep = [os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, tempfile.gettempdir())]
    for path in paths:
        p = os.path.realpath(path)
        if os.path.isdir(p) and p != "/" and not any(k == p or k.startswith(p + os.sep) for k in keep) \
                and p not in _HIDDEN_PATHS:
            _HIDDEN_PATHS.append(p)


@functools.cache
def sandbox_isolation() -> str:
    """'namespaces' when the kernel-level isolation works here (checked by running a probe
    through it once), else 'python-guard'."""
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    if os.name != "posix" or os.geteuid() != 0 or not unshare or not setpriv or not shutil.which("mount"):
        return "python-guard"
    probe = run_python("print('sandbox-ok')", SandboxLimits(wall_seconds=20), isolation="namespaces")
    return "namespaces" if probe.strip() == "sandbox-ok" else "python-guard"


_CGROUP_PREFIX = "llmforge-sandbox"
_cgroup: Cgroup | None = None
_cgroup_users = 0
_cgroup_why_not = "not enabled (only `llmforge serve` makes one)"


def enable_cgroup(totals: SandboxTotals | None = None) -> Cgroup | None:
    """Make this process's tool cgroup (llmforge-sandbox-PID) if the machine allows; None if not
    (`sandbox_description()` then says why). Each call is matched by one `disable_cgroup()`."""
    global _cgroup, _cgroup_users, _cgroup_why_not
    _cgroup_users += 1
    if _cgroup is None:
        totals = totals or SandboxTotals()
        try:
            remove_stale(_CGROUP_PREFIX)
            _cgroup = Cgroup.create(f"{_CGROUP_PREFIX}-{os.getpid()}", cpus=totals.cpus,
                                    memory_bytes=totals.memory_bytes, processes=totals.processes)
        except OSError as e:
            _cgroup_why_not = str(e)
    return _cgroup


def disable_cgroup() -> None:
    """Kill whatever is still in the tool cgroup and remove it, once its last user is done."""
    global _cgroup, _cgroup_users
    _cgroup_users = max(0, _cgroup_users - 1)
    if _cgroup is not None and _cgroup_users == 0:
        group, _cgroup = _cgroup, None
        group.close()


@atexit.register
def _remove_cgroup_at_exit() -> None:
    global _cgroup_users
    _cgroup_users = 1
    disable_cgroup()


def _process_limit_in_force(isolation: str) -> bool:
    return _cgroup is not None or isolation == "namespaces" or os.geteuid() != 0


def sandbox_description() -> list[str]:
    """The server's start-up log lines: which isolation and which limits the Python tool really gets."""
    isolation = sandbox_isolation()
    if isolation == "namespaces":
        lines = ["python sandbox: namespaces (no network, own PID and mount namespaces, read-only filesystem, "
                 "hidden paths covered, runs as nobody without capabilities, per-process rlimits)"]
    else:
        lines = ["python sandbox: python-guard FALLBACK (no root/unshare here, so no namespaces): same user as the "
                 "server, per-process rlimits, best-effort Python-level blocks on network, writes and hidden "
                 "paths; code using ctypes or os.system can get around them"]
    limits = SandboxLimits()
    if _cgroup is not None:
        held = _cgroup.limits()
        cpus, memory, processes = (("unlimited" if v is None else f"{v:g}") for v in
                                   (held["cpus"], held["memory_bytes"] and held["memory_bytes"] >> 20,
                                    held["processes"]))
        lines.append(f"tool cgroup: {_cgroup.version}, all tool processes together: {cpus} CPUs, "
                     f"{memory} MB, {processes} processes; each call: "
                     f"{limits.memory_bytes >> 20} MB, {limits.processes} processes"
                     + ("" if isolation == "namespaces" else " (root code could move itself out: best effort)"))
    else:
        lines.append(f"tool cgroup: NONE ({_cgroup_why_not}): memory and CPU limits are per process only"
                     + ("; process count: RLIMIT_NPROC, per user" if _process_limit_in_force(isolation) else ""))
    if not _process_limit_in_force(isolation):
        lines.append("tool process count: NOT LIMITED (root without namespaces or a cgroup: the kernel lets root "
                     "exceed RLIMIT_NPROC), so a fork bomb from the Python tool is not stopped")
    return lines


def _rlimits(limits: SandboxLimits, group: Cgroup | None = None) -> dict:
    """The per-process limits. With a call cgroup its pids.max counts this call's processes alone, so
    RLIMIT_NPROC (which counts every process of the user, other calls' too) is left out."""
    rl = {"RLIMIT_AS": (limits.memory_bytes, limits.memory_bytes),
          "RLIMIT_CPU": (limits.cpu_seconds, limits.cpu_seconds + 1),
          "RLIMIT_FSIZE": (limits.file_bytes, limits.file_bytes),
          "RLIMIT_NOFILE": (limits.open_files, limits.open_files),
          "RLIMIT_NPROC": (limits.processes, limits.processes),
          "RLIMIT_CORE": (0, 0)}
    if group is not None:
        del rl["RLIMIT_NPROC"]
    return rl


def _processes_of(uid: int) -> int:
    """Tasks (processes and threads) this uid runs now, which RLIMIT_NPROC counts."""
    count = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                pass
    return count


def _read_capped(proc: subprocess.Popen, limits: SandboxLimits) -> tuple[bytes, str]:
    """Collect stdout+stderr up to the cap; kill the process group on timeout or overflow."""
    out = bytearray()
    reason = ""
    deadline = time.monotonic() + limits.wall_seconds
    fd = proc.stdout.fileno()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            reason = f"killed: wall-clock limit of {limits.wall_seconds:g}s exceeded"
            break
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if not ready:
            if proc.poll() is not None:
                break
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        out += chunk
        if len(out) > limits.output_bytes:
            reason = f"output truncated at {limits.output_bytes} bytes; process killed"
            del out[limits.output_bytes:]
            break
    if reason:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.stdout.close()
    proc.wait()
    return bytes(out), reason


def _call_cgroup(limits: SandboxLimits, isolation: str) -> Cgroup | None:
    """This call's sub-cgroup: its memory for all its processes, and its process count (plus the
    sandbox's own: unshare and the launcher in namespace mode, the interpreter itself)."""
    if _cgroup is None:
        return None
    own = 3 if isolation == "namespaces" else 1
    try:
        return _cgroup.child(f"call-{uuid.uuid4().hex[:12]}", memory_bytes=limits.memory_bytes,
                             processes=limits.processes + own)
    except OSError:
        return None   # e.g. the server's cgroup was removed under us: the rlimits still apply


def run_python(code: str, limits: SandboxLimits | None = None, isolation: str | None = None) -> str:
    """Run `code` in a fresh interpreter inside the sandbox; return its output and fate.
    `isolation` forces "python-guard" (tests); by default the strongest available is used.
    `print(EXPR)` of a pure expression on literals, and a documentation look-up of a stdlib
    function, are answered in-process (pure_print, doc_lookup)."""
    if not isinstance(code, str) or not code.strip():
        return "error: 'code' must be a non-empty string of Python source"
    printed = pure_print(code)
    if printed is None:
        printed = doc_lookup(code)
    if printed is not None:
        return printed
    limits = limits or SandboxLimits()
    isolation = isolation or sandbox_isolation()
    group = _call_cgroup(limits, isolation)
    with tempfile.TemporaryDirectory(prefix="llmforge-sandbox-") as box:
        box = os.path.realpath(box)
        env = {"HOME": box, "TMPDIR": box, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        rl = {}
        if isolation == "namespaces":
            Path(box, "main.py").write_text(code, encoding="utf-8")
            keep = sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.prefix)})
            cfg = {"dir": box, "rlimits": _rlimits(limits, group), "env": env, "python": sys.executable,
                   "setpriv": shutil.which("setpriv"), "keep": keep, "hide": list(_HIDDEN_PATHS)}
            argv = [shutil.which("unshare"), "--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc",
                    sys.executable, "-I", "-c", _LAUNCHER, json.dumps(cfg)]
        else:
            guard = f"_HIDE = {json.dumps(_HIDDEN_PATHS)}\n" + _GUARD
            Path(box, "main.py").write_text(guard + "\n" + code, encoding="utf-8")
            argv = [sys.executable, "-I", "main.py"]
            rl = _rlimits(limits, group)
            if os.geteuid() != 0 and group is None:   # the limit counts all of this user's processes: allow ours plus the budget
                mine = _processes_of(os.getuid())
                rl["RLIMIT_NPROC"] = (mine + limits.processes, mine + limits.processes)

        def preexec():   # in the child, before exec: join the call's cgroup, then limit itself
            if group is not None:
                group.enter()
            for name, value in rl.items():
                resource.setrlimit(getattr(resource, name), value)
        try:
            proc = subprocess.Popen(argv, cwd=box, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec)
            out, reason = _read_capped(proc, limits)
        finally:
            events = group.close() if group is not None else {}   # kills anything it left running
    text = out.decode("utf-8", errors="replace")
    rc = proc.returncode
    if not reason and rc:
        signum = -rc if rc < 0 else rc - 128 if rc > 128 else 0
        name = signal.Signals(signum).name if signum in signal.valid_signals() else ""
        if name:
            why = {"SIGXCPU": f"CPU limit of {limits.cpu_seconds}s exceeded",
                   "SIGKILL": "killed (likely the memory limit)",
                   "SIGXFSZ": f"file size limit of {limits.file_bytes} bytes exceeded"}.get(name, name)
            if name == "SIGKILL" and events.get("oom_kills"):
                why = f"memory limit of {limits.memory_bytes >> 20} MB for the call's processes exceeded"
            reason = f"killed: {why}"
        else:
            reason = f"exit code {rc}"
    notes = [reason] if reason else []
    if events.get("oom_kills") and "memory limit" not in reason:
        notes.append(f"{events['oom_kills']} process(es) killed: memory limit of {limits.memory_bytes >> 20} MB "
                     "for the call's processes exceeded")
    if events.get("forks_refused"):
        notes.append(f"process limit of {limits.processes} reached: {events['forks_refused']} new process(es) "
                     "refused")
    return text + "".join(f"\n[{n}]" for n in notes)


# ---------------------------------------------------------------- registry

TOOL_SPECS = {
    "calculator": {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression: + - * / // % ** and parentheses, "
                           "plus abs, round, min, max, sqrt, log, exp, sin, cos, pi, e.",
            "parameters": {"type": "object",
                           "properties": {"expression": {"type": "string", "description": "e.g. (3 + 4) * 12"}},
                           "required": ["expression"], "additionalProperties": False},
        },
    },
    "python": {
        "type": "function",
        "function": {
            "name": "python",
            "description": "Run a Python program in a sandbox (no network, own temporary directory, "
                           "time and memory limits) and return what it prints.",
            "parameters": {"type": "object",
                           "properties": {"code": {"type": "string", "description": "Python source; use print()"}},
                           "required": ["code"], "additionalProperties": False},
        },
    },
}

_RUNNERS = {
    "calculator": lambda args: calculate(args.get("expression")),
    "python": lambda args: run_python(args.get("code")),
}


def tool_names() -> list[str]:
    return list(_RUNNERS)


def tool_specs(names=None) -> list[dict]:
    """OpenAI-style `tools` entries for the built-in tools (all of them by default)."""
    names = tool_names() if names is None else names
    for name in names:
        check_tool(name)
    return [TOOL_SPECS[n] for n in names]


def check_tool(name: str) -> None:
    if name not in _RUNNERS:
        raise UnknownToolError(f"unknown tool '{name}'; built-in tools are: {', '.join(_RUNNERS)}")


def run_tool(name: str, arguments: dict | str) -> str:
    """Execute a registered tool. Arguments may be a dict or its JSON text (as a model writes it)."""
    check_tool(name)
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return f"error: tool arguments are not valid JSON: {arguments[:200]!r}"
    if not isinstance(arguments, dict):
        return "error: tool arguments must be a JSON object"
    return _RUNNERS[name](arguments)
