"""Network namespaces for test beds (plain Python and the ``ip``/``nft`` tools; root only).

``Namespaces`` is what every bed needs whatever its topology: named namespaces under one random prefix (so two
runs on one machine never collide), processes spawned inside them, a host crash (every process of a namespace
killed), nftables scripts run inside them, the calling thread moved into one, and a teardown that leaves nothing
behind (also run at exit). The AM tests' ``tests/am/netbed.py`` and the live bed (``xapisim.live.bed``) build their
topologies on it.

Cuts are nftables tables of the ``netdev`` family bound to a device (ingress and egress hooks): nothing is
reported to the sender (no EPERM, no ICMP, no carrier loss), so a cut is only detected by silence.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000

IP = shutil.which("ip") or "/usr/sbin/ip"
NFT = shutil.which("nft") or "/usr/sbin/nft"
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(RuntimeError):
    pass


def setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _check(proc: subprocess.CompletedProcess | subprocess.Popen, what: str, stderr: str) -> None:
    if proc.returncode != 0:
        raise NetnsError(f"{what} failed (exit {proc.returncode}): {stderr.strip()}")


def exited(pid: int) -> bool:
    """True once ``pid`` is gone or a zombie: its memory and sockets are released."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def netns_names(prefix: str) -> list[str]:
    """The namespaces (as ``ip netns list`` shows them) whose name starts with ``prefix`` + "-"."""
    out = subprocess.run([IP, "netns", "list"], capture_output=True, text=True, check=True, timeout=30).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix + "-")]


def free_prefix(base: str) -> str:
    """``base`` + 4 random hex digits, not the prefix of any namespace that exists now."""
    existing = {p.name.split("-", 1)[0] for p in NETNS_DIR.iterdir()} if NETNS_DIR.is_dir() else set()
    while True:
        prefix = base + secrets.token_hex(2)
        if prefix not in existing:
            return prefix


def drop_table(table: str, family: str = "netdev") -> str:
    """An nft script deleting ``table`` whether or not it exists (declaring it first makes the deletion succeed)."""
    return f"table {family} {table} {{}}\ndelete table {family} {table}\n"


def cut_table(table: str, dev: str) -> str:
    """An nft script dropping everything that enters or leaves ``dev`` (idempotent: replaces an earlier one)."""
    return drop_table(table) + (
        f"table netdev {table} {{\n"
        f'  chain ingress {{ type filter hook ingress device "{dev}" priority 0; policy drop; }}\n'
        f'  chain egress {{ type filter hook egress device "{dev}" priority 0; policy drop; }}\n'
        "}\n"
    )


class Namespaces:
    """Namespaces named ``<prefix>-<short name>``; the methods take the short names.

    ``known`` holds the short names this object created (and deletes at ``close``); a subclass adds to it as it
    creates namespaces. ``close`` is registered with atexit when the first namespace is created.
    """

    def __init__(self, prefix: str) -> None:
        if not (1 <= len(prefix) <= 7) or not prefix.replace("_", "").isalnum():
            raise ValueError(f"prefix {prefix!r}: 1 to 7 letters, digits or underscores")
        self.prefix = prefix
        self.known: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self._created = False
        self._closed = False

    def netns(self, ns: str) -> str:
        """The full name of namespace ``ns``, as ``ip netns`` knows it."""
        return f"{self.prefix}-{ns}"

    # -- ip ---------------------------------------------------------------------------------------------

    def ip_batch_start(self, ns: str | None, lines: Sequence[str], force: bool = False) -> tuple[subprocess.Popen, str]:
        argv = [IP]
        if ns is not None:
            argv += ["-n", self.netns(ns)]
        if force:
            argv.append("-force")
        argv += ["-batch", "-"]
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        return proc, "\n".join(lines) + "\n"

    def ip_batch(self, ns: str | None, lines: Sequence[str], force: bool = False) -> None:
        """Run ``ip -batch`` in namespace ``ns`` (None: the root namespace); ``force`` goes on after an error."""
        proc, script = self.ip_batch_start(ns, lines, force)
        _, err = proc.communicate(script, timeout=30)
        if not force:
            _check(proc, f"ip -batch in {ns or 'the root namespace'}", err)

    def ip_batches(self, per_ns: dict[str, list[str]]) -> None:
        """One ``ip -batch`` per namespace, all at once (the namespaces must be independent of each other)."""
        running = {ns: self.ip_batch_start(ns, lines) for ns, lines in per_ns.items()}
        errors = []
        for ns, (proc, script) in running.items():
            _, err = proc.communicate(script, timeout=30)
            if proc.returncode != 0:
                errors.append(f"{ns}: {err.strip()}")
        if errors:
            raise NetnsError("configuring the namespaces failed: " + "; ".join(errors))

    def add_namespaces(self, names: Iterable[str], root_lines: Sequence[str] = ()) -> None:
        """Create the namespaces ``names``, then run ``root_lines`` (e.g. veths into them) in the root namespace,
        all in one ``ip -batch``."""
        names = list(names)
        if not self._created:
            self._created = True
            atexit.register(self.close)
        self.known += [ns for ns in names if ns not in self.known]
        self.ip_batch(None, [f"netns add {self.netns(ns)}" for ns in names] + list(root_lines))

    def delete_namespaces(self, names: Iterable[str]) -> None:
        """Kill what runs in them, then delete them (which deletes their interfaces and the veths' other ends)."""
        names = list(names)
        for ns in names:
            self.kill_namespace_processes(ns)
        existing = [self.netns(ns) for ns in names if (NETNS_DIR / self.netns(ns)).exists()]
        if existing:
            self.ip_batch(None, [f"netns del {name}" for name in existing], force=True)
        self.known = [ns for ns in self.known if ns not in names]

    # -- processes --------------------------------------------------------------------------------------

    def exec_argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        return [IP, "netns", "exec", self.netns(ns), *argv]

    def spawn(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        log_path: str | os.PathLike,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        stdin: int = subprocess.DEVNULL,
    ) -> subprocess.Popen:
        """Start ``argv`` inside namespace ``ns`` in a session of its own (so it is killed as a group), its stdout
        and stderr appended to ``log_path``; ``env`` replaces the environment as in Popen. Killed at ``close``."""
        log = Path(log_path)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                self.exec_argv(ns, argv),
                stdin=stdin,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def run(
        self,
        ns: str,
        argv: Sequence[str],
        timeout: float,
        *,
        input: str | None = None,  # noqa: A002 - subprocess.run's name
        env: dict[str, str] | None = None,
        check: bool = False,
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` inside namespace ``ns`` to its end, its output captured (text); killed after ``timeout``
        seconds (subprocess.TimeoutExpired)."""
        return subprocess.run(
            self.exec_argv(ns, argv),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=check,
            start_new_session=True,
        )

    def pids(self, ns: str) -> list[int]:
        """The processes whose network namespace is ``ns`` (what ``ip netns pids`` lists; zombies are not)."""
        try:
            target = os.stat(NETNS_DIR / self.netns(ns))
        except FileNotFoundError:
            return []
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                st = os.stat(f"/proc/{entry.name}/ns/net")
            except OSError:  # gone, or a zombie
                continue
            if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                found.append(int(entry.name))
        return found

    def kill_namespace_processes(self, *namespaces: str, timeout: float = 10.0) -> list[int]:
        """SIGKILL every process in the namespaces, in one sweep, and wait until they are gone: a host crash (a
        host's own namespace and its guests'). Returns the pids.

        The calling process itself is never killed (it shows up there while its main thread is inside ``in_ns``)."""
        killed: list[int] = []
        deadline = time.monotonic() + timeout
        ns = ", ".join(self.netns(n) for n in namespaces)
        while True:
            pids = [pid for n in namespaces for pid in self.pids(n) if pid != os.getpid()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if pid not in killed:
                    killed.append(pid)
            self.reap()
            if time.monotonic() > deadline:
                raise NetnsError(f"processes {pids} of {ns} survived SIGKILL for {timeout}s")
            time.sleep(0.01)
        # A process leaves its namespace early in its exit, before its memory and sockets are gone: wait for
        # the end of the exit too (no such process, or a zombie), so a crash is over when this returns.
        while not all(exited(pid) for pid in killed):
            self.reap()
            if time.monotonic() > deadline:
                raise NetnsError(f"processes of {ns} still exiting after {timeout}s")
            time.sleep(0.01)
        self.reap()
        return killed

    def reap(self) -> None:
        """Collect the exit status of spawned processes that ended (no zombies left behind)."""
        for proc in self.procs:
            proc.poll()

    # -- nftables ---------------------------------------------------------------------------------------

    def nft(self, namespaces: Sequence[str], script: str) -> None:
        """Run the nft ``script`` in each of ``namespaces``, in parallel."""
        running = []
        for ns in namespaces:
            proc = subprocess.Popen(
                self.exec_argv(ns, [NFT, "-f", "-"]),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            running.append((ns, proc))
        for ns, proc in running:
            _, err = proc.communicate(script, timeout=30)
            _check(proc, f"nft in {self.netns(ns)}", err)

    # -- entering a namespace ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def in_ns(self, ns: str) -> Iterator[None]:
        """Move the calling THREAD into namespace ``ns`` for the block, then back to the network namespace it had.

        Caveats: setns(2) acts on the calling thread only, so use it in a thread of its own (e.g. one running an
        asyncio loop) and never across an ``await`` shared with other work, nor around a block that runs code of
        other threads. Sockets opened inside stay in ``ns`` after the block; threads and subprocesses started
        inside inherit ``ns`` (an executor's threads started lazily inside would be there, its earlier ones not).
        While the MAIN thread is inside, the process shows up in ``pids(ns)``.
        """
        target = os.open(NETNS_DIR / self.netns(ns), os.O_RDONLY | os.O_CLOEXEC)
        try:
            original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns(target)
                try:
                    yield
                finally:
                    setns(original)
            finally:
                os.close(original)
        finally:
            os.close(target)

    # -- teardown ---------------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every spawned process and every process left in the namespaces, then delete the namespaces (which
        deletes their veths and bridges). Idempotent; also registered with atexit."""
        if self._closed or not self._created:
            return
        self._closed = True
        atexit.unregister(self.close)
        errors = []
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for ns in self.known:
            try:
                self.kill_namespace_processes(ns)
            except NetnsError as exc:
                errors.append(str(exc))
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                errors.append(f"process {proc.pid} ({proc.args}) did not exit")
        names = [self.netns(ns) for ns in self.known if (NETNS_DIR / self.netns(ns)).exists()]
        if names:
            self.ip_batch(None, [f"netns del {name}" for name in names], force=True)
        left = [name for name in names if (NETNS_DIR / name).exists()]
        if left:
            errors.append(f"namespaces not deleted: {', '.join(left)}")
        if errors:
            raise NetnsError("; ".join(errors))
