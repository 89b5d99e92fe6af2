"""``python -m am --config FILE``: one Availability Manager agent."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from aiohttp import web

from am import config
from am.agent import Agent
from am.api import make_app


async def serve(cfg: config.Config) -> None:
    agent = Agent(cfg)
    await agent.start()
    runner = web.AppRunner(make_app(agent), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, cfg.management.host, cfg.management.port, reuse_address=True).start()
    print(f"am {cfg.node} ready: management {cfg.management}, nbd {cfg.nbd}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await agent.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m am", description="eAC Availability Manager agent")
    parser.add_argument("--config", required=True, help="TOML configuration file")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        sys.exit(f"am: {exc}")
    try:
        asyncio.run(serve(cfg))
    except OSError as exc:
        sys.exit(f"am: cannot start: {exc}")
    except ValueError as exc:
        sys.exit(f"am: {exc}")


if __name__ == "__main__":
    main()
