"""A self-contained HTML review page of a report: what a curator looks at instead of JSON.

Summary (counts, coverage, classes, score histograms), one gallery per class sorted by score, the review
queue of abstained files (top class, score, reason), the failed files with their errors, and filters by
class and state. Thumbnails are the model's own view (``data_loader.load_sample``'s stretched 448x448
image, shrunk to 128 px) embedded as JPEG, made in decode threads for the files shown only: a gallery
shows at most ``per_gallery`` files (half the highest scores, half the lowest) and counts the rest with
the command that lists them, so a 20,000-file report stays a page a browser opens in seconds.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import data_loader
from report import UNKNOWN, AtomicWriter, read_report

logger = logging.getLogger(__name__)

THUMBNAIL_SIZE = 128
DEFAULT_PER_GALLERY = 200
HISTOGRAM_BINS = 10


def thumbnail(path: str, hdu: int | str | None = None) -> str | None:
    """The model's view of a file as a base64 JPEG data URI (None when it cannot be read any more)."""
    try:
        image = data_loader.load_sample(path, hdu=hdu).image
    except (data_loader.ImageLoadError, OSError, ValueError) as exc:
        logger.warning("%s: no thumbnail: %s", path, exc)
        return None
    pixels = Image.fromarray(np.round(image * 255).astype(np.uint8)).resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE),
                                                                            Image.Resampling.BOX)
    buffer = io.BytesIO()
    pixels.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _shown(records: list[dict[str, Any]], per_gallery: int) -> tuple[list[dict[str, Any]], int]:
    """The records a gallery shows (highest and lowest scores, by score) and how many it leaves out."""
    ranked = sorted(records, key=lambda r: -(r["score"] or 0.0))
    if len(ranked) <= per_gallery:
        return ranked, 0
    top = per_gallery - per_gallery // 2
    return ranked[:top] + ranked[len(ranked) - per_gallery // 2:], len(ranked) - per_gallery


def _groups(records: Iterable[dict[str, Any]]) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]],
                                                        list[dict[str, Any]]]:
    galleries: dict[str, list[dict[str, Any]]] = {}
    queue, failed = [], []
    for record in records:
        if record.get("error"):
            failed.append(record)
        elif record.get("abstained"):
            queue.append(record)
        else:
            galleries.setdefault(record["class"], []).append(record)
    return galleries, queue, failed


def _histogram(scores: list[float]) -> list[int]:
    counts, _ = np.histogram(scores, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    return counts.tolist()


def _bars(counts: dict[str, int]) -> str:
    top = max(counts.values(), default=1) or 1
    return "".join(f'<div class="bar"><span class="label">{html.escape(name)}</span><span class="fill" '
                   f'style="width:{100 * n / top:.1f}%"></span><span class="n">{n}</span></div>'
                   for name, n in counts.items())


def _sky_text(record: dict[str, Any]) -> str:
    sky = record.get("sky")
    return f"RA {sky['ra']:.5f} Dec {sky['dec']:+.5f}" if sky else "no sky position"


def _card(record: dict[str, Any], image: str | None, state: str) -> str:
    label = record["top_class"] if state == "abstained" else record["class"]
    reason = html.escape(record.get("abstain_reason") or "")
    detail = (f"{html.escape(str(record['top_class']))} {record['score']:.3f} ({reason})" if state == "abstained"
              else f"{record['score']:.3f}")
    sets = record.get("prediction_set")
    picture = f'<img src="{image}" alt="" width="{THUMBNAIL_SIZE}" height="{THUMBNAIL_SIZE}">' if image else \
        '<div class="noimg">no image</div>'
    return (f'<figure class="card" data-class="{html.escape(str(label))}" data-state="{state}" '
            f'title="{html.escape(record["path"])}">{picture}<figcaption><b>{detail}</b>'
            f'{"" if sets is None else "<br>set: " + (html.escape(", ".join(sets)) or "(empty)")}'
            f'<br><span class="path">{html.escape(Path(record["path"]).name)}</span>'
            f'<br><span class="sky">{_sky_text(record)}</span></figcaption></figure>')


def _list_command(report_path: Path, name: str) -> str:
    """A command that prints every file of one class with its score, best first."""
    return (f"python -c \"import sys; from pathlib import Path; from report import read_report; "
            f"rows = [r for r in read_report(Path('{report_path}'))[1] if r['class'] == '{name}']; "
            f"[print(r['score'], r['path']) for r in sorted(rows, key=lambda r: -r['score'])]\"")


def add_command(commands: Any) -> None:
    """Register ``review`` on an ``add_subparsers()`` object."""
    parser = commands.add_parser("review", help="an HTML page to look at a report's results")
    parser.add_argument("report", type=Path, help="a JSON or JSONL report")
    parser.add_argument("--html", type=Path, required=True, help="the page to write (one self-contained file)")
    parser.add_argument("--per-gallery", "--per_gallery", type=int, default=DEFAULT_PER_GALLERY,
                        help="files shown per class and in the review queue (half best, half worst scores)")
    parser.add_argument("--workers", type=int, default=None, help="thumbnail threads (default: CPUs)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    parser.set_defaults(handler=cmd_review)


def cmd_review(args: Any) -> int:
    try:
        states = write_review(args.report, args.html.absolute(), args.per_gallery, args.workers)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {args.report} -> {args.html}: {exc}", file=sys.stderr)
        return 4
    print(f"wrote {args.html}: " + ", ".join(f"{n} {state}" for state, n in sorted(states.items())))
    return 0


def render_page(meta: dict[str, Any], records: list[dict[str, Any]], report_path: Path,
                per_gallery: int = DEFAULT_PER_GALLERY, workers: int | None = None) -> str:
    """The whole page as one HTML string (thumbnails embedded)."""
    galleries, queue, failed = _groups(records)
    shown = {name: _shown(items, per_gallery) for name, items in sorted(galleries.items())}
    queue_shown, queue_left = _shown(queue, per_gallery)
    wanted = [r["path"] for items, _ in shown.values() for r in items] + [r["path"] for r in queue_shown]
    with ThreadPoolExecutor(workers or data_loader.available_cpus(), thread_name_prefix="thumbnail") as pool:
        images = dict(zip(wanted, pool.map(thumbnail, wanted)))
    counts = {name: len(items) for name, items in sorted(galleries.items())}
    counts_with_states = {**counts, UNKNOWN: len(queue), "failed": len(failed)}
    histograms = {html.escape(name): _histogram([r["score"] for r in items]) for name, items in sorted(galleries.items())}
    if queue:
        histograms[UNKNOWN] = _histogram([r["score"] for r in queue])
    labelled = sum(counts.values())
    coverage = labelled / (labelled + len(queue)) if labelled + len(queue) else None
    sections = []
    for name, (items, left) in shown.items():
        more = f'<p class="more">{left} more not shown: <code>{html.escape(_list_command(report_path, name))}</code></p>' \
            if left else ""
        cards = "".join(_card(r, images.get(r["path"]), "classified") for r in items)
        sections.append(f'<section class="gallery" data-class="{html.escape(name)}"><h2>{html.escape(name)} '
                        f'({counts[name]})</h2><div class="cards">{cards}</div>{more}</section>')
    queue_html = "".join(_card(r, images.get(r["path"]), "abstained") for r in queue_shown)
    failed_rows = "".join(f'<tr data-state="failed"><td>{html.escape(r["path"])}</td>'
                          f'<td>{html.escape(r["error"])}</td></tr>' for r in failed)
    class_buttons = "".join(f'<button data-filter-class="{html.escape(n)}">{html.escape(n)}</button>' for n in counts)
    summary = {"total": len(records), "classified": labelled, "abstained": len(queue), "failed": len(failed),
               "coverage": coverage, "histograms": histograms}
    return _PAGE.format(
        title=html.escape(f"Review: {report_path.name}"), report=html.escape(str(report_path)),
        model=html.escape(str(meta.get("model", {}).get("path", ""))), total=len(records), labelled=labelled,
        abstained=len(queue), failed=len(failed), coverage="n/a" if coverage is None else f"{coverage:.1%}",
        bars=_bars(counts_with_states), class_buttons=class_buttons, galleries="".join(sections),
        queue=queue_html, queue_more=(f'<p class="more">{queue_left} more abstained files not shown.</p>'
                                      if queue_left else ""),
        failed_rows=failed_rows, summary_json=json.dumps(summary).replace("</", "<\\/"))


def write_review(report_path: Path, output: Path, per_gallery: int = DEFAULT_PER_GALLERY,
                 workers: int | None = None) -> dict[str, int]:
    """Render ``report_path`` into ``output`` atomically; returns the counts it shows."""
    meta, records = read_report(report_path)
    records = list(records)
    page = render_page(meta, records, report_path, per_gallery, workers)
    with AtomicWriter(output) as handle:
        handle.write(page)
    galleries, queue, failed = _groups(records)
    return {"classified": sum(map(len, galleries.values())), "abstained": len(queue), "failed": len(failed)}


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.4em; margin: 0 0 .3em; }} h2 {{ font-size: 1.15em; margin: 1.2em 0 .4em; }}
.meta {{ color: #555; }} .stats b {{ font-size: 1.2em; }}
.bar {{ display: flex; align-items: center; gap: .5em; margin: 2px 0; max-width: 640px; }}
.bar .label {{ width: 8em; text-align: right; }} .bar .fill {{ height: 14px; background: #3b78c4; display: inline-block; }}
.filters button {{ margin: 2px; padding: 3px 10px; border: 1px solid #888; background: #f4f4f4; cursor: pointer; }}
.filters button.active {{ background: #3b78c4; color: white; border-color: #3b78c4; }}
.cards {{ display: flex; flex-wrap: wrap; gap: 8px; }}
.card {{ margin: 0; width: 132px; font-size: 11px; border: 1px solid #ddd; padding: 2px; background: #fafafa; }}
.card img, .noimg {{ display: block; width: 128px; height: 128px; background: #000; color: #aaa; }}
.card[data-state=abstained] {{ border-color: #d08a00; }}
.path {{ word-break: break-all; color: #444; }} .sky {{ color: #666; }} .more {{ color: #555; }}
.hidden {{ display: none !important; }}
table {{ border-collapse: collapse; }} td {{ border: 1px solid #ddd; padding: 3px 6px; font-size: 12px; }}
svg text {{ font-size: 10px; }}
</style></head><body>
<h1>{title}</h1>
<p class="meta">Report <code>{report}</code>, model <code>{model}</code></p>
<p class="stats"><b>{total}</b> files: <b>{labelled}</b> classified, <b>{abstained}</b> unknown,
<b>{failed}</b> failed; coverage <b>{coverage}</b></p>
<div id="classes">{bars}</div>
<div id="histograms"></div>
<div class="filters">Class: <button data-filter-class="" class="active">all</button>{class_buttons}
&nbsp; State: <button data-filter-state="" class="active">all</button><button data-filter-state="classified">classified</button><button data-filter-state="abstained">unknown</button><button data-filter-state="failed">failed</button></div>
<div id="galleries">{galleries}</div>
<section id="queue" data-state="abstained"><h2>Review queue: abstained ({abstained})</h2><div class="cards">{queue}</div>{queue_more}</section>
<section id="failed" data-state="failed"><h2>Failed files ({failed})</h2><table><tbody>{failed_rows}</tbody></table></section>
<script>
const summary = {summary_json};
const filters = {{cls: "", state: ""}};
function apply() {{
  document.querySelectorAll(".card").forEach(card => {{
    const show = (!filters.cls || card.dataset.class === filters.cls) && (!filters.state || card.dataset.state === filters.state);
    card.classList.toggle("hidden", !show);
  }});
  document.querySelectorAll(".gallery").forEach(g => g.classList.toggle("hidden",
    (filters.cls && g.dataset.class !== filters.cls) || (filters.state && filters.state !== "classified")));
  document.getElementById("queue").classList.toggle("hidden", filters.state && filters.state !== "abstained");
  document.getElementById("failed").classList.toggle("hidden", (filters.state && filters.state !== "failed") || !!filters.cls);
  document.querySelectorAll("[data-filter-class]").forEach(b => b.classList.toggle("active", b.dataset.filterClass === filters.cls));
  document.querySelectorAll("[data-filter-state]").forEach(b => b.classList.toggle("active", b.dataset.filterState === filters.state));
  document.body.dataset.visibleCards = document.querySelectorAll(".card:not(.hidden)").length;
}}
document.querySelectorAll("[data-filter-class]").forEach(b => b.onclick = () => {{ filters.cls = b.dataset.filterClass; apply(); }});
document.querySelectorAll("[data-filter-state]").forEach(b => b.onclick = () => {{ filters.state = b.dataset.filterState; apply(); }});
const params = new URLSearchParams(location.hash.slice(1));
filters.cls = params.get("class") || ""; filters.state = params.get("state") || "";
function histogram(name, counts) {{
  const top = Math.max(1, ...counts), w = 14, h = 50;
  const bars = counts.map((n, i) => `<rect x="${{i * w}}" y="${{h - h * n / top}}" width="${{w - 2}}" height="${{h * n / top}}" fill="#3b78c4"><title>${{(i / 10).toFixed(1)}}-${{((i + 1) / 10).toFixed(1)}}: ${{n}}</title></rect>`).join("");
  return `<figure style="display:inline-block;margin:0 1em 0 0"><svg width="${{counts.length * w}}" height="${{h + 12}}">${{bars}}<text x="0" y="${{h + 11}}">0</text><text x="${{counts.length * w - 8}}" y="${{h + 11}}">1</text></svg><figcaption>${{name}} scores</figcaption></figure>`;
}}
document.getElementById("histograms").innerHTML = Object.entries(summary.histograms).map(([n, c]) => histogram(n, c)).join("");
apply();
</script>
</body></html>
"""
