"""In a real browser: JupyterLab on a loopback port, the launch tutorial opened in headless Chromium, every cell run,
the panel's Launch clicked, the run followed to 'finished' with points on the plot, and a screenshot of the panel.

Needs Debian's `chromium` (/usr/bin/chromium; `.ci/run` installs it) and the `playwright` Python package, which drives
that browser directly (no `playwright install`). Set SCALETRAIN_UPDATE_SCREENSHOT=1 to also refresh
nbs/images/launch_panel.png."""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
import pytest
from scaletrain.procs import free_port

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
TUTORIAL = ROOT / "nbs" / "tutorials" / "08_launch_from_notebook.ipynb"

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"browser test needs Debian's chromium at {CHROMIUM} (apt-get install chromium; .ci/run does this)",
)


def write_json(p: Path, d):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(d))


@pytest.fixture
def lab(tmp_path):
    "JupyterLab on 127.0.0.1 with a token, serving a copy of the tutorial; private config, settings, runtime folders."
    root = tmp_path / "root"
    root.mkdir()
    nb = json.loads(TUTORIAL.read_text())
    nb["metadata"]["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    (root / TUTORIAL.name).write_text(json.dumps(nb))
    settings = tmp_path / "lab-settings"
    write_json(
        settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings", {"windowingMode": "none"}
    )
    write_json(
        settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings",
        {"fetchNews": "false", "checkForUpdates": False},
    )
    port, token = free_port(), secrets.token_hex(16)
    env = dict(
        os.environ,
        JUPYTER_CONFIG_DIR=str(tmp_path / "jconfig"),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "jruntime"),
        JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"),
        PYTHONUNBUFFERED="1",
    )
    log = open(tmp_path / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
            "--LabApp.expose_app_in_browser=True",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]
        + (["--allow-root"] if os.geteuid() == 0 else []),  # CI containers run as root
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                pytest.fail(f"jupyterlab exited:\n{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}")
            try:
                req = urllib.request.Request(f"{url}/api/status", headers={"Authorization": f"token {token}"})
                if urllib.request.urlopen(req, timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("jupyterlab did not start")
        yield dict(url=url, token=token, root=root, log=tmp_path / "jupyterlab.log")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


NOTEBOOK_STATE = """() => {
  const app = window.jupyterapp; if (!app) return null;
  const w = app.shell.currentWidget; if (!w || !w.content || !w.content.model || !w.sessionContext) return null;
  const cells = w.content.model.cells; let pending = 0, code = 0; const errors = [];
  for (let i = 0; i < cells.length; i++) {
    const c = cells.get(i); if (c.type !== 'code') continue; code++;
    if (c.executionCount === null || c.executionState === 'running') pending++;
    for (const o of c.outputs.toJSON()) if (o.output_type === 'error') errors.push(o.ename + ': ' + o.evalue);
  }
  const k = w.sessionContext.session && w.sessionContext.session.kernel;
  return {code, pending, errors, kernel: k ? k.status : null};
}"""


def test_tutorial_panel_in_chromium(lab, tmp_path):
    sync_playwright = pytest.importorskip(
        "playwright.sync_api", reason="the playwright Python package is not installed"
    ).sync_playwright
    shot = tmp_path / "launch_panel.png"
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            viewport={"width": 1300, "height": 2400},
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            page.goto(f"{lab['url']}/lab/tree/{TUTORIAL.name}?token={lab['token']}")
            page.wait_for_function(
                f"() => {{ const s = ({NOTEBOOK_STATE})(); return s && s.kernel === 'idle'; }}", timeout=120_000
            )
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            t0, state = time.time(), None
            while time.time() - t0 < 600:
                state = page.evaluate(NOTEBOOK_STATE)
                assert not state["errors"], f"a cell failed in the browser: {state['errors']}"
                if state["pending"] == 0 and state["kernel"] == "idle":
                    break
                time.sleep(1)
            else:
                pytest.fail(f"the tutorial did not finish running in the browser: {state}")
            panel = page.locator(".scaletrain-launch-panel").first
            panel.scroll_into_view_if_needed()
            panel.locator("button", has_text="Launch").click()
            status = ""
            t0 = time.time()
            while time.time() - t0 < 600:
                status = panel.locator(".scaletrain-status").first.text_content(timeout=10_000).strip()
                assert status not in ("failed", "error"), panel.inner_text()
                if status == "finished":
                    break
                time.sleep(1)
            assert status == "finished", panel.inner_text()
            page.wait_for_function(
                "() => { const e = document.querySelector('.scaletrain-points'); "
                "return e && parseInt(e.textContent) > 0; }",
                timeout=60_000,
            )
            points = int(panel.locator(".scaletrain-points").first.text_content().split()[0])
            assert points == 40  # one per step of the panel's run
            widths = panel.locator("img").evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
            assert widths and widths[0] > 300  # the live plot was rendered by the browser
            text = panel.inner_text()
            assert "predicted memory per rank" in text and "demo" in text and "fit-line" in text  # the runs table
            run_name = text.split("finished · ", 1)[1].split(" ·", 1)[0]
            panel.locator("select[multiple]").select_option(
                [run_name, "demo"]
            )  # compare the panel's run with the tutorial's
            panel.locator("button", has_text="Compare curves").click()
            page.wait_for_function(
                "() => { const i = document.querySelectorAll('.scaletrain-launch-panel img'); "
                "return i.length > 1 && i[1].naturalWidth > 300; }",
                timeout=60_000,
            )
            panel.scroll_into_view_if_needed()
            panel.screenshot(path=str(shot))
        finally:
            ctx.close()
    assert shot.stat().st_size > 20_000
    print(f"screenshot: {shot}")
    if os.environ.get("SCALETRAIN_UPDATE_SCREENSHOT"):
        dest = ROOT / "nbs" / "images" / "launch_panel.png"
        dest.parent.mkdir(exist_ok=True)
        shutil.copy(shot, dest)
