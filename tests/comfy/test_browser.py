"""The real ComfyUI page (its frontend package, headless Chromium) with the pack: load and run the examples.

Each shipped example workflow is loaded with ``app.loadGraphData`` as a user dropping the file would: every
node must be created from a registered type with its widgets (no red "missing" node), and the page must not
log errors about our extension. Then the ShapesWorld example is queued from the page with
``app.queuePrompt(0)`` and must run: ESD training on CPU (about 1–4 minutes), the status line and loss
chart our web extension draws, the before/after previews and the judges' counts.

Screenshots go to ``$CONCEPT_GUARD_ARTIFACTS/browser/`` (or a pytest temp folder; its path is printed).
Needs the ``playwright`` package and a Chromium (``CONCEPT_GUARD_CHROMIUM`` or ``chromium`` on PATH):
Playwright's own browser download is not used.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from comfy_page import VIEWPORT, find_chromium, fit_view, load_workflow_in_page, open_app, queue_from_page
from workflows import EXAMPLES, load_workflow

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None

CHROMIUM = find_chromium()
if sync_playwright is None:
    pytest.skip(
        "browser tests need the `playwright` Python package (pip install playwright; it is in the test extras)",
        allow_module_level=True,
    )
if CHROMIUM is None:
    pytest.skip(
        "browser tests need Chromium: none found as `chromium`/`chromium-browser` on PATH or "
        "CONCEPT_GUARD_CHROMIUM (Debian: apt-get install chromium)",
        allow_module_level=True,
    )

EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.glob("*.json"))
ERASE_WORKFLOW = "shapesworld_erase.json"
#: How our pack shows up in URLs and messages (folder, web extension name, node ids).
OURS = re.compile(r"concept[_-]?guard", re.IGNORECASE)
#: Page errors of the frontend itself: seen on every load, also with --disable-all-custom-nodes.
KNOWN_FRONTEND_ERRORS = ("Cannot read properties of undefined (reading 'id')",)
OUR_SCRIPT = "/extensions/concept_guard/concept_guard.js"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
RUN_TIMEOUT = float(os.environ.get("CONCEPT_GUARD_BROWSER_RUN_TIMEOUT", "600"))


@dataclass
class PageLog:
    """What the page reported: console messages, uncaught errors, HTTP responses."""

    console: list[dict] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    responses: list[tuple[int, str]] = field(default_factory=list)

    def mark(self) -> tuple[int, int, int]:
        return len(self.console), len(self.page_errors), len(self.responses)

    def since(self, mark: tuple[int, int, int]) -> PageLog:
        c, p, r = mark
        return PageLog(self.console[c:], self.page_errors[p:], self.responses[r:])

    def our_console_errors(self) -> list[dict]:
        return [m for m in self.console if m["type"] == "error" and OURS.search(f"{m['text']} {m['url']}")]

    def unexpected_page_errors(self) -> list[str]:
        return [e for e in self.page_errors if not any(k in e for k in KNOWN_FRONTEND_ERRORS)]

    def our_failed_requests(self) -> list[tuple[int, str]]:
        return [(status, url) for status, url in self.responses if status >= 400 and OURS.search(url)]


@dataclass
class BrowserPage:
    page: object  # playwright.sync_api.Page
    log: PageLog


def _announce(config, line: str) -> None:
    """Print ``line`` on the terminal, past pytest's output capturing (when pytest has a terminal)."""
    capture = config.pluginmanager.getplugin("capturemanager")
    reporter = config.pluginmanager.getplugin("terminalreporter")
    if capture is None or reporter is None:  # e.g. an xdist worker: the line shows with the test's output
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, pytestconfig) -> Path:
    root = os.environ.get("CONCEPT_GUARD_ARTIFACTS", "").strip()
    folder = Path(root) / "browser" if root else tmp_path_factory.mktemp("browser_artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    _announce(pytestconfig, f"\nbrowser test screenshots: {folder}")


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.get_json("/object_info")


@pytest.fixture(scope="module")
def browser_page(comfy_server):
    log = PageLog()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.on(
                "console",
                lambda m: log.console.append(
                    {"type": m.type, "text": m.text, "url": m.location.get("url", "")}
                ),
            )
            page.on("pageerror", lambda e: log.page_errors.append(str(e)))
            page.on("response", lambda r: log.responses.append((r.status, r.url)))
            open_app(page, comfy_server)
            yield BrowserPage(page, log)
        finally:
            browser.close()


def widget_inputs(info: dict) -> list[str]:
    """The inputs of a node definition that the frontend shows as widgets."""
    names = []
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES) and not options.get("forceInput"):
                names.append(name)
    return names


def test_the_web_extension_is_served_and_registered(browser_page):
    statuses = [status for status, url in browser_page.log.responses if url.endswith(OUR_SCRIPT)]
    assert statuses == [200], f"{OUR_SCRIPT}: responses {statuses}"
    names = browser_page.page.evaluate("() => app.extensions.map(e => e.name)")
    assert "concept_guard.progress" in names, names
    assert browser_page.log.our_failed_requests() == []
    assert browser_page.log.our_console_errors() == []


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_workflow_loads_in_the_page(browser_page, object_info, artifacts, name):
    workflow = load_workflow(name)
    mark = browser_page.log.mark()
    loaded = load_workflow_in_page(browser_page.page, workflow)
    fit_view(browser_page.page)
    shot = artifacts / f"{Path(name).stem}.png"
    browser_page.page.screenshot(path=str(shot))

    assert loaded["unregistered"] == [], f"node types the frontend does not know: {loaded['unregistered']}"
    nodes = {n["id"]: n for n in loaded["nodes"]}
    assert sorted(nodes) == sorted(n["id"] for n in workflow["nodes"])
    red = [n for n in nodes.values() if n["has_errors"] or not n["registered"]]
    assert red == [], f"nodes the frontend marked as missing/broken: {red}"
    for source in workflow["nodes"]:
        node = nodes[source["id"]]
        assert node["type"] == source["type"], node
        if source["type"] not in object_info:  # frontend-only nodes (MarkdownNote)
            continue
        expected = widget_inputs(object_info[source["type"]])
        missing = sorted(set(expected) - set(node["widgets"]))
        assert missing == [], f"{name}: node {node['id']} ({node['type']}) lacks the widgets {missing}"
        if source["type"].startswith("ConceptGuard") and expected:
            assert len(node["widgets"]) > 0, node
    ours = [n for n in workflow["nodes"] if n["type"].startswith("ConceptGuard")]
    assert ours, f"{name} has no Concept Guard node"

    log = browser_page.log.since(mark)
    assert log.our_console_errors() == []
    assert log.our_failed_requests() == []
    assert log.unexpected_page_errors() == [], log.unexpected_page_errors()


def _node_ids(workflow: dict, node_type: str) -> list[int]:
    return [n["id"] for n in workflow["nodes"] if n["type"] == node_type]


def _judge_rate(entry: dict, node_id: int, label: str) -> float:
    (table,) = entry["outputs"][str(node_id)]["text"]
    match = re.search(rf"'{label}': ([0-9.]+)", table)
    assert match, table
    return float(match.group(1))


def test_erase_workflow_runs_when_queued_from_the_page(browser_page, comfy_server, artifacts):
    """Load ShapesWorld -> Erase Concept (ESD, auto settings) -> KSampler before/after -> ShapesWorld Judge."""
    page, workflow = browser_page.page, load_workflow(ERASE_WORKFLOW)
    (esd,) = _node_ids(workflow, "ConceptGuardEraseESD")
    previews = _node_ids(workflow, "PreviewImage")
    judges = {
        n["title"].split("(")[-1].rstrip(")"): n["id"] for n in workflow["nodes"] if "Judge" in n["type"]
    }
    load_workflow_in_page(page, workflow)
    fit_view(page)
    mark = browser_page.log.mark()
    seen = []  # the ESD node's status line and chart length, sampled while the prompt runs

    def sample() -> None:
        seen.append(
            page.evaluate(
                "(id) => { const n = app.graph.getNodeById(id);"
                " return { status: n.title_status ?? '', losses: (n.cg_losses ?? []).length }; }",
                esd,
            )
        )

    _, entry = queue_from_page(page, comfy_server, timeout=RUN_TIMEOUT, on_poll=sample)
    # The previews are set from the "executed" events; give the page a moment after /history has the entry.
    page.wait_for_function(
        "(ids) => ids.every(id => (app.graph.getNodeById(id).imgs ?? []).length > 0)",
        arg=previews,
        timeout=30_000,
    )
    final = page.evaluate(
        "(ids) => ids.map(id => { const n = app.graph.getNodeById(id); return { id, type: n.type,"
        " status: n.title_status ?? '', losses: (n.cg_losses ?? []).length, imgs: (n.imgs ?? []).length }; })",
        [n["id"] for n in workflow["nodes"]],
    )
    final = {n["id"]: n for n in final}
    fit_view(page)
    shot = artifacts / "shapesworld_erase_finished.png"
    page.screenshot(path=str(shot))

    assert entry["status"]["status_str"] == "success", entry["status"]
    for preview in previews:
        assert len(entry["outputs"][str(preview)]["images"]) == 16  # EmptyLatentImage batch of 16
        assert final[preview]["imgs"] > 0, final[preview]
    before, after = (
        _judge_rate(entry, judges["before"], "circle"),
        _judge_rate(entry, judges["after"], "circle"),
    )
    stamps = {name: data.get("timestamp") for name, data in entry["status"]["messages"]}
    seconds = (stamps["execution_success"] - stamps["execution_start"]) / 1000
    result = {
        "seconds": seconds,
        "circle_rate_before": before,
        "circle_rate_after": after,
        "esd_status_samples": seen,
        "final": final,
        "report": entry["outputs"].get(str(_node_ids(workflow, "PreviewAny")[0]), {}).get("text"),
    }
    (artifacts / "shapesworld_erase_result.json").write_text(json.dumps(result, indent=1))
    print(f"ShapesWorld judge, share of images with a circle: before {before:.2f}, after {after:.2f}")
    print(f"the workflow ran in {seconds:.1f} s")
    assert after < before, f"ESD did not reduce circles: {before:.2f} -> {after:.2f}"

    log = browser_page.log.since(mark)
    assert log.our_console_errors() == []
    assert log.unexpected_page_errors() == [], log.unexpected_page_errors()

    # Our web extension: a status line and a live loss chart on the ESD node ...
    assert any(s["status"] for s in seen) and final[esd]["status"], (seen, final[esd])
    assert max(s["losses"] for s in seen) > 1, f"no loss chart while training: {seen}"
    # ... and the chart is still there when the run is over.
    assert final[esd]["losses"] > 1, (
        f"the ESD node's loss chart is gone after the run (status {final[esd]['status']!r}): "
        "web/js/concept_guard.js must keep cg_losses until the next run starts"
    )
