"""`cura ui`'s web server: FastAPI routes over `cura.ui.actions`, one static page, Server-Sent Events.

Safe by default:
- it binds 127.0.0.1; on any other address an access token is required on every request (a query
  `?token=` once, then a cookie; or an `Authorization: Bearer` / `X-Cura-Token` header);
- without a token, only requests addressed to localhost are answered (a web page elsewhere cannot reach
  the server through a DNS name that points at 127.0.0.1);
- every POST must carry the `X-Cura: 1` header, which a page of another site cannot send without the
  server's consent (it never gives it), so no other site can start a job;
- every path is inside the workspace (`cura.ui.workspace`), uploads have a size limit, and the only
  programs run are `cura` commands built from checked values (`cura.ui.jobs`).
"""

import hmac
import re
import time
from importlib import resources
from pathlib import Path

from cura.errors import CuraError
from cura.optional import require
from cura.ui import actions, jobs
from cura.ui.chat import base_source, chat_events, sse
from cura.ui.workspace import DATA_SUFFIXES, Workspace

PURPOSE = "cura ui"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def page() -> str:
    return (resources.files("cura.ui") / "static" / "index.html").read_text(encoding="utf-8")


def warm_up() -> None:
    """Import the model code (and torch) in the background while the first page loads, so the first
    Data or Chat request does not wait for it; status requests never need it."""
    import importlib
    import threading

    threading.Thread(target=importlib.import_module, args=("cura.models",), daemon=True).start()


def token_of(request) -> str | None:
    """The token a request presents: the Authorization header, X-Cura-Token, ?token= or the cookie."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return (
        request.headers.get("x-cura-token")
        or request.query_params.get("token")
        or request.cookies.get("cura_token")
    )


def create_app(workspace: str | Path, *, token: str | None = None, max_upload_mb: float = 100.0):
    """The FastAPI app for `workspace`; with `token`, every request must present it."""
    fastapi = require("fastapi", extra="ui", purpose=PURPOSE)
    responses = require("fastapi.responses", extra="ui", purpose=PURPOSE)
    require("python_multipart", extra="ui", purpose=PURPOSE, distribution="python-multipart")
    ws = Workspace(workspace)
    limit = int(max_upload_mb * 2**20)
    warm_up()
    app = fastapi.FastAPI(title="cura", docs_url=None, redoc_url=None, openapi_url=None)
    JSONResponse = responses.JSONResponse

    @app.middleware("http")
    async def guard(request: fastapi.Request, call_next):
        """Token (when on), localhost-only Host (when off), and the X-Cura header on every POST."""
        host = (request.headers.get("host") or "").rsplit(":", 1)[0] if request.headers.get("host") else ""
        if token is not None:
            given = token_of(request) or ""
            if not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse(
                    {"error": "an access token is needed: open the address cura ui printed"}, 401
                )
        elif host not in LOCAL_HOSTS:
            return JSONResponse({"error": f"this server answers only on localhost, not {host!r}"}, 403)
        if request.method == "POST" and request.headers.get("x-cura") != "1":
            return JSONResponse({"error": "POST requests need the header X-Cura: 1"}, 403)
        response = await call_next(request)
        if token is not None and request.query_params.get("token"):
            response.set_cookie("cura_token", token, httponly=True, samesite="strict")
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(CuraError)
    async def user_error(request: fastapi.Request, exc: CuraError):
        return JSONResponse({"error": str(exc)}, 400)

    async def body(request: fastapi.Request) -> dict:
        try:
            data = await request.json()
        except ValueError:
            raise CuraError("the request body must be JSON") from None
        if not isinstance(data, dict):
            raise CuraError("the request body must be a JSON object")
        return data

    @app.get("/")
    def index():
        return responses.HTMLResponse(page())

    @app.get("/api/state")
    def state():
        from cura.memory import GPUS

        return {
            "workspace": str(ws.root),
            "bundled": actions.BUNDLED_NAME,
            "models": ws.model_candidates(),
            "data_files": ws.data_files(),
            "runs": [actions.run_state(ws, name, since=1 << 30) | {"rows": []} for name in ws.run_names()],
            "gpus": [{"key": k, "label": g.label} for k, g in GPUS.items()],
            "max_upload_mb": max_upload_mb,
        }

    @app.post("/api/model")
    async def model(request: fastapi.Request):
        data = await body(request)
        return actions.model_info(ws, data.get("model"))

    @app.post("/api/data/inspect")
    async def inspect(request: fastapi.Request):
        data = await body(request)
        return actions.inspect_data(ws, data.get("data", ""), data.get("model"), data.get("max_length"))

    @app.post("/api/data/upload")
    async def upload(request: fastapi.Request, file: fastapi.UploadFile, model: str = fastapi.Form("")):
        name = SAFE_NAME.sub("_", Path(file.filename or "upload.jsonl").name).lstrip(".") or "upload.jsonl"
        if Path(name).suffix.lower() not in DATA_SUFFIXES:
            raise CuraError(f"{name}: upload a {', '.join(DATA_SUFFIXES)} file")
        declared = int(request.headers.get("content-length") or 0)
        if declared > limit + 2**16:
            return JSONResponse(
                {"error": f"{name} is larger than the upload limit ({max_upload_mb:g} MB)"}, 413
            )
        chunks, size = [], 0
        while chunk := await file.read(1 << 20):
            size += len(chunk)
            if size > limit:
                return JSONResponse(
                    {"error": f"{name} is larger than the upload limit ({max_upload_mb:g} MB)"}, 413
                )
            chunks.append(chunk)
        from cura.atomic import write_bytes

        target = ws.path(f"data/{name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(target, b"".join(chunks))
        return actions.inspect_data(ws, ws.relative(target), model or None)

    @app.post("/api/data/demo")
    async def demo_data(request: fastapi.Request):
        """Copy the demo's data into the workspace and check it (for a first try without a file)."""
        data = await body(request)
        files = actions.copy_demo_data(ws)
        return actions.inspect_data(ws, files["train"], data.get("model"))

    @app.post("/api/plan")
    async def plan(request: fastapi.Request):
        data = await body(request)
        return actions.plan_run(
            ws, data.get("model"), data.get("data") or None, data.get("settings") or {}, data.get("target")
        )

    @app.get("/api/runs/{name}")
    def run(name: str, since: int = 0):
        return actions.run_state(ws, name, since)

    @app.post("/api/runs/{name}/command")
    async def train_command(name: str, request: fastapi.Request):
        """The `cura train` command Start would run (shown before it runs)."""
        data = await body(request)
        if not data.get("data"):
            return {"command": None}
        args = actions.train_args(ws, name, data.get("model"), data["data"], data.get("settings") or {})
        return {"command": jobs.display_command(args)}

    @app.post("/api/runs/{name}/start")
    async def start(name: str, request: fastapi.Request):
        data = await body(request)
        if not data.get("data"):
            raise CuraError("pick a data file on the Data screen first")
        actions.start_train(ws, name, data.get("model"), data["data"], data.get("settings") or {})
        return actions.run_state(ws, name)

    @app.post("/api/runs/{name}/resume")
    def resume(name: str):
        actions.start_train(ws, name, None, None, None, resume=True)
        return actions.run_state(ws, name)

    @app.post("/api/runs/{name}/stop")
    def stop(name: str):
        jobs.stop(ws.job_dir(name), "train")
        return actions.run_state(ws, name)

    @app.get("/api/runs/{name}/events")
    def events(name: str, since: int = 0):
        """Server-Sent Events: `update` (new metrics rows and the run's state) each second while one of
        the run's jobs (train, eval, merge, export) runs, then `end`."""
        ws.run_dir(name)

        def stream():
            seen, quiet = since, 0
            while quiet < 2:
                state = actions.run_state(ws, name, seen)
                seen = state["total_rows"] if not state["restart"] else len(state["rows"])
                yield sse("update", state)
                running = any(state[k] and state[k]["running"] for k in jobs.KINDS)
                quiet = 0 if running else quiet + 1
                time.sleep(1.0)
            yield sse("end", {})

        return responses.StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/api/runs/{name}/eval")
    async def evaluate(name: str, request: fastapi.Request):
        data = await body(request)
        actions.start_job(ws, name, "eval", actions.eval_args(ws, name, data.get("data") or None))
        return actions.run_state(ws, name)

    @app.get("/api/runs/{name}/eval")
    def eval_report(name: str):
        return actions.eval_report(ws, name)

    @app.post("/api/runs/{name}/merge")
    def merge(name: str):
        actions.start_job(ws, name, "merge", actions.merge_args(ws, name))
        return actions.run_state(ws, name)

    @app.post("/api/runs/{name}/export")
    async def export(name: str, request: fastapi.Request):
        data = await body(request)
        actions.start_job(ws, name, "export", actions.export_args(ws, name, data.get("type") or "f16"))
        return actions.run_state(ws, name)

    @app.post("/api/runs/{name}/chat")
    async def chat(name: str, request: fastapi.Request):
        data = await body(request)
        adapter = actions.adapter_dir(ws, name)
        messages = data.get("messages")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict)
            and m.get("role") in ("user", "assistant")
            and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise CuraError("messages must be a list of {role: user|assistant, content: text}")
        events = chat_events(adapter, base_source(adapter), messages, bool(data.get("compare", True)))
        return responses.StreamingResponse(events, media_type="text/event-stream")

    @app.get("/api/files")
    def download(path: str):
        target = ws.path(path, must_exist=True)
        if not target.is_file():
            raise CuraError(f"{path} is not a file")
        return responses.FileResponse(target, filename=target.name)

    return app
