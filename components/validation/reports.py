"""The human-readable summaries (Markdown, and self-contained HTML with inline CSS: readable offline, unlike
the GX Data Docs that load their styling from CDNs), rendered from the same report dictionary that is
written as ``validation_report.json``.
"""

from __future__ import annotations

import html
from typing import Any


def _status(ok: bool) -> str:
    return "PASSED" if ok else "FAILED"


def render_markdown(report: dict[str, Any]) -> str:
    """``summary.md``: verdict, why it failed, counts per table, reasons with examples, files."""
    lines = [f"# Data validation: {_status(report['passed'])}", ""]
    lines.append(
        f"Dataset `{report['dataset']}`"
        + (f", features `{report['features']}`" if report.get("features") else "")
        + f"; {report['created_at']}; {report['seconds']:.1f} s; Great Expectations {report['great_expectations_version']}."
    )
    lines.append("")
    if report["failures"]:
        lines += ["## Why it failed", ""]
        lines += [f"- {f}" for f in report["failures"]]
        lines.append("")
    t = report["totals"]
    lines += [
        "## Tables",
        "",
        f"{t['input_rows']} rows read = {t['accepted']} accepted + {t['quarantined']} quarantined.",
        "",
        "| table | source | rows in | accepted | quarantined | bad | status |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, c in report["tables"].items():
        lines.append(
            f"| {name} | `{c['source']}` | {c['input_rows']} | {c['accepted']} | {c['quarantined']} "
            f"| {c['bad_fraction']:.1%} | {_status(c['passed'])} |"
        )
    lines.append("")
    reasons = {n: c for n, c in report["tables"].items() if c["reasons"]}
    if reasons:
        lines += ["## Quarantine reasons", ""]
        for name, c in reasons.items():
            lines += [f"### {name}", "", "| reason | rows | meaning |", "|---|---:|---|"]
            for reason, n in sorted(c["reasons"].items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"| `{reason}` | {n} | {c['descriptions'].get(reason, '')} |")
            examples = report["examples"].get(name, [])
            if examples:
                lines += ["", "Examples: " + ", ".join(f"`{e['row_id']}` ({e['reason']})" for e in examples)]
            lines.append("")
    if report.get("feature_spec"):
        spec = report["feature_spec"]
        lines += ["## Feature spec", "", ", ".join(f"{k} = {v}" for k, v in spec.items()), ""]
    lines += ["## Files", ""]
    for what, path in report["outputs"].items():
        lines.append(f"- {what}: `{path}`")
    lines.append("")
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:70rem;color:#1f2328;padding:0 1rem}
h1 .ok{color:#1a7f37}h1 .bad{color:#cf222e}
table{border-collapse:collapse;margin:.5rem 0 1.2rem}th,td{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:left}
th{background:#f6f8fa}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.fail td{background:#ffebe9}code{background:#f6f8fa;padding:0 .25rem;border-radius:4px}
ul.fail li{color:#cf222e}.meta{color:#57606a}
"""


def render_html(report: dict[str, Any]) -> str:
    """``summary.html``: the same content as the Markdown, one file, no external resources."""
    e = html.escape
    ok = report["passed"]
    out = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Data validation: "
        f"{_status(ok)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Data validation: <span class='{'ok' if ok else 'bad'}'>{_status(ok)}</span></h1>",
        f"<p class='meta'>Dataset <code>{e(report['dataset'])}</code>"
        + (f", features <code>{e(str(report['features']))}</code>" if report.get("features") else "")
        + f"; {e(report['created_at'])}; {report['seconds']:.1f} s; "
        f"Great Expectations {e(report['great_expectations_version'])}</p>",
    ]
    if report["failures"]:
        out.append("<h2>Why it failed</h2><ul class='fail'>")
        out += [f"<li>{e(f)}</li>" for f in report["failures"]]
        out.append("</ul>")
    t = report["totals"]
    out.append(
        f"<h2>Tables</h2><p>{t['input_rows']} rows read = {t['accepted']} accepted + {t['quarantined']} quarantined.</p>"
        "<table><tr><th>table</th><th>source</th><th>rows in</th><th>accepted</th><th>quarantined</th>"
        "<th>bad</th><th>status</th></tr>"
    )
    for name, c in report["tables"].items():
        out.append(
            f"<tr class='{'' if c['passed'] else 'fail'}'><td>{e(name)}</td><td><code>{e(c['source'])}</code></td>"
            f"<td class='n'>{c['input_rows']}</td><td class='n'>{c['accepted']}</td><td class='n'>{c['quarantined']}</td>"
            f"<td class='n'>{c['bad_fraction']:.1%}</td><td>{_status(c['passed'])}</td></tr>"
        )
    out.append("</table>")
    for name, c in report["tables"].items():
        if not c["reasons"]:
            continue
        out.append(f"<h3>{e(name)}</h3><table><tr><th>reason</th><th>rows</th><th>meaning</th></tr>")
        for reason, n in sorted(c["reasons"].items(), key=lambda kv: (-kv[1], kv[0])):
            out.append(
                f"<tr><td><code>{e(reason)}</code></td><td class='n'>{n}</td>"
                f"<td>{e(c['descriptions'].get(reason, ''))}</td></tr>"
            )
        out.append("</table>")
        examples = report["examples"].get(name, [])
        if examples:
            out.append(
                "<p>Examples: "
                + ", ".join(f"<code>{e(str(x['row_id']))}</code> ({e(x['reason'])})" for x in examples)
                + "</p>"
            )
    if report.get("feature_spec"):
        spec = report["feature_spec"]
        out.append("<h2>Feature spec</h2><p>" + e(", ".join(f"{k} = {v}" for k, v in spec.items())) + "</p>")
    out.append("<h2>Files</h2><ul>")
    out += [f"<li>{e(what)}: <code>{e(str(path))}</code></li>" for what, path in report["outputs"].items()]
    out.append("</ul></body></html>\n")
    return "\n".join(out)
