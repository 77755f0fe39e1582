"""Runs the Microsoft Agent Framework twins the way `pf` runs the flows, on azure-ai-evaluation's `evaluate()`.

    pf flow test --flow flows/chat ...          python -m finetune_phi.evaluation.maf_runner test ...
    pf run create --flow flows/chat ...         python -m finetune_phi.evaluation.maf_runner run --flow flows/chat-maf ...
    pf run create --flow flows/eval --run X     python -m finetune_phi.evaluation.maf_runner run --flow flows/eval-maf --run X
    pf run show-metrics --name X                python -m finetune_phi.evaluation.maf_runner show-metrics --name X
    pf flow serve --source flows/chat           python -m finetune_phi.evaluation.maf_runner serve
    finetune-phi compare ...                    finetune-phi compare --runner maf ...

A run is one `evaluate()` (its own batch engine; no promptflow): flows/chat-maf's workflow as the target, and the
eval twin's evaluator (flows/eval-maf) scoring each answer. What it writes is the run: --runs-dir/<name>/
evaluation_results.json (evaluate()'s rows and metrics), its log, and answers.jsonl, the chat target's answers as
they come, from which a run killed half way resumes. `--azure-ai-project` logs the run to an Azure AI Foundry
project as well. Run these commands with .venv-maf/bin/python (finetune_phi.twins says why).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from .. import project
from ..errors import UserError
from ..serving.client import EndpointError
from ..serving.maf_serve import FLOW_PORT, serve
from ..serving.options import HOST
from ..twins import (
    ENDPOINT_URL_ENV,
    MafError,
    connection_settings,
    endpoint,
    have_agent_framework,
    is_chat,
    load,
    maf_python,
)
from .console import console_to
from .judge import Judge
from .metrics import METRICS, aggregate
from .report import UNSCORED, Side


RUNS = Path(".runs") / "maf"
RESULTS = "evaluation_results.json"  # evaluate()'s output: {"rows": [...], "metrics": {...}}
ANSWERS = "answers.jsonl"  # the chat target's answers, appended as they come
WORKERS = 4  # rows in flight at once, as a pf batch run's default workers
JUDGE_ENV = "FINETUNE_PHI_JUDGE"  # the judge's URL, model and auth headers, for .venv-maf (never written to a file)
PROJECT_ENV = "FINETUNE_PHI_AZURE_AI_PROJECT"  # --azure-ai-project, for .venv-maf


class ChatTarget:
    """evaluate()'s target: flows/chat-maf's workflow for one row -> {"answer", "error"}. A line that fails is an
    answer of None with its error (evaluate() would otherwise stop the whole run). Answers are appended to
    answers.jsonl as they come; a resumed run takes the answered lines from there and asks only the others."""

    def __init__(
        self,
        endpoint_url: str,
        api_key: str,
        deployment: str,
        temperature: float | None,
        max_tokens: int | None,
        answers: Path,
        resume: bool,
    ):
        self.flow, self.url, self.key = load(project.flow("chat-maf")), endpoint_url, api_key
        # the flow's inputs as given; one left as None takes ChatInput's default (flows/chat's)
        given = dict(deployment=deployment, temperature=temperature, max_tokens=max_tokens)
        self.settings = {k: v for k, v in given.items() if v is not None}
        self.known = _answered(answers) if resume else {}
        self.file, self.lock = answers.open("a" if resume else "w", encoding="utf-8"), threading.Lock()

    # evaluate() passes a target the data's columns named by its required parameters
    def __call__(self, question: str, chat_history: list) -> dict:
        key = _line_key(question, chat_history, self.settings)
        if key in self.known:
            return {"answer": self.known[key], "error": None}
        try:
            chat_input = self.flow.ChatInput(question, chat_history or [], **self.settings)
            result = asyncio.run(self.flow.create_workflow(self.url, self.key).run(chat_input))
            outcome = {"answer": result.get_outputs()[0], "error": None}
        except Exception as e:  # the line fails, the run goes on (as in a pf batch run)
            outcome = {"answer": None, "error": f"{type(e).__name__}: {e}"}
        with self.lock:
            self.file.write(json.dumps({"key": key, **outcome}, ensure_ascii=False) + "\n")
            self.file.flush()
        return outcome


def _line_key(question: str, chat_history: list, settings: dict) -> str:
    return hashlib.sha256(json.dumps([question, chat_history, settings], sort_keys=True).encode()).hexdigest()


def _answered(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:  # the last line of a run killed mid-write
            continue
        if record.get("answer") is not None:
            found[record["key"]] = record["answer"]
    return found


def _evaluate(
    out: Path, data: Path, evaluators: dict, mapping: dict, target=None, workers: int = WORKERS
) -> list[dict]:
    """azure-ai-evaluation's evaluate() into `out`, its console lines into out/evaluate.log: evaluate()'s rows."""
    from azure.ai.evaluation import evaluate

    project_settings = json.loads(os.environ.get(PROJECT_ENV) or "null")
    os.environ["PF_WORKER_COUNT"] = str(workers)  # evaluate()'s batch engine reads Prompt flow's variable
    with console_to(out / "evaluate.log"):
        result = evaluate(
            data=str(data),
            target=target,
            evaluators=evaluators,
            evaluation_name=out.name,
            evaluator_config={name: {"column_mapping": mapping} for name in evaluators},
            output_path=str(out / RESULTS),
            azure_ai_project=project_settings,
        )
    return result["rows"]


def _run_dir(runs_dir: str | Path, name: str, resume: bool = False) -> Path:
    out = Path(runs_dir) / name
    if (out / RESULTS).exists() and not resume:
        raise MafError(f"a run named {name!r} already exists in {runs_dir}; pick another --name")
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).unlink(missing_ok=True)  # its presence means complete
    return out


def run_chat(
    data: str | Path,
    name: str,
    deployment: str = "",
    runs_dir: str | Path = RUNS,
    endpoint_url: str | None = None,
    api_key: str | None = None,
    connection: str | None = None,
    workers: int = WORKERS,
    temperature: float | None = None,
    max_tokens: int | None = None,
    resume: bool = False,
) -> dict:
    """flows/chat-maf over every row of data (question, chat_history), each answer scored against its ground_truth
    by flows/eval-maf's evaluator: one evaluate(). Failed lines are recorded, not raised. resume=True continues the
    run `name`: only lines without an answer are asked again."""
    if endpoint_url is None or api_key is None:
        endpoint_url, api_key = endpoint(connection)
    out, t = _run_dir(runs_dir, name, resume), time.time()
    target = ChatTarget(endpoint_url, api_key, deployment, temperature, max_tokens, out / ANSWERS, resume)
    scores = load(project.flow("eval-maf"), "evaluator.py").AnswerScores()
    rows = _evaluate(
        out,
        Path(data),
        {"score": scores},
        {"response": "${target.answer}", "ground_truth": "${data.ground_truth}"},
        target,
        workers,
    )
    return {
        "name": name,
        "lines": len(rows),
        "failed": sum(not isinstance(r.get("outputs.answer"), str) for r in rows),
        "seconds": round(time.time() - t, 3),
        "metrics": show_metrics(name, runs_dir),
    }


def run_eval(data: str | Path, name: str, run: str | None = None, runs_dir: str | Path = RUNS) -> dict:
    """flows/eval-maf's evaluator over data (question, ground_truth) and its `answer` column, or over the answers of
    the chat run `run` (its failed lines left out, as `pf run create --run` does)."""
    out, t = _run_dir(runs_dir, name, resume=True), time.time()  # scoring again replaces an eval run's files
    if run is not None:  # the chat run's answered lines, as data with an answer column
        rows = [
            {k.removeprefix("inputs."): v for k, v in r.items() if k.startswith("inputs.")}
            | {"answer": r["outputs.answer"]}
            for r in read_rows(runs_dir, run)
            if isinstance(r.get("outputs.answer"), str)
        ]
        data = out / "data.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    scores = load(project.flow("eval-maf"), "evaluator.py").AnswerScores()
    rows = _evaluate(
        out, Path(data), {"score": scores}, {"response": "${data.answer}", "ground_truth": "${data.ground_truth}"}
    )
    return {
        "name": name,
        "run": run,
        "lines": len(rows),
        "seconds": round(time.time() - t, 3),
        "metrics": show_metrics(name, runs_dir),
    }


def read_rows(runs_dir: str | Path, name: str) -> list[dict]:
    """evaluate()'s rows of the run `name`, in data order."""
    path = Path(runs_dir) / name / RESULTS
    if not path.exists():
        raise MafError(f"no run named {name!r} in {runs_dir}")
    rows = json.loads(path.read_text(encoding="utf-8"))["rows"]  # with a target, each says its data line
    return sorted(rows, key=lambda r: r["inputs.line_number"]) if rows and "inputs.line_number" in rows[0] else rows


def scores_of(row: dict) -> dict:
    """A row's scores from the eval twin's evaluator (evaluate() names them outputs.score.<metric>)."""
    return {k.removeprefix("outputs.score."): v for k, v in row.items() if k.startswith("outputs.score.")}


def show_metrics(name: str, runs_dir: str | Path = RUNS) -> dict:
    """The eval flow's aggregation over the run's scored lines: what `pf run show-metrics` shows for flows/eval."""
    lines = [scores_of(r) for r in read_rows(runs_dir, name)]
    if not any(lines):
        raise MafError(f"run {name!r} has no scores")
    return aggregate([line for line in lines if line])


# ---- compare --runner maf ----------------------------------------------------------------------------


def compare_side(pf, data: Path, config, role: str, label: str, runs_dir: Path, state):
    """One side of `finetune-phi compare` through the twins; the same Side the Prompt flow runner builds.
    A run that exists (a comparison being resumed) is continued: only lines without an answer are asked."""
    name = config.run_name("chat", role)
    resume = (runs_dir / name / ANSWERS).exists()
    state.runs(role).update(chat=[str(runs_dir / name)], eval=str(runs_dir / name))
    state.save()
    endpoint_url, api_key = endpoint(config.connection(role), pf)
    t = time.time()
    print(
        f"  maf run {name}: evaluate() with flows/chat-maf as the target over {data} with deployment="
        f"{config.deployment(role)}" + (" (resumed: only lines without an answer)" if resume else ""),
        flush=True,
    )
    settings = dict(
        deployment=config.deployment(role),
        temperature=config.temperature,
        max_tokens=config.max_tokens or 0,
        workers=config.workers,
    )
    if have_agent_framework():
        os.environ[PROJECT_ENV] = json.dumps(config.ai_project())
        run_chat(data, name, runs_dir=runs_dir, endpoint_url=endpoint_url, api_key=api_key, resume=resume, **settings)
    else:  # the main venv: the twins run in .venv-maf; url and key travel in its environment only
        env = {**os.environ, ENDPOINT_URL_ENV: endpoint_url, "FINETUNE_PHI_API_KEY": api_key}
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()] + (["--resume"] if resume else [])
        _in_maf_venv(
            [
                "run",
                "--flow",
                str(project.flow("chat-maf")),
                "--data",
                str(data),
                "--name",
                name,
                "--runs-dir",
                str(runs_dir),
                *flags,
            ],
            env,
            config,
        )
    rows = read_rows(runs_dir, name)
    answers = [r["outputs.answer"] if isinstance(r.get("outputs.answer"), str) else None for r in rows]
    errors = [r.get("outputs.error") if isinstance(r.get("outputs.error"), str) else None for r in rows]
    lines: list[dict | None] = [None] * len(rows)
    for i, scores in enumerate(map(scores_of, rows)):
        if answers[i] is None:
            continue
        if scores.get("failed"):
            errors[i] = UNSCORED
        else:
            lines[i] = {m: float(scores[m]) for m in METRICS}
    seconds = state.add_seconds(role, time.time() - t)
    metrics = aggregate([s for s in map(scores_of, rows) if s])
    return Side.paired(label, str(runs_dir / name), str(runs_dir / name), lines, answers, errors, seconds, metrics)


def run_judge(
    data: str | Path, name: str, judge: Judge, runs_dir: str | Path = RUNS, workers: int = WORKERS
) -> list[dict]:
    """flows/judge-maf's evaluator over the paired lines of `data` (judge-input.jsonl): one evaluate()."""
    out = _run_dir(runs_dir, name, resume=True)  # judging again is free: the judge's replies are cached
    evaluator = load(project.flow("judge-maf"), "evaluator.py").PairJudge(judge)
    columns = ("question", "answer_base", "answer_candidate", "chat_history", "ground_truth", "evaluators")
    return _evaluate(out, Path(data), {"judge": evaluator}, {c: f"${{data.{c}}}" for c in columns}, workers=workers)


def judge_side(data: Path, judge: Judge, config, runs_dir: Path, state) -> dict[int, dict | None]:
    """compare --runner maf --judge: line -> judge outputs, or None where the judge could not be asked. The same
    verdicts as the Prompt flow run (the same prompts, client and cache)."""
    name = f"{config.name}_judge"
    state.sides["judge"] = [str(runs_dir / name)]
    state.save()
    print(
        f"  maf run {name}: evaluate() with flows/judge-maf ({config.judge}, {judge.model}) over the paired lines, "
        "both orders",
        flush=True,
    )
    if have_agent_framework():
        os.environ[PROJECT_ENV] = json.dumps(config.ai_project())
        run_judge(data, name, judge, runs_dir, config.workers)
    else:
        env = {
            **os.environ,
            JUDGE_ENV: json.dumps(
                {"url": judge.url, "model": judge.model, "headers": judge.headers, "kind": judge.kind}
            ),
        }
        _in_maf_venv(
            ["judge", "--data", str(data), "--name", name, "--runs-dir", str(runs_dir), f"--workers={config.workers}"],
            env,
            config,
        )
    found = {}
    for row in read_rows(runs_dir, name):
        outputs = {k.removeprefix("outputs.judge."): v for k, v in row.items() if k.startswith("outputs.judge.")}
        found[row["inputs.line"]] = (
            None if isinstance(outputs.get("error"), str) or "verdict_1" not in outputs else outputs
        )
    return found


def _in_maf_venv(args: list[str], env: dict, config):
    """This module's command line in .venv-maf (agent-framework lives there), --azure-ai-project passed on."""
    env = {**env, PROJECT_ENV: json.dumps(config.ai_project())}
    done = subprocess.run(
        [maf_python(), "-m", "finetune_phi.evaluation.maf_runner", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if done.returncode != 0:
        raise MafError(f"the Agent Framework runner failed: {done.stderr.strip()[-2000:]}")


def devui(host: str = HOST, port: int = 8090, connection: str | None = None, deployment: str = ""):
    """flows/chat-maf as a chat agent (the workflow's `as_agent()`: the conversation so far in, the answer out)
    behind Agent Framework's DevUI, whose page keeps the conversation and sends it every turn."""
    from agent_framework_devui import serve as serve_devui

    if host not in (HOST, "localhost"):
        raise MafError("devui serves the chat page without a key: bind it to 127.0.0.1")
    url, key = endpoint(connection)
    agent = (
        load(project.flow("chat-maf"))
        .create_workflow(url, key, deployment=deployment)
        .as_agent(
            name="finetune-phi chat",
            description="the fine-tuned model behind the finetune-phi endpoint (flows/chat-maf)",
        )
    )
    serve_devui(entities=[agent], host=host, port=port, auth_enabled=False)


# ---- command line: python -m finetune_phi.evaluation.maf_runner ---------------------------------------------------


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(
        prog="python -m finetune_phi.evaluation.maf_runner",
        description="Run the Agent Framework twins of the flows as `pf` runs the flows.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("test", help="one input through a twin (pf flow test)")
    t.add_argument("--flow", default=None, help="flows/chat-maf (default) or flows/eval-maf")
    t.add_argument("--question", default="")
    t.add_argument("--chat-history", default="[]", help="JSON, Prompt flow's shape")
    t.add_argument("--stream", action="store_true", help="print the answer piece by piece")
    t.add_argument("--answer", default="", help="eval twin: the answer to score")
    t.add_argument("--ground-truth", default="", help="eval twin: the reference answer")
    r = sub.add_parser("run", help="a batch run over a jsonl (pf run create [--run]): one evaluate()")
    r.add_argument("--flow", required=True, help="flows/chat-maf (answers, scored) or flows/eval-maf (scores)")
    r.add_argument("--data", required=True, help="rows with question, chat_history, ground_truth (and answer)")
    r.add_argument("--name", required=True, help="the run's name")
    r.add_argument("--run", default=None, help="eval twin: the chat run whose answers to score")
    r.add_argument("--runs-dir", default=str(RUNS))
    r.add_argument("--workers", type=int, default=WORKERS, help="rows in flight at once")
    r.add_argument(
        "--resume", action="store_true", help="chat twin: continue the run --name; ask only lines without an answer"
    )
    m = sub.add_parser("show-metrics", help="a run's metrics (pf run show-metrics)")
    m.add_argument("--name", required=True)
    m.add_argument("--runs-dir", default=str(RUNS))
    s = sub.add_parser("serve", help="the chat twin over HTTP (pf flow serve)")
    s.add_argument("--flow", default=None, help="default: the project's flows/chat-maf")
    s.add_argument("--host", default=HOST)
    s.add_argument("--port", type=int, default=FLOW_PORT)
    for q in (t, r, s):
        q.add_argument("--connection", default=None, help="Prompt flow connection (default finetune_phi_endpoint)")
    for q in (t, r):
        q.add_argument("--deployment", default="", help="chat twin: a deployment to pin; empty or * = traffic split")
        q.add_argument(
            "--temperature", type=float, default=None, help="chat twin: 0 = greedy (default: the flow's, 0.7)"
        )
        q.add_argument(
            "--max-tokens",
            type=int,
            default=None,
            help="chat twin: longest answer in tokens (default: the endpoint's)",
        )
    d = sub.add_parser("devui", help="a chat page for the chat twin: Agent Framework's DevUI (pf flow serve's page)")
    d.add_argument("--host", default=HOST, help="loopback only: the page has no key of its own")
    d.add_argument("--port", type=int, default=8090)
    d.add_argument("--connection", default=None, help="Prompt flow connection (default finetune_phi_endpoint)")
    d.add_argument("--deployment", default="", help="the deployment that answers (default: the traffic split)")
    j = sub.add_parser("judge", help=argparse.SUPPRESS)  # compare --runner maf --judge: the judge env var's judge
    j.add_argument("--data", required=True)
    j.add_argument("--name", required=True)
    j.add_argument("--runs-dir", required=True)
    j.add_argument("--workers", type=int, default=WORKERS)
    k = sub.add_parser("_connection", help=argparse.SUPPRESS)  # for .venv-maf: a connection's url and key, on stdout
    k.add_argument("name")
    args = p.parse_args(argv)
    try:
        _dispatch(args)
    except UserError as e:
        print(f"{p.prog} {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


def _dispatch(args):
    if args.command == "_connection":
        url, key = connection_settings(args.name)
        print(json.dumps({"endpoint_url": url, "api_key": key}))
    elif args.command == "test":
        flow = args.flow or project.flow("chat-maf")
        if not is_chat(flow):
            print(
                json.dumps(
                    load(flow, "evaluator.py").AnswerScores()(response=args.answer, ground_truth=args.ground_truth),
                    indent=2,
                )
            )
            return
        module, (url, key) = load(flow), endpoint(args.connection)
        given = dict(deployment=args.deployment, temperature=args.temperature, max_tokens=args.max_tokens)
        chat_input = module.ChatInput(
            args.question, json.loads(args.chat_history), **{k: v for k, v in given.items() if v is not None}
        )
        try:
            if args.stream:

                async def stream():
                    async for event in module.create_workflow(url, key, stream=True).run(chat_input, stream=True):
                        if event.type == "output":
                            print(event.data, end="", flush=True)
                    print()

                asyncio.run(stream())
            else:
                print(
                    json.dumps(
                        {"answer": asyncio.run(module.create_workflow(url, key).run(chat_input)).get_outputs()[0]},
                        ensure_ascii=False,
                    )
                )
        except EndpointError as e:
            raise MafError(str(e)) from None
    elif args.command == "run":
        if is_chat(args.flow):
            record = run_chat(
                args.data,
                args.name,
                args.deployment,
                args.runs_dir,
                connection=args.connection,
                workers=args.workers,
                temperature=args.temperature,
                max_tokens=args.max_tokens,
                resume=args.resume,
            )
        else:
            record = run_eval(args.data, args.name, args.run, args.runs_dir)
        print(json.dumps(record, indent=2))
    elif args.command == "show-metrics":
        print(json.dumps(show_metrics(args.name, args.runs_dir), indent=4))
    elif args.command == "serve":
        serve(args.flow, args.host, args.port, args.connection)
    elif args.command == "devui":
        devui(args.host, args.port, args.connection, args.deployment)
    elif args.command == "judge":
        run_judge(args.data, args.name, Judge(**json.loads(os.environ[JUDGE_ENV])), args.runs_dir, args.workers)


if __name__ == "__main__":
    main()
