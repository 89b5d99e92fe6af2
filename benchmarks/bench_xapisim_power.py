"""xapisim's CPU per VM power operation, with a watcher reading the changes: one pool of bench_pools.

Run: .venv/bin/python benchmarks/bench_xapisim_power.py [--hosts 25] [--vms 2500] [--ops 400] [--rate 10.5]
     (DATABASE_URL is not used: no database, Django's settings only for the console's XAPI client)

Starts one ``python -m xapisim`` as bench_pools starts each of its pools (``--hosts 25 --vms 2500 --seed 1
--op-delay 0 --listen-hosts 1 --log-level WARNING``), then, with the console's own XAPI client
(``inventory.xapi.connect``) and as bench_pools' PowerLoad and the watcher's EventPump use it:

* a load thread makes ``--ops`` VM power operations at ``--rate`` a second (bench_pools' 200 a second over 19
  pools is 10.5 each): ``VM.hard_shutdown`` of a running guest, then ``VM.start`` of it, then the next guest, paced
  (a call that falls behind does not make the next ones burst);
* a watcher thread loops ``event.from`` with the watcher's classes, timeout and decoded fields
  (``inventory.sync_specs``' EVENT_CLASSES and RECORD_FIELDS, settings.EAC_EVENT_TIMEOUT), from a token taken
  before the load.

The simulator's CPU (user + system, /proc/PID/stat) is read just before the first operation and again once the
watcher has seen the last one's result; the figure is that CPU over the operations made, so it includes serving
the watcher's event.from (the part spent in the kernel is shown too). Also printed: the simulator's CPU while idle
beforehand (its listener's poll loop), the operations a second achieved, and what the watcher received. Figures
only, nothing asserted: the benchmark's own threads share the machine's cores with the simulator.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field

import common
from common import argument_parser, process_cpu, start_xapisim

USER, PASSWORD = "root", "demo"
IDLE_S = 3.0
CATCH_UP_S = 30.0


@dataclass
class Watch:
    """The watcher's event.from loop, and what it saw: the last power state of each VM, calls, events."""

    client: object
    token: str
    timeout: float
    power: dict[str, str] = field(default_factory=dict)
    calls: int = 0
    events: int = 0
    error: str = ""
    stopping: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def run(self) -> None:
        from inventory.sync_specs import EVENT_CLASSES, RECORD_FIELDS
        from inventory.xapi import XapiError

        try:
            while not self.stopping.is_set():
                answer = self.client.event_from(EVENT_CLASSES, self.token, self.timeout, fields=RECORD_FIELDS)
                self.token = answer["token"]
                with self.changed:
                    self.calls += 1
                    for event in answer["events"]:
                        self.events += 1
                        if event["class"] == "vm" and event.get("snapshot"):
                            self.power[event["ref"]] = event["snapshot"]["power_state"]
                    self.changed.notify_all()
        except XapiError as exc:
            if not self.stopping.is_set():
                self.error = exc.describe()

    def wait_for(self, ref: str, state: str, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.power.get(ref) == state or self.error, timeout) and not self.error


@dataclass
class Load:
    """bench_pools' PowerLoad on one pool: hard_shutdown then start of each running guest in turn, paced."""

    client: object
    refs: list[str]
    ops: int
    rate: float
    made: int = 0
    failed: list[str] = field(default_factory=list)
    last: tuple[str, str] = ("", "")  # (ref, power state) the last operation that succeeded left

    def run(self) -> None:
        from inventory.xapi import XapiError

        interval = 1.0 / self.rate
        next_at = time.monotonic()
        for n in range(self.ops):
            ref = self.refs[(n // 2) % len(self.refs)]
            try:
                if n % 2 == 0:
                    self.client.call("VM.hard_shutdown", ref)
                    self.last = (ref, "Halted")
                else:
                    self.client.call("VM.start", ref, False, False)
                    self.last = (ref, "Running")
                self.made += 1
            except XapiError as exc:
                self.failed.append(exc.describe())
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -1.0:
                next_at = time.monotonic()


def main() -> int:
    parser = argument_parser(__doc__, hosts=25, vms=2500)
    parser.add_argument("--ops", type=int, default=400, help="VM power operations to make (even: each VM comes back)")
    parser.add_argument("--rate", type=float, default=10.5, help="power operations a second")
    args = parser.parse_args()
    common.django_setup(LOG_LEVEL="WARNING")
    from django.conf import settings

    from inventory.xapi import connect

    sim_args = ["--hosts", str(args.hosts), "--vms", str(args.vms), "--seed", "1", "--listen-hosts", "1",
                "--log-level", "WARNING"]  # fmt: skip
    print(f"bench_xapisim_power: python -m xapisim {' '.join(sim_args)} --op-delay 0; {args.ops} power operations "
          f"at {args.rate:g}/s   ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start)")
    sim = start_xapisim(*sim_args, op_delay=0)
    pid = sim.proc.pid
    load_client = connect(sim.url, USER, PASSWORD, verify_tls=False)
    watch_client = connect(sim.url, USER, PASSWORD, verify_tls=False)
    watcher = None
    try:
        vms = load_client.get_all_records("VM", fields=("power_state", "is_a_template", "is_control_domain",
                                                        "is_a_snapshot", "name_label"))  # fmt: skip
        running = sorted((r["name_label"], ref) for ref, r in vms.items() if r["power_state"] == "Running" and not (
            r["is_a_template"] or r["is_control_domain"] or r["is_a_snapshot"]))  # fmt: skip
        refs = [ref for _, ref in running]
        watch = Watch(watch_client, watch_client.event_from(["pool"], "", 0.0)["token"], settings.EAC_EVENT_TIMEOUT)
        watcher = threading.Thread(target=watch.run, name="watch", daemon=True)
        watcher.start()

        idle_from, idle_cpu = time.monotonic(), sum(process_cpu(pid))
        time.sleep(IDLE_S)
        idle = (sum(process_cpu(pid)) - idle_cpu) / (time.monotonic() - idle_from)

        load = Load(load_client, refs, args.ops, args.rate)
        began, cpu_before = time.monotonic(), process_cpu(pid)
        load.run()
        load_s = time.monotonic() - began
        caught_up = watch.wait_for(*load.last, CATCH_UP_S)
        user, system = (after - before for after, before in zip(process_cpu(pid), cpu_before, strict=True))
        cpu = user + system
        elapsed = time.monotonic() - began
    finally:
        if watcher is not None:
            watch.stopping.set()
            watch_client.abort()  # breaks the blocked event.from, as EventPump.stop does
            watcher.join(10)
        load_client.logout()
        watch_client.logout()
        sim.stop()

    print(f"\n  {len(refs)} running guests cycled; {load.made} operations made in {load_s:.1f} s "
          f"({load.made / load_s:.1f}/s), {len(load.failed)} failed{': ' + load.failed[0] if load.failed else ''}")
    print(f"  watcher: {watch.calls} event.from answers, {watch.events} events; "
          + ("saw the last operation's result" if caught_up else f"did NOT see the last result ({watch.error})"))
    print(f"  simulator idle beforehand: {idle * 1000:.1f} ms of CPU a second")
    print(f"  simulator CPU: {cpu:.2f} s over {elapsed:.1f} s ({cpu / elapsed:.3f} cores), "
          f"{cpu / max(1, load.made) * 1000:.2f} ms per power operation (event.from included; "
          f"{system / max(1, load.made) * 1000:.2f} ms of it in the kernel)")
    return 0 if caught_up and not load.failed else 1


if __name__ == "__main__":
    sys.exit(main())
