"""A test bed of network namespaces for the Availability Manager's end-to-end tests (plain Python, root only).

Topology (every name carries the bed's prefix, ``am`` + 4 hex digits unless given, so two runs on one machine
never collide; the interfaces are created straight inside their namespaces and never appear in the root one)::

    namespace    interface            address
    hosta        <p>-lan   (LAN)      10.X.0.1/24
                 <p>-a     (link A)   10.X.1.1/24   veth pair hosta <-> hostb
                 <p>-b     (link B)   10.X.2.1/24   veth pair hosta <-> hostb
    hostb        <p>-lan / <p>-a / <p>-b  10.X.0.2 / 10.X.1.2 / 10.X.2.2
    witness      <p>-lan              10.X.0.9/24
    client       <p>-lan              10.X.0.20/24
    lan          <p>-br, a bridge (the switch) with the ports <p>-hosta, <p>-hostb, <p>-witness, <p>-client

``X`` is derived from the prefix (or given). Loopback is up everywhere. Namespace names are ``<p>-<name>``; the
methods take the short names (``"hosta"``, ``"lan"``...).

    with NetBed() as bed:
        bed.addr("hostb", "a")                       # '10.X.1.2'
        proc = bed.spawn("hosta", [...], log_path=p)  # runs inside hosta, killed at close
        bed.cut_link("a"); bed.restore_link("a")      # a silent cut: the carriers stay up
        bed.cut_witness("hosta"); bed.heal()
        bed.kill_namespace_processes("hostb")        # a host crash
        with bed.in_ns("client"):                     # this thread's sockets are the client's
            socket.create_connection((bed.addr("hosta", "lan"), 443))

Cuts are nftables tables of the ``netdev`` family bound to the device (ingress and egress hooks), so nothing is
reported to the sender (no EPERM, no ICMP, no carrier loss): a cut is only detected by silence.
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
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

HOSTS = ("hosta", "hostb", "witness", "client")
NAMESPACES = (*HOSTS, "lan")
NETS = ("lan", "a", "b")
LAN_OCTET = {"hosta": 1, "hostb": 2, "witness": 9, "client": 20}
LINK_SUBNET = {"a": 1, "b": 2}  # the third octet of the availability links
LINK_OCTET = {"hosta": 1, "hostb": 2}

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000

_IP = shutil.which("ip") or "/usr/sbin/ip"
_NFT = shutil.which("nft") or "/usr/sbin/nft"
_libc = ctypes.CDLL(None, use_errno=True)


class NetBedError(RuntimeError):
    pass


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _check(proc: subprocess.CompletedProcess | subprocess.Popen, what: str, stderr: str) -> None:
    if proc.returncode != 0:
        raise NetBedError(f"{what} failed (exit {proc.returncode}): {stderr.strip()}")


class NetBed:
    """The namespaces, veths and bridge of one test bed; a context manager (``close`` also runs at exit).

    ``prefix``: at most 7 characters (interface names stay within 15); ``octet``: the X of 10.X.0.0/24.
    """

    def __init__(self, prefix: str | None = None, octet: int | None = None) -> None:
        if prefix is None:
            prefix = self._free_prefix()
        if not (1 <= len(prefix) <= 7) or not prefix.replace("_", "").isalnum():
            raise ValueError(f"prefix {prefix!r}: 1 to 7 letters, digits or underscores")
        self.prefix = prefix
        self.octet = octet if octet is not None else 20 + zlib.crc32(prefix.encode()) % 200
        if not 0 <= self.octet <= 255:
            raise ValueError(f"octet {octet} out of range")
        self.procs: list[subprocess.Popen] = []
        self.cuts: set[tuple[str, str]] = set()  # ("link", "a"), ("witness", "hosta")
        self.setup_seconds: float | None = None
        self.teardown_seconds: float | None = None
        self._created = False
        self._closed = False

    @staticmethod
    def _free_prefix() -> str:
        existing = {p.name.split("-", 1)[0] for p in NETNS_DIR.iterdir()} if NETNS_DIR.is_dir() else set()
        while True:
            prefix = "am" + secrets.token_hex(2)
            if prefix not in existing:
                return prefix

    # -- names and addresses ------------------------------------------------------------------------

    def netns(self, ns: str) -> str:
        """The full name of namespace ``ns`` (one of NAMESPACES), as ``ip netns`` knows it."""
        if ns not in NAMESPACES:
            raise ValueError(f"unknown namespace {ns!r} (one of {', '.join(NAMESPACES)})")
        return f"{self.prefix}-{ns}"

    def ifname(self, host: str, net: str) -> str:
        """The interface of ``host`` on ``net`` ("lan", "a" or "b"), inside that host's namespace."""
        self.addr(host, net)  # validates the pair
        return f"{self.prefix}-{net}"

    def addr(self, host: str, net: str) -> str:
        """The IPv4 address of ``host`` on ``net``: addr("hosta", "lan"), addr("hostb", "a"), addr("hosta", "b")."""
        if net == "lan":
            if host not in LAN_OCTET:
                raise ValueError(f"{host!r} is not on the lan (one of {', '.join(LAN_OCTET)})")
            return f"10.{self.octet}.0.{LAN_OCTET[host]}"
        if net in LINK_SUBNET:
            if host not in LINK_OCTET:
                raise ValueError(f"{host!r} is not on link {net} (hosta and hostb are)")
            return f"10.{self.octet}.{LINK_SUBNET[net]}.{LINK_OCTET[host]}"
        raise ValueError(f"unknown network {net!r} (one of {', '.join(NETS)})")

    def cidr(self, net: str) -> str:
        return f"10.{self.octet}.{0 if net == 'lan' else LINK_SUBNET[net]}.0/24"

    # -- creation -----------------------------------------------------------------------------------

    def __enter__(self) -> NetBed:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.close()

    def up(self) -> NetBed:
        """Create the namespaces and links: one ``ip -batch`` in the root namespace, then one per namespace."""
        if self._created:
            return self
        started = time.monotonic()
        self._created = True
        atexit.register(self.close)
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        self.setup_seconds = time.monotonic() - started
        return self

    def _create(self) -> None:
        p, n = self.prefix, self.netns
        root = [f"netns add {n(ns)}" for ns in NAMESPACES]
        root.append(f"link add {p}-br netns {n('lan')} type bridge stp_state 0 forward_delay 0")
        for host in HOSTS:
            root.append(f"link add {p}-lan netns {n(host)} type veth peer name {p}-{host} netns {n('lan')}")
        for link in LINK_SUBNET:
            root.append(f"link add {p}-{link} netns {n('hosta')} type veth peer name {p}-{link} netns {n('hostb')}")
        self._ip_batch(None, root)

        per_ns: dict[str, list[str]] = {}
        for host in HOSTS:
            lines = ["link set lo up", f"addr add {self.addr(host, 'lan')}/24 dev {p}-lan", f"link set {p}-lan up"]
            if host in LINK_OCTET:
                for link in LINK_SUBNET:
                    lines += [f"addr add {self.addr(host, link)}/24 dev {p}-{link}", f"link set {p}-{link} up"]
            per_ns[host] = lines
        lan = ["link set lo up", f"link set {p}-br up"]
        for host in HOSTS:
            lan += [f"link set {p}-{host} master {p}-br", f"link set {p}-{host} up"]
        per_ns["lan"] = lan
        # The namespaces are independent by now: configure them in parallel.
        running = {ns: self._ip_batch_start(ns, lines) for ns, lines in per_ns.items()}
        errors = []
        for ns, (proc, script) in running.items():
            _, err = proc.communicate(script, timeout=30)
            if proc.returncode != 0:
                errors.append(f"{ns}: {err.strip()}")
        if errors:
            raise NetBedError("configuring the namespaces failed: " + "; ".join(errors))

    def _ip_batch_start(self, ns: str | None, lines: Sequence[str], force: bool = False):
        argv = [_IP]
        if ns is not None:
            argv += ["-n", self.netns(ns)]
        if force:
            argv.append("-force")
        argv += ["-batch", "-"]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        return proc, "\n".join(lines) + "\n"

    def _ip_batch(self, ns: str | None, lines: Sequence[str], force: bool = False) -> None:
        proc, script = self._ip_batch_start(ns, lines, force)
        _, err = proc.communicate(script, timeout=30)
        if not force:
            _check(proc, f"ip -batch in {ns or 'the root namespace'}", err)

    # -- processes ----------------------------------------------------------------------------------

    def _exec_argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        return [_IP, "netns", "exec", self.netns(ns), *argv]

    def spawn(self, ns: str, argv: Sequence[str], *, log_path: str | os.PathLike, env: dict[str, str] | None = None,
              cwd: str | os.PathLike | None = None) -> subprocess.Popen:
        """Start ``argv`` inside namespace ``ns`` in a session of its own (so it is killed as a group), its stdout
        and stderr appended to ``log_path``; ``env`` replaces the environment as in Popen. Killed at ``close``."""
        log = Path(log_path)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(self._exec_argv(ns, argv), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, ns: str, argv: Sequence[str], timeout: float, *, input: str | None = None,
            env: dict[str, str] | None = None, check: bool = False) -> subprocess.CompletedProcess:
        """Run ``argv`` inside namespace ``ns`` to its end, its output captured (text); killed after ``timeout``
        seconds (subprocess.TimeoutExpired)."""
        return subprocess.run(self._exec_argv(ns, argv), input=input, capture_output=True, text=True,
                              timeout=timeout, env=env, check=check, start_new_session=True)

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

    def kill_namespace_processes(self, ns: str, timeout: float = 10.0) -> list[int]:
        """SIGKILL every process in namespace ``ns`` and wait until they are gone: a host crash. Returns the pids.

        The test process itself is never killed (it shows up there while its main thread is inside ``in_ns``)."""
        killed: list[int] = []
        deadline = time.monotonic() + timeout
        while True:
            pids = [pid for pid in self.pids(ns) if pid != os.getpid()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if pid not in killed:
                    killed.append(pid)
            self._reap()
            if time.monotonic() > deadline:
                raise NetBedError(f"processes {pids} of {self.netns(ns)} survived SIGKILL for {timeout}s")
            time.sleep(0.01)
        # A process leaves its namespace early in its exit, before its memory and sockets are gone: wait for
        # the end of the exit too (no such process, or a zombie), so a crash is over when this returns.
        while not all(_exited(pid) for pid in killed):
            self._reap()
            if time.monotonic() > deadline:
                raise NetBedError(f"processes of {self.netns(ns)} still exiting after {timeout}s")
            time.sleep(0.01)
        self._reap()
        return killed

    def _reap(self) -> None:
        for proc in self.procs:
            proc.poll()

    # -- cuts ---------------------------------------------------------------------------------------

    def _nft(self, hosts: Sequence[str], script: str) -> None:
        running = []
        for host in hosts:
            proc = subprocess.Popen(self._exec_argv(host, [_NFT, "-f", "-"]), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            running.append((host, proc))
        for host, proc in running:
            _, err = proc.communicate(script, timeout=30)
            _check(proc, f"nft in {self.netns(host)}", err)

    @staticmethod
    def _drop_table(table: str) -> str:
        # Declaring a table before deleting it makes the deletion succeed when it is absent (idempotent).
        return f"table netdev {table} {{}}\ndelete table netdev {table}\n"

    def _check_link(self, link: str) -> None:
        if link not in LINK_SUBNET:
            raise ValueError(f"unknown link {link!r} (one of {', '.join(LINK_SUBNET)})")

    def cut_link(self, link: str) -> None:
        """Pull the cable of availability link ``link`` ("a" or "b") silently: in hosta and hostb everything
        entering or leaving that interface is dropped, while both carriers stay up."""
        self._check_link(link)
        dev = self.ifname("hosta", link)
        table = f"netbed_link_{link}"
        script = self._drop_table(table) + (
            f"table netdev {table} {{\n"
            f"  chain ingress {{ type filter hook ingress device \"{dev}\" priority 0; policy drop; }}\n"
            f"  chain egress {{ type filter hook egress device \"{dev}\" priority 0; policy drop; }}\n"
            "}\n"
        )
        self._nft(("hosta", "hostb"), script)
        self.cuts.add(("link", link))

    def restore_link(self, link: str) -> None:
        self._check_link(link)
        self._nft(("hosta", "hostb"), self._drop_table(f"netbed_link_{link}"))
        self.cuts.discard(("link", link))

    def _check_witness_host(self, host: str) -> None:
        if host not in ("hosta", "hostb", "client"):
            raise ValueError(f"cut_witness takes hosta, hostb or client, not {host!r}")

    def cut_witness(self, host: str) -> None:
        """Silently drop the traffic (IPv4 and ARP) between ``host`` and the witness, in ``host``'s namespace; the
        rest of the lan still works for it."""
        self._check_witness_host(host)
        dev, witness = self.ifname(host, "lan"), self.addr("witness", "lan")
        script = self._drop_table("netbed_witness") + (
            "table netdev netbed_witness {\n"
            f"  chain ingress {{ type filter hook ingress device \"{dev}\" priority 0; policy accept;\n"
            f"    ip saddr {witness} drop\n"
            f"    arp saddr ip {witness} drop\n"
            "  }\n"
            f"  chain egress {{ type filter hook egress device \"{dev}\" priority 0; policy accept;\n"
            f"    ip daddr {witness} drop\n"
            f"    arp daddr ip {witness} drop\n"
            "  }\n"
            "}\n"
        )
        self._nft((host,), script)
        self.cuts.add(("witness", host))

    def restore_witness(self, host: str) -> None:
        self._check_witness_host(host)
        self._nft((host,), self._drop_table("netbed_witness"))
        self.cuts.discard(("witness", host))

    def heal(self) -> None:
        """Undo every cut in place."""
        for kind, what in sorted(self.cuts):
            if kind == "link":
                self.restore_link(what)
            else:
                self.restore_witness(what)

    # -- entering a namespace -----------------------------------------------------------------------

    @contextlib.contextmanager
    def in_ns(self, ns: str) -> Iterator[None]:
        """Move the calling THREAD into namespace ``ns`` for the block, then back to the network namespace it had.

        Caveats: setns(2) acts on the calling thread only, so use it in a thread of its own (e.g. one running an
        asyncio loop) and never across an ``await`` shared with other work, nor around a block that runs code of
        other threads. Sockets opened inside stay in ``ns`` after the block; threads and subprocesses started
        inside inherit ``ns`` (an executor's threads started lazily inside would be there, its earlier ones not).
        While the MAIN thread is inside, the test process shows up in ``pids(ns)``.
        """
        target = os.open(NETNS_DIR / self.netns(ns), os.O_RDONLY | os.O_CLOEXEC)
        try:
            original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
                try:
                    yield
                finally:
                    _setns(original)
            finally:
                os.close(original)
        finally:
            os.close(target)

    # -- teardown -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every spawned process and every process left in the namespaces, then delete the namespaces (which
        deletes the veths and the bridge). Idempotent; also registered with atexit."""
        if self._closed or not self._created:
            return
        self._closed = True
        started = time.monotonic()
        atexit.unregister(self.close)
        errors = []
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for ns in NAMESPACES:
            try:
                self.kill_namespace_processes(ns)
            except NetBedError as exc:
                errors.append(str(exc))
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                errors.append(f"process {proc.pid} ({proc.args}) did not exit")
        names = [self.netns(ns) for ns in NAMESPACES if (NETNS_DIR / self.netns(ns)).exists()]
        if names:
            self._ip_batch(None, [f"netns del {name}" for name in names], force=True)
        left = [name for name in names if (NETNS_DIR / name).exists()]
        if left:
            errors.append(f"namespaces not deleted: {', '.join(left)}")
        self.teardown_seconds = time.monotonic() - started
        if errors:
            raise NetBedError("; ".join(errors))


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def netns_names(prefix: str) -> list[str]:
    """The namespaces (as ``ip netns list`` shows them) whose name starts with ``prefix`` + "-"."""
    out = subprocess.run([_IP, "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix + "-")]
