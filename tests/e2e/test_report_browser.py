"""The HTML report in a real browser: Debian's Chromium driven by Playwright.

Every page of a report built from a real run over the demo corpus loads from file:// with
no console error, no request leaving file://, and every image decoded (naturalWidth > 0);
pagination and sorting links lead where they say; a hostile file name is shown as text;
and the checker itself is shown to catch a broken thumbnail. Screenshots of the summary and
of a group page are saved under tests/artifacts/.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import HOSTILE_NAME
from tests.helpers import ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
INSTALL_HINT = "Chromium is not installed: sudo apt-get update && sudo apt-get install -y chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
ARTIFACTS = ROOT / "tests" / "artifacts"

# Force lazy images to load, wait for each to finish, then list those that did not decode.
BROKEN_IMAGES_JS = """
async () => {
  const imgs = [...document.images];
  for (const img of imgs) img.loading = "eager";
  await Promise.all(imgs.map(img => img.complete ? null :
      new Promise(done => { img.addEventListener("load", done); img.addEventListener("error", done); })));
  return imgs.filter(img => !(img.complete && img.naturalWidth > 0)).map(img => img.getAttribute("src"));
}
"""


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(INSTALL_HINT)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def report(spark, demo_run, tmp_path_factory):
    from pipeline.report.build import build_report

    _, config, _ = demo_run
    return build_report(spark, config, str(tmp_path_factory.mktemp("report") / "report"))


def check_page(browser, url: str, screenshot: Path | None = None) -> tuple[list[str], object]:
    """Load ``url``; return (problems, page). Problems: console errors, page errors, dialogs,
    requests that leave file:// or fail, images that did not decode."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.on("request", lambda r: problems.append(f"network: {r.url}")
            if not r.url.startswith(("file://", "data:")) else None)
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.goto(url, wait_until="load")
    problems += [f"broken image: {src}" for src in page.evaluate(BROKEN_IMAGES_JS)]
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=screenshot.name.endswith("summary.png"))
    return problems, page


def test_every_page_loads_clean(browser, report):
    files = sorted(Path(report.out_dir).glob("*.html"))
    names = {f.name for f in files}
    assert {"index.html", "groups-size-0001.html", "groups-doubt-0001.html", "failed-0001.html"} <= names
    assert report.groups >= 8 and report.thumbnail_errors == 0 and report.thumbnails >= report.groups * 2
    for f in files:
        shot = {"index.html": ARTIFACTS / "report-summary.png",
                "groups-size-0001.html": ARTIFACTS / "report-group.png"}.get(f.name)
        problems, page = check_page(browser, f.as_uri(), shot)
        assert problems == [], f"{f.name}: {problems}"
        page.close()
    assert (ARTIFACTS / "report-summary.png").stat().st_size > 10_000
    assert (ARTIFACTS / "report-group.png").stat().st_size > 10_000


def test_summary_counts_plot_and_mlflow(browser, report, demo_run):
    _, _, metrics = demo_run
    problems, page = check_page(browser, Path(report.index).as_uri())
    assert page.inner_text("#groups-total") == str(metrics["groups"])
    assert page.inner_text("#to-remove") == str(metrics["images_to_remove"])
    # The run that wrote the groups: the demo's `run`, or a later `dedup` of the same workdir.
    import mlflow

    writers = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list",
                                             order_by=["attributes.start_time DESC"])
               if r.data.tags.get("job") in ("run", "dedup") and r.info.status == "FINISHED"]
    assert page.inner_text("#mlflow-run") == writers[0].info.run_id
    assert metrics["mlflow_run_id"] in {r.info.run_id for r in writers}
    plot = page.locator("img.plot")
    assert plot.evaluate("img => img.naturalWidth") >= 600  # the matplotlib histogram, really drawn
    page.close()
    # The report is an artifact of its own MLflow run, stored inside the workdir.
    run = mlflow.get_run(report.mlflow_run_id)
    assert run.data.tags["source_run"] == writers[0].info.run_id
    local = mlflow.artifacts.download_artifacts(run_id=report.mlflow_run_id, artifact_path="report/index.html")
    assert open(local, encoding="utf-8").read() == open(report.index, encoding="utf-8").read()
    assert run.info.artifact_uri.startswith(Path(demo_run[1].workdir).resolve().as_uri())


def test_pagination_and_sorting_links(browser, report):
    problems, page = check_page(browser, (Path(report.out_dir) / "groups-size-0001.html").as_uri())
    sizes = [int(s) for s in page.locator("section.group").evaluate_all("els => els.map(e => e.dataset.size)")]
    assert len(sizes) == 3 and sizes == sorted(sizes, reverse=True)
    page.click("nav.pager >> nth=0 >> a.next")
    assert page.url.endswith("groups-size-0002.html")
    assert page.locator("section.group h2").first.inner_text().startswith("#4 ")
    later = [int(s) for s in page.locator("section.group").evaluate_all("els => els.map(e => e.dataset.size)")]
    assert max(later) <= min(sizes)  # the order continues across pages
    page.click("nav.pager >> nth=0 >> a.last")
    assert page.url.endswith(f"groups-size-{-(-report.groups // 3):04d}.html")
    page.click("a.sort[data-order=doubt]")
    assert page.url.endswith("groups-doubt-0001.html")
    seen = []
    while True:
        seen += [float(s) for s in page.locator("section.group").evaluate_all(
            "els => els.map(e => e.dataset.doubt)")]
        nxt = page.locator("nav.pager >> nth=0 >> a.next")
        if nxt.count() == 0:
            break
        nxt.click()
    assert len(seen) == report.groups and seen == sorted(seen)  # doubtful groups first, across all pages
    page.close()


def test_hostile_file_name_is_text(browser, report):
    pages = [p for p in Path(report.out_dir).glob("groups-size-*.html") if HOSTILE_NAME in
             p.read_text(encoding="utf-8").replace("&lt;", "<").replace("&gt;", ">").replace("&#34;", '"')]
    assert pages, "the hostile file should be in a group (it is a copy of an original photo)"
    problems, page = check_page(browser, pages[0].as_uri())
    assert problems == []  # no alert dialog, no request for "x"
    assert page.locator("span.path", has_text=HOSTILE_NAME).count() == 1
    assert page.locator("img[src=x]").count() == 0
    page.close()


def test_checker_catches_a_broken_thumbnail(browser, report, tmp_path):
    copy = tmp_path / "report"
    shutil.copytree(report.out_dir, copy)
    victim = sorted((copy / "thumbs").glob("*.jpg"))[0]
    victim.write_bytes(b"\xff\xd8 this is not a JPEG")
    page_of = [p for p in sorted(copy.glob("groups-size-*.html")) if victim.name in p.read_text(encoding="utf-8")][0]
    problems, page = check_page(browser, page_of.as_uri())
    assert problems == [f"broken image: thumbs/{victim.name}"]
    page.close()
