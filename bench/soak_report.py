"""bench/soak.py's verdict: which replies were lost, the hostile requests' outcomes, TTFA, and the
server's memory and file descriptors over the run; written as JSON and Markdown."""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from soak_actions import Outcome


def mark_truncated(outcomes: list[Outcome]) -> None:
    """A completed valid reply shorter than another reply to the same request (same route, question,
    options and token budget) lost its end. This relies on replies being deterministic for a given
    request, as they are with the default greedy decoding (and the tiny model never stops early)."""
    longest: dict[tuple, int] = defaultdict(int)
    for o in outcomes:
        if o.reply_key and not o.lost:
            longest[o.reply_key] = max(longest[o.reply_key], o.audio_bytes)
    for o in outcomes:
        if o.reply_key and not o.lost and o.audio_bytes < longest[o.reply_key]:
            o.lost, o.result = True, "truncated"
            o.detail = f"{o.audio_bytes} of {longest[o.reply_key]} bytes"


def percentile_ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def slope_per_minute(samples: list[dict], key: str) -> float | None:
    """Linear fit over the second half of the run (the first half includes warm-up growth)."""
    points = [(s["t"], s[key]) for s in samples if s.get(key) is not None]
    points = points[len(points) // 2:]
    if len(points) < 3:
        return None
    t, y = np.array(points).T
    return round(float(np.polyfit(t / 60, y, 1)[0]), 3)


def series_summary(samples: list[dict], key: str) -> dict:
    values = [s[key] for s in samples if s.get(key) is not None]
    if not values:
        return {"start": None, "end": None, "max": None}
    return {"start": values[0], "end": values[-1], "max": max(values)}


def summarize(outcomes: list[Outcome], samples: list[dict], meta: dict) -> dict:
    mark_truncated(outcomes)
    by_action: dict[str, Counter] = defaultdict(Counter)
    for o in outcomes:
        by_action[o.action][o.result] += 1
    valid = [o for o in outcomes if o.category == "valid"]
    lost = [o for o in outcomes if o.lost]
    reasons: dict[str, dict] = {}
    for o in lost:
        entry = reasons.setdefault(f"{o.action}: {o.result}", {"count": 0, "example": o.detail})
        entry["count"] += 1
    ttfa = [o.ttfa_s for o in valid if not o.lost and o.ttfa_s is not None]
    rss = {**series_summary(samples, "rss_mib"), "slope_mib_per_min_second_half": slope_per_minute(samples, "rss_mib")}
    return {
        **meta,
        "actions": {name: dict(results) for name, results in sorted(by_action.items())},
        "valid_replies": {"total": len(valid), "completed": sum(not o.lost for o in valid),
                          "lost": sum(o.lost for o in valid),
                          "busy_retries": sum(o.busy_retries for o in valid)},
        "lost": {"total": len(lost), "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1]["count"]))},
        "hostile": dict(Counter(o.result for o in outcomes if o.category == "hostile").most_common()),
        "disconnects": dict(Counter(o.result for o in outcomes if o.category == "disconnect").most_common()),
        "ttfa_ms": {"p50": percentile_ms(ttfa, 50), "p95": percentile_ms(ttfa, 95), "replies": len(ttfa)},
        "rss_mib": rss,
        "open_fds": series_summary(samples, "fds"),
        "health_sessions": series_summary(samples, "sessions"),
        "samples": samples,
    }


def passed(report: dict) -> bool:
    return report["lost"]["total"] == 0 and report["server_alive_at_end"]


def markdown(report: dict) -> str:
    v, rss, fds = report["valid_replies"], report["rss_mib"], report["open_fds"]
    lines = [
        f"# Soak: {report['model']} ({report['weights']}), {report['clients']} clients, {report['minutes']} min",
        "",
        f"{report['date']} · {report['machine']} · device {report['device']} · commit {report['commit']} · "
        f"seed {report['seed']} · `{report['command']}`",
        "",
        f"**{'PASS' if passed(report) else 'FAIL'}**: {v['completed']} of {v['total']} valid replies completed, "
        f"{report['lost']['total']} lost (valid or hostile), server {'up' if report['server_alive_at_end'] else 'DOWN'} "
        f"at the end, {report['sessions_after_run']} sessions left after the run.",
        "",
        "| TTFA p50 / p95 ms | RSS start / end / max MiB | RSS slope, 2nd half | fds start / end / max | busy retries |",
        "|---|---|---|---|---|",
        f"| {report['ttfa_ms']['p50']} / {report['ttfa_ms']['p95']} | {rss['start']} / {rss['end']} / {rss['max']} "
        f"| {rss['slope_mib_per_min_second_half']} MiB/min | {fds['start']} / {fds['end']} / {fds['max']} "
        f"| {v['busy_retries']} |",
        "",
        "## Actions",
        "",
        "| action | outcomes |",
        "|---|---|",
        *(f"| {name} | {', '.join(f'{result}: {n}' for result, n in results.items())} |"
          for name, results in report["actions"].items()),
        "",
        "## Lost replies",
        "",
    ]
    reasons = report["lost"]["reasons"]
    lines += ["| reason | count | example |", "|---|---|---|",
              *(f"| {r} | {e['count']} | {e['example'].replace('|', '/')[:160]} |" for r, e in reasons.items())] if reasons else ["none"]
    lines += ["", "## Hostile requests and disconnects", "",
              "hostile: " + ", ".join(f"{result}: {n}" for result, n in report["hostile"].items()), "",
              "disconnects: " + ", ".join(f"{result}: {n}" for result, n in report["disconnects"].items()), "",
              "## Server over time", "", "| s | RSS MiB | open fds | sessions |", "|---|---|---|---|",
              *(f"| {s['t']} | {s['rss_mib']} | {s['fds']} | {s['sessions']} |" for s in evenly_spaced(report["samples"], 12))]
    return "\n".join(lines) + "\n"


def evenly_spaced(samples: list[dict], count: int) -> list[dict]:
    """About ``count`` samples from first to last, for a table that fits a page."""
    if len(samples) <= count:
        return samples
    step = (len(samples) - 1) / (count - 1)
    return [samples[round(i * step)] for i in range(count)]


def terminal_table(report: dict) -> str:
    """The same verdict, aligned for a terminal."""
    rows = [(name, ", ".join(f"{r}: {n}" for r, n in results.items())) for name, results in report["actions"].items()]
    width = max(len(name) for name, _ in rows) if rows else 0
    v, rss, fds = report["valid_replies"], report["rss_mib"], report["open_fds"]
    out = [f"{name:<{width}}  {results}" for name, results in rows]
    out += ["", f"valid replies: {v['completed']}/{v['total']} completed, lost (all kinds): {report['lost']['total']}",
            f"TTFA p50/p95: {report['ttfa_ms']['p50']} / {report['ttfa_ms']['p95']} ms",
            f"RSS MiB start/end/max: {rss['start']} / {rss['end']} / {rss['max']}, "
            f"slope {rss['slope_mib_per_min_second_half']} MiB/min (2nd half)",
            f"open fds start/end/max: {fds['start']} / {fds['end']} / {fds['max']}",
            f"server alive at end: {report['server_alive_at_end']}, sessions after the run: {report['sessions_after_run']}"]
    out += [f"LOST {reason}: {e['count']}  {e['example'][:120]}" for reason, e in report["lost"]["reasons"].items()]
    return "\n".join(out)


def write(report: dict, stem: Path) -> tuple[Path, Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path
