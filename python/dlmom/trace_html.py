"""The trace view as one self-contained HTML page (inline CSS, SVG and a few lines of JS; nothing fetched).

Per answer: its facts, the answer's tokens coloured by mode, one SVG with per step the normalised entropy
(latent / preview shading, switch markers), the agreement between experts, bus bytes and merged vs
lead-alone, each step's packet (top tokens) on hover, and the router's scores. Every text from the trace
is escaped (tokens can hold <, &, quotes) and its control characters shown as \\xNN.
"""
from __future__ import annotations

import html
import json
import math

from .cli import printable
from .trace_view import View

W, LEFT, RIGHT = 1000, 84, 12  # the chart's viewBox width and margins
# (top, height) of each panel in the chart's viewBox
MARKS, ENTROPY, AGREEMENT, BUS, MERGED = (2, 16), (22, 130), (168, 50), (234, 50), (300, 14)
HEIGHT = 338
SHADE = {"latent": "#e4d9ff", "preview": "#ffefb8"}
MERGED_FILL = {True: "#59a14f", False: "#e15759", None: "#cccccc"}


def esc(text) -> str:
    """``text`` safe inside HTML text and attribute values."""
    return html.escape(printable(str(text)), quote=True)


def _num(x, lo: float = 0.0, hi: float = 1.0) -> float:
    """A finite number clamped to [lo, hi] (a missing or NaN value draws as lo)."""
    x = float(x) if isinstance(x, (int, float)) else lo
    return lo if math.isnan(x) else min(max(x, lo), hi)


def step_tip(r: dict) -> str:
    """What hovering a step shows: its mode, entropy, agreement, merge, bus bytes, the packet's top tokens."""
    merged = {True: "merged (consensus)", False: "lead expert alone"}.get(r.get("merged"), "merged: not recorded")
    agreement = (f"{_num(r['agreement']):.2f}" if isinstance(r.get("agreement"), (int, float))
                 else "not recorded" + (" (the others deferred)" if "agreement" in r else ""))
    head = (f"step {r['step']} · {r['mode']} · entropy {_num(r.get('entropy')):.3f} · agreement {agreement} · "
            f"{merged} · bus {r.get('bus_bytes', 0)} B")
    top = " · ".join(f"{json.dumps(str(t), ensure_ascii=False)} {float(p):.3f}" for t, p in r.get("top", []))
    lines = [head, f"shown: {json.dumps(r.get('token', ''), ensure_ascii=False)}", f"top: {top or '-'}"]
    if "switch" in r:
        lines.append(f"switch: {r['switch']}")
    return "\n".join(lines)


def _tokens(k: int, trace: list[dict]) -> str:
    spans = []
    for r in trace:
        token = r.get("token", "")
        cls = f"tok m-{r['mode']}" + ("" if token else " empty") + (" sw" if "switch" in r else "")
        spans.append(f'<span class="{cls}" data-k="{k}-{esc(r["step"])}" title="{esc(step_tip(r))}">'
                     f'{esc(token) if token else "∅"}</span>')
    return "".join(spans)


def _runs(trace: list[dict]) -> list[tuple[int, int, str]]:
    """(first index, end index, mode) of each run of equal modes."""
    runs: list[tuple[int, int, str]] = []
    for i, r in enumerate(trace):
        if runs and runs[-1][2] == r["mode"]:
            runs[-1] = (runs[-1][0], i + 1, r["mode"])
        else:
            runs.append((i, i + 1, r["mode"]))
    return runs


def _ticks(n: int) -> int:
    return next((s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if n / s <= 12), 2000)


def _axes(trace: list[dict], x, sw: float, max_bus: int) -> list[str]:
    """Panel frames, gridlines, labels and step ticks."""
    out = []
    for (top, h), label, lo, hi in ((ENTROPY, "entropy", "0", "1"), (AGREEMENT, "agreement", "0", "1"),
                                    (BUS, "bus bytes", "0", f"{max_bus:,}"), (MERGED, "merged", "", "")):
        out.append(f'<rect class="frame" x="{LEFT}" y="{top}" width="{W - LEFT - RIGHT}" height="{h}"/>')
        out.append(f'<text class="lab" x="{LEFT - 6}" y="{top + h / 2 + 4}" text-anchor="end">{label}</text>')
        if hi:
            out.append(f'<text class="val" x="{LEFT - 6}" y="{top + 9}" text-anchor="end">{hi}</text>')
    out.append(f'<line class="grid" x1="{LEFT}" x2="{W - RIGHT}" y1="{ENTROPY[0] + ENTROPY[1] / 2}" '
               f'y2="{ENTROPY[0] + ENTROPY[1] / 2}"/>')
    every = _ticks(len(trace))
    for i, r in enumerate(trace):
        if i % every == 0:
            out.append(f'<text class="val" x="{x(i) + sw / 2:.1f}" y="{HEIGHT - 8}" text-anchor="middle">'
                       f'{esc(r["step"])}</text>')
    out.append(f'<text class="val" x="{LEFT - 6}" y="{HEIGHT - 8}" text-anchor="end">step</text>')
    return out


def _chart(k: int, trace: list[dict]) -> str:
    """One SVG: shading per mode run, entropy line, agreement and bus bars, merged strip, hover targets,
    switch markers on top."""
    n = len(trace)
    sw = (W - LEFT - RIGHT) / n

    def x(i: float) -> float:
        return LEFT + i * sw
    max_bus = max((int(_num(r.get("bus_bytes"), 0, 1e18)) for r in trace), default=0)
    top, bottom = ENTROPY[0], MERGED[0] + MERGED[1]
    out = [f'<rect class="shade m-{m}" x="{x(a):.2f}" y="{top}" width="{(b - a) * sw:.2f}" height="{bottom - top}" '
           f'fill="{SHADE[m]}"/>' for a, b, m in _runs(trace) if m in SHADE]
    out += _axes(trace, x, sw, max_bus)
    (et, eh), (at, ah), (bt, bh), (mt, mh) = ENTROPY, AGREEMENT, BUS, MERGED
    points = " ".join(f"{x(i) + sw / 2:.1f},{et + eh * (1 - _num(r.get('entropy'))):.1f}" for i, r in enumerate(trace))
    out.append(f'<polyline class="entropy" points="{points}"/>')
    if n <= 120:
        out += [f'<circle class="dot m-{r["mode"]}" cx="{x(i) + sw / 2:.1f}" '
                f'cy="{et + eh * (1 - _num(r.get("entropy"))):.1f}" r="2.2"/>' for i, r in enumerate(trace)]
    gap = min(1.0, sw * 0.15)
    for i, r in enumerate(trace):
        a = _num(r.get("agreement")) * ah
        if r.get("agreement") is None:  # the other experts were deferred: a grey tick, no bar
            out.append(f'<rect class="noagree" x="{x(i) + gap:.2f}" y="{at + ah - 2}" width="{sw - 2 * gap:.2f}" '
                       f'height="2"/>')
        b = _num(r.get("bus_bytes"), 0, 1e18) / max_bus * bh if max_bus else 0
        merged = r.get("merged") if isinstance(r.get("merged"), bool) else None
        out.append(f'<rect class="agree" x="{x(i) + gap:.2f}" y="{at + ah - a:.1f}" width="{sw - 2 * gap:.2f}" '
                   f'height="{a:.1f}"/>')
        out.append(f'<rect class="bus" x="{x(i) + gap:.2f}" y="{bt + bh - b:.1f}" width="{sw - 2 * gap:.2f}" '
                   f'height="{b:.1f}"/>')
        out.append(f'<rect class="merge" x="{x(i):.2f}" y="{mt}" width="{sw:.2f}" height="{mh}" '
                   f'fill="{MERGED_FILL[merged]}"/>')
    for i, r in enumerate(trace):  # hover targets over every panel of the step
        out.append(f'<rect class="hit" data-k="{k}-{esc(r["step"])}" x="{x(i):.2f}" y="{top}" width="{sw:.2f}" '
                   f'height="{bottom - top}"><title>{esc(step_tip(r))}</title></rect>')
    for i, r in enumerate(trace):
        if "switch" in r:
            sx = x(i)
            reason = esc(f"switch at step {r['step']}: {r['switch']}")
            out.append(f'<g class="switch"><title>{reason}</title>'
                       f'<line x1="{sx:.2f}" x2="{sx:.2f}" y1="{MARKS[0] + MARKS[1]}" y2="{et + eh}"/>'
                       f'<path d="M{sx - 6:.2f},{MARKS[0]} L{sx + 6:.2f},{MARKS[0]} '
                       f'L{sx:.2f},{MARKS[0] + MARKS[1]} Z"/>'
                       f'</g>')
    return (f'<svg class="chart" viewBox="0 0 {W} {HEIGHT}" role="img" aria-label="step trace">'
            + "".join(out) + "</svg>")


def _facts(v: View) -> list[tuple[str, str]]:
    facts = list(v.facts)
    if v.has_steps:
        t = v.trace
        modes = {m: sum(r["mode"] == m for r in t) for m in ("explicit", "latent", "preview")}
        merged = [r.get("merged") for r in t]
        facts += [("steps", f"{len(t)} ({', '.join(f'{c} {m}' for m, c in modes.items() if c)})"),
                  ("switches", str(sum("switch" in r for r in t))),
                  ("merged / lead alone", f"{merged.count(True)} / {merged.count(False)}"
                   + (f" ({merged.count(None)} not recorded)" if None in merged else "")),
                  ("mean agreement", _mean_agreement(t)),
                  ("bus bytes", f"{sum(int(_num(r.get('bus_bytes'), 0, 1e18)) for r in t):,}")]
    for key, label in (("tokens", "tokens processed"), ("wall_s", "wall s")):
        if isinstance(v.usage.get(key), (int, float)):
            facts.append((label, f"{v.usage[key]:,}" if key == "tokens" else f"{v.usage[key]:.2f}"))
    return facts


def _mean_agreement(trace: list[dict]) -> str:
    """Over the steps that recorded one (None where the gate deferred the other experts)."""
    values = [_num(r["agreement"]) for r in trace if isinstance(r.get("agreement"), (int, float))]
    shown = f"{sum(values) / len(values):.2f}" if values else "-"
    return shown + (f" ({len(trace) - len(values)} steps not recorded)" if len(values) < len(trace) else "")


def _route(route: list[dict]) -> str:
    if not route:
        return '<p class="note">No router scores (one expert, or no preview).</p>'
    rows = "".join(
        f"<tr><td>{esc(r.get('expert', '?'))}</td><td>{_fmt(r.get('bits_per_byte'))}</td>"
        f"<td class=\"{'kept' if r.get('kept') else 'dropped'}\">{'kept' if r.get('kept') else 'dropped'}</td>"
        f"<td>{_fmt(r.get('weight'))}</td></tr>" for r in route)
    scored = esc(route[0].get("scored", "preview"))  # records before route_by existed scored the preview
    return (f'<table class="route"><caption>router: each expert\'s score on the {scored}</caption><tr><th>expert</th>'
            '<th>bits per byte</th><th>kept</th><th>weight</th></tr>' + rows + "</table>")


def _fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else esc(x if x is not None else "-")


def _agents(trace: list[dict]) -> str:
    """A baseline's trace: one collapsible block per agent record."""
    blocks = []
    for i, r in enumerate(trace):
        if not isinstance(r, dict):
            blocks.append(f"<pre>{esc(json.dumps(r, ensure_ascii=False))}</pre>")
            continue
        name = r.get("agent") or next(iter(r), f"record {i + 1}")
        rest = {k: v for k, v in r.items() if k not in ("agent", "prompt", "text")}
        body = "".join(f"<h4>{key}</h4><pre>{esc(r[key])}</pre>" for key in ("prompt", "text") if key in r)
        if rest:
            body += f"<pre>{esc(json.dumps(rest, ensure_ascii=False, indent=1))}</pre>"
        blocks.append(f"<details><summary>{esc(name)}</summary>{body}</details>")
    if not blocks:
        return '<p class="note">No trace recorded.</p>'
    return '<p class="note">No step trace (a baseline): its agents\' records.</p>' + "".join(blocks)


def _section(k: int, v: View) -> str:
    facts = "".join(f"<dt>{esc(a)}</dt><dd>{esc(b)}</dd>" for a, b in _facts(v))
    head = f'<section class="view" id="view-{k}"><h2>{esc(v.title)}</h2><dl>{facts}</dl>'
    if not v.has_steps:
        return head + f"<h3>answer</h3><pre>{esc(v.text)}</pre>{_agents(v.trace)}</section>"
    return (head + f'<h3>answer, token by token</h3><div class="answer">{_tokens(k, v.trace)}</div>'
            f'<details><summary>answer text as returned</summary><pre>{esc(v.text)}</pre></details>'
            f"<h3>per step</h3>{_chart(k, v.trace)}{_route(v.route)}</section>")


def render(views: list[View]) -> str:
    """The page of ``views``."""
    body = "\n".join(_section(k, v) for k, v in enumerate(views))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>dlmom trace</title>'
            f"<style>{CSS}</style></head><body><h1>dlmom trace</h1>{LEGEND}\n{body}\n<script>{JS}</script>"
            f"</body></html>\n")


LEGEND = ('<p class="legend"><span class="tok m-latent">latent step</span> <span class="tok m-explicit">explicit '
          'step</span> <span class="tok m-preview">preview step</span> <span class="sw-key">▼</span> switch (hover '
          'for the reason; in the text a red bar before the token) '
          '<span class="key" style="background:#59a14f"></span> merged (consensus) '
          '<span class="key" style="background:#e15759"></span> lead expert alone (gate) · hover a step or token '
          'for its packet\'s top tokens</p>')

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:16px 24px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:0 0 6px}h3{font-size:13px;margin:12px 0 4px;color:#555}
h4{font-size:12px;margin:6px 0 2px;color:#555}
.view{border:1px solid #ddd;border-radius:6px;padding:12px 16px;margin:14px 0}
dl{display:flex;flex-wrap:wrap;gap:2px 18px;margin:0}dt{color:#777}dd{margin:0 0 0 -12px;font-weight:600}
.answer{white-space:pre-wrap;font:13px/1.7 ui-monospace,monospace;border:1px solid #eee;padding:6px 8px;
 max-height:260px;overflow:auto}
.tok{border-radius:2px;cursor:default}.tok.m-latent{background:#e4d9ff}.tok.m-preview{background:#ffefb8;
 border-bottom:2px dotted #c9a100}.tok.empty{color:#aaa}.tok.sw{box-shadow:inset 2px 0 0 #d62728}
.tok.lit{outline:2px solid #222}
pre{white-space:pre-wrap;word-break:break-word;background:#fafafa;border:1px solid #eee;padding:6px 8px;margin:2px 0;
 max-height:300px;overflow:auto}
.chart{width:100%;height:auto;display:block}
.chart .frame{fill:none;stroke:#bbb}.chart .grid{stroke:#ddd;stroke-dasharray:3 3}
.chart .lab{font-size:12px;fill:#444}.chart .val{font-size:10px;fill:#777}
.chart .entropy{fill:none;stroke:#333;stroke-width:1.4}.chart .dot{fill:#333}.chart .dot.m-latent{fill:#6a3fd1}
.chart .agree{fill:#4c78a8}.chart .noagree{fill:#999}.chart .bus{fill:#f28e2b}
.chart .hit{fill:transparent}.chart .hit.lit,.chart .hit:hover{fill:rgba(0,0,0,.10)}
.chart .switch line{stroke:#d62728;stroke-dasharray:4 2;pointer-events:none}.chart .switch path{fill:#d62728}
table.route{border-collapse:collapse;margin-top:10px;font-size:13px}
.route caption{text-align:left;color:#555;font-weight:600;padding-bottom:2px}
.route td,.route th{border:1px solid #ddd;padding:2px 10px;text-align:right}.route td:first-child{text-align:left}
.route .kept{color:#2a7a2a}.route .dropped{color:#a33}
.note{color:#777;font-size:12px}
.legend{font-size:12px;color:#555}.legend .tok{padding:0 3px}.sw-key{color:#d62728}
.key{display:inline-block;width:10px;height:10px;margin-left:8px;vertical-align:middle}
#tip{position:fixed;display:none;max-width:560px;white-space:pre-wrap;background:#222;color:#fff;
 font:12px/1.4 ui-monospace,monospace;padding:6px 8px;border-radius:4px;pointer-events:none;z-index:9}
"""

# Native tooltips (title, SVG <title>) without JS; with it, one tooltip that shows at once and follows the
# mouse, and hovering a step lights its token and chart column together.
JS = """
(function () {
  var tip = document.createElement('div'); tip.id = 'tip'; document.body.appendChild(tip);
  document.querySelectorAll('[title]').forEach(function (el) {
    el.setAttribute('data-tip', el.getAttribute('title')); el.removeAttribute('title');
  });
  document.querySelectorAll('svg title').forEach(function (t) {
    t.parentNode.setAttribute('data-tip', t.textContent); t.parentNode.removeChild(t);
  });
  var lit = [];
  function light(k) {
    lit.forEach(function (e) { e.classList.remove('lit'); });
    lit = k ? Array.prototype.slice.call(document.querySelectorAll('[data-k="' + k + '"]')) : [];
    lit.forEach(function (e) { e.classList.add('lit'); });
  }
  document.addEventListener('mouseover', function (ev) {
    var el = ev.target.closest ? ev.target.closest('[data-tip]') : null;
    if (!el) { tip.style.display = 'none'; light(null); return; }
    tip.textContent = el.getAttribute('data-tip'); tip.style.display = 'block'; light(el.getAttribute('data-k'));
  });
  document.addEventListener('mousemove', function (ev) {
    var x = ev.clientX + 14, y = ev.clientY + 14;
    if (x + tip.offsetWidth > window.innerWidth) x = Math.max(0, ev.clientX - tip.offsetWidth - 14);
    if (y + tip.offsetHeight > window.innerHeight) y = Math.max(0, ev.clientY - tip.offsetHeight - 14);
    tip.style.left = x + 'px'; tip.style.top = y + 'px';
  });
  document.body.setAttribute('data-view', 'ready');
})();
"""
