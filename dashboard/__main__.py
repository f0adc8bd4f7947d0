"""``python -m dashboard``: run the Streamlit app on loopback, hash a password, enforce retention, check config.

``run`` starts ``streamlit run dashboard/app.py`` bound to 127.0.0.1 (use a reverse proxy with TLS to
serve it further), headless, with usage statistics off, and passes the config path in
``REIDFLEET_DASHBOARD_CONFIG`` so every page reads the same validated config.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from common.configfile import ConfigError, dump_yaml
from common.logs import setup_logging
from dashboard.config import CONFIG_ENV, load_dashboard_config

APP = Path(__file__).resolve().parent / "app.py"


def streamlit_command(port: int, address: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(APP),
            "--server.address", address, "--server.port", str(port), "--server.headless", "true",
            "--browser.gatherUsageStats", "false", "--global.developmentMode", "false",
            "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal",
            "--server.maxUploadSize", "10"]  # MB: search-by-image takes one person crop, not a video


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dashboard", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help=f"YAML config (default ${CONFIG_ENV} or built-in defaults)")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", parents=[common], help="serve the dashboard on 127.0.0.1")
    run.add_argument("--port", type=int, default=8501)
    run.add_argument("--address", default="127.0.0.1", help="bind address (keep loopback behind a TLS proxy)")
    sub.add_parser("hash-password", help="print a password_hash for the config (reads the password from stdin/tty)")
    sub.add_parser("retention", parents=[common], help="delete data older than the retention setting now, then exit")
    sub.add_parser("check-config", parents=[common], help="validate the config and print it with defaults filled in")
    args = ap.parse_args(argv)
    setup_logging("dashboard", json_lines=None)

    if args.cmd == "hash-password":
        from dashboard.auth import hash_password

        pw = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
        print(hash_password(pw))
        return 0
    try:
        cfg = load_dashboard_config(args.config, args.set)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.cmd == "check-config":
        print(dump_yaml(cfg), end="")
        return 0
    if args.cmd == "retention":
        from dashboard.retention import enforce

        result = enforce(cfg)
        if result.error:
            print(f"retention failed: {result.error}", file=sys.stderr)
            return 1
        r = result.report
        assert r is not None
        print(f"kept {result.retention_days} days: deleted {r.sightings} sightings, {r.tracks} tracks, "
              f"{r.transitions} moves, {r.identities} identities; {result.vectors}")
        return 0
    env = dict(os.environ)
    if args.config:
        env[CONFIG_ENV] = str(Path(args.config).resolve())
    if args.set:  # the app reads a file, so write the validated result with the overrides applied
        out = Path("var/dashboard/effective-config.yaml")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(dump_yaml(cfg))
        env[CONFIG_ENV] = str(out.resolve())
    print(f"dashboard on http://{args.address}:{args.port}/", flush=True)
    cmd = streamlit_command(args.port, args.address)
    # exec, not a child process: SIGTERM from systemd, a supervisor or a test then reaches Streamlit itself
    # instead of leaving it running behind a dead wrapper.
    os.execve(cmd[0], cmd, env)
    return 0  # unreachable


if __name__ == "__main__":
    raise SystemExit(main())
