"""`finetune-phi compare`: base vs fine-tuned on the same held-out rows, the Prompt flow way.

For each side it runs the chat flow over eval.jsonl against one deployment (a named `pf` run), then
the eval flow over that run, exactly as a user would with `pf run create`. Both sides answer the
same rows, so per-line differences are paired: the table gives the mean delta of each metric with
a 95% paired-bootstrap interval. A line whose chat call failed scores 0 on every metric (the user
got no answer) and is counted. The report (Markdown, an offline HTML page, a PNG chart and the
per-line CSV, worst regressions first) goes to reports/<name>/.
"""
from __future__ import annotations

import base64
import html
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import project
from ..errors import UserError
from .metrics import METRICS

DEFAULT_WORKERS = 8  # chat lines in flight per batch run


class CompareError(UserError):
    """compare cannot start (a deployment the endpoint lacks, an endpoint it cannot reach): one line for the user."""


def endpoint_deployments(endpoint_url: str, api_key: str, timeout: float = 30) -> list[str] | None:
    """The deployment names an endpoint lists at GET /v1/models; None if it has no such route (Azure
    ML's scoring script answers 404 there), so the names cannot be checked up front."""
    import urllib.error
    import urllib.request

    from ..serving.client import scoring_url

    url = scoring_url(endpoint_url).removesuffix("/score") + "/v1/models"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return [model["id"] for model in json.loads(response.read())["data"]]
    except urllib.error.HTTPError as e:
        if e.code in (404, 405):
            return None
        hint = " (the connection's api_key is not this endpoint's key)" if e.code == 401 else ""
        raise CompareError(f"GET {url} failed with HTTP {e.code} {e.reason}{hint}") from None
    except (urllib.error.URLError, TimeoutError) as e:
        raise CompareError(f"cannot reach endpoint {url}: {getattr(e, 'reason', e)}. Is it running? "
                           "(start one with `finetune-phi serve`)") from None
    except (ValueError, KeyError, TypeError):
        return None  # something else answers there: leave the check to the runs


def check_deployments(pf, sides: list[tuple[str, str | None]]):
    """Before any batch run: each (deployment, connection) names a deployment on the endpoint that
    connection points to. Otherwise a misspelt name costs a batch run whose every line fails, and
    ends in Prompt flow's InvalidRunStatusError traceback."""
    from ..serving.connection import CONNECTION_NAME

    for deployment, connection in sides:
        name = connection or CONNECTION_NAME  # the chat flow's default connection
        conn = pf.connections.get(name, with_secrets=True, raise_error=False)  # None when there is none
        if conn is None:
            raise CompareError(f"no Prompt flow connection named {name!r}; create it with `finetune-phi connect`")
        url = conn.configs["endpoint_url"]
        have = endpoint_deployments(url, conn.secrets["api_key"])
        if have is not None and deployment not in have:
            raise CompareError(f"no deployment named {deployment!r} on {url}; it has {have}")


@dataclass
class Side:
    label: str  # what the table calls it: the deployment name
    chat_run: str
    eval_run: str
    lines: list[dict | None]  # per data line: metric scores, or None where the chat call failed
    answers: list[str | None]
    seconds: float
    metrics: dict  # what the eval run logged


@contextmanager
def pf_console_quiet(log: Path):
    """Prompt flow's own lines (run submitted, log paths, worker processes started, "terminated" and "had
    been terminated" at the end of every run) go to `log`, not the console, where they would bury the
    lines this command prints. pf writes them to stdout, from its worker processes too, so stdout and
    stderr are redirected at the file-descriptor level (children inherit them) while a run lasts; a
    failed run still raises here."""
    import sys

    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    console = {fd: os.dup(fd) for fd in (1, 2)}
    with log.open("a") as f:
        for fd in console:
            os.dup2(f.fileno(), fd)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            for fd, saved_fd in console.items():
                os.dup2(saved_fd, fd)
                os.close(saved_fd)


def eval_workers() -> int:
    """Worker processes for an eval run: scoring is CPU work, and each worker first imports the metric
    libraries (azure-ai-evaluation: seconds of CPU), so more workers than cores only add start-up time
    (8 workers on 2 cores: ~20 s for 40 rows; 2 workers: a few seconds)."""
    return max(1, min(os.cpu_count() or 1, DEFAULT_WORKERS))


def run_side(pf, data: Path, deployment: str, name: str, connection: str | None,
             workers: int = DEFAULT_WORKERS, log: Path = Path("pf.log")) -> tuple[str, str, float]:
    """The chat run and the eval run over it; returns their names and the chat run's wall time.

    The chat run sends `workers` lines at once (Prompt flow's PF_WORKER_COUNT, set for that run only,
    as `pf run create --environment-variables` does): the endpoint decodes concurrent requests in
    one batch, so more lines in flight finish sooner than Prompt flow's default of 4."""
    chat_run, eval_run = f"{name}_chat_{deployment}", f"{name}_eval_{deployment}"
    t = time.time()
    print(f"  pf run {chat_run}: chat flow over {data} with deployment={deployment}", flush=True)
    with pf_console_quiet(log):
        pf.run(flow=str(project.flow("chat")), data=str(data), name=chat_run, stream=False,
               column_mapping={"question": "${data.question}", "chat_history": "${data.chat_history}",
                               "deployment": deployment},
               connections={"chat": {"connection": connection}} if connection else None,
               environment_variables={"PF_WORKER_COUNT": str(workers)})
    seconds = time.time() - t
    print(f"  pf run {eval_run}: eval flow over {chat_run}", flush=True)
    with pf_console_quiet(log):
        pf.run(flow=str(project.flow("eval")), data=str(data), run=chat_run, name=eval_run, stream=False,
               column_mapping={"question": "${data.question}", "ground_truth": "${data.ground_truth}",
                               "answer": "${run.outputs.answer}"},
               environment_variables={"PF_WORKER_COUNT": str(eval_workers())})
    return chat_run, eval_run, seconds


def collect(pf, label: str, chat_run: str, eval_run: str, n_rows: int, seconds: float) -> Side:
    """Per-line scores from the eval run; lines it lacks are the chat run's failures."""
    details = pf.get_details(eval_run, all_results=True)
    lines: list[dict | None] = [None] * n_rows
    answers: list[str | None] = [None] * n_rows
    for _, row in details.iterrows():
        i = int(row["inputs.line_number"])
        if row.get("outputs.failed") in (False, 0):  # pf writes "(Failed)" for a line that raised
            lines[i] = {m: float(row[f"outputs.{m}"]) for m in METRICS}
            answers[i] = row["inputs.answer"]
    return Side(label, chat_run, eval_run, lines, answers, seconds, pf.get_metrics(eval_run))


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


def table(base: Side, cand: Side) -> list[dict]:
    """One row per metric: base mean, candidate mean, paired delta and its 95% interval (failed = 0)."""
    zero = {m: 0.0 for m in METRICS}
    rows = []
    for m in METRICS:
        b = [(line or zero)[m] for line in base.lines]
        c = [(line or zero)[m] for line in cand.lines]
        delta, lo, hi = paired_bootstrap([y - x for x, y in zip(b, c)])
        rows.append({"metric": m, "base": sum(b) / len(b), "candidate": sum(c) / len(c), "delta": delta,
                     "ci_low": lo, "ci_high": hi})
    return rows


def per_line_frame(rows: list[dict], base: Side, cand: Side):
    """question, ground truth, both answers and scores per line; worst regressions (F1, then ROUGE-L) first."""
    import pandas as pd

    records = []
    for i, row in enumerate(rows):
        rec = {"line": i, "question": row["question"], "ground_truth": row["ground_truth"],
               f"answer_{base.label}": base.answers[i], f"answer_{cand.label}": cand.answers[i]}
        for m in METRICS:
            b = (base.lines[i] or {}).get(m, 0.0)
            c = (cand.lines[i] or {}).get(m, 0.0)
            rec |= {f"{m}_{base.label}": b, f"{m}_{cand.label}": c, f"{m}_delta": c - b}
        records.append(rec)
    return pd.DataFrame(records).sort_values(["f1_score_delta", "rouge_l_delta", "line"]).reset_index(drop=True)


def format_table(rows: list[dict], base: Side, cand: Side, losses: dict | None) -> str:
    head = f"{'metric':<16}{base.label:>10}{cand.label:>12}{'delta':>10}   95% CI (paired bootstrap)"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['metric']:<16}{r['base']:>10.3f}{r['candidate']:>12.3f}{r['delta']:>+10.3f}"
                     f"   [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]")
    if losses:
        lines.append(f"{'held-out loss':<16}{losses['base']:>10.3f}{losses['candidate']:>12.3f}"
                     f"{losses['candidate'] - losses['base']:>+10.3f}")
    n = len(base.lines)
    lines.append(f"lines: {n}; failed (no answer, scored 0): {base.label} {base.lines.count(None)}, "
                 f"{cand.label} {cand.lines.count(None)}")
    return "\n".join(lines)


def chart(rows: list[dict], base: Side, cand: Side, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["metric"] != "answer_length"]  # the [0, 1] metrics share one axis
    names = [r["metric"] for r in shown]
    x = range(len(shown))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, name: str, rows: list[dict], base: Side, cand: Side, losses: dict | None, frame) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    text = format_table(rows, base, cand, losses)
    paths = {"md": out / "compare.md", "html": out / "compare.html", "png": out / "compare.png", "csv": out / "lines.csv"}
    frame.to_csv(paths["csv"], index=False)
    chart(rows, base, cand, paths["png"])
    runs = (f"chat runs `{base.chat_run}`, `{cand.chat_run}`; eval runs `{base.eval_run}`, `{cand.eval_run}` "
            + ("(`pf run show-details --name ...`)" if "/" not in base.chat_run else "(folders of the maf runner)"))
    paths["md"].write_text(f"# {name}: {cand.label} vs {base.label}\n\n```\n{text}\n```\n\n{runs}\n\n"
                           f"![metrics](compare.png)\n\nPer-line scores: `lines.csv` (worst regressions first).\n")
    worst = frame.head(10)
    cols = ["question", "ground_truth", f"answer_{base.label}", f"answer_{cand.label}", "f1_score_delta"]
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in cols) + "</tr>" for _, r in worst.iterrows())
    png = base64.b64encode(paths["png"].read_bytes()).decode()
    # everything inline (no scripts, no CDN): the page works offline, unlike `pf run visualize`
    paths["html"].write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}pre{{background:#f4f4f4;padding:1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px;vertical-align:top;font-size:13px}}</style>
</head><body><h1>{html.escape(name)}: {html.escape(cand.label)} vs {html.escape(base.label)}</h1>
<pre>{html.escape(text)}</pre><p>{html.escape(runs)}</p>
<img alt="metrics chart" src="data:image/png;base64,{png}">
<h2>Worst regressions (by token F1)</h2><table><tr>{''.join(f'<th>{html.escape(c)}</th>' for c in cols)}</tr>{cells}</table>
</body></html>
""")
    return paths


def compare(base: str, candidate: str, data: str | Path = "data/eval.jsonl", name: str | None = None,
            base_model: str | None = None, candidate_model: str | None = None, test_file: str | None = None,
            base_connection: str | None = None, candidate_connection: str | None = None,
            reports: str | Path = "reports", losses: dict | None = None, runner: str = "promptflow",
            workers: int = DEFAULT_WORKERS) -> dict:
    """Run both sides, print the table, write the report. `losses` ({"base", "candidate"}) may be
    passed when already known (the demo has them from training) instead of giving the models.
    runner="maf" runs the Agent Framework twins (flows/chat-maf, flows/eval-maf; see maf_runner) instead."""
    from promptflow.client import PFClient

    from ..data.prepare import read_jsonl

    data = Path(data).resolve()
    rows = read_jsonl(data)
    for i, row in enumerate(rows, start=1):
        if not {"question", "ground_truth"} <= set(row):
            raise CompareError(f"{data}:{i}: an eval row needs 'question' and 'ground_truth' (make one with `finetune-phi data`)")
    name = name or f"compare_{time.strftime('%Y%m%d_%H%M%S')}"
    pf = PFClient()
    check_deployments(pf, [(base, base_connection), (candidate, candidate_connection)])
    sides = []
    for label, connection in ((base, base_connection), (candidate, candidate_connection)):
        if runner == "maf":  # same rows, same client and metrics code, same Side: the same table and report
            from .maf_runner import compare_side

            side = compare_side(pf, data, label, name, connection, (Path(reports) / name / "maf-runs").resolve())
            seconds = side.seconds
        else:
            log = (Path(reports) / name / "pf.log").resolve()
            chat_run, eval_run, seconds = run_side(pf, data, label, name, connection, workers, log)
            side = collect(pf, label, chat_run, eval_run, len(rows), seconds)
        print(f"  {label}: {len(rows)} rows in {seconds:.1f} s ({len(rows) / seconds:.1f} rows/s), "
              f"{side.lines.count(None)} failed" + ("" if runner == "maf" else f"; Prompt flow's log: {log}"), flush=True)
        sides.append(side)
    base_side, cand_side = sides

    if losses is None and base_model and candidate_model:
        from ..training.trainer import heldout_loss

        test_file = test_file or str(data.with_name("test.jsonl"))
        print(f"  held-out loss on {test_file}", flush=True)
        losses = {"base": heldout_loss(base_model, test_file), "candidate": heldout_loss(candidate_model, test_file)}

    result_rows = table(base_side, cand_side)
    frame = per_line_frame(rows, base_side, cand_side)
    paths = write_report(Path(reports) / name, name, result_rows, base_side, cand_side, losses, frame)
    print("\n" + format_table(result_rows, base_side, cand_side, losses))
    print(f"\nreport: {paths['md']}  {paths['html']}  {paths['png']}  {paths['csv']}")
    summary = {"name": name, "runner": runner, "rows": result_rows, "losses": losses, "paths": {k: str(v) for k, v in paths.items()},
               "runs": {s.label: {"chat": s.chat_run, "eval": s.eval_run, "seconds": s.seconds,
                                  "failed": s.lines.count(None)} for s in sides}}
    (Path(reports) / name / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
