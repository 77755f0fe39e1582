"""A result on real UltraChat rows: LoRA-fine-tune smollm2-135m, then compare it with its base, greedy.

    python bench/ultrachat.py [--source FILE|ultrachat] [--train-rows 800] [--test-rows 200] [--workdir bench-out/ultrachat]

The whole loop as a user runs it, on real data: `finetune-phi data` on the first train+test rows of the
source (default: the 1,000 real ultrachat_200k rows in ../shared/assets/ultrachat-sample/, messages-only
form; `--source ultrachat` takes the hub split), split with a fixed seed; `finetune-phi train --lora`;
held-out loss before and after (assistant tokens, the training's own measure); `finetune-phi serve` with
both models as deployments; and `finetune-phi compare` through the chat and evaluation flows, greedy, over
every held-out conversation (lexical metrics with paired 95% intervals, answer lengths). It prints the
figures, five answer pairs side by side, the commands and the machine. `--smoke` is the same on a few rows
and steps (about two minutes; the suite runs it) and runs the comparison twice to show it repeats to
the last digit.

Token overlap with a long UltraChat reference is a weak signal of a better chat answer: read the loss
first, and a pairwise judge (`compare --judge`, when one is available) for the strong one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ULTRACHAT1000 = REPO.parent / "shared" / "assets" / "ultrachat-sample" / "ultrachat1000-messages.jsonl"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--source",
        default=str(ULTRACHAT1000),
        help="an UltraChat file (any form `finetune-phi data` reads) or 'ultrachat' (hub)",
    )
    p.add_argument("--train-rows", type=int, default=800)
    p.add_argument("--test-rows", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-model", default="smollm2-135m")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=192, help="tokens per training conversation (CPU: keep short)")
    p.add_argument("--max-steps", type=int, default=None, help="stop training after this many steps")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length cap of the endpoint")
    p.add_argument("--workdir", default="bench-out/ultrachat")
    p.add_argument(
        "--smoke", action="store_true", help="a few rows and steps, and the comparison twice (the suite's check)"
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.train_rows, args.test_rows, args.max_steps, args.max_new_tokens = 12, 6, 1, 16
    return args


def take_rows(source: str, n: int, out: Path) -> str:
    """The first n rows of a local file, as a file of its own (the hub source is passed through)."""
    if source == "ultrachat" or not Path(source).exists():
        return source
    with open(source, encoding="utf-8") as f:
        lines = [line for _, line in zip(range(n), f, strict=False)]
    if len(lines) < n:
        raise SystemExit(f"{source} has {len(lines)} rows; asked for {n}")
    path = out / f"source-{n}.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return str(path)


def main(argv=None):
    args = parse_args(argv)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "0" if args.source == "ultrachat" else "1")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    from finetune_phi.data.prepare import prepare
    from finetune_phi.evaluation.compare import CompareConfig, compare
    from finetune_phi.modeling import models
    from finetune_phi.serving import keys
    from finetune_phi.serving.connection import connect
    from finetune_phi.serving.local import free_port, wait_ready
    from finetune_phi.training.trainer import TrainConfig, train

    t0 = time.time()
    stamp = time.strftime("%Y%m%d_%H%M%S")
    total = args.train_rows + args.test_rows
    print(f"data: {total} rows of {args.source}, {args.test_rows} held out (seed {args.seed})", flush=True)
    prepared = prepare(
        take_rows(args.source, total, work), work / "data", test_size=args.test_rows / total, seed=args.seed
    )
    print(
        f"  train {prepared.train} / test {prepared.test} conversations, eval.jsonl {prepared.eval} rows", flush=True
    )
    base = models.resolve(args.base_model)

    t = time.time()
    extra = {"max_steps": args.max_steps} if args.max_steps else {}
    result = train(
        TrainConfig(
            base_model=args.base_model,
            data=str(work / "data"),
            out=str(work / "models" / "ft"),
            lora=True,
            lr=args.lr,
            batch_size=args.batch_size,
            max_length=args.max_length,
            epochs=args.epochs,
            seed=args.seed,
            overwrite=True,
            extra=extra,
        )
    )
    train_s = time.time() - t
    print(
        f"fine-tuning: {result.steps} LoRA steps in {train_s:.0f} s; held-out loss {result.base_eval_loss:.4f} -> "
        f"{result.eval_loss:.4f}",
        flush=True,
    )

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api_key, _ = keys.get_or_create_key()
    serve = [
        "serve",
        "--deployment",
        f"base={base}",
        "--deployment",
        f"ft={result.out}",
        "--max-new-tokens-cap",
        str(args.max_new_tokens),
        "--port",
        str(port),
    ]
    log = work / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "finetune_phi.cli", *serve], stdout=out, stderr=subprocess.STDOUT
        )
    summaries = []
    try:
        wait_ready(url + "/ready", headers={"Authorization": f"Bearer {api_key}"}, proc=server, log=log)
        connect(url + "/score", api_key, name="ultrachat_bench")
        for attempt in range(2 if args.smoke else 1):
            t = time.time()
            name = f"ultrachat_{stamp}" + (f"_{attempt}" if attempt else "")
            summaries.append(
                compare(
                    CompareConfig(
                        "base",
                        "ft",
                        str(work / "data" / "eval.jsonl"),
                        name=name,
                        reports=str(work / "reports"),
                        base_connection="ultrachat_bench",
                        candidate_connection="ultrachat_bench",
                    ),
                    losses={"base": result.base_eval_loss, "candidate": result.eval_loss},
                )
            )
            compare_s = time.time() - t
    finally:
        server.terminate()
        server.wait(timeout=30)

    summary = summaries[0]
    import pandas as pd

    lines = pd.read_csv(summary["paths"]["csv"], keep_default_na=False).sort_values("line")
    print(
        f"\nResult ({args.base_model}, LoRA, {prepared.train} real UltraChat conversations, {result.steps} steps; "
        f"{summary['lines']['paired']} of {summary['lines']['total']} held-out answers paired, greedy, "
        f"at most {args.max_new_tokens} new tokens)"
    )
    print(
        f"  held-out loss (assistant tokens): base {result.base_eval_loss:.4f} -> fine-tuned {result.eval_loss:.4f} "
        f"({result.eval_loss / result.base_eval_loss - 1:+.1%})"
    )
    for r in summary["rows"]:
        if r["delta"] is not None:
            print(
                f"  {r['metric']:<14} base {r['base']:8.3f}  fine-tuned {r['candidate']:8.3f}  delta {r['delta']:+.3f}  "
                f"95% CI [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
            )
    print("\nFive held-out questions, side by side:")
    for _, row in lines.head(5).iterrows():
        print("  Q:   " + textwrap.shorten(str(row["question"]), 160))
        print("  base " + textwrap.shorten(str(row["answer_base"]), 160))
        print("  ft   " + textwrap.shorten(str(row["answer_ft"]), 160) + "\n")
    if args.smoke:
        same = summaries[0]["rows"] == summaries[1]["rows"]
        print(f"the same comparison twice: {'identical tables' if same else 'DIFFERENT tables'}")
    figures = {
        "source": args.source,
        "train": prepared.train,
        "test": prepared.test,
        "steps": result.steps,
        "loss": {"base": result.base_eval_loss, "candidate": result.eval_loss},
        "train_seconds": train_s,
        "compare_seconds": compare_s,
        "rows": summary["rows"],
        "lines": summary["lines"],
        "repeat_identical": summaries[0]["rows"] == summaries[-1]["rows"],
        "report": summary["paths"]["html"],
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, {platform.python_version()}",
    }
    (work / "figures.json").write_text(json.dumps(figures, indent=2))
    print(
        f"machine: {figures['machine']}; whole bench {time.time() - t0:.0f} s (training {train_s:.0f} s, "
        f"comparison {compare_s:.0f} s); report {summary['paths']['html']}; figures {work / 'figures.json'}"
    )
    return figures


if __name__ == "__main__":
    main()
