"""`finetune-phi compare`: base vs fine-tuned on the same held-out rows, the Prompt flow way.

For each side it runs the chat flow over eval.jsonl against one deployment (a named `pf` run), then
the eval flow over that run, exactly as a user would with `pf run create`. Comparisons are fair by
construction: both sides decode greedily unless --temperature says otherwise, the flows' client
retries transient endpoint failures (serving.client.RetryPolicy), and only paired lines (answered
on both sides) enter the means, deltas and 95% paired-bootstrap intervals; a line that failed on
either side is counted, kept in lines.csv with its error, and left out on both sides. A comparison
that was killed, or whose endpoint went away, continues with `--resume NAME`: only lines without an
answer are asked again. The report (Markdown, an offline HTML page, a PNG chart, the per-line CSV
with worst regressions first and summary.json) goes to reports/<name>/.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from .. import project
from ..data.read import read_jsonl
from ..errors import UserError
from ..options import check_bounds, setting
from ..serving.client import openai_url
from ..serving.connection import CONNECTION_NAME
from ..training.trainer import heldout_loss
from . import maf_runner
from .console import console_to
from .judge import Judge, JudgeError, summarize
from .metrics import METRICS
from .quality import parse_names
from .report import (
    UNSCORED,
    Side,
    format_table,
    line_counts,
    paired_lines,
    per_line_frame,
    quality_table,
    table,
    write_report,
)
from .watchdog import dies_with_me


DEFAULT_WORKERS = 8  # chat lines in flight per batch run
ROLES = ("base", "candidate")
STATE = "state.json"  # reports/<name>/state.json: the settings and the runs so far, for --resume


class CompareError(UserError):
    """compare cannot start (a deployment the endpoint lacks, an endpoint it cannot reach): one line for the user."""


def endpoint_deployments(endpoint_url: str, api_key: str, timeout: float = 30) -> list[str] | None:
    """The deployment names an endpoint lists at GET /v1/models; None if it has no such route (Azure
    ML's scoring script answers 404 there), so the names cannot be checked up front."""

    url = openai_url(endpoint_url, "/models")
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
        raise CompareError(
            f"cannot reach endpoint {url}: {getattr(e, 'reason', e)}. Is it running? "
            "(start one with `finetune-phi serve`)"
        ) from None
    except (ValueError, KeyError, TypeError):
        return None  # something else answers there: leave the check to the runs


def check_deployments(pf, sides: list[tuple[str, str | None]]):
    """Before any batch run: each (deployment, connection) names a deployment on the endpoint that
    connection points to. Otherwise a misspelt name costs a batch run whose every line fails, and
    ends in Prompt flow's InvalidRunStatusError traceback."""
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
class CompareConfig:
    """Every setting of `finetune-phi compare`: each field is a flag, a key of `compare --config FILE`
    (finetune_phi.options), and what the comparison reads. Saved in reports/<name>/state.json, so that
    `--resume NAME` continues it with the same settings."""

    BOUNDS = {"workers": (1, None), "max_tokens": (1, None)}

    base: str | None = setting(None, "deployment name answering as the base (e.g. base)")
    candidate: str | None = setting(None, "deployment name answering as the fine-tuned model (e.g. ft)")
    data: str = setting("data/eval.jsonl", "eval rows (question, chat_history, ground_truth)")
    name: str | None = setting(None, "prefix of the run names and the report folder (default: compare_<timestamp>)")
    base_model: str | None = setting(None, "model of the base deployment, to report held-out loss too")
    candidate_model: str | None = setting(None, "model of the candidate deployment, for held-out loss")
    test_file: str | None = setting(None, "UltraChat rows for the loss (default: test.jsonl beside --data)")
    base_connection: str | None = setting(None, "pf connection for the base (default finetune_phi_endpoint)")
    candidate_connection: str | None = setting(None, "pf connection for the candidate")
    reports: str = setting("reports", "folder for the report")
    runner: Literal["promptflow", "maf"] = setting(
        "promptflow",
        "promptflow: flows/chat + flows/eval as pf runs; maf: their Microsoft Agent Framework twins "
        "flows/chat-maf + flows/eval-maf (in .venv-maf, made by `make maf`)",
    )
    workers: int = setting(
        DEFAULT_WORKERS, "chat lines in flight per batch run (Prompt flow's PF_WORKER_COUNT for that run)"
    )
    temperature: float = setting(
        0.0, "sampling temperature of both sides; 0 = greedy, so the same compare gives the same table"
    )
    max_tokens: int | None = setting(None, "longest answer in tokens (default: the endpoint's)")
    max_failed: str = setting(
        "5%", "exit non-zero (after writing the report) when a side fails more than this share of lines (5%% or 0.05)"
    )
    judge: str | None = setting(
        None,
        "also judge each paired line in both orders (MT-Bench's pairwise protocol) with the chat model behind "
        "this Prompt flow connection (type open_ai or azure_open_ai)",
        metavar="CONNECTION",
    )
    judge_model: str | None = setting(
        None, "the judge's model (OpenAI; default gpt-4o) or deployment name (Azure OpenAI, required)"
    )
    azure_ai_project: str | None = setting(
        None,
        "with --runner maf: also log each evaluate() run to this Azure AI Foundry project: its endpoint "
        "(https://RESOURCE.services.ai.azure.com/api/projects/PROJECT) or SUBSCRIPTION_ID/RESOURCE_GROUP/PROJECT_NAME",
        metavar="PROJECT",
    )
    judge_evaluators: str = setting(
        "",
        "also score both answers with Azure AI Evaluation's evaluators, asked of the judge model: a comma-separated "
        "list of coherence, fluency, relevance, similarity (1-5, paired CIs)",
        metavar="NAMES",
    )

    def __post_init__(self):
        check_bounds(self)
        try:
            self.judge_evaluators = ",".join(parse_names(self.judge_evaluators))
        except JudgeError as e:
            raise CompareError(f"--judge-evaluators: {e}") from None
        if self.judge_evaluators and not self.judge:
            raise CompareError("--judge-evaluators asks the judge model: give it with --judge CONNECTION")
        if not 0 <= self.temperature <= 2:
            raise CompareError(f"--temperature must be from 0 (greedy) to 2, got {self.temperature}")
        self.max_failed = str(self.max_failed)  # a float in a state.json of an older version
        if not 0 <= self.failed_share <= 1:
            raise CompareError(
                f"--max-failed must be a share of the lines from 0 to 1 (or 0% to 100%), got {self.max_failed}"
            )
        if self.azure_ai_project is not None:
            if self.runner != "maf":
                raise CompareError("--azure-ai-project logs azure-ai-evaluation's evaluate() runs: add --runner maf")
            self.ai_project()  # checked now, not after both sides have run
        if self.runner not in ("promptflow", "maf"):
            raise CompareError(f"--runner must be promptflow or maf, got {self.runner!r}")

    def ai_project(self) -> str | dict | None:
        """--azure-ai-project as evaluate() takes it: a project endpoint URL, or an AzureAIProject dict."""

        text = (self.azure_ai_project or "").strip()
        if not text:
            return None
        url = urlparse(text)
        if (
            url.scheme == "https"
            and url.netloc
            and "/api/projects/" in url.path
            and url.path.split("/api/projects/")[1]
        ):
            return text
        parts = text.split("/")
        if url.scheme or len(parts) != 3 or not all(p.strip() for p in parts):
            raise CompareError(
                f"--azure-ai-project {text!r}: give the project's endpoint (https://RESOURCE.services.ai."
                "azure.com/api/projects/PROJECT) or SUBSCRIPTION_ID/RESOURCE_GROUP/PROJECT_NAME"
            )
        return dict(
            zip(("subscription_id", "resource_group_name", "project_name"), (p.strip() for p in parts), strict=True)
        )

    @property
    def evaluators(self) -> tuple[str, ...]:
        return tuple(n for n in self.judge_evaluators.split(",") if n)

    @property
    def failed_share(self) -> float:
        """--max-failed: '5%' or 0.05."""
        text = self.max_failed.strip()
        try:
            return float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise CompareError(f"--max-failed takes a share of the lines such as 5% or 0.05, got {text!r}") from None

    def deployment(self, role: str) -> str:
        return self.base if role == "base" else self.candidate

    def connection(self, role: str) -> str | None:
        return self.base_connection if role == "base" else self.candidate_connection

    def labels(self) -> tuple[str, str]:
        """What the table calls each side: the deployment names, told apart when they are the same name
        (on two connections)."""
        if self.base != self.candidate:
            return self.base, self.candidate
        return f"{self.base}_base", f"{self.candidate}_candidate"

    def run_name(self, kind: str, role: str) -> str:
        """The pf run names carry the side, so the same deployment name on two connections cannot clash."""
        return f"{self.name}_{kind}_{role}_{self.deployment(role)}"


COMPARE_COMMAND = (CompareConfig,)  # the dataclass behind `finetune-phi compare`


def eval_workers() -> int:
    """Worker processes for an eval run: scoring is CPU work, and each worker first imports the metric
    libraries (azure-ai-evaluation: seconds of CPU), so more workers than cores only add start-up time
    (8 workers on 2 cores: ~20 s for 40 rows; 2 workers: a few seconds)."""
    return max(1, min(os.cpu_count() or 1, DEFAULT_WORKERS))


def chat_run_lines(pf, run: str) -> dict[int, tuple[str | None, str | None]]:
    """line number -> (answer, error) of every line a chat run finished, read from the run's own line
    records (what `pf run show-details` reads): the lines of a run that was killed half way too."""
    from promptflow._sdk.operations._local_storage_operations import (
        LocalStorageOperations,
    )

    found = {}
    for info in LocalStorageOperations(pf.runs.get(run)).load_detail()["flow_runs"]:
        if info.get("status") == "Completed" and isinstance(info.get("output"), dict):
            found[int(info["index"])] = (info["output"].get("answer"), None)
        else:
            error = info.get("error") or {}
            found[int(info["index"])] = (None, error.get("message") or f"line status {info.get('status')}")
    return found


def _pf_run(pf, name: str):
    try:
        return pf.runs.get(name)
    except Exception as e:  # promptflow's RunNotFoundError
        if type(e).__name__ == "RunNotFoundError":
            return None
        raise


@contextmanager
def _resumable(pf, run: str):
    """Prompt flow resumes only a run whose status is Completed; one whose process was killed stays
    Running in pf's store for ever, without the outputs file pf writes at the end. That file is written
    from the lines the run recorded, and while it is resumed from the run is shown as Completed; then
    Canceled (or what it was: Failed)."""
    from promptflow._sdk._orm import RunInfo
    from promptflow._sdk.operations._local_storage_operations import (
        LocalStorageOperations,
    )

    status = pf.runs.get(run).status
    if status == "Completed":
        yield
        return
    # the inputs/outputs files pf writes when a run ends, from the line records the run left
    LocalStorageOperations(pf.runs.get(run)).dump_inputs_and_outputs()
    RunInfo.get(run).update(status="Completed")
    try:
        yield
    finally:
        RunInfo.get(run).update(
            status="Canceled" if status in ("NotStarted", "Preparing", "Running", "CancelRequested") else status
        )


def run_chat(pf, data: Path, config: CompareConfig, role: str, name: str, log: Path, resume_from: str | None = None):
    """The chat flow over data against one side's deployment (`pf run create --flow flows/chat ...`), or
    `--resume-from` an earlier run of it: only the lines that have no answer are asked again.

    The run sends `workers` lines at once (Prompt flow's PF_WORKER_COUNT, set for that run only, as
    `pf run create --environment-variables` does): the endpoint decodes concurrent requests in one
    batch, so more lines in flight finish sooner than Prompt flow's default of 4."""
    from promptflow.entities import Run

    connection = config.connection(role)
    # the same run pf.run() makes, or with resume_from (`pf run create --resume-from`): pf.run() refuses
    # connections and environment variables beside resume_from, and a resumed run would lose the
    # original's --connections, so the run is built whole and submitted
    run = Run(
        flow=str(project.flow("chat")),
        data=str(data),
        name=name,
        resume_from=resume_from,
        column_mapping={
            "question": "${data.question}",
            "chat_history": "${data.chat_history}",
            "deployment": config.deployment(role),
            "temperature": config.temperature,
            "max_tokens": config.max_tokens or 0,
        },
        connections={"chat": {"connection": connection}} if connection else None,
        environment_variables={"PF_WORKER_COUNT": str(config.workers)},
    )
    with console_to(log):
        if resume_from:
            with _resumable(pf, resume_from):
                pf.runs.create_or_update(run)
        else:
            pf.runs.create_or_update(run)


def run_eval(pf, data: Path, chat_run: str, name: str, log: Path):
    """The eval flow over a chat run's answers (`pf run create --flow flows/eval --run CHAT ...`)."""
    with console_to(log):
        pf.run(
            flow=str(project.flow("eval")),
            data=str(data),
            run=chat_run,
            name=name,
            stream=False,
            column_mapping={
                "question": "${data.question}",
                "ground_truth": "${data.ground_truth}",
                "answer": "${run.outputs.answer}",
            },
            environment_variables={"PF_WORKER_COUNT": str(eval_workers())},
        )


def pf_side(
    pf, data: Path, n_rows: int, config: CompareConfig, role: str, label: str, state: State, log: Path
) -> Side:
    """One side through Prompt flow: the chat run (continued from the last one when resuming and lines
    are missing), then the eval run over it. A side whose every line failed gets no eval run (there is
    nothing to score) and the comparison goes on."""
    runs = state.runs(role)
    t = time.time()
    previous = next((r for r in reversed(runs["chat"]) if _pf_run(pf, r) is not None), None)
    done = chat_run_lines(pf, previous) if previous else {}
    missing = [i for i in range(n_rows) if done.get(i, (None, None))[0] is None]
    if previous is None or missing:
        name = config.run_name("chat", role) + (f"_resume{len(runs['chat'])}" if runs["chat"] else "")
        if _pf_run(pf, name) is not None:
            raise CompareError(
                f"a Prompt flow run named {name!r} already exists (an earlier comparison named "
                f"{config.name!r}?): pick another --name, or continue it with --resume {config.name}"
            )
        how = (
            f"resuming {previous} ({len(missing)} of {n_rows} lines to ask again)"
            if previous
            else f"chat flow over {data} with deployment={config.deployment(role)}"
        )
        print(f"  pf run {name}: {how}", flush=True)
        runs["chat"].append(name)
        runs["eval"] = None
        state.save()
        run_chat(pf, data, config, role, name, log, resume_from=previous)
        done = chat_run_lines(pf, name)
    chat_run = runs["chat"][-1]
    seconds = time.time() - t
    answers = [done.get(i, (None, None))[0] for i in range(n_rows)]
    errors = [done.get(i, (None, "no answer recorded"))[1] for i in range(n_rows)]
    lines: list[dict | None] = [None] * n_rows
    metrics = {}
    if any(a is not None for a in answers):
        eval_run = runs["eval"] or config.run_name("eval", role) + chat_run.removeprefix(config.run_name("chat", role))
        existing = _pf_run(pf, eval_run)
        if runs["eval"] is None or existing is None or existing.status != "Completed":
            if existing is not None:  # an eval run cut short: score again under a new name
                eval_run += f"_{time.strftime('%H%M%S')}"
            print(f"  pf run {eval_run}: eval flow over {chat_run}", flush=True)
            runs["eval"] = eval_run
            state.save()
            run_eval(pf, data, chat_run, eval_run, log)
        details = pf.get_details(eval_run, all_results=True)
        for _, row in details.iterrows():
            i = int(row["inputs.line_number"])
            if row.get("outputs.failed") in (False, 0):  # pf writes "(Failed)" for a line that raised
                lines[i] = {m: float(row[f"outputs.{m}"]) for m in METRICS}
            elif answers[i] is not None:
                errors[i] = UNSCORED
        metrics = pf.get_metrics(eval_run)
    else:
        eval_run = ""
        print(f"  {label}: every line failed; no eval run", flush=True)
    seconds = state.add_seconds(role, seconds)
    return Side.paired(label, chat_run, eval_run, lines, answers, errors, seconds, metrics)


class State:
    """reports/<name>/state.json: the settings and each side's runs so far, written atomically as runs
    start, so a comparison killed at any point can be continued with --resume."""

    def __init__(self, path: Path, config: CompareConfig, sides: dict | None = None):
        self.path, self.config = path, config
        self.sides = sides or {role: {"chat": [], "eval": None, "seconds": 0.0} for role in ROLES}

    @classmethod
    def load(cls, path: Path) -> State:
        try:
            raw = json.loads(path.read_text())
            known = {f.name for f in fields(CompareConfig)}
            return cls(path, CompareConfig(**{k: v for k, v in raw["config"].items() if k in known}), raw["sides"])
        except FileNotFoundError:
            raise CompareError(
                f"nothing to resume: {path} does not exist (was the comparison started with another --reports folder?)"
            ) from None
        except (ValueError, KeyError, TypeError) as e:
            raise CompareError(f"{path} is not a comparison's state ({e}); start a new comparison instead") from None

    def runs(self, role: str) -> dict:
        return self.sides[role]

    def add_seconds(self, role: str, seconds: float) -> float:
        self.sides[role]["seconds"] = self.sides[role].get("seconds", 0.0) + seconds
        self.save()
        return self.sides[role]["seconds"]

    def save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"config": asdict(self.config), "sides": self.sides}, indent=2))
        os.replace(tmp, self.path)


JUDGE_OUTPUTS = ("outcome", "verdict_1", "verdict_2", "reason_1", "reason_2", "length_delta", "quality")


def judge_connection(pf, name: str):
    """The judge's Prompt flow connection, checked before any run: it exists and is open_ai or azure_open_ai."""
    conn = pf.connections.get(name, with_secrets=True, raise_error=False)
    if conn is None:
        raise CompareError(
            f"no Prompt flow connection named {name!r} for --judge: create one of type open_ai "
            "(api_key, base_url) or azure_open_ai (api_base, api_key or Entra ID) with `pf connection create`"
        )
    if type(conn).__name__ not in ("OpenAIConnection", "AzureOpenAIConnection"):
        raise CompareError(
            f"--judge {name}: a {type(conn).__name__}; a judge connection is of type open_ai or azure_open_ai"
        )
    return conn


def judge_rows(rows: list[dict], base: Side, cand: Side, evaluators: tuple = ()) -> list[dict]:
    """The judge flow's input: one row per paired line, both answers and the reference beside the question,
    and the Azure AI Evaluation evaluators to score both answers with."""
    return [
        {
            "line": i,
            "question": rows[i]["question"],
            "chat_history": rows[i].get("chat_history") or [],
            "ground_truth": rows[i].get("ground_truth") or "",
            "answer_base": base.answers[i],
            "answer_candidate": cand.answers[i],
            "evaluators": ",".join(evaluators),
        }
        for i in paired_lines(base, cand)
    ]


def pf_judge(pf, config: CompareConfig, data: Path, state: State, log: Path) -> dict[int, dict | None]:
    """flows/judge over the paired lines (`pf run create --flow flows/judge --data ... --connections
    judge.connection=NAME`): line -> its judge outputs, or None where the judge could not be asked. A
    resumed comparison judges again under a new name; the judge's cache makes the lines it judged free."""
    from promptflow.entities import Run

    judged = state.sides.setdefault("judge", [])
    name = f"{config.name}_judge" + (f"_resume{len(judged)}" if judged else "")
    judged.append(name)
    state.save()
    print(
        f"  pf run {name}: judge flow ({config.judge}, {config.judge_model or 'default model'}) over the paired lines, "
        "both orders",
        flush=True,
    )
    run = Run(
        flow=str(project.flow("judge")),
        data=str(data),
        name=name,
        column_mapping={
            "question": "${data.question}",
            "chat_history": "${data.chat_history}",
            "ground_truth": "${data.ground_truth}",
            "answer_base": "${data.answer_base}",
            "answer_candidate": "${data.answer_candidate}",
            "model": config.judge_model or "",
            "evaluators": "${data.evaluators}",
        },
        connections={node: {"connection": config.judge} for node in ("judge", "quality")},
        environment_variables={"PF_WORKER_COUNT": str(config.workers)},
    )
    with console_to(log):
        pf.runs.create_or_update(run)
    lines = [json.loads(line) for line in data.read_text().splitlines()]
    found = {row["line"]: None for row in lines}
    for _, row in pf.get_details(name, all_results=True).iterrows():
        i = lines[int(row["inputs.line_number"])]["line"]
        verdicts = [row.get(f"outputs.verdict_{k}") for k in (1, 2)]
        if isinstance(row.get("outputs.reason_1"), str) and row.get("outputs.reason_1") != "(Failed)":
            found[i] = {k: row.get(f"outputs.{k}") for k in JUDGE_OUTPUTS}
            found[i]["quality"] = found[i]["quality"] if isinstance(found[i]["quality"], dict) else {}
            found[i].update(
                verdict_1=verdicts[0] if verdicts[0] in ("A", "B", "C") else None,
                verdict_2=verdicts[1] if verdicts[1] in ("A", "B", "C") else None,
            )
    return found


def judged(results: dict[int, dict | None], model: str) -> dict:
    """summary.json's `judge` object: judge.summarize over the lines the judge answered, and how many it failed."""
    ok = [r for _, r in sorted(results.items()) if r is not None]
    return {
        **summarize(ok, [float(r["length_delta"]) for r in ok], model),
        "failed": sum(r is None for r in results.values()),
    }


def _run_sides(
    pf, data: Path, rows: list[dict], config: CompareConfig, state: State, out: Path, labels: dict, losses: dict | None
):
    """Both sides' runs, then the held-out loss when the models are given: (base, candidate, losses, loss error)."""
    sides = []
    for role in ROLES:
        if config.runner == "maf":  # same rows, same client and metrics code, same Side: the same table and report
            side = maf_runner.compare_side(pf, data, config, role, labels[role], (out / "maf-runs").resolve(), state)
        else:
            side = pf_side(pf, data, len(rows), config, role, labels[role], state, (out / "pf.log").resolve())
        print(
            f"  {side.label}: {len(rows)} rows in {side.seconds:.1f} s, {side.failed} failed"
            + ("" if config.runner == "maf" else f"; Prompt flow's log: {(out / 'pf.log').resolve()}"),
            flush=True,
        )
        sides.append(side)
    base_side, cand_side = sides

    loss_error = None
    if losses is None and config.base_model and config.candidate_model:
        test_file = config.test_file or str(data.with_name("test.jsonl"))
        print(f"  held-out loss on {test_file}", flush=True)
        try:  # an optional figure: its failure is reported, never a reason to lose both sides' answers
            losses = {
                "base": heldout_loss(config.base_model, test_file),
                "candidate": heldout_loss(config.candidate_model, test_file),
            }
        except Exception as e:
            loss_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            print(f"  held-out loss failed: {loss_error}", flush=True)

    return base_side, cand_side, losses, loss_error


def compare(config: CompareConfig, losses: dict | None = None, resume: bool = False) -> dict:
    """Run both sides, print the table, write the report. `losses` ({"base", "candidate"}) may be passed
    when already known (the demo has them from training) instead of giving the models. resume=True
    continues reports/<config.name>/ with the settings saved there. Raises CompareError after writing
    the report when a side failed more than config.failed_share of its lines."""
    from promptflow.client import PFClient

    state_path = Path(config.reports) / (config.name or "") / STATE
    if resume:
        state = State.load(state_path)
        config = state.config
        print(f"  resuming {config.name}: {config.base} vs {config.candidate} over {config.data}", flush=True)
    else:
        config.name = config.name or f"compare_{time.strftime('%Y%m%d_%H%M%S')}"
        if len(config.name) > 100 or not config.name.replace("_", "").replace("-", "").isalnum():
            raise CompareError(
                f"--name {config.name[:40]!r}...: use at most 100 letters, digits, '_' and '-' "
                "(it names Prompt flow runs and a folder)"
            )
        state_path = Path(config.reports) / config.name / STATE
        if state_path.exists():
            raise CompareError(
                f"a comparison named {config.name!r} exists in {state_path.parent}: continue it with "
                f"`finetune-phi compare --resume {config.name}`, or pick another --name"
            )
        state = State(state_path, config)
    data = Path(config.data).resolve()
    rows = read_jsonl(data)
    if not rows:
        raise CompareError(f"{data} has no rows to compare on")
    for i, row in enumerate(rows, start=1):
        if not {"question", "ground_truth"} <= set(row):
            raise CompareError(
                f"{data}:{i}: an eval row needs 'question' and 'ground_truth' (make one with `finetune-phi data`)"
            )
    pf = PFClient()
    check_deployments(pf, [(config.base, config.base_connection), (config.candidate, config.candidate_connection)])
    judge_client = None
    if config.judge:
        judge_client = Judge.from_connection(judge_connection(pf, config.judge), config.judge_model)
    state.save()
    out = Path(config.reports) / config.name
    labels = dict(zip(ROLES, config.labels(), strict=True))
    judge_results = judge = None
    with dies_with_me():  # pf's workers and the maf runner end with compare, even if it is killed
        base_side, cand_side, losses, loss_error = _run_sides(pf, data, rows, config, state, out, labels, losses)
        if judge_client is not None:
            judge_data = out / "judge-input.jsonl"
            judge_data.write_text(
                "".join(
                    json.dumps(r, ensure_ascii=False) + "\n"
                    for r in judge_rows(rows, base_side, cand_side, config.evaluators)
                ),
                encoding="utf-8",
            )
            if config.runner == "maf":
                judge_results = maf_runner.judge_side(
                    judge_data, judge_client, config, (out / "maf-runs").resolve(), state
                )
            else:
                judge_results = pf_judge(pf, config, judge_data, state, (out / "pf.log").resolve())
            judge = judged(judge_results, judge_client.model)
    sides = [base_side, cand_side]

    result_rows = table(base_side, cand_side)
    if judge_results is not None and config.evaluators:
        result_rows += quality_table(judge_results, config.evaluators)
    frame = per_line_frame(rows, base_side, cand_side, judge_results)
    paths = write_report(out, config.name, result_rows, base_side, cand_side, losses, frame, loss_error, judge)
    print("\n" + format_table(result_rows, base_side, cand_side, losses, loss_error, judge))
    print(f"\nreport: {paths['md']}  {paths['html']}  {paths['png']}  {paths['csv']}")
    summary = {
        "name": config.name,
        "runner": config.runner,
        "temperature": config.temperature,
        "max_tokens": config.max_tokens,
        "rows": result_rows,
        "lines": line_counts(base_side, cand_side),
        "losses": losses,
        "loss_error": loss_error,
        "paths": {k: str(v) for k, v in paths.items()},
        "runs": {
            s.label: {"chat": s.chat_run, "eval": s.eval_run, "seconds": s.seconds, "failed": s.failed} for s in sides
        },
    }
    if judge is not None:
        summary["judge"] = judge
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    too_many = [f"{s.label} {s.failed} of {len(rows)}" for s in sides if s.failed > config.failed_share * len(rows)]
    if too_many:
        raise CompareError(
            f"too many lines failed ({', '.join(too_many)}; --max-failed {config.failed_share:.0%}): the "
            f"report in {out} leaves them out, but says little. Their errors are in lines.csv; "
            f"`finetune-phi compare --resume {config.name}` asks them again"
        )
    return summary
