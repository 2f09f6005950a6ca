"""The console in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium),
against the real app on a live uvicorn server with a real worker training the tiny model.

One user's path: see a bad file refused with its row and field, upload a good one, start a job from
the form built from /openapi.json, watch it reach `succeeded` on the page (loss curve, checkpoint,
adapter), then chat with the adapter in the playground. scripts/install-system.sh installs the
browser; without it these tests skip and say so.

With GPTOSS_SCREENSHOTS=<folder> the test saves the README's screenshots there (docs/img).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.ml.data import SAMPLES_DIR
from tests.fixtures_inference import DEVELOPER
from tests.fixtures_service import StartWorker

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
        reason="no chromium/chromedriver: scripts/install-system.sh installs Debian's packages",
    ),
]
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

SCREENSHOTS = os.environ.get("GPTOSS_SCREENSHOTS")
# The random tiny base has to learn, in a few CPU steps, to think and then answer, so the playground
# has both to show: a short thought, a high learning rate and rank, four rows in one batch, and the
# expert LoRA on (the default target_parameters; attention alone does not learn it in 8 steps).
FORM_TRAINING = {
    "max_steps": 8,
    "save_steps": 8,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "warmup_steps": 0,
    "max_seq_length": 256,
    "learning_rate": 0.01,
    "lora_r": 16,
    "lora_alpha": 64,
    "max_grad_norm": 0.5,
}
THOUGHT = "France: Paris."


def france_rows() -> list[str]:
    """The sample's France questions, answered "Paris." after the thought THOUGHT."""
    rows = []
    for line in (SAMPLES_DIR / "capitals.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "France" in row["messages"][0]["content"] and row["developer"] == DEVELOPER:
            row["messages"][1]["thinking"] = THOUGHT
            rows.append(json.dumps(row))
    assert len(rows) == 4, "the capitals sample changed; pick the rows again"
    return rows


@pytest.fixture
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1360,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: Any, predicate: Any, timeout: float = 30, what: str = "the page") -> Any:
    waiter = WebDriverWait(driver, timeout, poll_frequency=0.2)
    return waiter.until(predicate, f"timed out waiting for {what}")


def css(driver: Any, selector: str) -> list[Any]:
    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def shot(driver: Any, name: str) -> None:
    if SCREENSHOTS:
        driver.execute_script("window.scrollTo(0, 0)")
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(SCREENSHOTS) / name))


def fill_hyperparameters(driver: Any, values: dict[str, Any]) -> None:
    """Typed schema: one input per field (under "All hyperparameters" when not a common one).
    Free-form schema: the JSON textarea."""
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#job-submit"), what="the job form")
    areas = driver.find_elements(By.ID, "job-hyperparameters")
    if areas:
        areas[0].clear()
        areas[0].send_keys(json.dumps(values))
        return
    more = driver.find_elements(By.CSS_SELECTOR, "details.more")
    if more:
        driver.execute_script("arguments[0].open = true", more[0])
    for name, value in values.items():
        field = driver.find_element(By.ID, f"hp-{name}")
        field.clear()
        field.send_keys(", ".join(value) if isinstance(value, list) else str(value))
        if isinstance(value, list) and not value:
            field.send_keys(" ")  # marks the emptied list as changed (an empty list is sent)


def test_upload_train_watch_and_chat_in_the_browser(
    browser: Any, svc_server: str, start_worker: StartWorker, tmp_path: Path
) -> None:
    start_worker()
    browser.get(svc_server + "/")
    wait(browser, lambda d: css(d, ".empty:not([hidden])"), what="the empty job list")
    assert browser.find_element(By.CSS_SELECTOR, ".chip.warn").text == "API keys off"

    # A bad file is refused with its row and field, before any job exists.
    good_rows = france_rows()
    bad = tmp_path / "bad.jsonl"
    broken = good_rows[1].replace('"role": "assistant"', '"role": "robot"')
    bad.write_text(good_rows[0] + "\n" + broken + "\n")
    browser.get(svc_server + "/#/data")
    browser.find_element(By.ID, "upload-file").send_keys(str(bad))
    browser.find_element(By.ID, "upload-button").click()
    error = wait(browser, lambda d: d.find_elements(By.ID, "upload-error"), what="the upload error")[0]
    assert "row 2" in error.text and "messages[1].role" in error.text, error.text
    shot(browser, "console-upload-error.png")

    good = tmp_path / "france.jsonl"
    good.write_text("\n".join(good_rows) + "\n")
    browser.find_element(By.ID, "upload-file").send_keys(str(good))
    browser.find_element(By.ID, "upload-button").click()
    ok = wait(browser, lambda d: d.find_elements(By.ID, "upload-ok"), what="the upload to pass")[0]
    assert "4 rows" in ok.text
    file_id = ok.find_element(By.TAG_NAME, "code").text
    dataset = Select(browser.find_element(By.ID, "job-dataset"))
    assert dataset.first_selected_option.get_attribute("value") == file_id

    # A job from the form; the page moves to the job and follows it live to the end.
    browser.find_element(By.ID, "job-suffix").send_keys("browser")
    fill_hyperparameters(browser, FORM_TRAINING)
    shot(browser, "console-data.png")
    browser.find_element(By.ID, "job-submit").click()
    wait(browser, lambda d: "#/jobs/ftjob_" in d.current_url, what="the job page")
    job_id = browser.current_url.rsplit("/", 1)[-1]
    wait(browser, lambda d: css(d, ".page-head [data-status='succeeded']"), 300, "the job to succeed")
    with httpx.Client(base_url=svc_server) as http:
        job = http.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["name"] == "browser" and job["dataset"] == file_id
    assert {k: job["hyperparameters"][k] for k in FORM_TRAINING} == FORM_TRAINING  # the form's values
    chart = browser.find_element(By.ID, "loss-chart")
    assert css(chart, "path.line.train") and css(chart, "path.line.lr")  # loss and learning rate
    assert "checkpoint" in browser.find_element(By.ID, "events").text
    adapter_name = browser.find_element(By.ID, "adapter-name").text
    assert adapter_name == job["adapter"]["name"]
    first_checkpoint = ".table.compact td.num"
    wait(browser, lambda d: [c.text for c in css(d, first_checkpoint)][:1] == ["8"], what="checkpoints")
    shot(browser, "console-job.png")

    browser.get(svc_server + "/#/jobs")
    row = wait(browser, lambda d: css(d, f"tr[data-job='{job_id}']"), what="the job list")[0]
    assert row.get_attribute("data-status") == "succeeded" and "8 / 8" in row.text
    shot(browser, "console-jobs.png")

    chat_with_the_adapter(browser, svc_server, job)


def chat_with_the_adapter(browser: Any, svc_server: str, job: dict[str, Any]) -> None:
    browser.get(f"{svc_server}/#/jobs/{job['id']}")
    wait(browser, lambda d: d.find_elements(By.LINK_TEXT, "Chat with it"), what="the adapter card")[0].click()
    model = wait(browser, lambda d: Select(d.find_element(By.ID, "pg-model")), what="the playground")
    chosen = job["adapter_id"]
    wait(browser, lambda d: model.first_selected_option.get_attribute("value") == chosen, what="adapters")
    browser.find_element(By.CSS_SELECTOR, "input[name='effort'][value='low'] + span").click()
    browser.find_element(By.ID, "pg-developer").send_keys(DEVELOPER)
    for field, value in (("pg-temp", "0"), ("pg-max", "24")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    question = "What is the capital of France?"
    browser.find_element(By.ID, "pg-prompt").send_keys(question)
    browser.find_element(By.ID, "pg-send").click()
    done = ".msg.assistant[data-state='done']"
    answer = wait(browser, lambda d: css(d, done), 240, "the answer")[0]
    shot(browser, "console-playground.png")

    # The same request without streaming: the page put its reasoning and its answer each in their place.
    body = {
        "adapter": job["adapter_id"],
        "messages": [{"role": "user", "content": question}],
        "developer": DEVELOPER,
        "reasoning_effort": "low",
        "temperature": 0,
        "max_new_tokens": 24,
    }
    with httpx.Client(base_url=svc_server, timeout=240) as http:
        plain = http.post("/generate", json=body).json()
    reasoning = answer.find_element(By.CSS_SELECTOR, ".reasoning-text").get_attribute("textContent")
    content = answer.find_element(By.CSS_SELECTOR, ".answer").get_attribute("textContent")
    assert plain["reasoning"] and plain["content"], plain  # the adapter thinks, then answers
    assert (reasoning, content) == (plain["reasoning"], plain["content"])
    assert answer.find_element(By.CSS_SELECTOR, ".reasoning").is_displayed()
    meta = answer.find_element(By.CSS_SELECTOR, ".meta").text
    assert f"{plain['usage']['completion_tokens']} tokens" in meta


def test_older_jobs_page_in_below_the_live_list(browser: Any, svc_server: str) -> None:
    """Past the 50 newest (the live feed), "Show older jobs" loads GET /jobs pages below them; a job
    pushed out of the live list by a newer one moves to the older rows, so every job shows once."""
    from app.api.routes.console import FEED_JOBS

    def submit() -> str:
        body = {"dataset": "sample:capitals", "hyperparameters": {"max_steps": 1}}
        response = httpx.post(svc_server + "/jobs", json=body, timeout=60)
        assert response.status_code == 201, response.text
        job_id: str = response.json()["id"]
        return job_id

    made = [submit() for _ in range(FEED_JOBS + 5)]  # no worker: they stay queued

    def rows(selector: str) -> list[str]:
        # read in one script: the live rows are re-rendered at every feed event (stale elements)
        script = "return [...document.querySelectorAll(arguments[0])].map((row) => row.dataset.job)"
        found: list[str] = browser.execute_script(script, selector)
        return found

    live, older = "table.jobs-table tbody:not(.older) tr", "table.jobs-table tbody.older tr"
    browser.get(svc_server + "/")
    wait(browser, lambda d: len(rows(live)) == FEED_JOBS, what="the live list")
    shown = wait(browser, lambda d: [b for b in css(d, "#older-jobs") if b.is_displayed()], what="the button")
    button = shown[0]
    button.click()
    wait(browser, lambda d: len(rows(older)) == 5, what="the older page")
    assert rows(live) + rows(older) == made[::-1]  # newest first, each once
    assert not browser.find_element(By.ID, "older-jobs").is_displayed()  # nothing older left

    made.append(submit())  # pushes the oldest live job out of the feed
    wait(browser, lambda d: rows(live)[:1] == [made[-1]], what="the new job in the live list")
    wait(browser, lambda d: len(rows(older)) == 6, what="the pushed-out job among the older")
    assert rows(live) + rows(older) == made[::-1]
