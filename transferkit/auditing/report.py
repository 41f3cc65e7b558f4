"""The audit's files: duplicates.csv, label_issues.csv, outliers.csv, summary.json and report.html.

report.html is one self-contained page: thumbnails are embedded as base64 JPEG data URIs, the style and the
script that sorts its tables are inline, and nothing is fetched, so it opens offline and can be mailed as it is.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from transferkit.auditing.duplicates import LEAKAGE
from transferkit.runtime.atomic import write_json_atomic, write_text_atomic

THUMBNAIL = 64  # px, the longer side of each embedded thumbnail
IMAGE = "image"  # the heading of a thumbnail column (not sortable)
FILES = ("summary.json", "duplicates.csv", "label_issues.csv", "outliers.csv", "report.html")
_STYLE = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:1em}"
          "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;font-size:13px}img{display:block}"
          "th{background:#eee}.more{color:#666}th button{font:inherit;border:0;background:none;padding:0;"
          "cursor:pointer}th[aria-sort=ascending] button::after{content:' \\25B2'}"
          "th[aria-sort=descending] button::after{content:' \\25BC'}")
# Click (or Enter/Space on) a column's header button to sort its table by it, again to reverse. A column whose every
# cell is a number sorts numerically, any other by text; rows that compare equal keep their order (stable sort).
_SCRIPT = """
function sortBy(button) {
  var th = button.parentNode, table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
  var up = th.getAttribute("aria-sort") !== "ascending";
  table.querySelectorAll("th[aria-sort]").forEach(function (h) { h.removeAttribute("aria-sort"); });
  th.setAttribute("aria-sort", up ? "ascending" : "descending");
  var rows = Array.prototype.slice.call(body.rows);
  var text = function (r) { return r.cells[col].textContent.trim(); };
  var numeric = rows.every(function (r) { return text(r) !== "" && isFinite(text(r)); });
  rows.sort(function (a, b) {
    var d = numeric ? Number(text(a)) - Number(text(b)) : text(a).localeCompare(text(b));
    return up ? d : -d;
  });
  rows.forEach(function (r) { body.appendChild(r); });
}
document.querySelectorAll("th button").forEach(function (b) {
  b.addEventListener("click", function () { sortBy(b); });
});
"""


class Items:
    """The audited images, DATA first then TEST: each one's source, set name and picture (for thumbnails)."""

    def __init__(self, sources: Sequence[str], n_data: int, image: Callable[[int], Image.Image]) -> None:
        self.sources, self.n_data, self.image = list(sources), n_data, image

    def side(self, i: int) -> str:
        return "data" if i < self.n_data else "test"


def write_csvs(out: Path, items: Items, duplicates: list[dict], issues: list[dict], outliers: list[dict]) -> None:
    """The three tables, one row per finding, with the images' sources (paths, or IDX 'file#row')."""
    src = items.sources
    _write_csv(out / "duplicates.csv", ["kind", "scope", "source_a", "set_a", "source_b", "set_b", "similarity"],
               [[p["kind"], p["scope"], src[p["a"]], items.side(p["a"]), src[p["b"]], items.side(p["b"]),
                 p["similarity"]] for p in duplicates])
    _write_csv(out / "label_issues.csv", ["source", "given_label", "suggested_label", "quality"],
               [[src[r["index"]], r["given"], r["suggested"], r["quality"]] for r in issues])
    _write_csv(out / "outliers.csv", ["source", "label", "score", "threshold"],
               [[src[r["index"]], r["label"], r["score"], r["threshold"]] for r in outliers])


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def write_summary(out: Path, summary: dict) -> None:
    write_json_atomic(out / "summary.json", summary)


def write_html(out: Path, items: Items, summary: dict, duplicates: list[dict], issues: list[dict],
               outliers: list[dict], *, max_rows: int) -> None:
    """report.html: leakage, duplicates, label errors, outliers and class counts, at most `max_rows` rows each."""
    thumb = _Thumbnails(items)
    leaks = [p for p in duplicates if p["scope"] == LEAKAGE]
    within = [p for p in duplicates if p["scope"] != LEAKAGE]
    pair_head = [IMAGE + " A", "source A", IMAGE + " B", "source B", "kind", "similarity"]

    def pair_row(p: dict) -> list[str]:
        a, b = p["a"], p["b"]
        return [thumb(a), _text(f"{items.side(a)}: {items.sources[a]}"), thumb(b),
                _text(f"{items.side(b)}: {items.sources[b]}"), _text(p["kind"]), f"{p['similarity']:.4f}"]

    noise = summary["label_issues"].get("noise", {})
    sections = [
        ("Leakage: the same image in DATA and TEST", "duplicates.csv", pair_head, leaks, pair_row),
        ("Duplicates within a set", "duplicates.csv", pair_head, within, pair_row),
        ("Likely label errors", "label_issues.csv", [IMAGE, "source", "given label", "suggested label", "quality"],
         issues, lambda r: [thumb(r["index"]), _text(items.sources[r["index"]]), _text(r["given"]),
                            _text(r["suggested"]), f"{r['quality']:.4f}"]),
        ("Outliers", "outliers.csv", [IMAGE, "source", "label", "score", "threshold"], outliers,
         lambda r: [thumb(r["index"]), _text(items.sources[r["index"]]), _text(r["label"]), f"{r['score']:.4f}",
                    f"{r['threshold']:.4f}"]),
    ]
    body = [f"<h1>transferkit audit</h1><p>{_text(_headline(summary))}</p>"]
    if "estimated_noise_rate" in noise:
        pairs = "; ".join(f"{p['given']} given, {p['true']} true: {100 * p['fraction']:.2f}%"
                          for p in noise["top_pairs"][:5])
        body.append(f"<p>Estimated label noise (confident learning): {100 * noise['estimated_noise_rate']:.2f}% of "
                    f"images{_text('; ' + pairs) if pairs else ''}.</p>")
    for title, csv_name, head, rows, render in sections:
        body.append(_section(title, csv_name, head, rows, render, max_rows))
    balance = summary["class_balance"]
    body.append(_section(f"Class counts (imbalance ratio {balance['imbalance_ratio']})", "summary.json",
                         ["class", "images"], list(balance["counts"].items()),
                         lambda r: [_text(r[0]), str(r[1])], max_rows=len(balance["counts"])))
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>transferkit audit</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(body)}<script>{_SCRIPT}</script></body></html>\n")
    write_text_atomic(out / "report.html", page)


def _headline(summary: dict) -> str:
    d, li, o = summary["duplicates"], summary["label_issues"], summary["outliers"]
    return (f"{summary['n_data']} DATA images" + (f", {summary['n_test']} TEST images" if summary["n_test"] else "")
            + f"; codes {summary['codes']['key']} of {summary['codes']['model']}. {d['leakage']} leaked pair(s), "
            f"{d['within']} duplicate pair(s) within a set, {li['flagged']} likely label error(s), "
            f"{o['flagged']} outlier(s).")


def _section(title: str, csv_name: str, head: list[str], rows: list, render: Callable, max_rows: int) -> str:
    shown = rows[:max_rows]
    more = (f"<p class='more'>{len(rows) - len(shown)} more in {csv_name}.</p>" if len(rows) > len(shown) else "")
    if not rows:
        return f"<h2>{_text(title)}</h2><p>None found.</p>"
    cells = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in render(r)) + "</tr>" for r in shown)
    header = "".join(f"<th>{_text(h)}</th>" if h.split()[0] == IMAGE else  # a thumbnail has nothing to sort by
                     f"<th><button type='button' title='sort'>{_text(h)}</button></th>" for h in head)
    return (f"<h2>{_text(title)} ({len(rows)})</h2><table><thead><tr>{header}</tr></thead><tbody>{cells}</tbody>"
            f"</table>{more}")


def _text(s: object) -> str:
    return html.escape(str(s))


class _Thumbnails:
    """An <img> with each image as an embedded JPEG, made once per image however often it is shown."""

    def __init__(self, items: Items) -> None:
        self.items, self.done = items, {}

    def __call__(self, i: int) -> str:
        if i not in self.done:
            try:
                img = self.items.image(i).convert("RGB")
            except Exception:  # noqa: BLE001 - an image that cannot be shown still has its row
                self.done[i] = "(unreadable)"
                return self.done[i]
            img.thumbnail((THUMBNAIL, THUMBNAIL))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85)
            data = base64.b64encode(buf.getvalue()).decode("ascii")
            self.done[i] = f"<img alt='' width='{img.width}' height='{img.height}' src='data:image/jpeg;base64,{data}'>"
        return self.done[i]
