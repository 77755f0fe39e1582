"""Training throughput: packing, padding-free, LoRA vs full fine-tuning, for a fixed number of steps.

    python bench/train.py [--steps 40] [--config tiny|phi3-mini] [--batch-size 16] [--max-length 256]

Each variant runs in its own process (so peak memory is its own) on the offline sample and prints
trained (non-padding) tokens/s, step time, peak memory and padding waste (pad positions / all
positions over the batches it trained on). On a GPU it also prints MFU (6 x params x tokens/s
against the device's bf16 peak). `--config phi3-mini` is a random-init model with Phi-3-mini's
exact shape (3.8B parameters): for GPU runs. Ratios are against "full, padded" in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {
    "full, padded": {},
    "full, packing (bfd, padding-free)": {"packing": True},
    "full, packing (wrapped)": {"packing": True, "extra": {"packing_strategy": "wrapped"}},
    "LoRA r=16, padded": {"lora": True},
    "LoRA r=16, packing": {"lora": True, "packing": True},
}


def model_for(config: str, work: Path) -> str:
    from finetune_phi.modeling.models import PHI3_MINI_SHAPE, tiny_path

    if config == "tiny":
        return str(tiny_path())
    import torch
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    folder = work / "phi3-mini-random"
    if not (folder / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(tiny_path())
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Phi3ForCausalLM(Phi3Config(pad_token_id=tok.pad_token_id, **PHI3_MINI_SHAPE)).to(torch.bfloat16)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    return str(folder)


def run_one(args, name: str) -> dict:
    import torch
    from transformers import TrainerCallback

    from finetune_phi.training import throughput
    from finetune_phi.training.trainer import TrainConfig, build_trainer

    spec = VARIANTS[name]
    extra = {
        "max_steps": args.steps,
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_steps": 10_000,
        "disable_tqdm": True,
        **spec.get("extra", {}),
    }
    cfg = TrainConfig(
        base_model=args.model,
        train_file=str(args.data / "train.jsonl"),
        eval_file=str(args.data / "test.jsonl"),
        lr=1e-3,
        batch_size=args.batch_size,
        max_length=args.max_length,
        lora=spec.get("lora", False),
        packing=spec.get("packing", False),
        extra=extra,
    ).resolved()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, _ = build_trainer(cfg, tmp, report_to=[])
        pad = total = 0
        loader = trainer.get_train_dataloader()
        for i, batch in enumerate(loader):  # the same batches training sees (seeded sampler)
            p, t = throughput.padding_waste(batch)
            pad, total = pad + p, total + t
            if i + 1 >= args.steps:
                break

        class StepTimer(TrainerCallback):
            times: list = []

            def on_step_begin(self, *a, **k):
                self.t = time.perf_counter()

            def on_step_end(self, *a, **k):
                self.times.append(time.perf_counter() - self.t)

        timer = StepTimer()
        trainer.add_callback(timer)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        steady = timer.times[len(timer.times) // 5 :] or timer.times  # skip warm-up steps
        tokens = trainer.state.num_input_tokens_seen
        result = {
            "name": name,
            "tokens_per_s": tokens / wall,
            "step_ms": 1000 * sum(steady) / len(steady),
            "padding_waste": pad / total if total else 0.0,
            "steps": trainer.state.global_step,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "mfu": None,
        }
        if torch.cuda.is_available():
            result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            peak = throughput.peak_flops(torch.cuda.get_device_name())
            params = sum(p.numel() for p in trainer.model.parameters())
            if peak:
                result["mfu"] = throughput.mfu(params, tokens / wall, peak)
        return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--config", choices=["tiny", "phi3-mini"], default="tiny")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    ap.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:
        print("RESULT " + json.dumps(run_one(args, args.one)), flush=True)
        return
    from finetune_phi.data.prepare import prepare

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    prepare("sample", work / "data", sample_size=1200)
    model = model_for(args.config, work)
    results = []
    for name in args.variants:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--data",
            str(work / "data"),
            "--model",
            model,
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--max-length",
            str(args.max_length),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        line = next((out for out in done.stdout.splitlines() if out.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{done.stderr[-1500:]}")
            continue
        results.append(json.loads(line.removeprefix("RESULT ")))
    print(
        f"\n{args.config} model, batch {args.batch_size} x max_length {args.max_length}, {args.steps} steps, "
        f"{os.cpu_count()} CPUs{'' if not results or results[0]['mfu'] is None else ', GPU'}"
    )
    print(f"{'variant':<36}{'tokens/s':>10}{'vs padded':>10}{'step ms':>9}{'pad waste':>10}{'peak MiB':>10}{'MFU':>7}")
    base = next((r for r in results if r["name"] == "full, padded"), results[0] if results else None)
    for r in results:
        mfu = f"{r['mfu']:.0%}" if r["mfu"] is not None else "-"
        print(
            f"{r['name']:<36}{r['tokens_per_s']:>10.0f}{r['tokens_per_s'] / base['tokens_per_s']:>9.2f}x"
            f"{r['step_ms']:>9.1f}{r['padding_waste']:>10.1%}{r['peak_mib']:>10.0f}{mfu:>7}"
        )


if __name__ == "__main__":
    main()
