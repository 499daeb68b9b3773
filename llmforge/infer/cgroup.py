"""A cgroup for the Python tool's processes: CPU, memory and process count in total, where the
machine lets us make one.

    group = Cgroup.create("llmforge-sandbox-1234", cpus=1, memory_bytes=2 << 30, processes=128)
    call = group.child("call-ab12", memory_bytes=512 << 20, processes=33)   # one tool call
    subprocess.Popen(..., preexec_fn=call.enter)   # joins before exec: all it spawns is inside
    call.close()        # {"oom_kills": 0, "forks_refused": 3}; kills what is left, removes it
    group.close()

cgroup v2 is used when the server's own cgroup can hand the cpu, memory and pids controllers to a
child; else cgroup v1's cpu, memory and pids hierarchies. The new group is made under the
server's own cgroup in each hierarchy, so whatever limit the server already has still applies.
`Cgroup.create` raises OSError saying why when nothing writable is found. pids.max binds root too
(RLIMIT_NPROC does not), which is what a root server without namespaces needs.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

CONTROLLERS = ("cpu", "memory", "pids")
PERIOD_US = 100_000


def _cgroup_mounts() -> list[tuple[str, str, Path, set]]:
    """(fstype, root inside the hierarchy, mount point, super options) of each cgroup mount."""
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            fields, (fstype, _, options) = left.split(), right.split()[:3]
            if fstype in ("cgroup", "cgroup2"):
                mounts.append((fstype, fields[3], Path(fields[4].replace("\\040", " ")), set(options.split(","))))
    return mounts


def _own_paths() -> dict[str, str]:
    """{controller ('' for v2): this process's cgroup path}, from /proc/self/cgroup."""
    paths = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            for name in names.split(",") if names else [""]:
                paths[name] = path
    return paths


def _folder(point: Path, root: str, path: str) -> Path:
    rel = path[len(root):] if root != "/" and path.startswith(root) else path
    return point / rel.lstrip("/")


def _candidates() -> list[tuple[str, dict[str, Path]]]:
    """The server's own cgroup as ('v2', {controller: folder}) and/or ('v1', ...), best first."""
    mounts, own = _cgroup_mounts(), _own_paths()
    found = []
    for fstype, root, point, _ in mounts:
        if fstype == "cgroup2" and "" in own:
            found.append(("v2", dict.fromkeys(CONTROLLERS, _folder(point, root, own[""]))))
    v1 = {c: _folder(point, root, own[c]) for c in CONTROLLERS
          for fstype, root, point, options in mounts if fstype == "cgroup" and c in options and c in own}
    if len(v1) == len(CONTROLLERS):
        found.append(("v1", v1))
    return found


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _count(text: str, key: str) -> int:
    """The number after `key` in a flat-keyed cgroup file ("oom_kill 2\\nmax 0\\n")."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


class Cgroup:
    def __init__(self, version: str, dirs: dict[str, Path]):
        self.version, self.dirs = version, dirs   # controller -> folder (v2: the same folder thrice)

    @classmethod
    def create(cls, name: str, *, cpus: float, memory_bytes: int, processes: int) -> "Cgroup":
        """A new cgroup under the server's own, with these limits in total; OSError says why not."""
        reasons = []
        for version, parents in _candidates():
            try:
                if version == "v2":
                    folder = parents["cpu"]
                    offered = _read(folder / "cgroup.controllers").split()
                    if not set(CONTROLLERS) <= set(offered):
                        raise OSError(f"offers only {' '.join(offered) or 'no controllers'}")
                    # needs the server's cgroup to hold no processes itself (or be the root)
                    (folder / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in CONTROLLERS))
                group = cls(version, parents).child(name, memory_bytes=memory_bytes, processes=processes, cpus=cpus)
                return group
            except OSError as e:
                reasons.append(f"cgroup {version} at {parents['cpu']}: {e.strerror or e}")
        raise OSError("; ".join(reasons) or "no cgroup filesystem with cpu, memory and pids controllers is mounted")

    def child(self, name: str, *, memory_bytes: int, processes: int, cpus: float | None = None) -> "Cgroup":
        """A sub-cgroup with its own (tighter) limits; a fresh name, removed again if a limit fails."""
        group = Cgroup(self.version, {c: d / name for c, d in self.dirs.items()})
        try:
            for folder in group.folders():
                folder.mkdir()
            group.set_limits(memory_bytes=memory_bytes, processes=processes, cpus=cpus)
        except OSError:
            group.close()
            raise
        return group

    def folders(self) -> list[Path]:
        return list(dict.fromkeys(self.dirs.values()))

    def _write(self, controller: str, file: str, value, optional: bool = False) -> None:
        try:
            (self.dirs[controller] / file).write_text(str(value))
        except OSError:
            if not optional:
                raise

    def set_limits(self, *, memory_bytes: int, processes: int, cpus: float | None = None) -> None:
        if self.version == "v2":
            self._write("memory", "memory.max", memory_bytes)
            self._write("memory", "memory.swap.max", 0, optional=True)
            if cpus:
                self._write("cpu", "cpu.max", f"{int(cpus * PERIOD_US)} {PERIOD_US}")
        else:
            self._write("memory", "memory.limit_in_bytes", memory_bytes)
            self._write("memory", "memory.memsw.limit_in_bytes", memory_bytes, optional=True)   # no swap
            if cpus:
                self._write("cpu", "cpu.cfs_period_us", PERIOD_US)
                self._write("cpu", "cpu.cfs_quota_us", int(cpus * PERIOD_US))
        self._write("pids", "pids.max", processes)

    def limits(self) -> dict:
        """What the kernel holds now (for the start-up log and tests)."""
        if self.version == "v2":
            quota, period = (_read(self.dirs["cpu"] / "cpu.max").split() + ["max", "1"])[:2]
            memory = _read(self.dirs["memory"] / "memory.max").strip()
        else:
            quota, period = _read(self.dirs["cpu"] / "cpu.cfs_quota_us"), _read(self.dirs["cpu"] / "cpu.cfs_period_us")
            memory = _read(self.dirs["memory"] / "memory.limit_in_bytes").strip()
        cpus = int(quota) / int(period) if quota.strip().lstrip("-").isdigit() and int(quota) > 0 else None
        return {"cpus": cpus, "memory_bytes": int(memory) if memory.isdigit() else None,
                "processes": int(p) if (p := _read(self.dirs["pids"] / "pids.max").strip()).isdigit() else None}

    def enter(self) -> None:
        """Move the calling process in (a Popen preexec_fn: the child joins before it execs)."""
        pid = str(os.getpid())
        for folder in self.folders():
            with open(folder / "cgroup.procs", "w") as f:
                f.write(pid)

    def procs(self) -> set[int]:
        return {int(p) for folder in self.folders() for p in _read(folder / "cgroup.procs").split()}

    def events(self) -> dict:
        memory = _read(self.dirs["memory"] / ("memory.events" if self.version == "v2" else "memory.oom_control"))
        return {"oom_kills": _count(memory, "oom_kill"),
                "forks_refused": _count(_read(self.dirs["pids"] / "pids.events"), "max")}

    def kill(self) -> None:
        """SIGKILL everything inside: no new process may start (pids.max 0), then kill until empty."""
        self._write("pids", "pids.max", 0, optional=True)
        if self.version == "v2" and (self.dirs["cpu"] / "cgroup.kill").exists():
            self._write("cpu", "cgroup.kill", 1, optional=True)
        for _ in range(200):
            pids = self.procs()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.01)

    def close(self) -> dict:
        """Kill what is left, remove this cgroup (and any below it); its events before removal."""
        events = self.events()
        for sub in {p.name for folder in self.folders() if folder.is_dir() for p in folder.iterdir() if p.is_dir()}:
            Cgroup(self.version, {c: d / sub for c, d in self.dirs.items()}).close()
        self.kill()
        for folder in self.folders():
            for _ in range(100):   # a killed task leaves its cgroup a moment after the signal
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
        return events

    def __repr__(self) -> str:
        where = ", ".join(str(f) for f in self.folders())
        return f"cgroup {self.version} {where}"


def remove_stale(prefix: str) -> None:
    """Remove `PREFIX-PID` cgroups beside the server's own whose server process is gone (kill -9)."""
    for version, parents in _candidates():
        names = {p.name for d in set(parents.values()) if d.is_dir() for p in d.iterdir()
                 if p.is_dir() and p.name.startswith(prefix + "-")}
        for name in names:
            pid = name.rsplit("-", 1)[-1]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                try:
                    Cgroup(version, {c: d / name for c, d in parents.items()}).close()
                except OSError:
                    pass
