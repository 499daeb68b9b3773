"""Built-in tools: the calculator computes arithmetic and nothing else; the Python sandbox
cannot write outside its directory, reach the network, or run past its limits."""
import json
import socket
import time

import pytest

from llmforge.errors import UserError
from llmforge.infer.tools import (SandboxLimits, UnknownToolError, calculate, run_python, run_tool,
                                  sandbox_isolation, tool_specs)

MODES = ["python-guard"] + (["namespaces"] if sandbox_isolation() == "namespaces" else [])


@pytest.mark.parametrize("expression", ["1 + 2 * 3", "(1 + 2) * 3", "2 ** 10 - 7 // 2", "17 % 5 + -3",
                                        "7 / 2", "((((4))))", "-2 ** 2", "10 // -3"])
def test_calculator_matches_python_arithmetic(expression):
    expected = eval(expression)  # trusted literal from this test, to compare against
    got = calculate(expression)
    assert float(got) == pytest.approx(expected)


@pytest.mark.parametrize("expression", ["__import__('os').system('true')", "open('/etc/passwd')",
                                        "(1).__class__", "[1, 2]", "'a' * 3", "x + 1", "lambda: 1"])
def test_calculator_refuses_anything_but_arithmetic(expression):
    assert calculate(expression).startswith("error:")


def test_calculator_limits_are_fast():
    start = time.perf_counter()
    assert calculate("9 ** 9 ** 9").startswith("error:")
    assert calculate("(10 ** 1000) * (10 ** 1000)").startswith("error:")
    assert calculate("1 / 0") == "error: division by zero"
    assert calculate("1" + "+1" * 500).startswith("error:")
    assert time.perf_counter() - start < 1.0


def test_registry_unknown_tool_is_a_user_error_and_arguments_may_be_json_text():
    with pytest.raises(UnknownToolError) as e:
        run_tool("shell", {"cmd": "ls"})
    assert isinstance(e.value, UserError) and "calculator" in str(e.value)
    assert run_tool("calculator", json.dumps({"expression": "6*7"})) == "42"
    assert run_tool("calculator", "{not json").startswith("error:")
    assert run_tool("calculator", {}).startswith("error:")
    names = [s["function"]["name"] for s in tool_specs()]
    assert names == ["calculator", "python"]
    assert all(s["type"] == "function" and s["function"]["parameters"]["type"] == "object" for s in tool_specs())


@pytest.mark.parametrize("mode", MODES)
def test_sandbox_runs_code_in_its_own_directory(mode):
    out = run_python("import os\nopen('note.txt', 'w').write('hi')\n"
                     "print(os.getcwd() == os.environ['HOME'], sorted(os.listdir('.')))", isolation=mode)
    assert out.strip().startswith("True") and "note.txt" in out, out


@pytest.mark.parametrize("mode", MODES)
def test_sandbox_cannot_write_outside_its_directory(mode, tmp_path):
    target = tmp_path / "escaped.txt"
    out = run_python(f"open({str(target)!r}, 'w').write('pwned')\nprint('wrote')", isolation=mode)
    assert not target.exists(), out
    assert "wrote" not in out.split("Traceback")[0]


@pytest.mark.parametrize("mode", MODES)
def test_sandbox_cannot_reach_the_network_not_even_loopback(mode):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        out = run_python(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                         "s.sendall(b'leak')\nprint('connected')", isolation=mode)
        server.settimeout(0.2)
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()
    assert "connected" not in out.split("Traceback")[0] and "Error" in out, out


@pytest.mark.parametrize("mode", MODES)
def test_sandbox_is_killed_past_its_time_limit(mode):
    start = time.perf_counter()
    out = run_python("while True:\n    pass", SandboxLimits(wall_seconds=1.5, cpu_seconds=1), isolation=mode)
    assert time.perf_counter() - start < 5
    assert "killed" in out, out
    out = run_python("import time\ntime.sleep(30)", SandboxLimits(wall_seconds=0.5), isolation=mode)
    assert "wall-clock limit" in out, out


@pytest.mark.parametrize("mode", MODES)
def test_sandbox_memory_limit(mode):
    out = run_python("x = bytearray(1 << 30)\nprint('allocated', len(x))",
                     SandboxLimits(memory_bytes=256 << 20), isolation=mode)
    assert "allocated" not in out and ("MemoryError" in out or "killed" in out), out


@pytest.mark.parametrize("mode", MODES)
def test_sandbox_output_is_capped(mode):
    out = run_python("while True:\n    print('x' * 1000)", SandboxLimits(output_bytes=4096), isolation=mode)
    assert len(out) < 4096 + 200
    assert "output truncated at 4096 bytes" in out


@pytest.mark.skipif("namespaces" not in MODES, reason="needs root and util-linux unshare/setpriv")
def test_namespace_sandbox_hides_the_host(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    secret.chmod(0o600)
    out = run_python(f"import os\nprint(os.getuid(), len([p for p in os.listdir('/proc') if p.isdigit()]))\n"
                     f"print(open({str(secret)!r}).read())")
    uid, processes = out.split("\n")[0].split()
    assert uid == "65534" and int(processes) <= 3          # nobody, and only its own namespace's processes
    assert "s3cret" not in out and "PermissionError" in out


@pytest.mark.parametrize("mode", MODES)
def test_sandbox_cannot_read_hidden_folders_like_the_feedback_store(mode, tmp_path):
    from llmforge.infer import tools
    from llmforge.serve.feedback import open_store

    store_dir = tmp_path / "run"
    store = open_store(store_dir / "feedback.sqlite")
    store.new_conversation("private title")
    store.close()
    tools.hide_paths([store_dir])
    try:
        code = (f"import os\ntry:\n    print(open({str(store_dir / 'feedback.sqlite')!r}, 'rb').read()[:100])\n"
                f"except Exception as e:\n    print('refused', type(e).__name__)\n"
                f"try:\n    print(os.listdir({str(store_dir)!r}))\nexcept Exception as e:\n    print('refused', type(e).__name__)")
        out = run_python(code, isolation=mode)
    finally:
        tools._HIDDEN_PATHS.remove(str(store_dir.resolve()))
    assert "SQLite" not in out and "feedback.sqlite" not in out, out
    assert out.startswith("refused"), out   # namespaces: an empty folder (nothing to open); guard: refused


@pytest.mark.skipif("namespaces" not in MODES, reason="RLIMIT_NPROC binds the sandbox's nobody user here")
def test_sandbox_process_count_is_limited():
    code = ("import subprocess\nprocs = []\ntry:\n    for i in range(200):\n"
            "        procs.append(subprocess.Popen(['sleep', '5']))\nexcept OSError as e:\n"
            "    print('stopped at', len(procs), type(e).__name__)\nfor p in procs:\n    p.kill()")
    out = run_python(code, SandboxLimits(wall_seconds=30))
    assert "stopped at" in out, out
    assert int(out.split("stopped at")[1].split()[0]) <= SandboxLimits().processes


PURE = ["print(sorted([9, 2, 7]))", "print(sorted([9, 2, 7], reverse=True))", "print('mirror'[::-1])",
        "print('mirror'.count('r'))", "print(len('abc'))", "print(-3)", "print([1, 2, 3][1:])",
        "print(max([3, 9, 1]))", "print('Hello'.upper())", "print(sum([1.5, 2]))", "print(('a', 1))",
        "# descending\nprint(sorted([9, 2, 7], reverse=True))"]
NOT_PURE = ["import os\nprint(os.getcwd())", "print(open('/etc/passwd').read())", "print(().__class__)",
            "print('x'.__class__)", "print(1, 2)", "print(sorted([3, 1], key=len))", "x = 1\nprint(x)",
            "print('ab'[5])", "print(sorted([1, 'a']))", "print(min([]))", "print(__import__('os'))",
            "print(' ' * 10 ** 9)", "print(list(range(10 ** 9)))", "print(9 ** 9 ** 9)"]


LOOKUPS = ["# signature\nimport inspect, textwrap\nprint(inspect.signature(textwrap.dedent))",
           "# doc\nimport inspect, os.path\nprint(inspect.getdoc(os.path.join).splitlines()[0])",
           "import inspect\nprint(inspect.signature(inspect.getmro))",
           "import inspect, json\nprint(inspect.getdoc(json.dumps))"]
NOT_LOOKUPS = ["import inspect, os\nprint(inspect.signature(os.system))",             # os itself is not listed
               "import inspect, textwrap\nprint(inspect.signature(textwrap._wrap))",   # private
               "import inspect\nprint(inspect.signature(textwrap.dedent))",            # not imported
               "import inspect, textwrap\nprint(inspect.signature(textwrap.nope))",    # fails: real traceback
               "import inspect, textwrap\nprint(inspect.signature(textwrap.dedent).splitlines()[0])",
               "import inspect, textwrap\nprint(textwrap.dedent('  x'))",              # a call of the function
               "import inspect, textwrap\nprint(inspect.signature(textwrap.dedent))\nimport os"]


@pytest.mark.parametrize("code", LOOKUPS)
def test_doc_lookup_answers_exactly_what_the_sandbox_prints(code):
    """python_doc's look-ups are answered in-process (~µs instead of a ~150 ms interpreter):
    an optimisation only, the same text."""
    from llmforge.infer.tools import doc_lookup
    fast = doc_lookup(code)
    assert fast is not None and fast == run_python(code + "\npass")


@pytest.mark.parametrize("code", NOT_LOOKUPS)
def test_doc_lookup_leaves_everything_else_to_the_sandbox(code):
    from llmforge.infer.tools import doc_lookup
    assert doc_lookup(code) is None


@pytest.mark.parametrize("code", PURE)
def test_pure_print_answers_exactly_what_the_sandbox_prints(code):
    """The in-process fast path (~µs instead of ~130 ms) is an optimisation only: same text."""
    from llmforge.infer.tools import pure_print
    fast = pure_print(code)
    assert pure_print(code + "\npass") is None                     # two statements: the sandbox runs it
    assert fast is not None and fast == run_python(code + "\npass")


@pytest.mark.parametrize("code", NOT_PURE)
def test_pure_print_leaves_everything_else_to_the_sandbox(code):
    """Names, attributes, imports, I/O, several statements, failing expressions and anything
    that could grow without bound are not answered in-process (the sandbox shows their real
    output or traceback)."""
    from llmforge.infer.tools import pure_print
    assert pure_print(code) is None
