"""The study page clicked through in a real headless Chromium: the saved JSON is what the clicks meant, and the
videos play. In the slow tier; it runs where Chromium, its driver and selenium are installed (.ci/run installs
them and sets REQUIRE_BROWSER=1, so there a missing browser fails instead of skipping):

    apt-get install chromium chromium-driver && pip install selenium
"""
import glob
import json
import os
import shutil
import time

import pytest

import evaluate
import page
from test_page import make_run

pytestmark = pytest.mark.slow  # a browser: the slow tier (python -m pytest -q -m slow tests)
CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") and "/usr/lib/chromium/chromium")
DRIVER = os.environ.get("CHROMEDRIVER", shutil.which("chromedriver"))
try:
    from selenium import webdriver
except ImportError:
    webdriver = None
if not (webdriver and CHROMIUM and os.path.exists(CHROMIUM) and DRIVER):
    why = "needs Chromium, chromedriver and selenium (apt-get install chromium chromium-driver; pip install selenium)"
    if os.environ.get("REQUIRE_BROWSER"):
        raise RuntimeError(why)  # CI: a browser test that cannot run is a failure, not a skip
    pytest.skip(why, allow_module_level=True)


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900",
                 "--autoplay-policy=no-user-gesture-required"):
        opts.add_argument(flag)
    opts.add_experimental_option("prefs", {"download.default_directory": str(tmp_path / "downloads"),
                                           "download.prompt_for_download": False})
    drv = webdriver.Chrome(options=opts, service=Service(DRIVER))
    yield drv
    drv.quit()


def test_clicking_through_a_study_saves_the_expected_judgements(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    runs = make_run(tmp_path / "before", 120), make_run(tmp_path / "after", 10)
    evaluate.main(["--compare", *runs, "--study-html", str(tmp_path / "study.html"), "--seed", "7"])
    study, pairs = page.study_pairs(*(json.load(open(r)) for r in runs), seed=7)
    browser.get((tmp_path / "study.html").as_uri())
    playing = "return [0, 1].every(i => { const v = document.getElementById('v' + i); " \
              "return v.readyState >= 2 && v.videoWidth > 0; })"
    clicks = ["left", "right", "tie", "left"]  # Video 1, Video 2, the same, Video 1
    for i, button in enumerate(clicks):
        WebDriverWait(browser, 15).until(lambda d: d.execute_script(playing))  # each pair's H.264 videos decode
        assert browser.find_element(By.ID, "progress").text == f"Pair {i + 1} of {len(pairs)}"
        assert browser.find_element(By.ID, "prompt").text == pairs[i]["prompt"]
        browser.find_element(By.ID, button).click()
    assert browser.find_element(By.ID, "done").is_displayed()
    browser.find_element(By.ID, "save").click()
    deadline, saved = time.time() + 15, []
    while time.time() < deadline and not saved:
        saved = glob.glob(str(tmp_path / "downloads" / "study-*.json"))
        time.sleep(0.1)
    assert saved, "the page saved no results file"
    results = json.load(open(saved[0]))
    assert results["study"] == study and results["runs"] == ["before", "after"]
    assert [(j["pair"], j["choice"], j["runs"], j["videos"]) for j in results["judgements"]] == \
        [(i, c, p["runs"], p["videos"]) for i, (c, p) in enumerate(zip(clicks, pairs))]
    w = evaluate.main(["--study", saved[0]])  # the same file gives the win rate
    winners = [p["runs"][0 if c == "left" else 1] for c, p in zip(clicks, pairs) if c != "tie"]
    assert (w["wins"], w["ties"]) == (winners.count("after"), 1)
    browser.save_screenshot(str(tmp_path / "study.png"))


def test_comparison_page_table_fits_a_normal_window(tmp_path, browser):
    """Every metric evaluate.py can report (VBench's seven, the proxies, a reward's five dimensions, FVD) for three
    runs: the table stays inside a 1200-pixel window, every cell readable without scrolling sideways."""
    summary = {**dict.fromkeys(evaluate.VBENCH_QUALITY, 0.9), **dict.fromkeys(evaluate.PROXIES, 0.5),
               **{f"toy:{d}": 0.5 for d in ("visual_quality", "temporal_consistency", "dynamic_degree",
                                            "color_alignment", "direction_alignment")}, "fvd": 123.4}
    runs = []
    for name in ("untrained model", "after the quick start", "after 400 steps"):
        runs.append(str(tmp_path / f"{len(runs)}.json"))
        json.dump({"name": name, "summary": summary}, open(runs[-1], "w"))
    evaluate.main(["--compare", *runs, "--html", str(tmp_path / "page.html")])
    browser.get((tmp_path / "page.html").as_uri())
    right = browser.execute_script("return Math.max(...[...document.querySelectorAll('table td, table th')]"
                                   ".map(c => c.getBoundingClientRect().right))")
    width = browser.execute_script("return document.documentElement.clientWidth")
    assert 0 < right <= width, (right, width)
    browser.save_screenshot(str(tmp_path / "page.png"))
