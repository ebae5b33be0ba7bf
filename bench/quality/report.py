"""The report: a table on the terminal, report.json (everything), report.md (the tables and
what the numbers mean) and quality.png (TTFA and WER per model) when several models ran."""
from __future__ import annotations

import json
from pathlib import Path

from bench.latency import machine  # noqa: F401  (re-exported: the one description of the machine)

NOISE = ("RANDOM WEIGHTS: the replies are noise, so every score below measures noise, not the model: "
         "this run only proves the pipeline works end to end")


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def progress(model: str, row: dict) -> None:
    print(f"[{model}] {row['id']}: {row['audio_s']:.1f} s audio, TTFA {_fmt(row['ttfa_ms'], 0)} ms, "
          f"heard {row['transcript'][:60]!r}", flush=True)


def summary_rows(result: dict) -> list[list[str]]:
    rows = []
    for m in result["models"]:
        s, d = m["summary"], m.get("duplex") or {}
        scores = ", ".join(f"{k} {_fmt(v)}" for k, v in s.items() if k in ("keyword_match", "mcq_accuracy", "repeat_wer"))
        rows.append([m["model"] + (f" ({m['random_weights']} random)" if m["random_weights"] else ""), str(s["questions"]),
                     _fmt(s["ttfa_ms_median"], 0), _fmt(s["rtf_median"]), _fmt(s["consistency_wer_mean"]),
                     _fmt(s["mos_ovrl_mean"]), scores or "-", _fmt(d.get("start_latency_s")),
                     _fmt(d.get("barge_in_latency_s"))])
    return rows


HEADER = ["model", "n", "TTFA ms (median)", "RTF (median)", "speech-text WER", "DNSMOS OVRL", "answer scores",
          "duplex start s", "barge-in s"]


def notices(result: dict) -> list[str]:
    lines = [f"{m['model']}: {NOISE}" for m in result["models"] if m["random_weights"]]
    lines.append(f"ASR: {result['asr']}; on the questions themselves its WER is "
                 f"{_fmt(result['asr_check']['wer_mean'])} (a floor for every speech-text WER below)")
    lines.append(f"MOS: {result['mos']}")
    for m in result["models"]:
        if m["errors"]:
            lines.append(f"{m['model']}: {len(m['errors'])} question(s) not scored: "
                         + "; ".join(f"{e['id']} {e['error']}" for e in m["errors"]))
        if not m["text_output"]:
            lines.append(f"{m['model']} is audio-only: no speech-text WER; answers are scored on the ASR transcript")
        d = m.get("duplex") or {}
        for key in ("start_note", "barge_in_note"):
            if d.get(key):
                lines.append(f"{m['model']} duplex: {d[key]}")
    return lines


def print_table(result: dict) -> None:
    rows = [HEADER] + summary_rows(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    print()
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print()
    for line in notices(result):
        print(("!! " if "RANDOM" in line else "   ") + line)


def markdown(result: dict) -> str:
    out = [f"# Quality report, {result['date']}", ""]
    out += [f"> **{m['model']}: {NOISE}.**" for m in result["models"] if m["random_weights"]]
    out += ["", f"Machine: {result['machine']}; torch {result['torch']}; data: {result['data']}.", ""]
    for m in result["models"]:
        out.append(f"- **{m['model']}**: checkpoint {json.dumps(m['checkpoint'])}, device {m['device']}, "
                   f"dtype {m['dtype']}, options {json.dumps(m['options'])}")
    out += ["", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(r) + " |" for r in summary_rows(result)]
    out += [""] + [f"- {line}" for line in notices(result) if "RANDOM" not in line]
    for m in result["models"]:
        out += ["", f"## {m['model']}", "", "| id | task | audio s | TTFA ms | RTF | reply text | ASR transcript "
                "| speech-text WER | DNSMOS OVRL | score |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in m["questions"]:
            score = r["score"]
            out.append(f"| {r['id']} | {r['task']} | {r['audio_s']:.2f} | {_fmt(r['ttfa_ms'], 0)} | {_fmt(r['rtf'])} "
                       f"| {_cell(r['text'])} | {_cell(r['transcript'])} | {_fmt(r['consistency_wer'])} "
                       f"| {_fmt((r['mos'] or {}).get('ovrl'))} "
                       f"| {score['metric'] + ' ' + _fmt(score['value']) if score['metric'] else '-'} |")
        if m.get("duplex"):
            out += ["", "Duplex conversation: " + json.dumps({k: v for k, v in m["duplex"].items() if k != "script"})]
    out += ["", "What the numbers mean and their limits: README.md, section \"Quality\".", ""]
    return "\n".join(out)


def _cell(text: str) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text[:80] + ("…" if len(text) > 80 else "")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = [m["model"] for m in result["models"]]
    ttfa = [m["summary"]["ttfa_ms_median"] or 0 for m in result["models"]]
    wer = [m["summary"]["consistency_wer_mean"] for m in result["models"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.bar(names, ttfa, color="tab:blue")
    a.set_title("TTFA, median (ms)")
    b.bar(names, [w if w is not None else 0 for w in wer], color="tab:orange")
    for i, w in enumerate(wer):
        if w is None:
            b.text(i, 0, "no text", ha="center", va="bottom")
    b.set_title("speech-text WER, mean")
    if any(m["random_weights"] for m in result["models"]):
        fig.suptitle("RANDOM WEIGHTS: noise, not the models' quality", color="red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(result: dict, out: Path) -> list[Path]:
    paths = [out / "report.json", out / "report.md"]
    paths[0].write_text(json.dumps(result, indent=2, ensure_ascii=False))
    paths[1].write_text(markdown(result))
    if len(result["models"]) > 1:
        paths.append(out / "quality.png")
        plot(result, paths[-1])
    return paths
