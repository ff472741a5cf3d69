"""The synthetic-data loop in a real browser (headless Chromium, tests/test_browser.py's fixtures and helpers):
upload → train round 1 on tiny-demo → Grow: render 4 candidates from its checkpoint → click two to tick them →
Next round puts the original and the two into the Train tab's set → round 2 trains on the three pictures, and its
run.json names the round, the run it grew from and each picture's provenance.
"""
from __future__ import annotations

import json

from tests.helpers_app import write_subject_png
from tests.test_browser import (RUN_TIMEOUT, By, app, browser, configure_run, open_page, set_number,  # noqa: F401
                                strip_thumbnails, text_of, upload_image, wait_until)


def open_tab(driver, label: str) -> None:
    driver.find_element(By.XPATH, f"//button[@role='tab' and normalize-space()='{label}']").click()


def loaded_candidates(driver) -> list:
    """The candidate gallery's thumbnails that have their pixels (scrolled into view: they are lazy-loaded)."""
    driver.execute_script("document.querySelector('#grow-gallery')?.scrollIntoView({block: 'center'});")
    return [img for img in driver.find_elements(By.CSS_SELECTOR, "#grow-gallery img")
            if img.get_property("complete") and img.get_property("naturalWidth") > 0]


def ticked(driver) -> list[str]:
    return [box.find_element(By.XPATH, "..").text.strip()
            for box in driver.find_elements(By.CSS_SELECTOR, "#grow-picks input[type=checkbox]") if box.is_selected()]


def test_grow_candidates_pick_two_and_train_round_two_in_the_browser(app, browser, tmp_path):  # noqa: F811
    open_page(browser, app.url)
    upload_image(browser, write_subject_png(tmp_path))
    configure_run(browser, steps=2, save_every=2)
    browser.find_element(By.ID, "train").click()
    wait_until(browser, lambda d: "Finished" in text_of(d, "#progress"), RUN_TIMEOUT, "round 1 to finish")
    first = app.jobs[-1].run

    open_tab(browser, "Grow")
    # opening the tab lists the runs, picks the newest and its last checkpoint
    wait_until(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#grow-checkpoint input").get_attribute("value")
               == "step 2", 60, "the run's checkpoint in the Grow tab")
    set_number(browser, "Candidates (1 to 48)", 4)
    browser.find_element(By.ID, "grow-render").click()
    wait_until(browser, lambda d: "4 candidates (round 2)" in text_of(d, "#grow-status"), RUN_TIMEOUT,
               "four candidates")
    wait_until(browser, lambda d: len(loaded_candidates(d)) == 4, 60, "the four candidates in the gallery")
    assert text_of(browser, "#grow-notes").count(" · copy ") == 4  # each candidate with its scores

    thumbs = browser.find_elements(By.CSS_SELECTOR, "#grow-gallery .grid-container button")
    thumbs[1].click()
    wait_until(browser, lambda d: len(ticked(d)) == 1, 30, "the first click to tick candidate 2")
    browser.find_elements(By.CSS_SELECTOR, "#grow-gallery .grid-container button")[3].click()
    wait_until(browser, lambda d: len(ticked(d)) == 2, 30, "the second click to tick candidate 4")
    assert [label.split(".")[0] for label in ticked(browser)] == ["2", "4"]

    browser.find_element(By.ID, "grow-next-round").click()
    wait_until(browser, lambda d: "3 images" in text_of(d, "#set-info") and len(strip_thumbnails(d)) == 3, 120,
               "the original and the two candidates in the Train tab's set")
    assert "editing 1. original-01.png" in text_of(browser, "#set-info")
    set_number(browser, "Steps", 3)
    browser.find_element(By.ID, "train").click()
    wait_until(browser, lambda d: "Finished: 3 steps" in text_of(d, "#progress"), RUN_TIMEOUT, "round 2 to finish")

    second = app.jobs[-1].run
    manifest = json.loads((second.path / "run.json").read_text())
    assert manifest["lineage"]["round"] == 2 and manifest["lineage"]["parent"]["run"] == str(first.path)
    assert [e["name"] for e in manifest["dataset"]["images"]] == ["original-01.png", "candidate-002.png",
                                                                  "candidate-004.png"]
    assert all(e.get("provenance") for e in manifest["dataset"]["images"])
