"""The comparison's statistics and report: paired lines only, per-line deltas with a paired bootstrap interval,
the table, the chart, lines.csv and the Markdown/HTML pages. Both runners (Prompt flow and the Agent Framework
twins) hand it the same Side per model, so they make the same report.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from .metrics import METRICS


@dataclass
class Side:
    label: str  # what the table calls it: the deployment name
    chat_run: str
    eval_run: str
    lines: list[dict | None]  # per data line: metric scores, or None where the line failed
    answers: list[str | None]
    seconds: float
    metrics: dict  # what the eval run logged
    errors: list[str | None] = field(default_factory=list)  # per data line: why it failed (status, message, attempts)

    @property
    def failed(self) -> int:
        return self.lines.count(None)

    @classmethod
    def paired(cls, label, chat_run, eval_run, lines, answers, errors, seconds, metrics) -> Side:
        """A side from a run's lines: a line counts with its scores only; one without scores keeps no answer, and
        keeps its error (why it failed or was not scored), which a scored line does not."""
        return cls(
            label,
            chat_run,
            eval_run,
            lines,
            [a if lines[i] else None for i, a in enumerate(answers)],
            seconds,
            metrics,
            [None if lines[i] else errors[i] for i in range(len(lines))],
        )


UNSCORED = "the eval flow could not score it (no reference answer)"  # an answered line the eval flow failed


def quality_table(results: dict[int, dict | None], names: tuple) -> list[dict]:
    """One row per Azure AI Evaluation evaluator (1-5 scale), like table()'s: over the judged lines where it
    scored both answers; `n` of them, and `unscored` judged lines where the judge's reply gave no score."""
    rows = []
    judged_lines = [r.get("quality") or {} for r in results.values() if r is not None]
    for name in names:
        pairs = [
            (q["base"][name], q["candidate"][name])
            for q in judged_lines
            if q and q["base"].get(name) is not None and q["candidate"].get(name) is not None
        ]
        row = {
            "metric": name,
            "base": None,
            "candidate": None,
            "delta": None,
            "ci_low": None,
            "ci_high": None,
            "scale": "1-5",
            "n": len(pairs),
            "unscored": len(judged_lines) - len(pairs),
        }
        if pairs:
            delta, lo, hi = paired_bootstrap([c - b for b, c in pairs])
            row |= {
                "base": sum(b for b, _ in pairs) / len(pairs),
                "candidate": sum(c for _, c in pairs) / len(pairs),
                "delta": delta,
                "ci_low": lo,
                "ci_high": hi,
            }
        rows.append(row)
    return rows


def paired_bootstrap(deltas, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-line deltas and its percentile bootstrap interval (resampling lines, not sides)."""
    import numpy as np

    d = np.asarray(deltas, dtype=float)
    if d.size == 0:
        return 0.0, 0.0, 0.0
    idx = np.random.default_rng(seed).integers(0, d.size, size=(n_boot, d.size))
    means = d[idx].mean(axis=1)
    alpha = (1 - level) / 2
    return float(d.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def paired_lines(base: Side, cand: Side) -> list[int]:
    """The lines both sides answered and the eval flow scored: the only ones any paired statistic uses."""
    return [i for i, (b, c) in enumerate(zip(base.lines, cand.lines, strict=True)) if b is not None and c is not None]


def table(base: Side, cand: Side) -> list[dict]:
    """One row per metric over the paired lines: base mean, candidate mean, paired delta and its 95%
    interval. A line that failed on either side is left out on both (None everywhere if none is paired)."""
    paired = paired_lines(base, cand)
    rows = []
    for m in METRICS:
        b = [base.lines[i][m] for i in paired]
        c = [cand.lines[i][m] for i in paired]
        if not paired:
            rows.append({"metric": m, "base": None, "candidate": None, "delta": None, "ci_low": None, "ci_high": None})
            continue
        delta, lo, hi = paired_bootstrap([y - x for x, y in zip(b, c, strict=True)])
        rows.append(
            {
                "metric": m,
                "base": sum(b) / len(b),
                "candidate": sum(c) / len(c),
                "delta": delta,
                "ci_low": lo,
                "ci_high": hi,
            }
        )
    return rows


def line_counts(base: Side, cand: Side) -> dict:
    return {
        "total": len(base.lines),
        "paired": len(paired_lines(base, cand)),
        "failed": {base.label: base.failed, cand.label: cand.failed},
    }


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value):
    """A text cell that a spreadsheet would run as a formula (=HYPERLINK(...), +cmd, @SUM, ...) gets a
    leading apostrophe, as OWASP's CSV-injection advice says; other values are left alone."""
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA_START) else value


def per_line_frame(rows: list[dict], base: Side, cand: Side, judge: dict[int, dict | None] | None = None):
    """Every line: question, ground truth, both answers, scores and errors (and the judge's two verdicts and
    reasons). Paired lines first, worst regressions (F1, then ROUGE-L) first; failed lines after them, with
    empty scores on the failed side and no delta."""
    import pandas as pd

    records = []
    for i, row in enumerate(rows):
        paired = base.lines[i] is not None and cand.lines[i] is not None
        rec = {
            "line": i,
            "paired": paired,
            "question": row["question"],
            "ground_truth": row["ground_truth"],
            f"answer_{base.label}": base.answers[i],
            f"answer_{cand.label}": cand.answers[i],
            f"error_{base.label}": base.errors[i] if base.errors else None,
            f"error_{cand.label}": cand.errors[i] if cand.errors else None,
        }
        for m in METRICS:
            b = (base.lines[i] or {}).get(m)
            c = (cand.lines[i] or {}).get(m)
            rec |= {f"{m}_{base.label}": b, f"{m}_{cand.label}": c, f"{m}_delta": c - b if paired else None}
        if judge is not None:  # game 1: the base in slot A; game 2: the candidate in slot A
            verdict = judge.get(i) or {}
            rec |= {
                "judge_outcome": verdict.get("outcome") if i in judge else None,
                "judge_verdict_1": verdict.get("verdict_1"),
                "judge_verdict_2": verdict.get("verdict_2"),
                "judge_reason_1": verdict.get("reason_1"),
                "judge_reason_2": verdict.get("reason_2"),
            }
            for side, label in (("base", base.label), ("candidate", cand.label)):  # Azure AI Evaluation's scores
                for name, value in ((verdict.get("quality") or {}).get(side) or {}).items():
                    rec[f"{name}_{label}"] = value
        records.append({k: spreadsheet_safe(v) for k, v in rec.items()})
    frame = pd.DataFrame(records)
    return frame.sort_values(
        ["paired", "f1_score_delta", "rouge_l_delta", "line"], ascending=[False, True, True, True]
    ).reset_index(drop=True)


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def format_judge(j: dict, cand: Side) -> list[str]:
    if not j["n"]:
        return [
            f"judge {j['model']}: no line judged ({j['parse_failures']} replies without a verdict, {j['failed']} "
            "lines the judge could not answer)"
        ]
    return [
        f"judge {j['model']} (both orders): {cand.label} wins {j['wins']}, loses {j['losses']}, ties {j['ties']} of "
        f"{j['n']} -> win rate {j['win_rate']:.3f}   95% CI [{j['ci_low']:.3f}, {j['ci_high']:.3f}]",
        f"  position consistency {j['position_consistency']:.2f}, first slot wins {j['first_slot_rate']:.2f}, "
        f"length-controlled win rate {j['lc_win_rate']:.3f}, replies without a verdict {j['parse_failures']}, "
        f"lines not judged {j['failed']}",
    ]


def format_table(
    rows: list[dict],
    base: Side,
    cand: Side,
    losses: dict | None,
    loss_error: str | None = None,
    judge: dict | None = None,
) -> str:
    head = f"{'metric':<16}{base.label:>10}{cand.label:>12}{'delta':>10}   95% CI (paired bootstrap)"
    lines = [head, "-" * len(head)]
    for r in rows:
        ci = "" if r["delta"] is None else f"   [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
        if r.get("scale"):  # an Azure AI Evaluation evaluator, asked of the judge
            ci += f"   judge, {r['scale']}, {r['n']} lines" + (f" ({r['unscored']} unscored)" if r["unscored"] else "")
        lines.append(
            f"{r['metric']:<16}{_num(r['base'], '.3f'):>10}{_num(r['candidate'], '.3f'):>12}"
            f"{_num(r['delta'], '+.3f'):>10}{ci}"
        )
    if losses:
        lines.append(
            f"{'held-out loss':<16}{losses['base']:>10.3f}{losses['candidate']:>12.3f}"
            f"{losses['candidate'] - losses['base']:>+10.3f}"
        )
    elif loss_error:
        lines.append(f"held-out loss: not measured ({loss_error})")
    if judge:
        lines += format_judge(judge, cand)
    counts = line_counts(base, cand)
    lines.append(
        f"lines: {counts['paired']} of {counts['total']} paired; failed: {base.label} {base.failed}, "
        f"{cand.label} {cand.failed}"
        + (" (left out on both sides; errors in lines.csv)" if counts["paired"] < counts["total"] else "")
    )
    return "\n".join(lines)


def chart(rows: list[dict], base: Side, cand: Side, path: Path, judge: dict | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the [0, 1] metrics share one axis; with no paired line there is nothing to draw
    shown = [r for r in rows if r["metric"] != "answer_length" and not r.get("scale") and r["delta"] is not None]
    names = [r["metric"] for r in shown]
    x = range(len(shown))
    panels = 3 if judge and judge["n"] else 2
    fig, (ax1, ax2, *ax3) = plt.subplots(
        1, panels, figsize=(11 + 3 * (panels - 2), 4), gridspec_kw={"width_ratios": [4, 4, 1.5][:panels]}
    )
    ax1.bar([i - 0.2 for i in x], [r["base"] for r in shown], 0.4, label=base.label, color="#999999")
    ax1.bar([i + 0.2 for i in x], [r["candidate"] for r in shown], 0.4, label=cand.label, color="#2b6cb0")
    ax1.set_xticks(list(x), names, rotation=20)
    ax1.set_ylim(0, 1)
    ax1.set_title("mean score per metric")
    ax1.legend()
    deltas = [r["delta"] for r in shown]
    err = [[r["delta"] - r["ci_low"] for r in shown], [r["ci_high"] - r["delta"] for r in shown]]
    ax2.bar(list(x), deltas, 0.6, yerr=err, capsize=4, color=["#2f855a" if d >= 0 else "#c53030" for d in deltas])
    ax2.axhline(0, color="black", linewidth=0.8)
    ax2.set_xticks(list(x), names, rotation=20)
    ax2.set_title(f"{cand.label} - {base.label} (95% paired bootstrap CI)")
    if ax3:  # the judge's win rate for the candidate, with its 95% interval; 0.5 = no better, no worse
        (ax,) = ax3
        ax.bar(
            [0],
            [judge["win_rate"]],
            0.5,
            yerr=[[judge["win_rate"] - judge["ci_low"]], [judge["ci_high"] - judge["win_rate"]]],
            capsize=4,
            color="#2b6cb0",
        )
        ax.axhline(0.5, color="black", linewidth=0.8)
        ax.set_ylim(0, 1)
        ax.set_xticks([0], [f"n={judge['n']}"])
        ax.set_title(f"judge: {cand.label} win rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    out: Path,
    name: str,
    rows: list[dict],
    base: Side,
    cand: Side,
    losses: dict | None,
    frame,
    loss_error: str | None = None,
    judge: dict | None = None,
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    text = format_table(rows, base, cand, losses, loss_error, judge)
    paths = {
        "md": out / "compare.md",
        "html": out / "compare.html",
        "png": out / "compare.png",
        "csv": out / "lines.csv",
    }
    frame.to_csv(paths["csv"], index=False)
    chart(rows, base, cand, paths["png"], judge)
    runs = f"chat runs `{base.chat_run}`, `{cand.chat_run}`; eval runs `{base.eval_run}`, `{cand.eval_run}` " + (
        "(`pf run show-details --name ...`)" if "/" not in base.chat_run else "(folders of the maf runner)"
    )
    paths["md"].write_text(
        f"# {name}: {cand.label} vs {base.label}\n\n```\n{text}\n```\n\n{runs}\n\n"
        f"![metrics](compare.png)\n\nPer-line scores: `lines.csv` (paired lines, worst regressions "
        "first; then the failed lines with their errors).\n"
    )
    worst = frame[frame["paired"]].head(10)
    cols = ["question", "ground_truth", f"answer_{base.label}", f"answer_{cand.label}", "f1_score_delta"]
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in cols) + "</tr>" for _, r in worst.iterrows()
    )
    png = base64.b64encode(paths["png"].read_bytes()).decode()
    # everything inline (no scripts, no CDN): the page works offline, unlike `pf run visualize`
    paths["html"].write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}pre{{background:#f4f4f4;padding:1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px;vertical-align:top;font-size:13px}}</style>
</head><body><h1>{html.escape(name)}: {html.escape(cand.label)} vs {html.escape(base.label)}</h1>
<pre>{html.escape(text)}</pre><p>{html.escape(runs)}</p>
<img alt="metrics chart" src="data:image/png;base64,{png}">
<h2>Worst regressions (by token F1)</h2><table><tr>{"".join(f"<th>{html.escape(c)}</th>" for c in cols)}</tr>{cells}</table>
</body></html>
""")
    return paths
