"""`cura ui`: the real server in a subprocess, its security rules over plain HTTP, and the whole flow in a
headless Chromium (Debian's chromium + chromedriver, driven by selenium) on a tiny random model.

Screenshots of each screen go to $CURA_UI_SCREENSHOTS (default: a pytest tmp folder) for a person to look at.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="cura ui needs the 'ui' extra (fastapi)")
pytest.importorskip("uvicorn", reason="cura ui needs the 'ui' extra (uvicorn)")

ROOT = Path(__file__).resolve().parents[1]
DEMO_TRAIN = ROOT / "src" / "cura" / "demo" / "orders_train.jsonl"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, chat_tokenizer) -> Path:
    """A workspace with a tiny Llama folder (models/tiny), a good data file and one with a bad row 3."""
    from tiny import save_tiny_chat_model

    ws = tmp_path_factory.mktemp("ws")
    save_tiny_chat_model(ws / "models" / "tiny", chat_tokenizer)
    lines = DEMO_TRAIN.read_text(encoding="utf-8").splitlines()
    (ws / "orders.jsonl").write_text("\n".join(lines[:40]) + "\n", encoding="utf-8")
    bad = [*lines[:2], '{"messages": [{"role": "user", "content": "no answer"}]}', *lines[2:5]]
    (ws / "upload").mkdir()
    (ws / "upload" / "bad.jsonl").write_text("\n".join(bad) + "\n", encoding="utf-8")
    return ws


def start_server(ws: Path, *extra: str) -> tuple[subprocess.Popen, str, str | None]:
    """`cura ui` on a free port; (process, base URL, token or None) once it answers (60 s at most)."""
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-m", "cura", "ui", "--workspace", str(ws), "--port", str(port), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    token = None
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("access token"):
            token = line.split(":", 1)[1].strip()
        if "open http" in line and ("token" not in line or token is None):
            if "?token=" in line:
                token = line.rsplit("?token=", 1)[1].strip()
            break
    base = f"http://127.0.0.1:{port}"
    while time.time() < deadline:
        try:
            request(base + "/api/state", token=token)
            return proc, base, token
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"cura ui did not start: {proc.stdout.read()}")


def stop_server(proc: subprocess.Popen, ws: Path) -> None:
    """End the server and every job it started (each in its own process group), bounded in time."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    for record in (ws / ".cura-ui").glob("*/ui-*.json"):
        pid = json.loads(record.read_text())["pid"]
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def request(url: str, data: dict | None = None, *, token=None, headers=None, method=None):
    """(status, parsed JSON or bytes) of a plain HTTP request; HTTP errors are returned, not raised."""
    head = {"X-Cura": "1", **(headers or {})}
    body = None
    if data is not None:
        body, head["Content-Type"] = json.dumps(data).encode(), "application/json"
    if token:
        head["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, headers=head, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


@pytest.fixture(scope="module")
def served(workspace):
    """`cura ui --host 0.0.0.0`: the real CLI, so the access token is on; (base URL, token)."""
    proc, base, token = start_server(workspace, "--host", "0.0.0.0", "--max-upload-mb", "0.5")
    yield base, token
    stop_server(proc, workspace)


@pytest.fixture(scope="module")
def server(served):
    return served[0]


@pytest.fixture(scope="module")
def token(served):
    return served[1]


@pytest.fixture(scope="module")
def local_server(workspace):
    """The app without a token (what plain `cura ui` serves on 127.0.0.1), in a thread of this process."""
    import threading

    import uvicorn

    from cura.ui.server import create_app

    port = free_port()
    config = uvicorn.Config(create_app(workspace), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


# ------------------------------------------------------------------------------- plain HTTP: the rules


def test_paths_outside_the_workspace_are_refused(local_server, workspace, tmp_path):
    server = local_server
    secret = tmp_path / "secret.jsonl"
    secret.write_text(DEMO_TRAIN.read_text().splitlines()[0] + "\n")
    (workspace / "link.jsonl").symlink_to(secret)
    try:
        for path in ("../secret.jsonl", str(secret), "link.jsonl", "models/../../x"):
            status, body = request(f"{server}/api/files?path={urllib.request.quote(path)}")
            assert status == 400 and "outside the workspace" in body["error"], (path, body)
            status, body = request(f"{server}/api/data/inspect", {"data": path, "model": "models/tiny"})
            assert status == 400 and "outside the workspace" in body["error"], (path, body)
        status, body = request(f"{server}/api/model", {"model": "../../etc"})
        assert status == 400 and "outside the workspace" in body["error"]
        status, body = request(f"{server}/api/runs/..%2f..%2fx")
        assert status in (400, 404)
    finally:
        (workspace / "link.jsonl").unlink()
    status, body = request(f"{server}/api/files?path=orders.jsonl")
    assert status == 200 and body  # inside: served


def test_posts_need_the_header_and_localhost(local_server):
    server = local_server
    status, body = request(f"{server}/api/model", {"model": "models/tiny"}, headers={"X-Cura": "0"})
    assert status == 403 and "X-Cura" in body["error"]
    status, body = request(f"{server}/api/state", headers={"Host": "evil.example:80"})
    assert status == 403 and "localhost" in body["error"]


def test_only_listed_settings_run(local_server):
    server = local_server
    for settings in ({"output_dir": "/tmp/x"}, {"model": "x"}, {"threads": 3}):
        status, body = request(
            f"{server}/api/runs/r-bad/start",
            {"model": "models/tiny", "data": "orders.jsonl", "settings": settings},
        )
        assert status == 400 and "cannot be set from the page" in body["error"], body
    status, body = request(f"{server}/api/runs/bad%20name/start", {"data": "orders.jsonl"})
    assert status == 400 and "run name" in body["error"]


def test_upload_limit(server, token):
    boundary = "cura-test"
    payload = b"x" * (600 * 1024)
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    req = urllib.request.Request(
        f"{server}/api/data/upload",
        data=body,
        headers={
            "X-Cura": "1",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Authorization": f"Bearer {token}",
        },
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    assert info.value.code == 413 and b"upload limit" in info.value.read()


def test_token_is_required_when_not_on_localhost(server, token):
    assert token and len(token) >= 20
    assert request(server + "/api/state")[0] == 401
    assert request(server + "/")[0] == 401
    assert request(server + "/api/files?path=orders.jsonl")[0] == 401
    assert request(server + "/api/state", token=token[:-1] + "x")[0] == 401
    assert request(server + "/api/state", token=token)[0] == 200
    assert request(server + f"/api/state?token={token}")[0] == 200
    assert request(server + "/api/state", headers={"X-Cura-Token": token})[0] == 200


def test_demo_data_is_copied_into_the_workspace_and_checked(local_server, workspace):
    status, body = request(f"{local_server}/api/data/demo", {"model": "models/tiny"})
    assert status == 200 and body["ok"] and body["data"] == "data/orders_train.jsonl", body
    assert body["rows"] == len(DEMO_TRAIN.read_text().splitlines())
    assert (workspace / "data" / "orders_eval.jsonl").is_file()


def test_histogram_and_gguf_types():
    from cura.export.gguf import OUT_TYPES
    from cura.models.sources import BUNDLED_NAME
    from cura.ui import actions
    from cura.ui.actions import GGUF_TYPES, histogram

    assert set(GGUF_TYPES) == set(OUT_TYPES) and actions.BUNDLED_NAME == BUNDLED_NAME
    lengths = [3, 3, 4, 10, 25, 25, 26]
    bins = histogram(lengths, bins=4)
    assert sum(b["count"] for b in bins) == len(lengths)
    for b in bins:
        assert b["count"] == sum(b["low"] <= n <= b["high"] for n in lengths)


# ------------------------------------------------------------------------------------ the browser flow


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser tests need selenium")
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip("the browser tests need Debian's chromium and chromium-driver (/usr/bin/chromedriver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # never selenium-manager
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def screens(tmp_path_factory) -> Path:
    folder = os.environ.get("CURA_UI_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screens")
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_the_whole_flow_in_a_browser(server, token, workspace, browser, screens):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    d = browser

    def wait(condition, timeout=60, what=""):
        return WebDriverWait(d, timeout, poll_frequency=0.3).until(lambda _: condition(), message=what)

    def text(element_id):
        return d.find_element(By.ID, element_id).text

    def click(element_id):
        d.find_element(By.ID, element_id).click()

    def nav(screen, shot=None):
        click(f"nav-{screen}")
        if shot:
            d.save_screenshot(str(screens / f"{shot}.png"))

    def points():
        return len(d.find_elements(By.CSS_SELECTOR, "#chart circle.pt-loss"))

    d.get(
        f"{server}/?token={token}"
    )  # then the cookie carries it, as for a person opening the printed address
    wait(lambda: "models/tiny" in d.find_element(By.ID, "model").get_attribute("innerHTML"), what="models")
    Select(d.find_element(By.ID, "model")).select_by_value("models/tiny")
    click("model-go")
    wait(lambda: "layers" in text("model-info") and "models/tiny" in text("model-cmd"), what="model shape")
    d.save_screenshot(str(screens / "1-model.png"))

    # Data: the bad row is shown as file:line, then the good file is accepted
    nav("data")
    d.find_element(By.ID, "upload").send_keys(str(workspace / "upload" / "bad.jsonl"))
    click("upload-go")
    wait(lambda: "data/bad.jsonl:3:" in text("data-out"), what="the bad row's file:line")
    d.save_screenshot(str(screens / "2-data-bad-row.png"))
    Select(d.find_element(By.ID, "datafile")).select_by_value("orders.jsonl")
    click("data-go")
    wait(lambda: "40 rows, all valid" in text("data-out"), what="the good file's summary")
    assert d.find_elements(By.CSS_SELECTOR, "#data-out .example .t")  # trained tokens highlighted
    d.save_screenshot(str(screens / "2-data.png"))

    # Plan: too big for 560 MiB, the suggested change applied in one click, then the run's own settings
    nav("plan")

    def setting(key, value):
        field = d.find_element(By.ID, f"set-{key}")
        field.clear()
        field.send_keys(value)

    setting("batch_size", "64")
    setting("data.max_length", "128")
    d.find_element(By.ID, "target-size").send_keys("560MiB")
    click("plan-go")
    wait(lambda: "does not fit" in text("plan-out") and d.find_elements(By.ID, "apply"), what="no fit")
    d.save_screenshot(str(screens / "3-plan-does-not-fit.png"))
    click("apply")
    wait(lambda: "does not fit" not in text("plan-out") and "fits" in text("plan-out"), what="applied")
    batch = int(d.find_element(By.ID, "set-batch_size").get_attribute("value"))
    accum = int(float(d.find_element(By.ID, "set-grad_accum").get_attribute("value")))
    assert batch < 64 and batch * accum == 64  # the same samples per optimizer step
    d.find_element(By.ID, "target-size").clear()
    setting("grad_accum", "1")
    for key, value in {
        "max_steps": "300",
        "batch_size": "2",
        "data.max_length": "128",
        "lora.r": "4",
    }.items():
        field = d.find_element(By.ID, f"set-{key}")
        field.clear()
        field.send_keys(value)
    for key in ("save_every", "eval_every"):
        field = d.find_element(By.ID, f"set-{key}")
        field.clear()
        field.send_keys("3")
    click("plan-go")
    wait(lambda: "fits" in text("plan-out") and "LoRA adapters" in text("plan-out"), what="the plan")
    d.save_screenshot(str(screens / "3-plan.png"))

    # Train: start, see points arrive, reopen the page (re-attach), stop -> checkpoint, resume
    nav("train")
    name = d.find_element(By.ID, "runname")
    name.clear()
    name.send_keys("ui-run")
    click("train-start")
    wait(lambda: points() >= 2, timeout=120, what="loss points")
    first = points()
    wait(lambda: points() > first, timeout=60, what="more loss points")
    d.refresh()  # a reopened page re-attaches to the running job
    wait(lambda: "training" in text("train-status") and points() >= first, timeout=30, what="re-attach")
    assert "cura train --model" in text("train-cmd") and "--max-steps 300" in text("train-cmd")
    d.save_screenshot(str(screens / "4-train.png"))
    click("train-stop")
    wait(
        lambda: "stopped" in text("train-status") and "step-" in text("ckpts"), timeout=60, what="checkpoint"
    )
    stopped_at = points()
    d.save_screenshot(str(screens / "4-train-stopped.png"))
    click("train-resume")
    wait(lambda: "training" in text("train-status"), timeout=30, what="resumed")
    wait(lambda: points() > stopped_at, timeout=120, what="points after resume")
    assert "--resume" in text("train-cmd")
    click("train-stop")
    wait(lambda: "stopped" in text("train-status"), timeout=60, what="stopped again")

    # Evaluate: the screen and its command (the comparison itself is `cura eval`'s own tests)
    nav("eval")
    wait(lambda: "--compare" in text("eval-cmd"), what="eval command")
    d.save_screenshot(str(screens / "5-eval.png"))

    # Chat: streamed tokens from the fine-tuned and the base model
    nav("chat")
    d.find_element(By.ID, "chat-in").send_keys("Convert this order to JSON. 2 kettles to Split.")
    click("chat-go")

    def pieces(side):
        return int(d.find_element(By.ID, f"ans-{side}").get_attribute("data-n") or 0)

    wait(lambda: pieces("tuned") > 1 and pieces("base") > 1, timeout=90, what="streamed answers")
    d.save_screenshot(str(screens / "6-chat.png"))

    # Export: GGUF (checked) and download it
    nav("export")
    Select(d.find_element(By.ID, "gguf-type")).select_by_visible_text("f32")
    click("export-go")
    wait(lambda: "model.gguf" in text("downloads") and "export done" in text("export-status"), 240, "GGUF")
    assert "read back by transformers" in text("export-log")
    d.save_screenshot(str(screens / "7-export.png"))
    link = d.find_element(By.PARTIAL_LINK_TEXT, "model.gguf").get_attribute("href")
    status, data = request(link, token=token)
    assert status == 200 and data[:4] == b"GGUF"
    assert (workspace / "runs" / "ui-run" / "export" / "model.Modelfile").is_file()

    # an adapter in the workspace whose recorded base lies outside it is refused before anything loads
    evil = workspace / "runs" / "evil" / "adapter"
    shutil.copytree(workspace / "runs" / "ui-run" / "adapter", evil)
    record = json.loads((evil / "cura_adapter.json").read_text())
    record["base"]["source"] = str(workspace.parent)
    (evil / "cura_adapter.json").write_text(json.dumps(record))
    message = [{"role": "user", "content": "hi"}]
    status, body = request(f"{server}/api/runs/evil/chat", {"messages": message}, token=token)
    assert status == 400 and "outside the workspace" in body["error"], body
    status, body = request(f"{server}/api/runs/evil/export", {"type": "f16"}, token=token)
    assert status == 400 and "outside the workspace" in body["error"], body
