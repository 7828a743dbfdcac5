"""The notebook as a person runs it: JupyterLab on 127.0.0.1, driven in Debian's headless
Chromium through playwright. Run > Run All Cells executes every cell in order without an error
and draws the figures and the sample panel; the panel draws again with another sampler and step
count; Kernel > Restart Kernel and Run All Cells (the same notebook run again in the same
folder, as people do) executes every cell without an error too.

Screenshots go to $SMOL_TEST_ARTIFACTS (default tests/artifacts/browser/); on a failure, also a
screenshot of the page and the tail of JupyterLab's log. Deselect with `-m "not browser"`.
Without chromium or playwright the test is skipped, except where CI=true: there it fails."""
import importlib.util
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

try:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError:  # reported by _require, which skips or (in CI) fails
    sync_playwright = None

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "DDPM_train_and_sample.ipynb"
CHROMIUM = Path("/usr/bin/chromium")  # Debian's; playwright never downloads a browser of its own
# The flags this machine's closed network needs: without them chromium stalls on connections
# to its update, sync and field-trial servers. A fresh --user-data-dir is passed as the
# profile (launch_persistent_context).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("SMOL_TEST_ARTIFACTS") or ROOT / "tests" / "artifacts" / "browser")
# Every wait is bounded, in seconds (RUN_ALL_S: a run takes about 40 s on two CPU cores, 4 min
# while another job shares them). The whole test takes about 1.5 minutes on two cores.
SERVER_START_S, PAGE_LOAD_S, RUN_ALL_S, DRAW_S, STOP_S = 60, 90, 480, 60, 30
# A code cell's "[n]:" prompt (JupyterLab 4), and the status bar, which reads
# "Python 3 (ipykernel) | Idle" once the kernel is connected and idle. (The toolbar's execution
# indicator says idle before the kernel is connected; a Run All then runs nothing.)
PROMPTS = ".jp-Notebook .jp-CodeCell .jp-InputArea-prompt"
STATUS_BAR = "#jp-main-statusbar"
KERNEL_IDLE = re.compile(r"\| Idle")


def _require(ok: bool, reason: str) -> None:
    """Skip the test when a prerequisite is missing; where CI=true, fail instead, so that CI can
    never pass by skipping it."""
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true, so this test must run (.ci/run installs chromium)")
    pytest.skip(reason)


def tiny_notebook(folder: Path) -> Path:
    """The repository's notebook as it is now, with its parameters cell (the first code cell)
    replaced by tests/test_notebook.py's configuration, which trains in seconds, with the widget
    panel on; written into `folder`, where everything the run writes goes too."""
    import nbformat

    nb = nbformat.read(ROOT / NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in cell.metadata.get("tags", []), "the first code cell is not Parameters"
    overrides = {"image_size": 8, "channels": 16, "channel_mults": [1, 2],
                 "attn_resolutions": [4], "heads": 2, "steps": 30, "batch_size": 16,
                 "warmup": 5, "log_every": 10, "sample_every": 15, "sample_n": 4,
                 "sample_steps": 5, "num_classes": 10, "out_dir": str(folder / "run"),
                 "cache_dir": str(folder / "cache")}
    evaluation = {"n": 16, "bpd_n": 4, "batch_size": 16, "cache_dir": str(folder / "cache")}
    cell.source = (f'preset = "demo"\noverrides = {overrides!r}\n'
                   f"evaluation = {evaluation!r}\ninteractive = True\n")
    path = folder / NOTEBOOK
    nbformat.write(nb, path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(log: Path, lines: int = 40) -> str:
    """The last `lines` lines of JupyterLab's log."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


class Lab:
    """A running JupyterLab: its address, token and log."""

    def __init__(self, url: str, token: str, log: Path):
        self.url, self.token, self.log = url, token, log

    def open(self, path: str) -> str:
        return f"{self.url}/lab/tree/{path}?token={self.token}"


@contextmanager
def jupyterlab(folder: Path, state: Path) -> Iterator[Lab]:
    """JupyterLab serving `folder` on a free port of 127.0.0.1 with a random token, its
    kernels this interpreter (`sys.executable`, so this environment's packages), its settings,
    workspaces and runtime files under `state`, and nothing that reaches the network (no news
    feed, no update check, no extension listings). Stops the server and its kernels on exit,
    whatever happened."""
    port, token = _free_port(), secrets.token_hex(16)
    url, log = f"http://127.0.0.1:{port}", state / "jupyterlab.log"
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(state / "config"),
               JUPYTER_DATA_DIR=str(state / "data"), JUPYTER_RUNTIME_DIR=str(state / "runtime"),
               IPYTHONDIR=str(state / "ipython"), PYTHONUNBUFFERED="1")
    env.pop("MPLBACKEND", None)  # the kernel's figures come inline, as in a person's session
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           "--ServerApp.allow_root=True",  # CI runs as root
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}",
           "--LabApp.news_url=None", "--LabApp.extension_manager=readonly",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    # As `jupyter labextension disable` would: no "get notified about Jupyter news?" toast.
    (state / "config" / "labconfig").mkdir(parents=True)
    (state / "config" / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    with open(log, "wb") as out:
        server = subprocess.Popen(cmd, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_until_serving(server, url, token, log)
        yield Lab(url, token, log)
    finally:
        _stop(server, url, token, state / "runtime")


def _wait_until_serving(server: subprocess.Popen, url: str, token: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"JupyterLab exited with {server.returncode}:\n{log_tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"JupyterLab did not answer in {SERVER_START_S}s:\n{log_tail(log)}")


def _stop(server: subprocess.Popen, url: str, token: str, runtime: Path) -> None:
    """Ask the server to shut down (it shuts its kernels down first); terminate, then kill it
    if it does not; then kill, by pid, any kernel of this server still running (a kernel's
    command line names its connection file in this server's runtime folder)."""
    request = urllib.request.Request(f"{url}/api/shutdown", method="POST",
                                     headers={"Authorization": f"token {token}"})
    try:
        urllib.request.urlopen(request, timeout=10).close()
    except OSError:
        pass
    try:
        server.wait(STOP_S)
    except subprocess.TimeoutExpired:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(runtime).encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass  # gone meanwhile


@contextmanager
def chromium(profile: Path) -> Iterator["Page"]:
    """A page of Debian's headless chromium with a fresh, empty profile folder."""
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900}, timeout=60_000)
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(30_000)
            yield page
        finally:
            context.close()


@contextmanager
def evidence(page: "Page", log: Path) -> Iterator[None]:
    """On a failure inside, save a screenshot of the page and the tail of JupyterLab's log
    into the artefacts folder, and fail with that tail in the message."""
    try:
        yield
    except Exception as e:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        tail = log_tail(log, 60)
        (ARTIFACTS / "failure-jupyterlab.log").write_text(tail)
        try:
            page.screenshot(path=ARTIFACTS / "failure.png", timeout=10_000)
        except PlaywrightError as shot:  # the page may be what failed
            print(f"no failure screenshot: {shot}")
        print(f"failure evidence in {ARTIFACTS}")
        raise AssertionError(f"{e}\n\n--- JupyterLab log, last 60 lines ---\n{tail}") from e


def menu(page: "Page", top: str, item: str) -> None:
    """Click the main menu's `top` entry, then its entry `item` (a trailing "…" may follow)."""
    page.locator("#jp-MainMenu .lm-MenuBar-item", has_text=re.compile(f"^{top}$")).click()
    label = page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(item)}…?$"))
    page.locator(".lm-Menu .lm-Menu-item", has=label).click()


def run_all(page: "Page", start: Callable[[], None]) -> None:
    """Call `start` (which starts running every cell) and wait until the run is over: a cell
    was queued ("[*]:"), none is queued any more and the kernel is idle."""
    page.evaluate("""sel => {
        window.smolQueued = false;
        const seen = () => [...document.querySelectorAll(sel)]
            .some(p => p.textContent.includes('*'));
        new MutationObserver((_, obs) => {
            if (seen()) { window.smolQueued = true; obs.disconnect(); }
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""", PROMPTS)
    start()
    page.wait_for_function("() => window.smolQueued", timeout=30_000)
    page.wait_for_function("""([sel, bar, idle]) =>
        new RegExp(idle).test(document.querySelector(bar).textContent)
        && ![...document.querySelectorAll(sel)].some(p => p.textContent.includes('*'))""",
                           arg=[PROMPTS, STATUS_BAR, KERNEL_IDLE.pattern],
                           timeout=RUN_ALL_S * 1000, polling=250)


def check_run(page: "Page", path: Path, which: str) -> int:
    """Every code cell ran, in order, in a fresh kernel (prompts [1]: to [n]:), no cell shows
    an error (on the page: a traceback; in the saved notebook: an output of type error), and
    the figures are there as loaded images. Returns the number of images."""
    # textContent: innerText is empty for cells off screen (JupyterLab's default windowing
    # mode, contentVisibility, skips rendering them)
    prompts = page.locator(PROMPTS).all_text_contents()
    # Errors and stderr (tqdm's bars) are both rendered as application/vnd.jupyter.stderr;
    # only an error shows IPython's traceback.
    stderr = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
    errors = [text for text in page.locator(stderr).all_text_contents()
              if "Traceback (most recent call last)" in text]
    assert not errors, f"{which}: a cell failed:\n" + "\n\n".join(e[-3000:] for e in errors)
    counts = [int(m.group(1)) if (m := re.search(r"\[(\d+)\]", p)) else None for p in prompts]
    assert counts == list(range(1, len(prompts) + 1)), f"{which}: the cells' prompts: {prompts}"
    menu(page, "File", "Save Notebook")
    expect(page.locator(".lm-TabBar-tab.jp-mod-dirty")).to_have_count(0)  # saved
    import nbformat

    nb = nbformat.read(path, as_version=4)
    errors = [f"{o.ename}: {o.evalue}" for c in nb.cells if c.cell_type == "code"
              for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{which}: the saved notebook holds errors: {errors}"
    images = page.evaluate("""() => [...document.querySelectorAll('.jp-OutputArea-output img')]
        .filter(img => img.complete && img.naturalWidth > 0).length""")
    # Every figure is an <img> of a PNG: training images, the forward process, the noise
    # schedule, the training run's 2 sample grids (sample_every 15 of 30 steps), the loss,
    # 100 samples, the panel's grid, the trajectory, the samplers, the interpolation, a row per
    # class and the guidance scales: 13. A second run draws 12: training finds its finished run
    # and shows that run's last grid. 11 leaves room for one figure to change without this test
    # failing; figures that stop rendering as images fail it.
    assert images >= 11, f"{which}: {images} images in the outputs"
    return images


def screenshot(target, name: str) -> Path:
    """A screenshot of `target` (the page, or an element) saved in the artefacts folder."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    target.screenshot(path=ARTIFACTS / name)
    return ARTIFACTS / name


def first_figure(page: "Page") -> Path:
    """A screenshot of the cell holding the notebook's first figure, taken once the figure is
    on screen and drawn: a cell scrolled to is rendered a moment later (JupyterLab's
    windowing), and a screenshot taken at once is blank, so the test checks that it is not."""
    figures = page.locator(".jp-OutputArea-output img")
    figures.first.scroll_into_view_if_needed()
    expect(figures.first).to_be_in_viewport()
    cell = page.locator(".jp-Notebook .jp-Cell").filter(has=figures).first
    shot = screenshot(cell, "1-first-figure.png")
    from PIL import Image, ImageStat

    spread = ImageStat.Stat(Image.open(shot).convert("L")).stddev[0]
    assert spread > 10, f"{shot} is blank (pixel std {spread:.1f}): the figure did not render"
    return shot


def panel_screenshot(panel, name: str) -> Path:
    """The panel with its row of controls scrolled to its start (the row is wider than the
    notebook, so it scrolls; Draw, at its end, scrolled it to the right)."""
    panel.locator(".widget-hbox").first.evaluate("row => { row.scrollLeft = 0; }")
    return screenshot(panel, name)


def use_panel(page: "Page") -> list[Path]:
    """The sample panel shows its controls; with another sampler and step count, Draw replaces
    its figure by another (the seed is fixed, so a new image comes from the new settings).
    Returns screenshots of the panel before and after."""
    panel = page.locator(".widget-vbox").filter(has=page.get_by_role("button", name="Draw"))
    expect(panel).to_have_count(1)

    def control(kind: str, label: str):
        return panel.locator(kind, has=page.locator("label", has_text=re.compile(f"^{label}$")))

    sampler, steps = control(".widget-dropdown", "sampler"), control(".widget-slider", "steps")
    for c in (sampler, steps, control(".widget-text", "seed"), control(".widget-dropdown", "class"),
              control(".widget-slider", "guidance"), page.get_by_role("button", name="Draw")):
        expect(c).to_be_visible()
    image = panel.locator(".jp-OutputArea-output img")
    expect(image).to_have_count(1)
    before = image.get_attribute("src")
    shots = [panel_screenshot(panel, "2-panel-before-draw.png")]

    other = "ddim" if sampler.locator("select").input_value() != "ddim" else "ddpm"
    sampler.locator("select").select_option(other)
    readout = steps.locator(".widget-readout")
    n = "7" if readout.text_content().strip() != "7" else "9"
    readout.fill(n)  # the slider's editable readout, as a person types a number into it
    readout.press("Enter")
    expect(steps.locator(".noUi-handle")).to_have_attribute(
        "aria-valuenow", re.compile(f"^{n}(\\.0+)?$"))  # the widget took it
    page.get_by_role("button", name="Draw").click()
    expect(image).not_to_have_attribute("src", before, timeout=DRAW_S * 1000)
    expect(page.locator(STATUS_BAR)).to_have_text(KERNEL_IDLE, timeout=DRAW_S * 1000)
    expect(image).to_have_count(1)
    expect(sampler.locator("select")).to_have_value(other)
    shots.append(panel_screenshot(panel, "3-panel-after-draw.png"))
    return shots


def test_the_notebook_runs_twice_in_jupyterlab_and_its_panel_draws(tmp_path):
    """Run All, the panel's Draw with other settings, then Restart Kernel and Run All, each
    checked as a person would see it (see the module's docstring)."""
    _require(CHROMIUM.exists(), f"no {CHROMIUM} (Debian: apt-get install chromium)")
    _require(sync_playwright is not None, "no playwright (pip install -e .[test])")
    for module in ("jupyterlab", "ipywidgets", "nbformat"):
        _require(importlib.util.find_spec(module) is not None,
                 f"no {module} (pip install -r requirements-test.txt)")
    start = time.monotonic()
    folder = tmp_path / "notebook"
    folder.mkdir()
    path = tiny_notebook(folder)
    with (jupyterlab(folder, tmp_path / "jupyter") as lab, chromium(tmp_path / "profile") as page,
          evidence(page, lab.log)):
        page.goto(lab.open(NOTEBOOK))
        expect(page.locator(STATUS_BAR)).to_have_text(KERNEL_IDLE, timeout=PAGE_LOAD_S * 1000)
        marks = {"JupyterLab up, kernel idle": time.monotonic()}
        run_all(page, lambda: menu(page, "Run", "Run All Cells"))
        marks["Run All Cells"] = time.monotonic()
        images = [check_run(page, path, "Run All Cells")]
        shots = [first_figure(page)]
        shots += use_panel(page)
        marks["checks and the panel"] = time.monotonic()

        def restart_and_run_all() -> None:
            menu(page, "Kernel", "Restart Kernel and Run All Cells")
            page.get_by_role("button", name="Confirm Kernel Restart").click()

        run_all(page, restart_and_run_all)  # the same folder: the run's checkpoint is there
        marks["Restart Kernel and Run All Cells"] = time.monotonic()
        images.append(check_run(page, path, "Restart Kernel and Run All Cells"))
        page.locator(".jp-Notebook .jp-Cell").last.scroll_into_view_if_needed()
        shots.append(screenshot(page, "4-second-run-end.png"))
    steps = ", ".join(f"{name} {t - last:.0f}s" for (name, t), last
                      in zip(marks.items(), [start, *marks.values()]))
    print(f"browser test: {time.monotonic() - start:.0f}s ({steps}); images in the outputs after"
          f" each run: {images}; screenshots:",
          *(str(s) for s in shots), sep="\n  ")
