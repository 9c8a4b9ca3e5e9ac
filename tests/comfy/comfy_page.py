"""The real page in headless Chromium (Playwright): helpers for test_browser.py and scripts/make_readme_images.py.

The functions take a Playwright (sync API) ``Page``; nothing here imports Playwright or ComfyUI.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from comfy_harness import ComfyServer


#: Frontend settings for a clean, stable page: no first-run template dialog, no minimap or canvas stats.
PAGE_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
}
VIEWPORT = {"width": 1600, "height": 900}


def find_chromium() -> str | None:
    """A Chromium for Playwright's ``executable_path`` (Playwright cannot download its own browser here)."""
    for candidate in (os.environ.get("CONCEPT_GUARD_CHROMIUM", ""), "chromium", "chromium-browser"):
        found = candidate and (shutil.which(candidate) or (Path(candidate).is_file() and candidate))
        if found:
            return str(found)
    return None


def open_app(page, server: ComfyServer, timeout: float = 120) -> None:
    """Open ComfyUI's page and wait until ``window.app`` and its graph exist."""
    server.post_json("/api/settings", PAGE_SETTINGS)
    page.goto(server.url, wait_until="domcontentloaded", timeout=timeout * 1000)
    page.wait_for_function("() => window.app && window.app.graph", timeout=timeout * 1000)


def load_workflow_in_page(page, workflow: dict) -> dict:
    """``app.loadGraphData(workflow)``; returns what the page then holds.

    ``unregistered``: node types of the file LiteGraph does not know (the frontend's "missing nodes");
    ``nodes``: per node of ``app.graph`` its id, type, comfyClass, title, widget names and ``has_errors``
    (LiteGraph sets it on a node it could not create) and whether its type is registered.
    """
    return page.evaluate(
        """async (wf) => {
            const unregistered = wf.nodes.map(n => n.type).filter(t => !(t in LiteGraph.registered_node_types));
            await app.loadGraphData(wf);
            const nodes = app.graph._nodes.map(n => ({
                id: n.id, type: n.type, comfyClass: n.comfyClass ?? null, title: n.title,
                widgets: (n.widgets ?? []).map(w => w.name), has_errors: !!n.has_errors,
                registered: n.type in LiteGraph.registered_node_types,
            }));
            return { unregistered, nodes };
        }""",
        workflow,
    )


def fit_view(page, zoom: float = 0.97) -> None:
    """Zoom and pan the canvas so that every node and group is visible, then redraw."""
    page.evaluate(
        """(zoom) => {
            const boxes = app.graph._nodes.map(n => [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT,
                                                     n.size[0], n.size[1] + LiteGraph.NODE_TITLE_HEIGHT]);
            for (const g of app.graph._groups ?? []) if (g._bounding) boxes.push(Array.from(g._bounding));
            if (!boxes.length) return;
            const x0 = Math.min(...boxes.map(b => b[0])), y0 = Math.min(...boxes.map(b => b[1]));
            const x1 = Math.max(...boxes.map(b => b[0] + b[2])), y1 = Math.max(...boxes.map(b => b[1] + b[3]));
            app.canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], { zoom });
            app.canvas.setDirty(true, true);
        }""",
        zoom,
    )
    page.wait_for_timeout(500)


def queue_from_page(page, server: ComfyServer, timeout: float = 600, on_poll=None) -> tuple[str, dict]:
    """``app.queuePrompt(0)`` in the page; waits for the prompt's ``/history`` entry: (prompt id, entry).

    ``on_poll()`` is called about every 2 s while the prompt runs (e.g. to sample the page's state).
    """
    before = set(server.get_json("/history"))
    page.evaluate("async () => { await app.queuePrompt(0); }")  # resolves once the server answered /prompt

    def new_ids() -> list[str]:
        queue = server.get_json("/queue")
        queued = [item[1] for item in queue["queue_running"] + queue["queue_pending"]]
        return [i for i in queued + list(server.get_json("/history")) if i not in before]

    ids = new_ids()
    if not ids:
        raise AssertionError("app.queuePrompt(0) queued nothing (the page refused the graph or /prompt did).")
    prompt_id = ids[0]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = server.get_json(f"/history/{prompt_id}")
        if prompt_id in history:  # an entry is written when the prompt has finished (or failed)
            if on_poll is not None:
                on_poll()
            return prompt_id, history[prompt_id]
        if on_poll is not None:
            on_poll()
        time.sleep(2)
    raise TimeoutError(f"prompt {prompt_id} queued from the page did not finish within {timeout:.0f} s")
