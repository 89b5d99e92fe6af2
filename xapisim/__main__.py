"""``python -m xapisim``: serve a simulated XenServer / XCP-ng pool."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from .live.bed import LiveBed
from .server import Simulator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m xapisim", description="A XAPI-compatible pool simulator.")
    p.add_argument("--preset", choices=("demo", "generated"), default="demo", help="pool to serve (default: demo)")
    p.add_argument("--hosts", type=int, help="hosts of a generated pool (implies --preset generated)")
    p.add_argument("--vms", type=int, help="VMs of a generated pool (implies --preset generated)")
    p.add_argument("--seed", type=int, default=1, help="makes uuids and refs reproducible (default: 1)")
    p.add_argument("--port", type=int, default=8086, help="port every host listens on; 0 picks a free one")
    p.add_argument("--bind", default="127.0.0.1", help="address of host 0; host i gets the i-th next one")
    p.add_argument(
        "--advertise",
        metavar="NAME",
        help="serve host 0 alone, on every interface, known to clients as NAME (for containers)",
    )
    p.add_argument("--user", default="root")
    p.add_argument(
        "--password",
        default=os.environ.get("XAPISIM_PASSWORD", "demo"),
        help="default: $XAPISIM_PASSWORD, else 'demo'",
    )
    p.add_argument("--op-delay", type=float, default=0.05, help="simulated duration of a VM operation, s")
    p.add_argument("--ha-timeout", type=float, default=10.0, help="host failure detection delay when HA gives none, s")
    p.add_argument("--listen-hosts", type=int, default=16, help="how many hosts get a listener (default 16)")
    p.add_argument(
        "--live",
        action="store_true",
        help="run hosts, AMs and a few guests as real namespaces and processes (root; demo preset only)",
    )
    p.add_argument("--live-dir", help="where the live bed keeps images, configs and logs (default: a temporary one)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    preset = "generated" if args.hosts is not None or args.vms is not None else args.preset
    if args.live and preset != "demo":
        print("xapisim: --live runs the demo preset only", file=sys.stderr)
        return 2
    if args.live and os.geteuid() != 0:
        print("xapisim: --live needs root (network namespaces)", file=sys.stderr)
        return 2
    sim = Simulator(
        preset,
        hosts=args.hosts,
        vms=args.vms,
        seed=args.seed,
        port=args.port,
        bind=args.bind,
        user=args.user,
        password=args.password,
        op_delay=args.op_delay,
        ha_timeout=args.ha_timeout,
        listen_hosts=max(1, args.listen_hosts),
        advertise=args.advertise,
    )
    done = threading.Event()

    def stop(signum: int, frame: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        sim.start()
    except OSError as e:
        print(f"xapisim: cannot listen: {e}", file=sys.stderr)
        return 1
    bed = None
    if args.live:
        try:
            bed = LiveBed(sim.engine, args.live_dir, xapi_port=sim.port).start()
            sim.listen_as_master(bed.uplink_addr)
        except Exception as e:
            sim.stop()
            print(f"xapisim: the live bed failed: {e}", file=sys.stderr)
            return 1
    # Scripts and tests wait for exactly this line to learn the port.
    print(f"xapisim listening on {sim.url}", flush=True)
    while not done.wait(3600):
        pass
    if bed is not None:
        bed.stop()
    sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
