"""The rating page in a real headless Chromium (Playwright): a rater rates by clicking and by keyboard, comes back
and continues; the prompt and both answers are on screen, and markup in them is shown as text, never run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from llm.human_eval.ratings import read_ratings
from tests.llm.human_eval.conftest import ITEMS

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)", allow_module_level=True)

BY_ID = {item["id"]: item for item in ITEMS}


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


def shown_item(page) -> dict:
    """The item on screen, checked: its prompt and both answers visible, as the exact text (markup included)."""
    page.locator("#rate").wait_for(state="visible")
    item = BY_ID[page.locator("#rate").get_attribute("data-item")]
    for box in ("#prompt", "#left", "#right"):
        assert page.locator(box).is_visible()
    assert page.locator("#prompt").text_content() == item["prompt"]
    assert {page.locator("#left").text_content(), page.locator("#right").text_content()} == {item["a"], item["b"]}
    assert page.locator("#rate script, #rate img, #prompt b").count() == 0  # no element made from the data
    assert page.evaluate("typeof window.pwned") == "undefined"
    return item


def next_shown(page, after: str) -> None:
    """Wait until the page shows another item than ``after``, or the done screen."""
    page.wait_for_function("(id) => document.querySelector('#rate').dataset.item !== id", arg=after)


def test_rate_by_click_and_keyboard_then_come_back(browser, study, server, tmp_path):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda err: problems.append(str(err)))
    page.goto(server + "/")
    assert "←" in page.locator("#keys").inner_text() and "3" in page.locator("#keys").inner_text()
    page.locator("#rater").press_sequentially("Test Rater")  # typed, key by key
    page.click("#start")

    first = shown_item(page)
    page.check("input[name=score][value='4']")
    page.fill("#comment", "keys 1 2 3 here are text, <i>not</i> choices")
    page.click("#choose-left")
    next_shown(page, first["id"])

    second = shown_item(page)
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    # the screenshot's content: what is on screen at that moment, the prompt and both answers
    visible = page.locator("body").inner_text()
    assert second["prompt"].splitlines()[0] in visible
    assert second["a"].splitlines()[0] in visible and second["b"].splitlines()[0] in visible
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    page.keyboard.press("ArrowRight")
    next_shown(page, second["id"])

    rated = read_ratings(study.root / "ratings.jsonl")
    assert [(r["item"], r["choice"]) for r in rated] == [(first["id"], "left"), (second["id"], "right")]
    assert (rated[0]["score"], rated[0]["comment"]) == (4, "keys 1 2 3 here are text, <i>not</i> choices")
    assert rated[1]["score"] is None

    page.reload()  # the rater comes back: the name is remembered, the server knows what was rated
    assert page.locator("#rater").input_value() == "Test Rater"
    page.press("#rater", "Enter")
    third = shown_item(page)
    assert third["id"] not in (first["id"], second["id"])
    page.keyboard.press("3")
    next_shown(page, third["id"])
    fourth = shown_item(page)
    page.keyboard.press("ArrowDown")
    page.locator("#done").wait_for(state="visible")
    assert (
        "3 of 4" not in page.locator("#done-text").inner_text() and "4 of 4" in page.locator("#done-text").inner_text()
    )

    rated = read_ratings(study.root / "ratings.jsonl")
    assert [r["choice"] for r in rated] == ["left", "right", "tie", "tie"]
    assert {r["item"] for r in rated} == set(BY_ID) and fourth["id"] == rated[-1]["item"]
    assert page.evaluate("typeof window.pwned") == "undefined"
    assert problems == []  # no script error, no blocked resource (the policy allows the page's own script and style)
    context.close()


def test_markup_in_answers_is_literal_text(browser, study, server):
    page = browser.new_page()
    page.goto(server + "/")
    page.fill("#rater", "xss")
    page.click("#start")
    for _ in ITEMS:  # rate until the item with markup is on screen
        item = shown_item(page)
        if item["id"] == "item-3":
            break
        page.click("#choose-tie")
        next_shown(page, item["id"])
    assert page.get_by_text("<script>window.pwned=1</script>", exact=True).is_visible()
    assert page.get_by_text('Bath <img src=x onerror="window.pwned=1">', exact=True).is_visible()
    assert page.get_by_text("Name a town <b>in</b> Austen.", exact=True).is_visible()
    assert page.evaluate("typeof window.pwned") == "undefined"
    page.close()
