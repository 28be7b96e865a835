"""notebooks/06_interactive.ipynb in a real browser: Jupyter Notebook on localhost, opened in headless
Chromium driven over the W3C WebDriver protocol (a small client below: no Python dependency), every cell
run, a digit pressed, and the frames the page shows read by the run's classifier.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them); skipped, saying so, without them.
It works on a copy of the notebook in a temporary folder that links to the repository, so that nothing the
browser saves lands in the repository."""

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

import pytest
import torch

import causal_forcing as cf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = "06_interactive.ipynb"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, check, timeout, every=0.5):
    """check()'s first truthy value, polled every `every` s; a failure naming `what` after `timeout` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def http(method, url, body=None, timeout=60):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{method} {url}: HTTP {e.code}: {e.read()[:500]!r}") from None


class Browser:
    """A WebDriver session of headless Chromium (the W3C protocol: JSON over HTTP to chromedriver)."""

    ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

    def __init__(self, driver_url: str, profile: str):
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1100",
                f"--user-data-dir={profile}"]
        options = {"binary": CHROMIUM, "args": args}
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        session = http("POST", driver_url + "/session", caps, timeout=120)["value"]["sessionId"]
        self.url = f"{driver_url}/session/{session}"

    def open(self, url: str) -> None:
        http("POST", self.url + "/url", {"url": url}, timeout=120)

    def js(self, script: str, *args):
        return http("POST", self.url + "/execute/sync", {"script": script, "args": list(args)})["value"]

    def click(self, css: str, text: str) -> None:
        """A real click (WebDriver's) on the element matching `css` whose text is `text`."""
        found = http("POST", self.url + "/elements", {"using": "css selector", "value": css})["value"]
        for element in found:
            eid = element[self.ELEMENT]
            if http("GET", f"{self.url}/element/{eid}/text")["value"].strip() == text:
                http("POST", f"{self.url}/element/{eid}/click", {})
                return
        pytest.fail(f"no {css!r} element with text {text!r} on the page")

    def close(self) -> None:
        http("DELETE", self.url)


# from now on, every frame the page shows (each load of the image): when, and its pixels at the model's 16 x 16
RECORD = """const img = document.querySelector('img.cf-live-frame');
window.cfFrames = [];
img.addEventListener('load', () => {
  const c = document.createElement('canvas'); c.width = 16; c.height = 16;
  const ctx = c.getContext('2d'); ctx.imageSmoothingEnabled = false; ctx.drawImage(img, 0, 0, 16, 16);
  const pixels = Array.from(ctx.getImageData(0, 0, 16, 16).data).filter((_, i) => i % 4 == 0);
  window.cfFrames.push([performance.now(), pixels]);
});"""
TAKE = "const f = window.cfFrames; window.cfFrames = []; return f;"
READOUT = "const r = document.querySelector('.cf-live-readout'); return r ? r.innerText : '';"


def frames_shown(browser, classifier, seconds: float) -> tuple[list[int], float]:
    """The digit the classifier reads in each frame the page shows during `seconds` (the test only waits
    meanwhile), and the frames shown per second."""
    browser.js(TAKE)
    time.sleep(seconds)
    frames = browser.js(TAKE)
    if len(frames) < 2:
        return [], 0.0
    pixels = torch.tensor([f[1] for f in frames], dtype=torch.uint8).reshape(len(frames), 1, 1, 16, 16)
    reads = cf.read_frames(classifier, cf.to_unit(pixels))[1][:, 0].tolist()
    return reads, (len(frames) - 1) / (frames[-1][0] - frames[0][0]) * 1000


def start(command, env, log):
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(process) -> None:
    if process is not None and process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)  # the process group this test started (Jupyter and its kernel)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def repository_copy(folder) -> str:
    """A folder that links every entry of the repository but holds its own copy of the notebook."""
    os.makedirs(os.path.join(folder, "notebooks"))
    for name in os.listdir(ROOT):
        if name not in (".git", "notebooks"):
            os.symlink(os.path.join(ROOT, name), os.path.join(folder, name))
    shutil.copy(os.path.join(ROOT, "notebooks", NOTEBOOK), os.path.join(folder, "notebooks", NOTEBOOK))
    return folder


@pytest.mark.slow
def test_the_live_notebook_in_a_browser_switches_the_digit_at_a_press(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Chromium and its WebDriver (Debian: apt-get install chromium chromium-driver; .ci/run "
                    "installs them)")
    pytest.importorskip("notebook", reason="needs Jupyter Notebook 7 (pip install jupyter)")
    pytest.importorskip("ipywidgets", reason="needs ipywidgets (pip install jupyter)")
    cfg = cf.run_config(os.path.join(ROOT, "docs", "mnist_run"), device="cpu")
    classifier = cf.load_models(os.path.join(ROOT, "docs", "mnist_run"), cfg)["digit_classifier"]
    folder, token, port, driver_port = repository_copy(str(tmp_path / "repo")), "cf-test", free_port(), free_port()
    env = {**os.environ, "CF_NOTEBOOK_FAST": "1", "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"), "JUPYTER_CONFIG_DIR": str(tmp_path / "config")}
    server = driver = browser = None
    with open(tmp_path / "jupyter.log", "w") as log:
        try:
            server = start([sys.executable, "-m", "jupyter", "notebook", "--no-browser", "--ip=127.0.0.1",
                            f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}",
                            "--expose-app-in-browser", "--allow-root"], env, log)
            driver = start([CHROMEDRIVER, f"--port={driver_port}"], env, log)
            base, driver_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{driver_port}"
            wait_for("Jupyter to start", lambda: _answers(f"{base}/api/status?token={token}"), 120)
            wait_for("chromedriver to start", lambda: _answers(f"{driver_url}/status"), 60)
            browser = Browser(driver_url, str(tmp_path / "chrome"))
            browser.open(f"{base}/notebooks/notebooks/{NOTEBOOK}?token={token}")
            _run_all_and_press(browser, classifier)
        except BaseException:
            log.flush()
            print("the end of Jupyter's and chromedriver's log:\n" + (tmp_path / "jupyter.log").read_text()[-4000:])
            raise
        finally:
            if browser is not None:
                browser.close()
            stop(driver)
            stop(server)


def _answers(url) -> bool:
    try:
        http("GET", url, timeout=5)
        return True
    except (OSError, RuntimeError):
        return False


def _run_all_and_press(browser, classifier) -> None:
    ready = """const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    return !!(w && w.sessionContext && w.sessionContext.isReady && w.content && w.content.widgets.length);"""
    wait_for("the notebook and its kernel", lambda: browser.js(ready), 180)
    browser.js("window.jupyterapp.commands.execute('notebook:run-all-cells');")
    last_cell = """const outs = document.querySelectorAll('.jp-Cell:last-child .jp-OutputArea-output');
    return Array.from(outs).map(o => o.innerText).join('\\n');"""
    wait_for("every cell to run (the last prints the frames shown)", lambda: "frames shown" in browser.js(last_cell),
             600)
    errors = browser.js("return Array.from(document.querySelectorAll('.jp-OutputArea-output[data-mime-type="
                        "\"application/vnd.jupyter.stderr\"]')).map(e => e.innerText).join('\\n');")
    assert "Traceback" not in errors and "Error" not in errors, errors
    assert "asked for 3" in wait_for("the readout", lambda: browser.js(READOUT), 60)
    browser.js(RECORD)
    before, fps = frames_shown(browser, classifier, 4)
    browser.click("button.cf-live-digit", "1")
    wait_for("the readout to say that 1 was asked for", lambda: "asked for 1" in browser.js(READOUT), 60)
    after, fps_after = frames_shown(browser, classifier, 6)
    print(f"\nthe page showed {fps:.1f} frames per second before the press and {fps_after:.1f} after; "
          f"readout: {browser.js(READOUT)!r}")
    assert len(before) >= 2 and len(after) >= 4, (before, after)  # the frames keep changing
    assert max(range(10), key=after.count) == 1, after  # the page shows 1s, read by the classifier
    assert after.count(1) / len(after) > before.count(1) / len(before), (before, after)
