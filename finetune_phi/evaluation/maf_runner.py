"""Runs the Microsoft Agent Framework twins (flows/chat-maf, flows/eval-maf) the way `pf` runs the flows.

    pf flow test --flow flows/chat ...          python -m finetune_phi.evaluation.maf_runner test --flow flows/chat-maf ...
    pf run create --flow flows/chat ...         python -m finetune_phi.evaluation.maf_runner run --flow flows/chat-maf ...
    pf run create --flow flows/eval --run X     python -m finetune_phi.evaluation.maf_runner run --flow flows/eval-maf --run X
    pf run show-metrics --name X                python -m finetune_phi.evaluation.maf_runner show-metrics --name X
    pf flow serve --source flows/chat           python -m finetune_phi.evaluation.maf_runner serve --flow flows/chat-maf
    finetune-phi compare ...                    finetune-phi compare --runner maf ...

agent-framework needs opentelemetry-api>=1.39 and promptflow 1.18.5 breaks above 1.38 (pyproject pins
~=1.38.0), so the twins live in a venv of their own (`make maf` -> .venv-maf, the project installed
there without its dependencies). Run these commands with .venv-maf/bin/python; `finetune-phi compare
--runner maf` in the main venv starts that interpreter itself (FINETUNE_PHI_MAF_PYTHON overrides).

The endpoint comes from FINETUNE_PHI_ENDPOINT_URL (key: FINETUNE_PHI_API_KEY, else the local
endpoint's key file) or else from the Prompt flow connection `finetune-phi connect` made (default
finetune_phi_endpoint; read through the main venv when promptflow is not importable here) — never
from a file in the repo. A run is kept in --runs-dir (default .runs/maf, git-ignored):
<name>/run.json, outputs.jsonl (one line per data row) and, for the eval flow, metrics.json.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .. import project
from ..data.read import read_jsonl
from ..errors import UserError
from ..serving.client import EndpointError, check_question
from ..serving.connection import CONNECTION_NAME
from ..serving.endpoint import Limits
from ..serving.keys import KEY_ENV, existing_key
from .judge import Judge
from .metrics import METRICS
from .report import Side

ENDPOINT_URL_ENV = "FINETUNE_PHI_ENDPOINT_URL"
MAF_PYTHON_ENV = "FINETUNE_PHI_MAF_PYTHON"  # an interpreter with agent-framework (default .venv-maf)
PF_PYTHON_ENV = "FINETUNE_PHI_PF_PYTHON"  # an interpreter with promptflow, to read a connection (default .venv)
RUNS = Path(".runs") / "maf"
WORKERS = 4  # rows in flight at once, as a pf batch run's default workers


class MafError(UserError):
    """The twins cannot run (no agent-framework venv, no endpoint settings, a run name taken): one line."""


# ---- where things are -----------------------------------------------------------------------------

def have_agent_framework() -> bool:
    return importlib.util.find_spec("agent_framework") is not None


def maf_python() -> str:
    python = os.environ.get(MAF_PYTHON_ENV) or str(project.root() / ".venv-maf" / "bin" / "python")
    if not Path(python).exists():
        raise MafError(f"no Agent Framework environment at {python}: create it with `make maf` "
                       f"(or point {MAF_PYTHON_ENV} at a python that has agent-framework-core)")
    return python


_flows: dict[Path, object] = {}


def load_flow(flow: str | Path):
    """A twin's workflow module, loaded from its folder as `pf` loads a flow folder."""
    path = Path(flow).resolve()
    if path not in _flows:
        source = path / "workflow.py"
        if not source.exists():
            raise MafError(f"{path} is not an Agent Framework flow: it has no workflow.py")
        spec = importlib.util.spec_from_file_location(f"maf_flow_{path.name.replace('-', '_')}", source)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
        _flows[path] = module
    return _flows[path]


def is_chat(module) -> bool:
    return hasattr(module, "ChatInput")


# ---- the endpoint: the same places `finetune-phi connect` uses, or the environment ----------------

def endpoint(connection: str | None = None, pf=None) -> tuple[str, str]:
    """(endpoint_url, api_key): FINETUNE_PHI_ENDPOINT_URL with FINETUNE_PHI_API_KEY (else the local
    endpoint's key file) unless a connection is named; else the Prompt flow connection."""
    url = os.environ.get(ENDPOINT_URL_ENV)
    if url and not connection:
        return url, _local_key()
    return _connection(connection or CONNECTION_NAME, pf)


def _local_key() -> str:
    found = existing_key()
    if found:
        return found[0]
    raise MafError(f"{ENDPOINT_URL_ENV} is set but no key: set {KEY_ENV}")


def _connection(name: str, pf=None) -> tuple[str, str]:
    if pf is None and importlib.util.find_spec("promptflow") is not None:
        from promptflow.client import PFClient

        pf = PFClient()
    if pf is not None:
        conn = pf.connections.get(name, with_secrets=True, raise_error=False)
        if conn is None:
            raise MafError(f"no Prompt flow connection named {name!r}: create it with `finetune-phi connect`, "
                           f"or set {ENDPOINT_URL_ENV} and FINETUNE_PHI_API_KEY")
        return conn.configs["endpoint_url"], conn.secrets["api_key"]
    # no promptflow here (.venv-maf): the main venv reads pf's store; the key comes back over a pipe
    python = os.environ.get(PF_PYTHON_ENV) or str(project.root() / ".venv" / "bin" / "python")
    if not Path(python).exists():
        raise MafError(f"no endpoint: set {ENDPOINT_URL_ENV} and FINETUNE_PHI_API_KEY (promptflow is not "
                       f"installed here to read the connection {name!r}, nor at {python}: point {PF_PYTHON_ENV} "
                       "at the main venv's python)")
    done = subprocess.run([python, "-m", "finetune_phi.evaluation.maf_runner", "_connection", name],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:  # our one-line error, not pf's telemetry chatter around it
        ours = [line for line in done.stderr.splitlines() if "_connection: error: " in line]
        raise MafError(ours[-1].split(": error: ", 1)[1] if ours else f"reading the connection {name!r} with "
                       f"{python} failed: {done.stderr.strip()[-500:]}")
    got = json.loads(done.stdout)
    return got["endpoint_url"], got["api_key"]


# ---- runs: the twin of `pf run create` and `pf run show-metrics` ------------------------------------

def _read_rows(data: str | Path) -> list[dict]:
    return read_jsonl(Path(data))


def _run_dir(runs_dir: str | Path, name: str, resume: bool = False) -> Path:
    out = Path(runs_dir) / name
    if (out / "run.json").exists() and not resume:
        raise MafError(f"a run named {name!r} already exists in {runs_dir}; pick another --name")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_run(out: Path, record: dict, outputs: list[dict], metrics: dict | None = None):
    (out / "outputs.jsonl").write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in outputs))
    if metrics is not None:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "run.json").write_text(json.dumps(record, indent=2))  # last: its presence means complete


def read_run(runs_dir: str | Path, name: str) -> tuple[dict, list[dict], dict | None]:
    out = Path(runs_dir) / name
    if not (out / "run.json").exists():
        raise MafError(f"no run named {name!r} in {runs_dir}")
    outputs = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines() if line.strip()]
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else None
    return json.loads((out / "run.json").read_text()), outputs, metrics


LINES = "lines.jsonl"  # a chat run's lines as they finish (appended), so a run killed half way can be resumed


def _answered(out: Path) -> dict[int, dict]:
    """The lines of a chat run (finished or cut short) that have an answer, by line number."""
    found = {}
    if (out / LINES).exists():
        for line in (out / LINES).read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # the last line of a run killed mid-write
                continue
            if record.get("answer") is not None:
                found[record["line_number"]] = record
    return found


async def _chat_rows(rows: list[dict], todo: list[int], deployment: str, endpoint_url: str, api_key: str,
                     workers: int, temperature: float, max_tokens: int, record) -> list[dict]:
    flow = load_flow(project.flow("chat-maf"))
    gate = asyncio.Semaphore(workers)

    async def one(i: int) -> dict:
        row = rows[i]
        async with gate:  # a workflow instance runs one input at a time: one per row
            try:
                result = await flow.create_workflow(endpoint_url, api_key).run(
                    flow.ChatInput(row["question"], row.get("chat_history") or [], deployment, temperature, max_tokens))
                outcome = {"line_number": i, "answer": result.get_outputs()[0]}
            except Exception as e:  # the line fails, the run goes on (as in a pf batch run)
                outcome = {"line_number": i, "answer": None, "error": f"{type(e).__name__}: {e}"}
        record(outcome)
        return outcome

    return list(await asyncio.gather(*(one(i) for i in todo)))


def run_chat(data: str | Path, name: str, deployment: str = "", runs_dir: str | Path = RUNS,
             endpoint_url: str | None = None, api_key: str | None = None, connection: str | None = None,
             workers: int = WORKERS, temperature: float = 0.7, max_tokens: int = 0, resume: bool = False) -> dict:
    """flows/chat-maf over every row of data (question, chat_history); failed lines are recorded, not raised.
    resume=True continues the run `name`: only lines without an answer are asked again."""
    if endpoint_url is None or api_key is None:
        endpoint_url, api_key = endpoint(connection)
    rows = _read_rows(data)
    out = _run_dir(runs_dir, name, resume)
    kept = _answered(out) if resume else {}
    todo = [i for i in range(len(rows)) if i not in kept]
    t = time.time()
    with (out / LINES).open("a" if resume else "w", encoding="utf-8") as lines:
        def record(outcome: dict):
            lines.write(json.dumps(outcome, ensure_ascii=False) + "\n")
            lines.flush()

        asked = asyncio.run(_chat_rows(rows, todo, deployment, endpoint_url, api_key, workers, temperature, max_tokens,
                                       record))
    outputs = sorted([*kept.values(), *asked], key=lambda o: o["line_number"])
    record = {"name": name, "flow": str(project.flow("chat-maf")), "data": str(Path(data).resolve()), "deployment": deployment,
              "temperature": temperature, "max_tokens": max_tokens, "lines": len(rows), "asked": len(todo),
              "failed": sum(o["answer"] is None for o in outputs), "seconds": round(time.time() - t, 3), "status": "Completed"}
    _write_run(out, record, outputs)
    return record


def run_eval(data: str | Path, name: str, run: str | None = None, runs_dir: str | Path = RUNS) -> dict:
    """flows/eval-maf over data (question, ground_truth) with answers from the chat run `run` (its failed
    lines left out, as `pf run create --run` does) or from data's own `answer` column."""
    flow = load_flow(project.flow("eval-maf"))
    rows = _read_rows(data)
    if run is not None:
        answers = {o["line_number"]: o["answer"] for o in read_run(runs_dir, run)[1] if o["answer"] is not None}
    else:
        answers = {i: row.get("answer") for i, row in enumerate(rows)}
    numbers = sorted(answers)
    out = _run_dir(runs_dir, name, resume=True)  # scoring again replaces an eval run's files
    t = time.time()
    batch = [flow.EvalRow(answers[i], rows[i].get("ground_truth") or "", rows[i].get("question") or "") for i in numbers]
    result = asyncio.run(flow.create_workflow().run(batch)).get_outputs()[0]
    outputs = [{"line_number": i, **line} for i, line in zip(numbers, result["lines"])]
    record = {"name": name, "flow": str(project.flow("eval-maf")), "data": str(Path(data).resolve()), "run": run,
              "lines": len(outputs), "seconds": round(time.time() - t, 3), "status": "Completed"}
    _write_run(out, record, outputs, result["metrics"])
    return record


def show_metrics(name: str, runs_dir: str | Path = RUNS) -> dict:
    metrics = read_run(runs_dir, name)[2]
    if metrics is None:
        raise MafError(f"run {name!r} logged no metrics (only an eval flow run does)")
    return metrics


# ---- compare --runner maf ----------------------------------------------------------------------------

def compare_side(pf, data: Path, config, role: str, label: str, runs_dir: Path, state):
    """One side of `finetune-phi compare` through the twins; the same Side the Prompt flow runner builds.
    A run that exists (a comparison being resumed) is continued: only lines without an answer are asked."""
    chat_run, eval_run = config.run_name("chat", role), config.run_name("eval", role)
    resume = (Path(runs_dir) / chat_run).exists()
    runs = state.runs(role)
    runs["chat"], runs["eval"] = [str(Path(runs_dir) / chat_run)], str(Path(runs_dir) / eval_run)
    state.save()
    endpoint_url, api_key = endpoint(config.connection(role), pf)
    t = time.time()
    print(f"  maf run {chat_run}: flows/chat-maf over {data} with deployment={config.deployment(role)}"
          + (" (resumed: only lines without an answer)" if resume else ""), flush=True)
    settings = dict(deployment=config.deployment(role), temperature=config.temperature, max_tokens=config.max_tokens or 0,
                    workers=config.workers)
    if have_agent_framework():
        run_chat(data, chat_run, runs_dir=runs_dir, endpoint_url=endpoint_url, api_key=api_key, resume=resume, **settings)
        print(f"  maf run {eval_run}: flows/eval-maf over {chat_run}", flush=True)
        run_eval(data, eval_run, chat_run, runs_dir)
    else:  # the main venv: the twins run in .venv-maf; url and key travel in its environment only
        env = {**os.environ, ENDPOINT_URL_ENV: endpoint_url, "FINETUNE_PHI_API_KEY": api_key}
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()] + (["--resume"] if resume else [])
        done = subprocess.run([maf_python(), "-m", "finetune_phi.evaluation.maf_runner", "side", "--data", str(data),
                               "--chat-run", chat_run, "--eval-run", eval_run, "--runs-dir", str(runs_dir), *flags],
                              env=env, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise MafError(f"the Agent Framework runner failed: {done.stderr.strip()[-2000:]}")
    chat, chat_outputs, _ = read_run(runs_dir, chat_run)
    _, eval_outputs, metrics = read_run(runs_dir, eval_run)
    n = len(chat_outputs)
    answers: list[str | None] = [o["answer"] for o in chat_outputs]
    errors: list[str | None] = [o.get("error") for o in chat_outputs]
    lines: list[dict | None] = [None] * n
    for o in eval_outputs:
        if not o["failed"]:
            lines[o["line_number"]] = {m: float(o[m]) for m in METRICS}
        else:
            errors[o["line_number"]] = "the eval flow could not score it (no reference answer)"
    seconds = state.add_seconds(role, time.time() - t)
    return Side(label, str(Path(runs_dir) / chat_run), str(Path(runs_dir) / eval_run), lines,
                [a if lines[i] else None for i, a in enumerate(answers)], seconds, metrics,
                [None if lines[i] else errors[i] for i in range(n)])


JUDGE_ENV = "FINETUNE_PHI_JUDGE"  # the judge's URL, model and auth headers, for .venv-maf (never written to a file)


def run_judge(data: str | Path, name: str, judge, runs_dir: str | Path = RUNS, workers: int = WORKERS) -> dict:
    """flows/judge-maf over the paired lines of `data` (judge-input.jsonl): per line its judge_pair outputs, or
    an error; the run's metrics are judge.summarize's."""
    flow = load_flow(project.flow("judge-maf"))
    rows = _read_rows(data)
    out = _run_dir(runs_dir, name, resume=True)  # judging again is free: the judge's replies are cached
    t = time.time()
    batch = [flow.JudgeRow(r["question"], r["answer_base"], r["answer_candidate"], r.get("chat_history") or [],
                           r.get("ground_truth") or "", r.get("evaluators") or "") for r in rows]
    result = asyncio.run(flow.create_workflow(judge, workers).run(batch)).get_outputs()[0]
    outputs = [{"line_number": i, "line": r["line"], **line} for i, (r, line) in enumerate(zip(rows, result["lines"]))]
    record = {"name": name, "flow": str(project.flow("judge-maf")), "data": str(Path(data).resolve()),
              "judge": judge.model, "lines": len(outputs), "failed": sum("error" in o for o in outputs),
              "seconds": round(time.time() - t, 3), "status": "Completed"}
    _write_run(out, record, outputs, result["metrics"])
    return record


def judge_side(data: Path, judge, config, runs_dir: Path, state) -> dict[int, dict | None]:
    """compare --runner maf --judge: flows/judge-maf in .venv-maf; line -> judge outputs, or None where the
    judge could not be asked. The same verdicts as the Prompt flow run (the same prompts, client and cache)."""
    name = f"{config.name}_judge"
    state.sides["judge"] = [str(Path(runs_dir) / name)]
    state.save()
    print(f"  maf run {name}: flows/judge-maf ({config.judge}, {judge.model}) over the paired lines, both orders", flush=True)
    if have_agent_framework():
        run_judge(data, name, judge, runs_dir, config.workers)
    else:
        env = {**os.environ, JUDGE_ENV: json.dumps({"url": judge.url, "model": judge.model, "headers": judge.headers,
                                                     "kind": judge.kind})}
        done = subprocess.run([maf_python(), "-m", "finetune_phi.evaluation.maf_runner", "judge", "--data", str(data),
                               "--name", name, "--runs-dir", str(runs_dir), f"--workers={config.workers}"],
                              env=env, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise MafError(f"the Agent Framework judge failed: {done.stderr.strip()[-2000:]}")
    _, outputs, _ = read_run(runs_dir, name)
    return {o["line"]: None if "error" in o else o for o in outputs}


# ---- serve: the twin of `pf flow serve` ----------------------------------------------------------------

def _endpoint_error(error: BaseException):
    """The EndpointError behind an exception the workflow raised (it may wrap what an executor raised)."""
    while error is not None and not isinstance(error, EndpointError):
        error = error.__cause__ or error.__context__
    return error


def serve(flow: str | Path | None = None, host: str = "127.0.0.1", port: int = 8080, connection: str | None = None):
    """POST /score {"question", "chat_history", "deployment"} -> {"answer"}; with `Accept: text/event-stream`
    the answer streams as `data: {"answer": "<piece>"}` events, as `pf flow serve` does. GET /health."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    flow = flow or project.flow("chat-maf")
    module = load_flow(flow)
    if not is_chat(module):
        raise MafError(f"serve takes the chat flow (flows/chat-maf), not {flow}")
    endpoint_url, api_key = endpoint(connection)
    max_body = Limits().max_body_bytes  # the endpoint's own default

    class Handler(BaseHTTPRequestHandler):
        def _json(self, status: int, body: dict):
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):
            if self.path == "/health":
                return self._json(200, {"status": "Healthy"})
            self._json(404, {"error": {"code": "not_found", "message": f"no route {self.path}"}})

        def do_POST(self):
            if self.path != "/score":
                return self._json(404, {"error": {"code": "not_found", "message": f"no route {self.path}"}})
            length = self.headers.get("Content-Length", "")
            if not length.isdigit():  # no length (chunked), "-1", junk: never read to an end that may not come
                self.close_connection = True
                return self._json(411, {"error": {"code": "length_required",
                                                  "message": "a request needs a Content-Length of 0 or more bytes"}})
            if int(length) > max_body:  # refused unread, as the endpoint does
                self.close_connection = True
                return self._json(413, {"error": {"code": "body_too_large",
                                                  "message": f"body has {length} bytes; the limit is {max_body}"}})
            try:
                body = json.loads(self.rfile.read(int(length)) or b"{}")
                chat_input = module.ChatInput(check_question(body.get("question")), body.get("chat_history") or [],
                                              body.get("deployment") or "", float(body.get("temperature", 0.7)),
                                              int(body.get("max_tokens") or 0))
            except (ValueError, KeyError, TypeError, AttributeError, EndpointError) as e:
                return self._json(400, {"error": {"code": "invalid_input",
                                                  "message": f"expected {{\"question\": ..., \"chat_history\": [...]}}: {e}"}})
            streaming = "text/event-stream" in (self.headers.get("Accept") or "")
            started = False
            try:
                if not streaming:
                    result = asyncio.run(module.create_workflow(endpoint_url, api_key).run(chat_input))
                    return self._json(200, {"answer": result.get_outputs()[0]})

                async def stream():
                    nonlocal started
                    async for event in module.create_workflow(endpoint_url, api_key, stream=True).run(chat_input, stream=True):
                        if event.type != "output":
                            continue
                        if not started:  # errors before the first piece still get a JSON error status
                            self.send_response(200)
                            self.send_header("Content-Type", "text/event-stream")
                            self.end_headers()
                            started = True
                        self.wfile.write(f"data: {json.dumps({'answer': event.data})}\n\n".encode())
                        self.wfile.flush()

                asyncio.run(stream())
                if not started:
                    self._json(200, {"answer": ""})
            except Exception as e:  # the endpoint failed: its message names URL and status
                if not started:  # what it refused in this request is the caller's 400; else a bad gateway
                    callers_fault = getattr(_endpoint_error(e), "callers_fault", False)
                    self._json(400 if callers_fault else 502, {"error": {"code": "endpoint_error", "message": str(e)}})

    server = ThreadingHTTPServer((host, port), Handler)
    print(f"serving {flow} at http://{host}:{port}/score (GET /health)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# ---- command line: python -m finetune_phi.evaluation.maf_runner ---------------------------------------------------

def _add_sampling_flags(p):
    p.add_argument("--temperature", type=float, default=0.7, help="chat flow: 0 = greedy (flows/chat-maf's default 0.7)")
    p.add_argument("--max-tokens", type=int, default=0, help="chat flow: longest answer in tokens; 0 = the endpoint's")
    p.add_argument("--resume", action="store_true", help="chat flow: continue the run --name; ask only lines without an answer")


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="python -m finetune_phi.evaluation.maf_runner",
                                description="Run the Agent Framework twins of the chat and eval flows as `pf` runs the flows.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("test", help="one input through a flow (pf flow test)")
    t.add_argument("--flow", default=None, help="flows/chat-maf (default) or flows/eval-maf")
    t.add_argument("--question", default="")
    t.add_argument("--chat-history", default="[]", help="JSON, Prompt flow's shape")
    t.add_argument("--deployment", default="", help="a deployment to pin; empty or * = traffic split")
    t.add_argument("--connection", default=None, help="Prompt flow connection (default finetune_phi_endpoint)")
    t.add_argument("--stream", action="store_true", help="print the answer piece by piece")
    t.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (flows/chat-maf's default 0.7)")
    t.add_argument("--max-tokens", type=int, default=0, help="longest answer in tokens; 0 = the endpoint's")
    t.add_argument("--answer", default="", help="eval flow: the answer to score")
    t.add_argument("--ground-truth", default="", help="eval flow: the reference answer")
    r = sub.add_parser("run", help="a batch run over a jsonl (pf run create [--run])")
    r.add_argument("--flow", required=True, help="flows/chat-maf or flows/eval-maf")
    r.add_argument("--data", required=True, help="rows with question, chat_history, ground_truth (and answer)")
    r.add_argument("--name", required=True, help="the run's name")
    r.add_argument("--run", default=None, help="eval flow: the chat run whose answers to score")
    r.add_argument("--deployment", default="", help="chat flow: a deployment to pin")
    r.add_argument("--connection", default=None, help="chat flow: Prompt flow connection (default finetune_phi_endpoint)")
    r.add_argument("--runs-dir", default=str(RUNS))
    r.add_argument("--workers", type=int, default=WORKERS, help="chat flow: rows in flight at once")
    _add_sampling_flags(r)
    m = sub.add_parser("show-metrics", help="an eval run's metrics (pf run show-metrics)")
    m.add_argument("--name", required=True)
    m.add_argument("--runs-dir", default=str(RUNS))
    s = sub.add_parser("serve", help="the chat flow over HTTP (pf flow serve)")
    s.add_argument("--flow", default=None, help="default: the project's flows/chat-maf")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--connection", default=None)
    c = sub.add_parser("side", help=argparse.SUPPRESS)  # compare --runner maf: a chat run, then an eval run over it
    c.add_argument("--data", required=True)
    c.add_argument("--chat-run", required=True)
    c.add_argument("--eval-run", required=True)
    c.add_argument("--deployment", required=True)
    c.add_argument("--runs-dir", required=True)
    c.add_argument("--workers", type=int, default=WORKERS)
    _add_sampling_flags(c)
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
        url, key = _connection(args.name)
        print(json.dumps({"endpoint_url": url, "api_key": key}))
    elif args.command == "test":
        module = load_flow(args.flow or project.flow("chat-maf"))
        if not is_chat(module):
            result = asyncio.run(module.create_workflow().run([module.EvalRow(args.answer, args.ground_truth, args.question)]))
            print(json.dumps(result.get_outputs()[0]["lines"][0], indent=2))
            return
        url, key = endpoint(args.connection)
        chat_input = module.ChatInput(args.question, json.loads(args.chat_history), args.deployment, args.temperature,
                                      args.max_tokens)
        try:
            if args.stream:
                async def stream():
                    async for event in module.create_workflow(url, key, stream=True).run(chat_input, stream=True):
                        if event.type == "output":
                            print(event.data, end="", flush=True)
                    print()
                asyncio.run(stream())
            else:
                print(json.dumps({"answer": asyncio.run(module.create_workflow(url, key).run(chat_input)).get_outputs()[0]},
                                 ensure_ascii=False))
        except EndpointError as e:
            raise MafError(str(e)) from None
    elif args.command == "run":
        module = load_flow(args.flow or project.flow("chat-maf"))
        if is_chat(module):
            record = run_chat(args.data, args.name, args.deployment, args.runs_dir, connection=args.connection,
                              workers=args.workers, temperature=args.temperature, max_tokens=args.max_tokens,
                              resume=args.resume)
        else:
            record = run_eval(args.data, args.name, args.run, args.runs_dir)
        print(json.dumps(record, indent=2))
    elif args.command == "show-metrics":
        print(json.dumps(show_metrics(args.name, args.runs_dir), indent=4))
    elif args.command == "serve":
        serve(args.flow, args.host, args.port, args.connection)
    elif args.command == "judge":
        run_judge(args.data, args.name, Judge(**json.loads(os.environ[JUDGE_ENV])), args.runs_dir, args.workers)
    elif args.command == "side":
        run_chat(args.data, args.chat_run, args.deployment, args.runs_dir, workers=args.workers,
                 temperature=args.temperature, max_tokens=args.max_tokens, resume=args.resume)
        print(f"  maf run {args.eval_run}: flows/eval-maf over {args.chat_run}", flush=True)
        run_eval(args.data, args.eval_run, args.chat_run, args.runs_dir)


if __name__ == "__main__":
    main()
