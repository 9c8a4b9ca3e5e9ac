"""Example workflows: UI format (what users drag into ComfyUI) -> API format (what ``/prompt`` runs).

The files in ``example_workflows/`` are saved in the frontend's graph format: nodes with positions,
``widgets_values`` in widget order and a link table. ``/prompt`` takes ``{node id: {"class_type",
"inputs"}}``. The frontend converts one into the other with the node definitions from ``/object_info``;
:func:`ui_to_api` does the same here, so the test runs exactly the file users get, and a widget list that
no longer matches the node's inputs fails the test instead of confusing users.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"
#: Frontend-only nodes (comments); the frontend leaves them out of the prompt.
VIRTUAL_NODES = {"Note", "MarkdownNote"}
#: LiteGraph node modes: 0 always, 2 never (muted), 4 bypass.
ALWAYS, MUTED = 0, 2
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def load_workflow(name: str) -> dict:
    return json.loads((EXAMPLES / name).read_text())


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _has_control_widget(name: str, spec: list) -> bool:
    """The frontend adds a "control after generate" widget (its value saved next to the seed's) for INT
    inputs that ask for it, and by legacy convention for INT inputs named seed/noise_seed."""
    options = spec[1] if len(spec) > 1 else {}
    if spec[0] == "INT":
        return bool(options.get("control_after_generate", name in ("seed", "noise_seed")))
    return bool(options.get("control_after_generate", False))


def _node_inputs(node: dict, info: dict, links: dict, active: set[int]) -> dict:
    linked = {
        inp["name"]: links[inp["link"]] for inp in node.get("inputs", []) if inp.get("link") is not None
    }
    values = iter(node.get("widgets_values") or [])
    out: dict = {}
    order = info["input_order"]
    for name in [*order.get("required", []), *order.get("optional", [])]:
        spec = info["input"].get("required", {}).get(name) or info["input"]["optional"][name]
        value = next(values, None) if _is_widget(spec) else None  # a linked widget keeps its slot
        if _is_widget(spec) and _has_control_widget(name, spec):
            next(values, None)
        if name in linked:
            _, src, slot, *_ = linked[name]
            if src not in active:
                raise ValueError(f"Node {node['id']} ({node['type']}) takes {name!r} from muted node {src}.")
            out[name] = [str(src), slot]
        elif _is_widget(spec):
            out[name] = value
    return out


def ui_to_api(workflow: dict, object_info: dict, *, unmute: bool = False) -> dict[str, dict]:
    """Convert a UI-format workflow into a ``/prompt`` graph, as the frontend does when queueing.

    Muted nodes are left out (``unmute=True``: included, as after the user unmutes them); comment
    nodes are dropped. Raises ``ValueError`` for node types the server does not know and for bypassed
    nodes (not needed by our examples).
    """
    links = {link[0]: link for link in workflow["links"]}
    nodes = [n for n in workflow["nodes"] if n["type"] not in VIRTUAL_NODES]
    for n in nodes:
        if n["type"] not in object_info:
            raise ValueError(f"Node {n['id']} has type {n['type']!r}, which the server does not provide.")
        if n.get("mode", ALWAYS) not in (ALWAYS, MUTED):
            raise ValueError(
                f"Node {n['id']} ({n['type']}) has mode {n['mode']}; only active or muted nodes are handled."
            )
    active = {n["id"] for n in nodes if n.get("mode", ALWAYS) == ALWAYS or unmute}
    return {
        str(n["id"]): {
            "class_type": n["type"],
            "inputs": _node_inputs(n, object_info[n["type"]], links, active),
        }
        for n in nodes
        if n["id"] in active
    }


def node_ids(prompt: dict, class_type: str) -> list[str]:
    return [nid for nid, node in prompt.items() if node["class_type"] == class_type]


def set_inputs(prompt: dict, class_type: str, **values) -> None:
    """Set widget inputs on every node of ``class_type`` (at least one must exist, with those inputs)."""
    ids = node_ids(prompt, class_type)
    if not ids:
        raise KeyError(f"No {class_type} node in the workflow.")
    for nid in ids:
        inputs = prompt[nid]["inputs"]
        unknown = set(values) - set(inputs)
        if unknown:
            raise KeyError(f"{class_type} node {nid} has no inputs {sorted(unknown)}.")
        inputs.update(values)


def post_prompt(server, prompt: dict) -> tuple[int, dict]:
    """POST a prompt to ``/prompt``; the HTTP status and the JSON body (also for a refused prompt)."""
    body = json.dumps({"prompt": prompt, "client_id": uuid.uuid4().hex}).encode()
    request = urllib.request.Request(
        server.url + "/prompt", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def queue(server, prompt: dict, timeout: float = 300) -> dict:
    """POST the prompt, wait for its ``/history`` entry and return it."""
    body = json.dumps({"prompt": prompt, "client_id": uuid.uuid4().hex}).encode()
    request = urllib.request.Request(
        server.url + "/prompt", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        queued = json.loads(response.read())
    assert queued["node_errors"] == {}, queued
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = server.get_json(f"/history/{queued['prompt_id']}")
        if queued["prompt_id"] in history:
            return history[queued["prompt_id"]]
        time.sleep(0.5)
    raise TimeoutError(f"prompt {queued['prompt_id']} did not finish within {timeout:.0f} s")
