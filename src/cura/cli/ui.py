"""`cura ui`: the fine-tuning flow in a local web page (model, data, plan, train, evaluate, chat, export).

    cura ui                                   # http://127.0.0.1:8765, the current folder as workspace
    cura ui --workspace ~/tuning --port 9000
    cura ui --host 0.0.0.0                    # reachable from other machines: an access token is printed

The page only reads and writes inside the workspace; its training runs are real `cura train` processes.
"""

from __future__ import annotations

import argparse
import secrets

from cura.cli import SUBCOMMANDS
from cura.errors import CuraError

LOCAL = ("127.0.0.1", "localhost", "::1")


def register(sub) -> None:
    p = sub.add_parser(
        "ui",
        help=SUBCOMMANDS["ui"],
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--port", type=int, default=8765, help="TCP port (default 8765)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--workspace", default=".", help="the folder the page may read and write (default: .)")
    p.add_argument("--max-upload-mb", type=float, default=100.0, help="largest data upload (default 100 MB)")
    p.set_defaults(func=run)


def run(args) -> int:
    from cura.optional import require

    uvicorn = require("uvicorn", extra="ui", purpose="cura ui")
    from cura.ui.server import create_app

    if not 0 < args.port < 65536:
        raise CuraError(f"--port {args.port} must be between 1 and 65535")
    token = None if args.host in LOCAL else secrets.token_urlsafe(24)
    app = create_app(args.workspace, token=token, max_upload_mb=args.max_upload_mb)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    address = f"http://{shown}:{args.port}/" + (f"?token={token}" if token else "")
    print(f"cura ui: open {address}", flush=True)
    if token:
        print(f"access token (needed on every request): {token}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
