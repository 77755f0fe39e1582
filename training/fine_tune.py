"""The training entry of the original tutorial, kept so its Azure ML job runs the very same code.

    python training/fine_tune.py --train-file data/train.jsonl --eval-file data/test.jsonl \
        --model_output_dir outputs/model [any `finetune-phi train` flag, e.g. --base-model ... --lora]

It is `finetune-phi train` with the tutorial's argument names; the job's code snapshot is the repo,
so the package is imported from there when it is not installed.
"""

import argparse
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune_phi import cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-file", required=True, help="UltraChat-format jsonl to train on")
    parser.add_argument("--eval-file", required=True, help="UltraChat-format jsonl held out for evaluation")
    parser.add_argument("--model_output_dir", required=True, help="where the fine-tuned model folder goes")
    known, rest = parser.parse_known_args(argv)
    return cli.main(
        [
            "train",
            "--train-file",
            known.train_file,
            "--eval-file",
            known.eval_file,
            "--out",
            known.model_output_dir,
            *rest,
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
