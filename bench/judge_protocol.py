"""A protocol check of the pairwise judge on known answers: smollm2-135m as the judge, NOT a credible one.

    python bench/judge_protocol.py [--pairs 40] [--model smollm2-135m] [--workdir bench-out/judge]

No model that installs here is a credible judge (SmolLM2-135M is the model under test). This runs the judge
protocol end to end against a real model behind `finetune-phi serve` (/v1/chat/completions, the judge
client, both orders, verdict parsing, the statistics) on pairs whose right answer is known: for each of the
first N real UltraChat rows, the row's own reference answer against another row's reference (a fluent
answer to a different question). It prints the judge's accuracy (the share of pairs where both orders
pick the right answer), position consistency, the rate at which the first slot wins and the replies
without a verdict. A strong judge scores near 100%; a coin that always picks slot A scores 0% with
consistency 0. Read the figures as a check of the machinery and of what a tiny judge does, not as a
judge to trust.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ULTRACHAT40 = REPO.parent / "shared" / "assets" / "ultrachat-sample" / "ultrachat40.jsonl"


def known_pairs(path: Path, n: int) -> list[dict]:
    """(question, the row's reference, another row's reference) from the first n rows with an answer."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        if len(messages) >= 2 and messages[0]["role"] == "user" and messages[1]["role"] == "assistant":
            rows.append((messages[0]["content"], messages[1]["content"]))
        if len(rows) == n:
            break
    return [{"question": q, "right": a, "wrong": rows[(i + 1) % len(rows)][1]} for i, (q, a) in enumerate(rows)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ULTRACHAT40), help="UltraChat rows (full schema, `messages`)")
    p.add_argument("--pairs", type=int, default=40)
    p.add_argument("--model", default="smollm2-135m", help="the judge model served by `finetune-phi serve`")
    p.add_argument("--max-answer-words", type=int, default=80, help="answers are cut to this many words (CPU)")
    p.add_argument("--workers", type=int, default=4, help="pairs judged at once (each pair: two requests)")
    p.add_argument("--max-tokens", type=int, default=192, help="the longest judge reply (CPU)")
    p.add_argument("--workdir", default="bench-out/judge")
    args = p.parse_args(argv)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    from finetune_phi.evaluation.judge import Judge, judge_pair, summarize
    from finetune_phi.modeling import models
    from finetune_phi.serving import keys
    from finetune_phi.serving.local import free_port, wait_ready

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    pairs = known_pairs(Path(args.data), args.pairs)
    cut = lambda text: " ".join(text.split()[: args.max_answer_words])  # noqa: E731
    path = models.resolve(args.model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    key, _ = keys.get_or_create_key()
    log = work / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "finetune_phi.cli",
                "serve",
                "--deployment",
                f"judge={path}",
                "--max-new-tokens-cap",
                str(args.max_tokens),
                "--request-timeout-ms",
                "900000",
                "--port",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_ready(url + "/ready", headers={"Authorization": f"Bearer {key}"}, proc=server, log=log)
        judge = Judge(
            url + "/v1/chat/completions", "judge", {"Authorization": f"Bearer {key}"}, max_tokens=args.max_tokens
        )
        t = time.time()
        done = [0]

        def one(pair):  # the right answer plays the candidate: a "win" is a correct verdict
            result = judge_pair(judge, pair["question"], [], None, cut(pair["wrong"]), cut(pair["right"]))
            done[0] += 1
            print(f"\r  judged {done[0]}/{len(pairs)} pairs ({time.time() - t:.0f} s)", end="", flush=True)
            return result

        with ThreadPoolExecutor(args.workers) as pool:
            results = list(pool.map(one, pairs))
        seconds = time.time() - t
    finally:
        server.terminate()
        server.wait(timeout=30)
    s = summarize(results, [r["length_delta"] for r in results], args.model)
    correct = sum(r["outcome"] == "win" for r in results)
    print(
        f"\n\nJudge protocol check: {args.model} as the judge (NOT a credible judge), {len(pairs)} known-answer pairs "
        f"from {Path(args.data).name}, both orders, greedy; {seconds:.0f} s"
    )
    print(
        f"  accuracy (both orders pick the row's own reference): {correct}/{len(pairs)} = {correct / len(pairs):.1%}"
    )
    print(
        f"  outcomes: right {s['wins']}, wrong {s['losses']}, tie {s['ties']}, no verdict on a line "
        f"{len(pairs) - s['n']}; replies without a verdict {s['parse_failures']} of {2 * len(pairs)}"
    )
    for name in ("position_consistency", "first_slot_rate"):
        value = s[name]
        print(f"  {name.replace('_', ' ')}: {'n/a' if value is None else format(value, '.2f')}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    (work / "judge_protocol.json").write_text(
        json.dumps({"summary": s, "correct": correct, "pairs": len(pairs), "seconds": seconds}, indent=2)
    )


if __name__ == "__main__":
    main()
