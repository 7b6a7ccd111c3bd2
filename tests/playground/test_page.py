"""The playground in a real browser: Debian's chromium, headless, driven by Playwright against a server on 127.0.0.1.

Screenshots of each panel land in the test's tmp output (pytest's basetemp) for review.
"""

from __future__ import annotations

import time

import httpx
import pytest

from pg_server import browser, page, running, server  # noqa: F401 (fixtures)
from rankdial.memory import estimate_memory

pytestmark = pytest.mark.slow

PANELS = ["p-lora", "p-plan", "p-train", "p-spectrum", "p-nf4", "p-merge", "p-steer", "p-many"]


def open_page(page, server):
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('lora-trainable').textContent !== '–'")
    page.wait_for_function("document.getElementById('plan-rows').children.length === 3")
    page.wait_for_function("document.getElementById('nf4-bits_dq').textContent !== '–'")


def text(page, id_):
    return page.locator("#" + id_).inner_text()


def test_every_panel_renders_without_console_errors(page, server, tmp_path):
    open_page(page, server)
    for panel in PANELS:
        box = page.locator("#" + panel)
        assert box.is_visible() and box.locator("h2").inner_text()
        box.screenshot(path=str(tmp_path / f"{panel}.png"))
    page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    assert text(page, "lora-trainable") == "131,072" and text(page, "lora-share") == "0.78%"
    assert text(page, "nf4-bits_plain") == "4.500" and text(page, "nf4-bits_dq").startswith("4.127")
    assert all((tmp_path / f"{p}.png").stat().st_size > 1000 for p in PANELS)
    assert page.errors == []


def test_the_rank_slider_changes_the_numbers_by_keyboard(page, server):
    open_page(page, server)
    page.focus("#lora-r-range")
    page.keyboard.press("ArrowRight")  # r: 16 -> 17
    page.wait_for_function("document.getElementById('lora-trainable').textContent === '139,264'")
    assert page.input_value("#lora-r") == "17" and text(page, "lora-a") == "69,632"
    page.fill("#lora-r", "64")
    page.wait_for_function("document.getElementById('lora-trainable').textContent === '524,288'")
    assert text(page, "lora-share") == "3.13%"
    assert page.errors == []


def test_the_planner_total_is_estimate_memory(page, server):
    open_page(page, server)
    page.select_option("#plan-model", "llama-70b")
    page.fill("#plan-rank", "16")
    page.fill("#plan-batch_size", "2")
    page.fill("#plan-seq_len", "1024")
    for method in ("full", "lora", "qlora"):
        want = estimate_memory("llama-70b", method=method, rank=16, batch_size=2, seq_len=1024).total_bytes
        page.wait_for_function(f"document.getElementById('plan-total-{method}').dataset.bytes === '{want}'")
        assert text(page, f"plan-total-{method}") == f"{want / 1e9:.2f} GB"
    assert page.errors == []


def test_bad_input_shows_a_message_and_the_api_names_the_field(page, server):
    open_page(page, server)
    page.fill("#lora-r", "abc")
    page.wait_for_selector("#lora-error:not([hidden])")
    assert "r:" in text(page, "lora-error")
    page.fill("#plan-seq_len", "-5")
    page.wait_for_selector("#plan-error:not([hidden])")
    assert "seq_len" in text(page, "plan-error")
    page.fill("#train-ranks", "1000")
    page.click("#train-start")
    page.wait_for_selector("#train-error:not([hidden])")
    assert "ranks" in text(page, "train-error") and "64" in text(page, "train-error")
    r = httpx.get(server + "/api/lora", params={"r": "abc"})
    assert r.status_code == 422 and r.json()["field"] == "r"
    page.fill("#lora-r", "8")  # a good value clears the message
    page.wait_for_selector("#lora-error", state="hidden")


def test_a_training_run_draws_a_curve_that_grows(page, server, tmp_path):
    open_page(page, server)
    page.fill("#train-ranks", "2,8")
    page.fill("#train-steps", "6")
    page.fill("#train-examples", "32")
    page.focus("#train-start")
    page.keyboard.press("Enter")  # by keyboard
    page.wait_for_function("document.getElementById('train-status').dataset.state")
    seen, deadline = [], time.monotonic() + 90
    while time.monotonic() < deadline:
        state = page.locator("#train-status").get_attribute("data-state")
        points = int(page.locator("#train-chart").get_attribute("data-points") or 0)
        if not seen or points != seen[-1]:
            seen.append(points)
        if state != "running":
            break
        time.sleep(0.3)
    assert page.locator("#train-status").get_attribute("data-state") == "done", text(page, "train-status")
    assert len(seen) >= 4 and seen == sorted(seen) and seen[-1] >= 2 * 6, seen  # it grew, step by step
    assert page.locator("#train-rows tr").count() == 2  # the sweep overlays both ranks
    page.locator("#p-train").screenshot(path=str(tmp_path / "p-train-after.png"))
    assert page.locator("#spectrum-run option").count() == 2
    assert "effective rank" in text(page, "spectrum-status")
    page.locator("#p-spectrum").screenshot(path=str(tmp_path / "p-spectrum-after.png"))
    assert page.errors == []


def test_cancel_from_the_page(page, server):
    open_page(page, server)
    page.fill("#train-ranks", "4")
    page.fill("#train-steps", "200")
    page.click("#train-start")
    page.wait_for_function("Number(document.getElementById('train-chart').dataset.points) > 0", timeout=60_000)
    page.click("#train-cancel")
    page.wait_for_function("document.getElementById('train-status').dataset.state === 'cancelled'")
    assert page.is_enabled("#train-start")
    assert page.errors == []


def test_closing_the_page_stops_its_job(browser, server):
    page = browser.new_page()
    open_page(page, server)
    page.fill("#train-ranks", "4")
    page.fill("#train-steps", "200")
    page.click("#train-start")
    page.wait_for_function("Number(document.getElementById('train-chart').dataset.points) > 0", timeout=60_000)
    job = page.evaluate("train.job")
    page.close()  # the visitor goes away mid-run
    deadline, state = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        state = browser.request.get(f"{server}/api/jobs/{job}").json()["state"]
        if state != "running":
            break
        time.sleep(0.25)
    assert state == "cancelled"


def test_phone_width_and_keyboard_reach_every_control(browser, server, tmp_path):
    page = browser.new_page()
    page.set_viewport_size({"width": 375, "height": 740})
    try:
        open_page(page, server)
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        for panel in PANELS:
            box = page.locator("#" + panel).bounding_box()
            assert box["width"] <= 375 and box["x"] >= 0
        page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
        reached = set()
        for _ in range(80):
            page.keyboard.press("Tab")
            reached.add(page.evaluate("document.activeElement.id"))
        assert {"lora-r-range", "lora-r", "plan-model", "train-ranks", "train-start", "nf4-layer"} <= reached
    finally:
        page.close()


def test_the_synthetic_task_shows_under_and_over_fitting(page, server):
    open_page(page, server)
    page.select_option("#train-task", "synthetic")
    assert page.input_value("#train-steps") == "300"
    page.fill("#train-ranks", "1,4")
    page.fill("#train-steps", "150")
    page.click("#train-start")
    page.wait_for_function("document.getElementById('train-status').dataset.state === 'done'", timeout=60_000)
    assert page.locator("#train-rows tr").count() == 2
    assert page.locator("#spectrum-run option").count() >= 2 and "effective rank" in text(page, "spectrum-status")
    assert page.errors == []


def test_merge_and_many_adapters_panels(page, server, tmp_path):
    open_page(page, server)
    page.click("#merge-run")
    page.wait_for_function("document.getElementById('merge-status').dataset.state === 'done'", timeout=60_000)
    assert "merged / base" in text(page, "merge-status") and "plain model again" in text(page, "merge-status")
    page.locator("#p-merge").screenshot(path=str(tmp_path / "p-merge-after.png"))
    served = httpx.get(server + "/api/adapters").json()["adapters"]
    page.fill("#many-prompt", "What does len do?")
    page.click("#many-run")
    page.wait_for_function("document.querySelectorAll('#many-answers div').length > 0", timeout=60_000)
    assert page.locator("#many-answers div").count() == 1 + len(served)
    assert page.locator("#many-answers div b").first.inner_text().startswith("base")
    page.locator("#p-many").screenshot(path=str(tmp_path / "p-many-after.png"))
    assert page.errors == []
    page.fill("#many-prompt", "")  # refused: chromium logs the 422 as a failed resource, nothing else
    page.click("#many-run")
    page.wait_for_selector("#many-error:not([hidden])")
    assert "prompt" in text(page, "many-error")
    assert all("status of 422" in e for e in page.errors), page.errors


STEERING = {"ranks": [2], "steps": 3, "batch": 16, "n_facts": 8, "tasks": {
    "format": [{"rank": 2, "eval_loss": 2.0, "loss_over_full": 1.1}, {"rank": None, "eval_loss": 1.8, "loss_over_full": 1.0}],
    "facts": [{"rank": 2, "eval_loss": 5.0, "loss_over_full": 2.5}, {"rank": None, "eval_loss": 2.0, "loss_over_full": 1.0}]}}


@pytest.fixture(scope="module")
def stub_server():
    """A playground whose text job crashes and whose steering job returns figures at once (in the library's shape)."""
    from rankdial.playground import JobManager, Limits, create_app

    def crash(job, check):
        raise MemoryError("pretend the job ran out of memory")

    def steering(job, check):
        job.emit({"type": "log", "line": "format: LoRA r=2 ..."})
        job.emit({"type": "steering", "figures": STEERING})


    limits = Limits()
    with running(create_app(limits, JobManager(limits, runners={"text": crash, "steering": steering}))) as url:
        yield url


def test_a_crash_shows_an_error_and_the_server_keeps_serving(page, stub_server):
    open_page(page, stub_server)
    page.click("#train-start")
    page.wait_for_selector("#train-error:not([hidden])")
    assert "MemoryError" in text(page, "train-error") and "Traceback" not in text(page, "train-error")
    page.click("#steer-run")
    page.wait_for_function("document.getElementById('steer-status').dataset.state === 'done'")
    assert "facts: LoRA/full eval loss r=2 2.50×" in text(page, "steer-status")
    assert httpx.get(stub_server + "/api/lora").status_code == 200
    assert page.errors == []


def test_the_singular_value_axis_is_labelled_with_integers(page, server):
    """Indices of singular values are integers: before, the axis read 1, 3.75, 6.5, 9.25 (charts.js writes the
    labels it drew into the canvas's data-xticks / data-yticks)."""
    open_page(page, server)
    page.select_option("#train-task", "synthetic")
    page.fill("#train-ranks", "10")
    page.fill("#train-steps", "20")
    page.click("#train-start")
    page.wait_for_function("document.getElementById('train-status').dataset.state === 'done'", timeout=60_000)
    page.wait_for_function("document.getElementById('spectrum-chart').dataset.xticks")
    ticks = page.locator("#spectrum-chart").get_attribute("data-xticks").split(" ")
    assert ticks[0] == "1" and all(t.isdigit() for t in ticks) and len(ticks) >= 3, ticks
    assert [int(t) for t in ticks] == sorted({int(t) for t in ticks})
    assert page.errors == []


def test_the_fit_table_fits_a_phone_screen(browser, server, tmp_path):
    """At 390 px the "Will it fit?" table scrolled sideways inside itself, its "fits on" column out of view, and
    its rows grew tall: every cell must be in view, no row taller than a few lines, nothing overflowing."""
    page = browser.new_page()
    page.set_viewport_size({"width": 390, "height": 844})
    try:
        open_page(page, server)
        page.select_option("#plan-model", "llama-70b")
        page.wait_for_function("Number(document.getElementById('plan-total-full').dataset.bytes) > 3e11")  # 70B
        page.locator("#p-plan").screenshot(path=str(tmp_path / "p-plan-390.png"))
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        table = page.locator("#plan-rows").locator("xpath=ancestor::table")
        assert page.evaluate("(t) => t.scrollWidth <= t.clientWidth", table.element_handle())
        rows = page.evaluate("""() => [...document.querySelectorAll('#plan-rows tr')].map((tr) => ({
            height: tr.getBoundingClientRect().height,
            cells: [...tr.children].map((c) => [c.textContent, c.getBoundingClientRect().left,
                                                c.getBoundingClientRect().right])}))""")  # one snapshot
        assert len(rows) == 3
        for row in rows:
            assert row["height"] <= 110, row
            assert all(left >= 0 and right <= 390.5 for _, left, right in row["cells"]), row
        label = page.evaluate("getComputedStyle(document.querySelector('#plan-rows td[data-label=\"fits on\"]'), "
                              "'::before').content")
        assert "fits on" in label  # each value says which column it is
    finally:
        page.close()


def test_a_diverged_steering_run_is_drawn_as_diverged(page, server):
    """A NaN/Inf figure reaches the page as null (the event stream's JSON has no NaN): the steering panel read it
    with toFixed and threw; it shows "diverged" instead."""
    open_page(page, server)
    figures = {"steps": 5, "tasks": {"format": [
        {"rank": 1, "eval_loss": 1.5, "loss_over_full": 0.9},
        {"rank": 8, "eval_loss": None, "loss_over_full": None},
        {"rank": None, "eval_loss": 1.6, "loss_over_full": 1.0}]}}
    page.evaluate("(f) => drawSteering(f)", figures)
    assert "r=8 diverged" in text(page, "steer-status") and "r=1 0.90×" in text(page, "steer-status")
    assert page.errors == []
