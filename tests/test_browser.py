"""In a real browser: JupyterLab on a loopback port, the launch tutorial opened in headless Chromium, every cell run,
the panel's Launch clicked, the run followed to 'finished' with points on the plot, and a screenshot of the panel.
A second test restarts the kernel from JupyterLab while a panel's run goes on: a new panel follows it to its end, and a
run killed while no kernel watched it is listed as lost, with the command that resumes it.

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


def restart_kernel(page):
    "Restart the kernel the way a user does: JupyterLab's command, confirmed in its dialog; wait until it is idle."
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:restart-kernel'); }")
    page.locator(".jp-Dialog .jp-mod-accept").first.click(timeout=60_000)
    page.wait_for_function(
        "() => { const w = window.jupyterapp.shell.currentWidget; const k = w.sessionContext.session.kernel;"
        " return k && k.status === 'idle' && !document.querySelector('.jp-Dialog'); }",
        timeout=120_000,
    )
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")


def run_cells(page, *indices):
    "Run the notebook's cells `indices` (in order) and wait until they are done, failing on an error output."
    for i in indices:
        page.evaluate(
            f"() => {{ const w = window.jupyterapp.shell.currentWidget; w.content.activeCellIndex = {i};"
            " return window.jupyterapp.commands.execute('notebook:run-cell'); }"
        )
    done = " && ".join(
        f"c.get({i}).executionCount !== null && c.get({i}).executionState !== 'running'" for i in indices
    )
    page.wait_for_function(
        f"() => {{ const s = ({NOTEBOOK_STATE})(); const c = window.jupyterapp.shell.currentWidget.content.model.cells;"
        f" return s && s.kernel === 'idle' && {done}; }}",
        timeout=300_000,
    )
    errors = page.evaluate(NOTEBOOK_STATE)["errors"]
    assert not errors, f"a cell failed in the browser: {errors}"


def panel_status(panel) -> str:
    return panel.locator(".scaletrain-status").first.text_content(timeout=30_000).strip()


def wait_status(panel, want: str, timeout: float = 600):
    t0, status = time.time(), ""
    while time.time() - t0 < timeout:
        status = panel_status(panel)
        assert status not in ("failed", "error", "lost") or status == want, panel.inner_text()
        if status == want:
            return
        time.sleep(0.5)
    pytest.fail(f"the panel's status stayed {status!r}, not {want!r}:\n{panel.inner_text()}")


def points(panel) -> int:
    e = panel.locator(".scaletrain-points")
    return int(e.first.text_content().split()[0]) if e.count() else 0


def newest_run(runs: Path) -> Path:
    return max((d for d in runs.iterdir() if (d / "launch.json").exists()), key=lambda d: d.stat().st_mtime)


def kill_job(run_dir: Path):
    "SIGKILL the job's torchrun and its ranks (each leads a session of its own), as a crash or the OOM killer would."
    from scaletrain.procs import pid_alive

    pid = json.loads((run_dir / "launch.json").read_text())["launches"][-1]["pid"]
    pids = [*(int(p.read_text()) for p in (run_dir / "logs").glob("rank*.pid")), pid]
    for p in pids:
        try:
            os.killpg(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in pids:
        while pid_alive(p):
            time.sleep(0.05)


def test_runs_survive_a_kernel_restart_in_chromium(lab, tmp_path, corpus, cache_dir):
    """Launch from the panel, restart the kernel from JupyterLab, build a new panel: it lists the run as running and
    follows it to the end. A run killed while no kernel watches it is then shown as lost, with how to resume it."""
    from scaletrain.runs import folder_status

    sync_playwright = pytest.importorskip(
        "playwright.sync_api", reason="the playwright Python package is not installed"
    ).sync_playwright
    runs = tmp_path / "runs"
    base = [
        f"data.source={corpus}",
        f"data.cache_dir={cache_dir}",
        "train.device=cpu",
        "train.eval_every=0",
        "train.eval_iters=2",
        "train.ckpt_every=0",
    ]
    code = [  # 0: the settings; 1: a panel (after a restart it follows what still runs); 2: one for a long run
        f"from scaletrain.widgets import LaunchPanel\nbase = {base!r}\nruns = {str(runs)!r}",
        "LaunchPanel(overrides=base, out_dir=runs, model='tiny', nproc=1, steps=1500, micro_batch=16)",
        "LaunchPanel(overrides=base, out_dir=runs, model='tiny', nproc=1, steps=10**6, micro_batch=16)",
    ]
    nb = dict(
        nbformat=4,
        nbformat_minor=5,
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}},
        cells=[
            dict(cell_type="code", id=f"c{i}", metadata={}, execution_count=None, outputs=[], source=src)
            for i, src in enumerate(code)
        ],
    )
    (lab["root"] / "restart.ipynb").write_text(json.dumps(nb))
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            viewport={"width": 1300, "height": 1800},
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
        )
        try:
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            page.goto(f"{lab['url']}/lab/tree/restart.ipynb?token={lab['token']}")
            page.wait_for_function(
                f"() => {{ const s = ({NOTEBOOK_STATE})(); return s && s.kernel === 'idle'; }}", timeout=120_000
            )
            run_cells(page, 0, 1)
            panel = page.locator(".scaletrain-launch-panel").first
            # before the first plot: no image is shown at all (an empty one would be a broken-image icon)
            visible = panel.locator("img").evaluate_all("imgs => imgs.filter(i => i.offsetParent !== null).length")
            assert visible == 0
            panel.locator("button", has_text="Launch").click()
            page.wait_for_function(
                "() => { const e = document.querySelector('.scaletrain-points'); "
                "return e && parseInt(e.textContent) > 0; }",
                timeout=300_000,
            )
            assert panel_status(panel) == "running", panel.inner_text()
            assert "ETA" in panel.locator(".scaletrain-progress-label").first.text_content()
            first = newest_run(runs)
            restart_kernel(page)
            assert folder_status(first) == "running"  # the job outlived its kernel
            assert page.locator(".scaletrain-launch-panel").count() == 0
            run_cells(page, 0, 1)
            panel = page.locator(".scaletrain-launch-panel").first
            row = panel.locator(f"tr.scaletrain-run[data-run='{first.name}']")
            assert row.get_attribute("data-status") == "running"
            line = panel.locator(".scaletrain-status").first.locator("xpath=..").inner_text()
            assert line.startswith("running") and first.name in line and "followed again" in line, line
            wait_status(panel, "finished")
            page.wait_for_function(
                "() => { const e = document.querySelector('.scaletrain-points'); "
                "return e && parseInt(e.textContent) === 1500; }",
                timeout=60_000,
            )  # every step's record, those from before the restart too
            assert "step 1500/1500 · 100%" in panel.locator(".scaletrain-progress-label").first.text_content()
            widths = panel.locator("img").evaluate_all(
                "imgs => imgs.filter(i => i.offsetParent !== null).map(i => i.naturalWidth)"
            )
            assert widths and min(widths) > 300  # the plot the new panel drew, and no broken image
            assert (
                panel.locator(f"tr.scaletrain-run[data-run='{first.name}']").get_attribute("data-status") == "finished"
            )
            # a long run from the panel of cell 2; the kernel restarts, then the job is killed with nobody watching
            run_cells(page, 2)
            panel = page.locator(".scaletrain-launch-panel").nth(1)
            panel.locator("button", has_text="Launch").click()
            wait_status(panel, "running")
            page.wait_for_function(
                "() => { const e = document.querySelectorAll('.scaletrain-points');"
                " return e.length > 1 && parseInt(e[1].textContent) > 0; }",
                timeout=300_000,
            )
            second = newest_run(runs)
            assert second != first
            restart_kernel(page)
            assert folder_status(second) == "running"
            kill_job(second)
            run_cells(page, 0, 1)
            panel = page.locator(".scaletrain-launch-panel").first
            assert panel_status(panel) == "idle"  # nothing left to follow
            assert panel.locator(f"tr.scaletrain-run[data-run='{second.name}']").get_attribute("data-status") == "lost"
            lost = panel.locator(".scaletrain-lost").first.text_content()
            assert second.name in lost and f"scaletrain launch --resume {second}" in lost
            assert (
                panel.locator(f"tr.scaletrain-run[data-run='{first.name}']").get_attribute("data-status") == "finished"
            )
            panel.screenshot(path=str(tmp_path / "after_restarts.png"))
        finally:
            ctx.close()
