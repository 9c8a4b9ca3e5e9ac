"""Make the README's images: the finished ShapesWorld erase in ComfyUI's page, and the demo's before/after grid.

- ``docs/images/comfyui_erase.png``: a headless ComfyUI (the test harness's server set-up: a temporary base
  directory, this repository as ``custom_nodes/concept_guard``) opens ``example_workflows/shapesworld_erase.json``
  in headless Chromium, queues it from the page, waits until it has run (ESD training: minutes on CPU) and
  takes a screenshot of the whole graph.
- ``docs/images/demo_grid.png``: the before/after grid of ``concept-guard demo``.

Needs the test extras (``pip install -e .[test]``: pytest, playwright), a Chromium (Debian: ``apt-get install
chromium``; Playwright's own browser download is not used) and a ComfyUI source tree::

    COMFYUI_PATH=../shared/vendor/ComfyUI python scripts/make_readme_images.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
WORKFLOW = ROOT / "example_workflows" / "shapesworld_erase.json"
VENDORED_COMFYUI = ROOT.parent / "shared" / "vendor" / "ComfyUI"
DEMO_GRID = "before_after.png"  # what `concept-guard demo --out` writes (cli/demo.py)


def _harness(comfyui: str | None):
    """Import ``tests/comfy/comfy_harness.py`` (it reads ``COMFYUI_PATH`` and imports ComfyUI)."""
    comfyui = comfyui or os.environ.get("COMFYUI_PATH", "").strip()
    if not comfyui and (VENDORED_COMFYUI / "main.py").is_file():
        comfyui = str(VENDORED_COMFYUI)
    if not comfyui:
        sys.exit("Set COMFYUI_PATH (or pass --comfyui) to a ComfyUI source tree.")
    os.environ["COMFYUI_PATH"] = comfyui
    sys.path.insert(0, str(ROOT / "tests" / "comfy"))
    import comfy_harness
    import comfy_page

    return comfy_harness, comfy_page


def comfyui_screenshot(out: Path, *, comfyui: str | None, timeout: float) -> None:
    import json

    from playwright.sync_api import sync_playwright

    h, pg = _harness(comfyui)
    chromium = pg.find_chromium()
    if chromium is None:
        sys.exit("No Chromium found (Debian: apt-get install chromium; or set CONCEPT_GUARD_CHROMIUM).")
    workflow = json.loads(WORKFLOW.read_text())
    previews = [n["id"] for n in workflow["nodes"] if n["type"] == "PreviewImage"]
    with tempfile.TemporaryDirectory(prefix="concept_guard_readme_") as base:
        print(f"starting ComfyUI ({os.environ['COMFYUI_PATH']}) in {base} ...", flush=True)
        server = h.start_comfy_server(Path(base))
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=chromium, headless=True)
                try:
                    page = browser.new_page(viewport=pg.VIEWPORT)
                    pg.open_app(page, server)
                    pg.load_workflow_in_page(page, workflow)
                    print(
                        f"queued {WORKFLOW.name} from the page; waiting (ESD training takes minutes on CPU) ..."
                    )
                    start = time.monotonic()
                    _, entry = pg.queue_from_page(page, server, timeout=timeout)
                    status = entry["status"]["status_str"]
                    if status != "success":
                        sys.exit(f"the workflow failed ({status}): {entry['status']}\n{server.log()[-4000:]}")
                    page.wait_for_function(
                        "(ids) => ids.every(id => (app.graph.getNodeById(id).imgs ?? []).length > 0)",
                        arg=previews,
                        timeout=30_000,
                    )
                    print(f"ran in {time.monotonic() - start:.0f} s")
                    pg.fit_view(page)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(out))
                finally:
                    browser.close()
        finally:
            h.stop_comfy_server(server)
    print(f"wrote {out}")


def demo_grid(out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="concept_guard_demo_") as tmp:
        cmd = [sys.executable, "-m", "concept_guard", "demo", "--out", tmp]
        print("running", " ".join(cmd), flush=True)
        done = subprocess.run(cmd, cwd=ROOT)
        grid = Path(tmp) / DEMO_GRID
        if not grid.is_file():
            sys.exit(f"`concept-guard demo` (exit status {done.returncode}) wrote no {DEMO_GRID}.")
        if done.returncode != 0:  # the grid is written at the end of the run; only reporting failed
            print(f"WARNING: `concept-guard demo` exited with {done.returncode} after writing {DEMO_GRID}.")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grid, out)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--comfyui", help="ComfyUI source tree (default: $COMFYUI_PATH, else the vendored one)"
    )
    parser.add_argument("--out", type=Path, default=IMAGES, help=f"output folder (default {IMAGES})")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds to wait for the workflow to run")
    parser.add_argument("--skip-comfyui", action="store_true", help="do not make comfyui_erase.png")
    parser.add_argument("--skip-demo", action="store_true", help="do not make demo_grid.png")
    args = parser.parse_args(argv)
    if not args.skip_comfyui:
        comfyui_screenshot(args.out / "comfyui_erase.png", comfyui=args.comfyui, timeout=args.timeout)
    if not args.skip_demo:
        demo_grid(args.out / "demo_grid.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
