"""``LIBRARY/index.html``: a static page over a concept library (no server, no script). Per image: the numbered
concept overlay, then per concept its mask, its embedding name (and how to write it in a ComfyUI prompt when the
library folder is copied into ``models/embeddings``), its mask area and EOT score, and the rendered sample when the
library was made with ``--preview``. Failed images are listed with their errors. Pictures are linked, not copied:
the page works from the library folder, opened as a file."""

from __future__ import annotations

import html
import json
from pathlib import Path

from .library import INDEX

PAGE = "index.html"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 16px; background: #f4f4f4; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; }
.job { color: #555; margin-bottom: 16px; font-size: 13px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px; margin: 0 0 14px; }
.card h2 { font-size: 15px; margin: 0 0 8px; }
.status-failed, .status-crashed, .status-pending { color: #a00; }
.overlay { display: block; max-width: min(100%, 512px); margin-bottom: 8px; }
.concepts { display: flex; flex-wrap: wrap; gap: 10px; }
.concept { border: 1px solid #eee; padding: 6px; width: 200px; font-size: 12px; }
.concept img { width: 96px; margin-right: 4px; vertical-align: top; border: 1px solid #ccc; }
code { background: #eee; padding: 0 3px; }
.error { white-space: pre-wrap; font-family: monospace; font-size: 12px; color: #a00; }
"""


def write_gallery(root: str | Path) -> Path:
    """Write ``root/index.html`` from ``root/index.json`` (atomically) and return its path."""
    from .fileio import write_text_atomic

    root = Path(root)
    index = json.loads((root / INDEX).read_text(encoding="utf-8"))
    return write_text_atomic(root / PAGE, render(index, root))


def render(index: dict, root: Path) -> str:
    entries = index.get("images", [])
    job = index.get("job", {})
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.get("status", "?")] = counts.get(e.get("status", "?"), 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>Concept library</title>',
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Concept library: {len(entries)} image(s)</h1>",
        f'<div class="job">{_e(summary)} &middot; model <code>{_e(job.get("model", "?"))}</code> &middot; '
        f"prefix <code>{_e(job.get('prefix', ''))}</code></div>",
    ]
    for entry in entries:
        parts.append(_card(entry, root))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _card(entry: dict, root: Path) -> str:
    folder, status = entry.get("folder", ""), entry.get("status", "?")
    name = Path(entry.get("image", "")).name
    if status != "done":
        error = entry.get("error") or ("not finished yet" if status == "pending" else "")
        head = f'<h2>{_e(name)} <span class="status-{_e(status)}">{_e(status)}</span></h2>'
        return f'<div class="card" id="{_e(folder)}">{head}<div class="error">{_e(error)}</div></div>'
    head = f'<h2>{_e(name)} &rarr; <code>{_e(folder)}/</code> <span class="status-done">done</span>'
    loss = entry.get("final_loss")
    head += f" &middot; final loss {loss:.4f}" if isinstance(loss, float) else ""
    evaluation = entry.get("evaluation")
    if evaluation:
        head += f" &middot; IoU {100 * evaluation['iou']:.1f} % against {evaluation['truth']} true mask(s)"
    head += f" &middot; {entry.get('seconds', 0):.1f} s</h2>"
    rows = []
    for k, concept in enumerate(entry.get("concepts", []), start=1):
        cname = concept.get("name", "")
        sample = f"{folder}/samples/{cname}.png"
        extra = f'<img src="{_e(sample)}" alt="sample of {_e(cname)}">' if (root / sample).is_file() else ""
        rows.append(
            f'<div class="concept"><img src="{_e(folder)}/{_e(concept.get("mask", ""))}" alt="mask {k}">{extra}'
            f"<div><b>{k}</b> <code>{_e(cname)}</code><br>ComfyUI: <code>embedding:{_e(folder)}/{_e(cname)}</code>"
            f"<br>area {100 * concept.get('area', 0):.1f} % &middot; EOT score {concept.get('eot_score', 0):.2f}"
            "</div></div>"
        )
    overlay = f'<img class="overlay" src="{_e(folder)}/concepts.png" alt="concepts of {_e(name)}">'
    return f'<div class="card" id="{_e(folder)}">{head}{overlay}<div class="concepts">{"".join(rows)}</div></div>'


def _e(value) -> str:
    return html.escape(str(value), quote=True)
