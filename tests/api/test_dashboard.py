"""The web dashboard in headless Chromium against the real stack (redis-server + API + Celery worker).

Chromium and chromedriver come from Debian packages (scripts/ensure_chromium.sh installs them when missing);
Selenium is pointed at /usr/bin/chromedriver, so Selenium Manager never downloads anything. Screenshots of
the job list and a job page land in runs/screenshots/.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, TEST_TEXT, TRAIN_TEXT
from tests.stack_helpers import FAST, Api

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium): "
                                                               "the dashboard's browser tests cannot run")
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SHOTS = ROOT / "runs" / "screenshots"
STAGES = ["load", "evaluate_fp", "prepare", "learn", "quantize", "evaluate", "export"]
# FAST, split into the form's own fields and the "other settings" JSON box.
FORM_FIELDS = {k: FAST[k] for k in ("w_bits", "a_bits", "kv_bits", "seq_len", "steps")}
EXTRA = {k: v for k, v in FAST.items() if k not in FORM_FIELDS}
EXPECTED_CONSOLE = re.compile(r"status of (401|422)")  # the refused token and the refused form, on purpose


def _ensure_chromium() -> None:
    r = subprocess.run(["bash", str(ROOT / "scripts" / "ensure_chromium.sh")], capture_output=True, text=True,
                       timeout=900)
    if r.returncode == 2:
        pytest.skip("DASHBOARD BROWSER TESTS SKIPPED, Chromium cannot be installed here: " + r.stderr.strip())
    assert r.returncode == 0, f"scripts/ensure_chromium.sh failed ({r.returncode}):\n{r.stderr}"


class Browser:
    """A headless Chromium on the dashboard, with the waits the tests share."""

    def __init__(self, driver: Any, base: str, downloads: Path) -> None:
        self.d, self.base, self.downloads = driver, base, downloads

    def go(self, hash_: str) -> None:
        self.d.execute_script("location.hash = arguments[0]", hash_)

    def until(self, cond: Callable[[], Any], timeout: float = 60, what: str = "") -> Any:
        def check(_: Any) -> Any:
            try:
                return cond()
            except StaleElementReferenceException:
                return None
        return WebDriverWait(self.d, timeout, poll_frequency=0.05).until(check, what)

    def el(self, css: str, timeout: float = 30) -> Any:
        return self.until(lambda: self.d.find_element(By.CSS_SELECTOR, css), timeout, f"no element {css}")

    def text(self, css: str) -> str:
        found = self.d.find_elements(By.CSS_SELECTOR, css)
        return found[0].text if found else ""

    def fill(self, css: str, value: Any) -> None:
        e = self.el(css)
        e.clear()
        e.send_keys(str(value))

    def shot(self, name: str, height: int | None = None) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        if height:
            self.d.set_window_size(1366, height)
        self.d.execute_script("window.scrollTo(0, 0)")
        path = SHOTS / name
        self.d.save_screenshot(str(path))
        self.d.set_window_size(1366, 1000)
        return path

    def console_errors(self) -> list[str]:
        return [e["message"] for e in self.d.get_log("browser")
                if e["level"] == "SEVERE" and not EXPECTED_CONSOLE.search(e["message"])]

    def sign_in(self, token: str) -> None:
        self.fill("#token", token)
        self.el("form.signin button[type=submit]").click()
        self.el("#jobs")


@pytest.fixture(scope="module")
def browser(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    _ensure_chromium()
    from selenium.webdriver.chrome.options import Options

    tmp = tmp_path_factory.mktemp("chromium")
    downloads = tmp / "downloads"
    downloads.mkdir()
    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--window-size=1366,1000", "--disable-extensions", "--disable-background-networking",
                f"--user-data-dir={tmp / 'profile'}"):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp / "chromedriver.log"))
    driver = webdriver.Chrome(options=opts, service=service)
    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        yield Browser(driver, stack.url, downloads)
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def user(stack: Any) -> Api:
    return Api(stack, stack.token("dashboard"))


@pytest.fixture(scope="module")
def signed_in(browser: Browser, user: Api) -> Browser:
    browser.d.get(browser.base + "/")
    browser.sign_in(user.token)
    return browser


def test_sign_in_refuses_a_bad_token_and_signs_out(browser: Browser, user: Api) -> None:
    b = browser
    b.d.get(b.base + "/")
    assert b.el("label[for=token]").text == "API token"
    b.fill("#token", "sq_not-a-token")
    b.el("form.signin button[type=submit]").click()
    b.until(lambda: "refused" in b.text("#token-error"), 10, "no refusal message")
    assert b.d.execute_script("return sessionStorage.getItem('spinquant.token')") is None
    b.sign_in(user.token)
    assert b.d.execute_script("return sessionStorage.getItem('spinquant.token')") == user.token
    b.until(lambda: "No jobs yet" in b.text("#jobs-message"), 10, "no empty-list message")
    b.el("#signout").click()
    b.el("#token")
    assert b.d.execute_script("return sessionStorage.getItem('spinquant.token')") is None
    assert b.el("#nav").get_attribute("hidden") is not None
    assert b.console_errors() == []


def test_form_shows_the_apis_422_next_to_the_field(signed_in: Browser, user: Api) -> None:
    b = signed_in
    b.go("#/submit")
    b.fill("#f-model", "local:llama-tiny")
    b.fill("#f-w_bits", 5)
    b.fill("#f-calib-dataset", "wikitext2")
    b.el("#submit").click()
    msg = b.until(lambda: b.text("#e-w_bits"), 20, "no error next to w_bits")
    same = user.submit({"model": "local:llama-tiny", "method": "spinquant", "settings": {"w_bits": 5},
                        "calib": {"dataset": "wikitext2"}, "formats": ["ct"], "force": False})
    assert same.status_code == 422 and msg == same.json()["detail"][0]["msg"], (msg, same.text)
    assert b.el("#f-w_bits").get_attribute("aria-invalid") == "true"
    assert b.text("#e-model") == "" and "refused" in b.text("#form-errors")
    b.fill("#f-model", "local:no-such-model")
    b.fill("#f-w_bits", 4)
    b.el("#submit").click()
    assert "unknown local model" in b.until(lambda: b.text("#e-model"), 20, "no error next to model")
    assert b.text("#e-w_bits") == ""
    assert user.http.get("/v1/jobs").json()["jobs"] == []  # nothing was created
    assert b.console_errors() == []


def test_submit_watch_open_and_download(signed_in: Browser, user: Api) -> None:
    b = signed_in
    t0 = time.monotonic()
    b.go("#/submit")
    b.fill("#f-model", "local:llama-tiny")
    b.el("#f-method option[value=spinquant]").click()
    for name, value in {**FORM_FIELDS, "seed": 4242}.items():
        b.fill(f"#f-{name}", value)
    b.el("#f-calib-file").send_keys(str(TRAIN_TEXT))
    b.el("#f-eval-file").send_keys(str(TEST_TEXT))
    b.el("details summary").click()
    b.fill("#f-extra", json.dumps(EXTRA))
    b.d.execute_script("performance.clearResourceTimings()")
    b.el("#submit").click()
    b.until(lambda: "submitted=" in b.d.current_url, 60, "the form did not submit")
    job_id = b.d.current_url.split("submitted=")[1]
    row = f"tr[data-job-id='{job_id}']"
    b.el(row)

    # The bar climbs through intermediate values to 100%, driven by the job's event stream.
    seen: list[int] = []

    def done() -> bool:
        v = int(b.el(f"{row} progress").get_attribute("value"))
        if not seen or seen[-1] != v:
            seen.append(v)
        return v == 100 and b.text(f"{row} .status").startswith("succeeded")
    b.until(done, 180, f"job {job_id} did not reach 100%: {seen}")
    watched_s = time.monotonic() - t0
    assert seen == sorted(seen) and any(0 < v < 100 for v in seen), seen
    api_job = user.job(job_id)
    assert api_job["status"] == "succeeded"
    ppl = f"{api_job['report']['fp_ppl']:.3f} → {api_job['report']['quant_ppl']:.3f}"
    b.until(lambda: b.text(f"{row} td:nth-child(8)") == ppl, 10, "the row never showed the perplexities")
    # No polling storm: the list was fetched on load, after `end`, and at most every 15 s between.
    list_calls = b.d.execute_script(
        "return performance.getEntriesByType('resource').filter(e => /\\/v1\\/jobs\\?/.test(e.name)).length")
    assert list_calls <= 2 + watched_s / 15, list_calls
    b.shot("dashboard-jobs.png")

    # The job page: timeline, loss chart (one point per step), evaluation, artifacts, serve, settings.
    b.el(f"{row} a[href='#/jobs/{job_id}']").click()
    table = b.el("#eval-table")
    rep = api_job["report"]
    for key in ("fp_ppl", "quant_ppl"):
        cell = table.find_element(By.CSS_SELECTOR, f"td[data-key={key}]")
        assert float(cell.get_attribute("data-value")) == rep[key] and cell.text == f"{rep[key]:.3f}"
    gap = (rep["quant_ppl"] / rep["fp_ppl"] - 1) * 100
    assert table.find_element(By.CSS_SELECTOR, "td[data-key=gap]").text == f"{'+' if gap > 0 else ''}{gap:.2f}%"
    path = b.el("#loss-chart svg path.line")
    assert int(path.get_attribute("data-points")) == len(rep["loss_curve"]) == FAST["steps"]
    assert len(re.findall(r"[ML]", path.get_attribute("d"))) == FAST["steps"]
    stages = [li.get_attribute("data-stage") for li in b.d.find_elements(By.CSS_SELECTOR, "#timeline li")]
    assert stages == STAGES
    assert b.text("#job-status") == "succeeded" and not b.d.find_elements(By.CSS_SELECTOR, "#cancel")
    assert b.until(lambda: b.text("#serve"), 10, "no serve snippet").startswith("vllm serve")
    b.shot("dashboard-job.png", height=1900)
    settings = b.el("#settings")
    assert settings.get_attribute("open") is None
    settings.find_element(By.TAG_NAME, "summary").click()
    data = json.loads(settings.find_element(By.TAG_NAME, "pre").text)
    assert data == api_job["settings"]["_data"] and data["train"]["steps"] == FAST["steps"]
    names = [r.get_attribute("data-name") for r in b.d.find_elements(By.CSS_SELECTOR, "#artifacts tbody tr")]
    assert names == [a["name"] for a in api_job["artifacts"]]

    # Download with the bearer header (blob + object URL); the file lands and its sha256 matches the API's.
    art = next(a for a in api_job["artifacts"] if a["name"] == "model/model.safetensors")
    b.el("#artifacts button[aria-label='Download model/model.safetensors']").click()
    target = b.downloads / "model_model.safetensors"
    b.until(lambda: target.is_file() and not list(b.downloads.glob("*.crdownload")), 60, "download never landed")
    data_bytes = target.read_bytes()
    assert len(data_bytes) == art["bytes"] and hashlib.sha256(data_bytes).hexdigest() == art["sha256"]
    assert b.console_errors() == []
    print(f"dashboard: submitted and watched to 100% in {watched_s:.1f}s ({list_calls} list fetches); "
          f"stages {({k: round(v['seconds'], 2) for k, v in api_job['timings'].items()})}; bar values {seen}")


def test_live_loss_chart_and_cancel_a_long_job(signed_in: Browser, user: Api) -> None:
    b = signed_in
    job_id = user.submit(user.job_body(steps=400, seed=4343)).json()["id"]
    try:
        b.go(f"#/jobs/{job_id}")
        # While it learns, the chart grows from live `progress` events (stage learn, loss).
        b.until(lambda: int(b.el("#loss-chart svg path.line").get_attribute("data-points")) >= 3, 120,
                "the live loss chart never grew")
        assert b.text("#job-status") == "running"
        assert re.match(r"step \d+ of 400, loss ", b.text("#live-step")), b.text("#live-step")
        b.shot("dashboard-job-running.png", height=1300)
        b.el("#cancel").click()
        b.until(lambda: b.d.switch_to.alert, 10, "no confirmation").accept()
        b.until(lambda: b.text("#job-status") == "cancelled", 60, "the job page never showed cancelled")
        assert b.el("#job-error").text.startswith("cancelled")
        assert not b.d.find_elements(By.CSS_SELECTOR, "#cancel")
        assert b.el("section[aria-labelledby=live-h]").get_attribute("hidden") is not None
        job = user.job(job_id)
        assert job["status"] == "cancelled" and job["error"]["code"] == "cancelled" and job["step"] < 400
        # Reopened later, a cancelled job (no report) still shows the steps it learned, replayed from its events.
        b.go("#/jobs")
        b.el("#jobs")
        b.go(f"#/jobs/{job_id}")
        learned = {d["step"] for _, e, d in user.events(job_id)
                   if e == "progress" and d.get("stage") == "learn" and d.get("step") and d.get("loss") is not None}
        b.until(lambda: int(b.el("#loss-chart svg path.line").get_attribute("data-points")) == len(learned), 20,
                f"the replayed loss chart does not have {len(learned)} points")
        b.go("#/jobs?status=cancelled")
        b.until(lambda: b.text(f"tr[data-job-id='{job_id}'] .status").startswith("cancelled"), 20)
        assert b.console_errors() == []
    finally:
        with contextlib.suppress(NoAlertPresentException):
            b.d.switch_to.alert.dismiss()
        if user.job(job_id)["status"] in ("queued", "running"):  # one worker: never leave it busy
            user.http.post(f"/v1/jobs/{job_id}/cancel")
            user.wait(job_id, timeout=60)


def test_compare_finished_jobs_of_one_model(signed_in: Browser, user: Api) -> None:
    b = signed_in
    rtn = user.submit(user.job_body(method="rtn", seed=4444)).json()["id"]
    assert user.wait(rtn, timeout=120)["status"] == "succeeded"
    finished = [j for j in user.http.get("/v1/jobs", params={"status": "succeeded"}).json()["jobs"]
                if j["model"] == "local:llama-tiny"]
    assert len(finished) == 2
    b.go("#/compare?model=local:llama-tiny")
    table = b.el("#compare")
    cols = [th.get_attribute("data-job-id") for th in table.find_elements(By.CSS_SELECTOR, "thead th[data-job-id]")]
    assert cols == [j["id"] for j in finished]
    rows = {tr.find_element(By.TAG_NAME, "th").text: [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")}
    assert rows["Method"] == [j["method"] for j in finished] == ["rtn", "spinquant"]
    assert [t.split()[0] for t in rows["Quantized perplexity"]] == [f"{j['quant_ppl']:.3f}" for j in finished]
    assert all(t != "—" for t in rows["Total time"] + rows["Checkpoint size"])
    b.shot("dashboard-compare.png")
    # Unticking a job removes its column and keeps the URL shareable.
    b.el(f"input[type=checkbox][value='{rtn}']").click()
    b.until(lambda: len(b.d.find_elements(By.CSS_SELECTOR, "#compare thead th[data-job-id]")) == 1, 10)
    assert f"ids={finished[1]['id']}" in b.d.current_url
    assert b.console_errors() == []
