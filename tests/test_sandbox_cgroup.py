"""The Python tool's cgroup: a fork bomb stops at the process limit while the server keeps
answering, a memory hog spread over processes is killed, whatever a call leaves behind dies
with it, and the start-up log says plainly when there is no cgroup. The cgroup tests skip where
no cgroup is writable (not root, or no delegated controllers)."""
import os
import threading
import time

import httpx
import pytest

from llmforge.config import ServeConfig
from llmforge.infer import cgroup, tools
from llmforge.infer.tools import SandboxLimits, SandboxTotals, run_python, sandbox_description, sandbox_isolation
from llmforge.serve.api import create_app, load_served, run_in_thread
from llmforge.serve.tiny import make_tiny_checkpoint

MODES = ["python-guard"] + (["namespaces"] if sandbox_isolation() == "namespaces" else [])
TOTALS = SandboxTotals(cpus=1, memory_bytes=1 << 30, processes=64)


@pytest.fixture(scope="module")
def group():
    made = tools.enable_cgroup(TOTALS)
    if made is None:
        tools.disable_cgroup()
        pytest.skip(f"no writable cgroup here: {tools._cgroup_why_not}")
    yield made
    tools.disable_cgroup()
    assert not any(f.exists() for f in made.folders())   # removed on shutdown


@pytest.fixture(scope="module")
def served(group, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    make_tiny_checkpoint(run / "ckpt" / "sft", max_seq_len=256)
    server = load_served(run, cfg=ServeConfig(max_batch=4, batch_wait_ms=5), db=str(run / "feedback.sqlite"))
    url, stop = run_in_thread(create_app(server))
    yield server, url
    stop()
    server.close()


def _calls_left(group) -> list:
    return [p for f in group.folders() for p in f.iterdir() if p.is_dir()]


def test_the_cgroup_holds_the_totals_and_the_log_says_so(group):
    assert group.limits() == {"cpus": 1.0, "memory_bytes": 1 << 30, "processes": 64}
    lines = sandbox_description()
    assert any(line.startswith(f"tool cgroup: {group.version}, all tool processes together: 1 CPUs, 1024 MB, "
                               f"64 processes") for line in lines), lines
    assert not any("NOT LIMITED" in line for line in lines)


@pytest.mark.parametrize("mode", MODES)
def test_a_fork_bomb_stops_at_its_process_limit_while_the_server_and_other_calls_go_on(served, group, mode):
    server, url = served
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        out=run_python(bomb, SandboxLimits(wall_seconds=4, processes=16), isolation=mode)))
    thread.start()
    time.sleep(0.5)
    assert run_python("print('still fine')", isolation=mode).startswith("still fine")   # another call
    answered = 0
    while thread.is_alive():
        r = httpx.post(url + "/v1/chat/completions", timeout=60,
                       json={"model": server.model_name, "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 4})
        assert r.status_code == 200, r.text
        answered += bool(thread.is_alive())
    thread.join()
    assert answered >= 1   # answered while the bomb ran
    out = result["out"]
    assert "[killed: wall-clock limit of 4s exceeded]" in out, out
    assert "process limit of 16 reached" in out, out
    assert group.procs() == set() and _calls_left(group) == []   # every bomb process is gone
    assert httpx.get(url + "/health", timeout=30).status_code == 200


@pytest.mark.parametrize("mode", MODES)
def test_a_memory_hog_over_several_processes_is_killed(group, mode):
    hog = ("import os\nfor i in range(3):\n    if os.fork() == 0:\n        x = b'x' * (120 << 20)\n"
           "        import time; time.sleep(5)\n        os._exit(0)\n"
           "print(sorted(os.waitstatus_to_exitcode(os.wait()[1]) for _ in range(3)))")
    out = run_python(hog, SandboxLimits(memory_bytes=256 << 20, wall_seconds=30), isolation=mode)
    assert "-9" in out.splitlines()[0], out   # at least one child got SIGKILL from the OOM killer
    assert "memory limit of 256 MB for the call's processes exceeded" in out, out   # each fits RLIMIT_AS alone
    assert _calls_left(group) == []


def test_a_process_that_detaches_itself_dies_with_its_call(group):
    code = ("import os, time\npid = os.fork()\nif pid == 0:\n    os.setsid()\n    os.close(1)\n"
            "    time.sleep(60)\n    os._exit(0)\nprint(pid)")
    out = run_python(code, SandboxLimits(wall_seconds=20), isolation="python-guard")
    pid = int(out.split()[0])
    deadline = time.time() + 5
    while os.path.exists(f"/proc/{pid}") and time.time() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":   # killed, not yet reaped by init
                break
        time.sleep(0.05)
    else:
        assert not os.path.exists(f"/proc/{pid}"), f"process {pid} outlived its call"


def test_without_a_cgroup_the_log_says_so_and_names_an_unlimited_process_count(monkeypatch):
    monkeypatch.setattr(tools, "_cgroup", None)
    monkeypatch.setattr(tools, "_cgroup_users", 0)
    monkeypatch.setattr(cgroup, "_candidates", lambda: [])
    assert tools.enable_cgroup() is None
    tools.disable_cgroup()
    monkeypatch.setattr(tools, "sandbox_isolation", lambda: "python-guard")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    lines = sandbox_description()
    assert "FALLBACK" in lines[0]
    assert lines[1].startswith("tool cgroup: NONE (no cgroup filesystem with cpu, memory and pids controllers")
    assert "NOT LIMITED" in lines[2] and "fork bomb" in lines[2]
