"""`finetune-phi demo`: the whole loop offline on a real model, each step printed as it runs.

sample data -> base model (the real SmolLM2-135M-Instruct by default; `tiny` for a one-minute run) -> fine-tune (MLflow run + registered version) -> endpoint serving the base
and the fine-tuned model -> Prompt flow connection -> one chat turn per deployment through the chat
flow (the real `pf` CLI) -> chat + eval flow batch runs over the held-out split for both deployments
-> held-out loss and answer metrics of base vs fine-tuned, and the commands to do it yourself.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from . import project
from .data.prepare import prepare
from .evaluation.compare import CompareConfig, compare
from .modeling import models
from .options import read_settings
from .serving import keys
from .serving.connection import CONNECTION_NAME, connect
from .serving.local import free_port, wait_ready
from .serving.options import PORT
from .training.config import TrainArguments
from .training.trainer import TrainConfig, train


QUESTION = "What is the capital of France?"

# How the demo fine-tunes each kind of base within its budget (2 CPU cores). The tiny model starts
# from random weights and needs many large steps (TrainConfig's defaults for tiny); a real model needs one short
# LoRA epoch to take on the sample's answers: recipes/smollm2-135m-lora.yaml (what `train --config` reads too).
# max_new_tokens caps each answer at the endpoint: the sample's answers are one sentence (6-11 tokens), and a base
# model that rambles on would spend the budget on text that only lowers its scores further. 160 rows (128 to
# train on, 16 LoRA steps; 32 held out) keep the real-model demo within 6 minutes on 2 cores. The tiny run shows
# the mechanics only: 40 held-out rows are enough to compare on.
RECIPES = {
    "tiny": dict(sample_size=400, test_size=0.1, max_new_tokens=48, train=None),
    "real": dict(sample_size=160, test_size=0.2, max_new_tokens=48, train="smollm2-135m-lora.yaml"),
}


def train_settings(recipe: dict) -> dict:
    """The recipe's training settings (its YAML file in recipes/), less the base model (the demo's --base-model)."""
    if recipe["train"] is None:
        return {}
    settings = read_settings(project.root() / "recipes" / recipe["train"], (TrainArguments,))
    settings.pop("base_model", None)
    return settings


class Stages:
    """Prints each step as it starts and keeps how long each took (the demo's budget is in minutes)."""

    def __init__(self, n: int):
        self.n, self.times, self._current, self._start = n, [], None, time.time()

    def step(self, i: int, text: str):
        self._close()
        self._current, self._start = text.split(":")[0], time.time()
        print(f"\n[{i}/{self.n}] {text}", flush=True)

    def _close(self):
        if self._current is not None:
            self.times.append((self._current, time.time() - self._start))
            self._current = None

    def summary(self) -> str:
        self._close()
        return ", ".join(f"{name} {seconds:.0f} s" for name, seconds in self.times)


def pf_chat(question: str, deployment: str) -> str:
    """One chat turn through the chat flow with the real `pf flow test`."""
    pf = Path(sys.executable).with_name("pf")
    cmd = [
        str(pf),
        "flow",
        "test",
        "--flow",
        str(project.flow("chat")),
        "--inputs",
        f"question={question}",
        f"deployment={deployment}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"pf flow test failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    out = done.stdout
    return json.loads(out[out.rindex("{", 0, out.rindex('"answer"')) : out.rindex("}") + 1])["answer"]


def run_demo(
    workdir: str = "demo",
    port: int = PORT,
    base_model: str = models.SMOLLM2,
    tokenizer: str | None = None,
    epochs: float | None = None,
):
    t0 = time.time()
    stages = Stages(8)
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")  # the demo never needs the hub
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    tok_flag = f" --tokenizer {shlex.quote(tokenizer)}" if tokenizer else ""
    recipe = RECIPES["tiny" if base_model == "tiny" else "real"]
    settings = {**train_settings(recipe), **({"epochs": epochs} if epochs else {})}

    stages.step(1, f"data: generating the offline UltraChat-format sample into {work / 'data'}")
    prepared = prepare("sample", work / "data", sample_size=recipe["sample_size"], test_size=recipe["test_size"])
    print(f"      train {prepared.train} / test {prepared.test} conversations, eval.jsonl {prepared.eval} rows")

    stages.step(2, f"base model: {base_model} (converted/built once, then cached)")
    base = models.resolve(base_model, tokenizer)
    print(f"      {base}")

    stages.step(3, "fine-tuning: TRL SFT (assistant-only loss), tracked in MLflow")
    result = train(
        TrainConfig(
            base_model=base_model,
            tokenizer=tokenizer,
            train_file=str(work / "data/train.jsonl"),
            eval_file=str(work / "data/test.jsonl"),
            out=str(work / "models/ft"),
            overwrite=True,
            **settings,
        )
    )
    registered = f"models:/finetune-phi/{result.registered_version}"
    print(
        f"      {result.steps} steps in {result.seconds:.0f} s; held-out loss {result.base_eval_loss:.3f} -> "
        f"{result.eval_loss:.3f}; registered {registered}"
    )

    stages.step(4, f"endpoint: serving deployments base ({base_model}) and ft (the registered model)")
    port = free_port(port)
    url = f"http://127.0.0.1:{port}"
    api_key, key_source = keys.get_or_create_key()
    serve_args = [
        "serve",
        "--deployment",
        f"base={base}",
        "--deployment",
        f"ft={registered}",
        "--traffic",
        "base=50",
        "--traffic",
        "ft=50",
        "--max-new-tokens-cap",
        str(recipe["max_new_tokens"]),
        "--port",
        str(port),
    ]
    log = work / "serve.log"
    with log.open("w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "finetune_phi.cli", *serve_args], stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        wait_ready(url + "/ready", headers={"Authorization": f"Bearer {api_key}"}, proc=server, log=log)
        print(f"      ready at {url}/score (key from {key_source}; log {log})")

        stages.step(5, f"connection: {CONNECTION_NAME} -> {url}/score")
        connect(f"{url}/score", api_key)

        stages.step(6, f"chat flow: one turn per deployment with `pf flow test` - {QUESTION!r}")
        for deployment in ("base", "ft"):
            print(f"      {deployment:>4}: {pf_chat(QUESTION, deployment)!r}")

        stages.step(7, f"comparison: chat + eval flow batch runs over {prepared.eval} held-out rows per deployment")
        name = f"demo_{time.strftime('%Y%m%d_%H%M%S')}"
        summary = compare(
            CompareConfig(
                "base", "ft", str(work / "data" / "eval.jsonl"), name=name, reports=str(work / "reports")
            ),  # greedy: the same table every time
            losses={"base": result.base_eval_loss, "candidate": result.eval_loss},
        )
    finally:
        server.terminate()
        server.wait(timeout=30)

    stages.step(8, "result: base vs fine-tuned")
    print(f"      held-out loss (assistant tokens, {prepared.test} test conversations):")
    print(f"        base        {result.base_eval_loss:.4f}")
    print(f"        fine-tuned  {result.eval_loss:.4f}   ({result.eval_loss / result.base_eval_loss:.1%} of base)")
    for metric, label in (("f1_score", "token F1"), ("rouge_l", "ROUGE-L ")):
        r = next(r for r in summary["rows"] if r["metric"] == metric)
        print(
            f"      {label} on held-out answers: base {r['base']:.3f} -> fine-tuned {r['candidate']:.3f} "
            f"(delta {r['delta']:+.3f}, 95% CI [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}])"
        )
    print(f"      report: {summary['paths']['html']}")
    print(f"      MLflow run {result.run_id} in {os.environ['MLFLOW_TRACKING_URI']}")
    chat_flow = project.flow("chat")
    print(f"\nDemo finished in {time.time() - t0:.0f} s ({stages.summary()}). To do it yourself:")
    env = f"MLFLOW_TRACKING_URI={shlex.quote(os.environ['MLFLOW_TRACKING_URI'])}"
    print(
        f"  finetune-phi data --source sample --sample-size {recipe['sample_size']} --test-size {recipe['test_size']} "
        f"--out {work / 'data'}"
    )
    flags = (f" --config {project.root() / 'recipes' / recipe['train']}" if recipe["train"] else "") + (
        f" --epochs {epochs}" if epochs else ""
    )
    print(
        f"  {env} finetune-phi train --base-model {base_model}{tok_flag}{flags} --data {work / 'data'} "
        f"--out {work / 'models/ft'} --overwrite"
    )
    print(f"  {env} finetune-phi {shlex.join(serve_args)} &")
    print(f"  finetune-phi connect --endpoint-url {url}/score")
    print(f"  pf flow test --flow {chat_flow} --inputs question={shlex.quote(QUESTION)} deployment=ft")
    print(
        f"  finetune-phi compare --base base --candidate ft --data {work / 'data/eval.jsonl'} "
        f"--base-model {base} --candidate-model {work / 'models/ft'}"
    )
    print(f"  pf run show-metrics --name {summary['runs']['ft']['eval']}")
    print(
        f"  pf flow serve --source {chat_flow} --port 8080 --host 127.0.0.1 --skip-open-browser --engine fastapi   # chat page: http://127.0.0.1:8080/"
    )
    return result
