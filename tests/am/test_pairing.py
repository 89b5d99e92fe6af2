"""Network pairing's policy (am/pairing.py), deterministically: what a host does given its NIC, its peer's and the
links; that no schedule of faults and message delays ever makes a bridge loop (a brute-force model of both AMs
with negative controls); and the ``[network]`` section of the agent's configuration.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from am import config, network, pairing
from am.network import ETH_P_RARP, rarp_frame
from am.pairing import Decision, Mode, PeerNic, Situation, decide, ports, steps
from tests.am.test_am_input import BASE  # a whole valid configuration, on addresses nothing answers

PAIRING = {"a": "pa", "b": "pb"}


def situation(carrier=True, links=("a", "b"), peer=PeerNic(True), protecting=True, borrowing=None, mode_seq=7):
    return Situation(carrier, links, peer, protecting, borrowing, mode_seq)


# -- what one host decides ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, expected", [
    pytest.param(situation(), Decision(), id="both-nics-up-alone"),
    pytest.param(situation(carrier=False), Decision(borrow="a"), id="nic-down-borrows-over-the-first-up-link"),
    pytest.param(situation(carrier=False, links=("b",)), Decision(borrow="b"), id="link-a-down-borrows-over-b"),
    pytest.param(situation(carrier=False, links=()), Decision(), id="no-link-no-pairing"),
    pytest.param(situation(carrier=False, peer=None), Decision(), id="peer-unknown-no-pairing"),
    pytest.param(situation(carrier=False, peer=PeerNic(False)), Decision(), id="both-nics-down-no-pairing"),
    pytest.param(situation(carrier=False, protecting=False), Decision(), id="no-protected-vm-no-new-pairing"),
    pytest.param(situation(carrier=False, protecting=False, borrowing="a"), Decision(borrow="a"),
                 id="a-pairing-outlives-its-protection-until-failback"),
    pytest.param(situation(carrier=False, borrowing="b"), Decision(borrow="b"), id="sticky-on-its-link"),
    pytest.param(situation(carrier=False, borrowing="a", links=("b",)), Decision(borrow="b"),
                 id="moves-when-its-link-goes-down"),
    pytest.param(situation(borrowing="a"), Decision(), id="failback-when-the-carrier-returns"),
    pytest.param(situation(peer=PeerNic(False, "a", echo=7)), Decision(lend="a"), id="lends-to-a-borrowing-peer"),
    pytest.param(situation(peer=PeerNic(False, "b", echo=7)), Decision(lend="b"), id="lends-over-the-peers-link"),
    pytest.param(situation(peer=PeerNic(False, "a", echo=6)), Decision(), id="stale-borrow-is-not-lent-to"),
    pytest.param(situation(carrier=False, peer=PeerNic(False, "a", echo=7)), Decision(),
                 id="no-lending-without-a-carrier"),
    pytest.param(situation(peer=PeerNic(False, "a", echo=7), links=("b",)), Decision(),
                 id="no-lending-over-a-link-that-is-down"),
    pytest.param(situation(peer=PeerNic(False, "a", echo=7), borrowing="a"), Decision(),
                 id="no-lending-while-failing-back"),
])
def test_decide(case, expected):
    assert decide(case) == expected


def test_ports_never_hold_the_nic_and_a_pairing_port_of_a_borrower_nor_two_pairing_ports():
    assert ports(Decision(), "eth0", PAIRING) == {"eth0"}
    assert ports(Decision(borrow="b"), "eth0", PAIRING) == {"pb"}
    assert ports(Decision(lend="a"), "eth0", PAIRING) == {"eth0", "pa"}
    assert Decision(borrow="a").mode == Mode.BORROWING and Decision(lend="b").link == "b"


def test_steps_take_every_port_out_before_putting_any_in():
    assert steps(frozenset({"eth0"}), frozenset({"pa"})) == [("eth0", False), ("pa", True)]
    assert steps(frozenset({"pa"}), frozenset({"eth0"})) == [("pa", False), ("eth0", True)]
    assert steps(frozenset({"eth0", "pa"}), frozenset({"eth0", "pb"})) == [("pa", False), ("pb", True)]
    assert steps(frozenset({"eth0"}), frozenset({"eth0"})) == []


# -- both AMs, every interleaving: never a loop ------------------------------------------------------------------


@dataclass
class Node:
    """One AM's pairing as am/network.py runs it: a step decides, its port moves run one at a time (the other host
    may act between two of them), then the decision is in force and the peer is told."""

    name: str
    carrier: bool = True
    protecting: bool = True
    decision: Decision = field(default_factory=Decision)
    mode_seq: int = 0
    bridge: set[str] = field(default_factory=lambda: {"eth0"})
    todo: list[tuple[str, bool]] = field(default_factory=list)
    next_decision: Decision | None = None
    peer: PeerNic | None = None
    peer_mode_seq: int = 0
    peer_seq: int = 0
    seq: int = 0


@dataclass
class Model:
    decide: object = decide
    steps: object = steps
    nodes: dict[str, Node] = field(default_factory=dict)
    links: set[str] = field(default_factory=lambda: {"a", "b"})
    wire: list[tuple[str, str, tuple]] = field(default_factory=list)  # (to, link, message)

    def __post_init__(self) -> None:
        self.nodes = {"A": Node("A", mode_seq=1000), "B": Node("B", mode_seq=2000)}

    def other(self, node: Node) -> Node:
        return self.nodes["B" if node.name == "A" else "A"]

    def step(self, node: Node) -> None:
        if node.todo:
            return
        new = self.decide(Situation(node.carrier, sorted(self.links), node.peer, node.protecting,
                                    node.decision.borrow, node.mode_seq))
        want = ports(new, "eth0", PAIRING)
        node.todo, node.next_decision = self.steps(frozenset(node.bridge), want), new
        if not node.todo:
            self.settle(node)

    def move(self, node: Node) -> str | None:
        dev, into = node.todo.pop(0)
        (node.bridge.add if into else node.bridge.discard)(dev)
        problem = self.loop()
        if not node.todo:
            self.settle(node)
        return problem

    def settle(self, node: Node) -> None:
        new, old = node.next_decision, node.decision
        if (new.borrow is None) != (old.borrow is None):
            node.mode_seq += 1
        node.decision = new
        node.seq += 1
        msg = (node.seq, node.carrier, node.mode_seq, node.peer_mode_seq, new.borrow, new.lend)
        for link in self.links:
            self.wire.append((self.other(node).name, link, msg))

    def deliver(self, index: int) -> None:
        to, _, (seq, carrier, mode_seq, echo, borrow, _) = self.wire.pop(index)
        node = self.nodes[to]
        if seq > node.peer_seq:
            node.peer_seq, node.peer, node.peer_mode_seq = seq, PeerNic(carrier, borrow, echo), mode_seq

    def cut(self, link: str) -> None:
        self.links.discard(link)
        self.wire = [m for m in self.wire if m[1] != link]
        if not self.links:
            for node in self.nodes.values():
                node.peer = None

    def loop(self) -> str | None:
        """A cycle in the graph LAN - bridge A - bridge B (NICs and tunnels as edges), counted whatever the carrier
        and link states: a loop in the configuration is a loop waiting to happen."""
        a, b = self.nodes["A"].bridge, self.nodes["B"].bridge
        edges = [(x, "LAN") for x, br in (("A", a), ("B", b)) if "eth0" in br]
        edges += [("A", "B") for dev in PAIRING.values() if dev in a and dev in b]
        parent = {n: n for n in ("A", "B", "LAN")}

        def root(n: str) -> str:
            while parent[n] != n:
                n = parent[n]
            return n

        for x, y in edges:
            if root(x) == root(y):
                return f"loop: A {sorted(a)}, B {sorted(b)}"
            parent[root(x)] = root(y)
        return None


def run_schedule(seed: int, events: int = 150, **model) -> str | None:
    rng = random.Random(seed)
    m = Model(**model)
    for node in m.nodes.values():
        node.protecting = rng.random() < 0.8
    for _ in range(events):
        node = m.nodes[rng.choice("AB")]
        roll = rng.random()
        if roll < 0.08:
            node.carrier = not node.carrier
        elif roll < 0.13:
            link = rng.choice("ab")
            if link in m.links:
                m.cut(link)
            else:
                m.links.add(link)
        elif roll < 0.45 and m.wire:
            m.deliver(rng.randrange(len(m.wire)))  # any message first: the two links reorder them
        elif roll < 0.7:
            m.step(node)
        elif node.todo:
            problem = m.move(node)
            if problem:
                return f"seed {seed}: {problem}"
    return None


def test_no_schedule_of_faults_and_message_delays_makes_a_bridge_loop():
    problems = [p for seed in range(3000) if (p := run_schedule(seed))]
    assert problems == []


def test_negative_control_putting_ports_in_before_taking_others_out_makes_loops():
    def in_first(have, want):
        return [(dev, True) for dev in sorted(want - have)] + [(dev, False) for dev in sorted(have - want)]

    assert any(run_schedule(seed, steps=in_first) for seed in range(3000))


def test_negative_control_lending_to_a_stale_borrow_makes_loops():
    def no_echo(s: Situation) -> Decision:
        if s.peer is not None:
            s = Situation(s.carrier, s.links_up, s.peer, s.protecting, s.borrowing, s.peer.echo)
        return decide(s)

    assert any(run_schedule(seed, events=300, decide=no_echo) for seed in range(3000))


def test_once_the_faults_stop_a_host_whose_nic_failed_borrows_and_its_peer_lends():
    for seed in range(300):
        rng = random.Random(seed)
        m = Model()
        run_events(m, rng, 100)
        m.links = {"a", "b"}
        a, b = m.nodes["A"], m.nodes["B"]
        a.carrier, b.carrier, a.protecting = False, True, True
        for _ in range(20):  # settle: every step done, every message delivered
            for node in (a, b):
                m.step(node)
                while node.todo:
                    assert m.move(node) is None
            while m.wire:
                m.deliver(0)
        link = a.decision.borrow  # the link it already borrowed over, if any: sticky
        assert link is not None and b.decision == Decision(lend=link), seed
        assert (a.bridge, b.bridge) == ({PAIRING[link]}, {"eth0", PAIRING[link]})


def run_events(m: Model, rng: random.Random, events: int) -> None:
    for _ in range(events):
        node = m.nodes[rng.choice("AB")]
        roll = rng.random()
        if roll < 0.1:
            node.carrier = not node.carrier
        elif roll < 0.15:
            link = rng.choice("ab")
            (m.cut if link in m.links else m.links.add)(link)
        elif roll < 0.5 and m.wire:
            m.deliver(rng.randrange(len(m.wire)))
        elif roll < 0.75:
            m.step(node)
        elif node.todo:
            assert m.move(node) is None


# -- announcements -----------------------------------------------------------------------------------------------


def test_an_announcement_is_a_broadcast_rarp_from_the_mac():
    frame = rarp_frame("02:00:0a:01:02:03")
    mac = bytes.fromhex("02000a010203")
    assert len(frame) == 60 and frame[:6] == b"\xff" * 6 and frame[6:12] == mac
    assert int.from_bytes(frame[12:14]) == ETH_P_RARP
    assert frame[20:22] == b"\x00\x03" and frame[22:28] == mac and frame[32:38] == mac  # op, sender, target


def test_the_macs_behind_a_bridge_are_those_learned_on_its_vm_ports_and_its_own(tmp_path, monkeypatch):
    """``bridge_macs`` reads sysfs: a fake one here, laid out as the kernel's (brforward: struct __fdb_entry)."""
    bridge = tmp_path / "xenbr0"
    for port, number in (("eth0", 1), ("pa", 2), ("vif1.0", 3), ("vif2.0", 0x103)):
        (bridge / "brif" / port).mkdir(parents=True)
        (bridge / "brif" / port / "port_no").write_text(f"{number:#x}\n")
    (bridge / "address").write_text("02:00:0a:00:00:01\n")
    entries = [("02:aa:00:00:00:01", 3, 0), ("02:aa:00:00:00:02", 0x103, 0), ("02:bb:00:00:00:01", 1, 0),
               ("02:cc:00:00:00:01", 2, 0), ("0e:00:00:00:00:03", 3, 1)]  # VM, VM (port above 255), LAN, peer, local
    (bridge / "brforward").write_bytes(b"".join(
        network.FDB_ENTRY.pack(bytes.fromhex(mac.replace(":", "")), port & 0xFF, local, 0, port >> 8, 0, 0)
        for mac, port, local in entries))
    monkeypatch.setattr(network, "SYS", tmp_path)
    assert network.bridge_macs("xenbr0", {"eth0", "pa", "pb"}) == [
        "02:00:0a:00:00:01", "02:aa:00:00:00:01", "02:aa:00:00:00:02"]
    assert network.bridge_ports("xenbr0") == {"eth0", "pa", "vif1.0", "vif2.0"}
    assert network.bridge_ports("no-such-bridge") == set()


# -- configuration ----------------------------------------------------------------------------------------------

NETWORK = '[network]\nbridge = "xenbr0"\nnic = "eth0"\npairing = { a = "pa", b = "pb" }\n'


def load(tmp_path, text: str) -> config.Config:
    path = tmp_path / "am.toml"
    path.write_text(text)
    return config.load(path)


def test_without_a_network_section_the_agent_does_no_pairing(tmp_path):
    assert load(tmp_path, BASE).network is None


def test_the_network_section_names_bridge_nic_and_pairing_per_link(tmp_path):
    net = load(tmp_path, BASE + NETWORK).network
    assert (net.bridge, net.nic, net.pairing) == ("xenbr0", "eth0", {"a": "pa", "b": "pb"})
    one = load(tmp_path, BASE + NETWORK.replace(', b = "pb"', "")).network
    assert one.pairing == {"a": "pa"}


@pytest.mark.parametrize("section, words", [
    pytest.param(NETWORK.replace('nic = "eth0"\n', ""), "nic", id="no-nic"),
    pytest.param(NETWORK.replace('bridge = "xenbr0"', 'bridge = ""'), "network.bridge must name", id="empty-bridge"),
    pytest.param(NETWORK.replace('"eth0"', '"a-name-far-too-long"'), "network.nic", id="name-too-long"),
    pytest.param(NETWORK.replace('"eth0"', '"eth0/x"'), "not a valid interface name", id="slash-in-name"),
    pytest.param(NETWORK.replace('"eth0"', '"eth 0"'), "not a valid interface name", id="space-in-name"),
    pytest.param(NETWORK.replace('a = "pa", b = "pb"', ""), "network.pairing must name", id="no-pairing"),
    pytest.param(NETWORK.replace('b = "pb"', 'c = "pc"'), "c", id="unknown-link"),
    pytest.param(NETWORK.replace('"pb"', '"pa"'), "different interfaces", id="same-pairing-twice"),
    pytest.param(NETWORK.replace('"pa"', '"eth0"'), "different interfaces", id="nic-as-pairing"),
    pytest.param(NETWORK + 'stp = true\n', "stp", id="unknown-key"),
    pytest.param(NETWORK.replace('"xenbr0"', "5"), "bridge", id="wrong-type"),
])
def test_a_bad_network_section_is_refused_with_a_sentence(tmp_path, section, words):
    with pytest.raises(config.ConfigError) as exc:
        load(tmp_path, BASE + section)
    assert words in str(exc.value)


def test_the_pairing_module_is_pure():
    assert not {"asyncio", "socket", "subprocess", "os"} & set(vars(pairing))
