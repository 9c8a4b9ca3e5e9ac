"""Template-browser thumbnails: example_workflows/<name>.jpg from the browser test's screenshots.

ComfyUI's template browser shows ``example_workflows/<name>.jpg`` beside each ``<name>.json``. Run the browser
test with ``CONCEPT_GUARD_ARTIFACTS=DIR`` (it saves ``DIR/browser/<name>.png`` per workflow), then
``python scripts/make_thumbnails.py DIR/browser``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "example_workflows"
SIZE = (512, 288)


def main(shots: Path) -> int:
    for workflow in sorted(EXAMPLES.glob("*.json")):
        shot = shots / f"{workflow.stem}.png"
        if not shot.is_file():
            print(f"no screenshot for {workflow.name} in {shots}", file=sys.stderr)
            return 1
        with Image.open(shot) as im:
            thumb = im.convert("RGB")
            thumb.thumbnail((SIZE[0] * 2, SIZE[1] * 2))
            thumb = thumb.resize(SIZE, Image.LANCZOS)
            thumb.save(workflow.with_suffix(".jpg"), quality=85)
        print(f"wrote {workflow.with_suffix('.jpg')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1])))
