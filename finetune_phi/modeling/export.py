"""`finetune-phi export`: a fine-tuned model (folder, models:/NAME/VERSION, tiny, smollm2-135m) as an
inference engine's own model folder.

    finetune-phi export smollm2-135m out/smollm2-ov --format openvino --precision int8
    finetune-phi serve --engine openvino --deployment main=out/smollm2-ov

Format `openvino` (the only one so far): OpenVINO IR with weight-only int8 (default), int4, fp16 or
fp32 weights, served by `--engine openvino` (OpenVINO GenAI's continuous batching on CPU). The
conversion is optimum-intel's, which needs transformers < 5.6 while the project runs a newer one: it runs in
an export venv of its own (`.venv-openvino-export`, see OPENVINO_EXPORT_REQUIREMENTS), found as
described in `openvino_exporter()`. Serving needs only `openvino-genai` (the `openvino` extra), which
shares the main venv.

The folder carries the source's Hugging Face tokenizer files and chat template, so the engine builds
prompts and stops exactly as the transformers engine does, and `finetune_phi_export.json` (format,
precision, source). It is written beside `out` and renamed into place: an interrupted export leaves
no half folder, and an existing `out` is refused unless overwrite is asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from .. import project
from ..errors import UserError
from ..files import sha256
from . import models
from .cache import cache_dir


FORMATS = {"openvino": ("int8", "int4", "fp16", "fp32")}
DEFAULT_PRECISION = {"openvino": "int8"}
MANIFEST = "finetune_phi_export.json"
# HF files copied from the source over whatever the converter wrote, so the engine's tokenizer and
# chat template are the source's own
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)

# The export venv (resolved together and used on 2026-11-25; optimum-intel goes in with --no-deps:
# its torchvision requirement would pull a CUDA torch, and the exporter does not import it).
OPENVINO_EXPORT_TORCH = "torch==2.13.0"
OPENVINO_EXPORT_REQUIREMENTS = [
    "transformers>=5.0,<5.6",
    "optimum==2.3.0",
    "nncf==3.4.0",
    "openvino==2026.4.1",
    "openvino-tokenizers==2026.4.1.0",
    "huggingface-hub<1.22",
    "accelerate",
    "requests",
]
OPENVINO_EXPORT_NO_DEPS = ["optimum-intel==2.2.0"]
EXPORT_VENV = ".venv-openvino-export"


class ExportError(UserError):
    """The export could not be made (no exporter, a refused output folder, the converter failed)."""


def _venvs() -> list[Path]:
    """Where the export venv is looked for: in the project (what `make openvino-export` makes), then in the cache."""
    try:
        return [project.root() / EXPORT_VENV, cache_dir() / "venv-openvino-export"]
    except project.ProjectNotFound:
        return [cache_dir() / "venv-openvino-export"]


def setup_hint(venv: Path | None = None) -> str:
    venv = venv or _venvs()[0]
    return (
        f"python3 -m venv {venv} && {venv}/bin/pip install '{OPENVINO_EXPORT_TORCH}' && "
        f"{venv}/bin/pip install "
        + " ".join(f"'{r}'" for r in OPENVINO_EXPORT_REQUIREMENTS)
        + f" && {venv}/bin/pip install --no-deps "
        + " ".join(OPENVINO_EXPORT_NO_DEPS)
    )


def openvino_exporter() -> Path:
    """The optimum-cli that converts to OpenVINO: $FINETUNE_PHI_OPENVINO_EXPORTER (a venv or its
    optimum-cli), else <project>/.venv-openvino-export, else <cache>/venv-openvino-export."""
    env = os.environ.get("FINETUNE_PHI_OPENVINO_EXPORTER")
    candidates = [Path(env)] if env else _venvs()
    for c in candidates:
        cli = c if c.name == "optimum-cli" else c / "bin" / "optimum-cli"
        if cli.is_file():
            return cli
    where = env or " or ".join(str(c) for c in candidates)
    raise ExportError(
        f"--format openvino needs optimum-intel's exporter in a venv of its own (it needs "
        f"transformers < 5.6; the project runs {metadata.version('transformers')}), and none was found at {where}. "
        f"Create it with: {setup_hint()}  (or `make openvino-export`), or point "
        f"FINETUNE_PHI_OPENVINO_EXPORTER at one."
    )


def setup_export_env(venv: Path | None = None, torch_index: str | None = None) -> Path:
    """Create the OpenVINO export venv (minutes: torch, transformers 5.5, optimum-intel, nncf)."""
    venv = Path(venv or _venvs()[0])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    (venv / ".gitignore").write_text("*\n")
    subprocess.run(pip + (["--index-url", torch_index] if torch_index else []) + [OPENVINO_EXPORT_TORCH], check=True)
    subprocess.run(pip + OPENVINO_EXPORT_REQUIREMENTS, check=True)
    subprocess.run(pip + ["--no-deps"] + OPENVINO_EXPORT_NO_DEPS, check=True)
    return venv


def _openvino_args(precision: str) -> list[str]:
    args = ["--weight-format", precision]
    if precision == "int4":
        # group-wise int4 needs a group size that divides every layer's input width (SmolLM2's 576 is
        # not a multiple of the default 128); `adjust` shrinks it where needed instead of failing
        args += ["--group-size", "64", "--group-size-fallback", "adjust"]
    return args


def export(
    spec: str,
    out: str | Path,
    format: str = "openvino",
    precision: str | None = None,
    *,
    overwrite: bool = False,
    progress=print,
) -> Path:
    """Convert the model `spec` into `out` for `format` at `precision`; returns the folder."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {sorted(FORMATS)}")
    precision = precision or DEFAULT_PRECISION[format]
    if precision not in FORMATS[format]:
        raise ExportError(f"--format {format} takes --precision {', '.join(FORMATS[format])}, not {precision!r}")
    out = Path(out).expanduser().absolute()
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; choose another folder or pass --overwrite")
    source = Path(models.resolve(spec))
    if not source.is_dir():
        raise ExportError(f"{spec}: export needs a local model folder (a hub id is not downloaded here)")
    if read_manifest(source):
        raise ExportError(
            f"{spec} is already an export ({read_manifest(source).get('format')}); "
            f"export the fine-tuned Hugging Face folder it came from"
        )
    config = json.loads((source / "config.json").read_text())
    cli = openvino_exporter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    started = time.time()
    try:
        progress(f"exporting {spec} to {format} {precision} (optimum-intel, {cli.parent.parent}) ...")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        cmd = [
            str(cli),
            "export",
            "openvino",
            "--model",
            str(source),
            "--task",
            "text-generation-with-past",
            *_openvino_args(precision),
            str(tmp),
        ]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if result.returncode != 0 or not is_openvino(tmp):
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
            raise ExportError(f"the OpenVINO conversion of {spec} failed (exit {result.returncode}):\n{tail}")
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        manifest = {
            "format": format,
            "precision": precision,
            "source": spec,
            "source_path": str(source),
            "model_type": config.get("model_type"),
            "exporter": "optimum-intel",
            "seconds": round(time.time() - started, 1),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    progress(
        f"exported {spec} -> {out} ({format} {precision}, {size:.0f} MB, {time.time() - started:.0f} s); "
        f"serve it with --engine {format}"
    )
    return out


def is_openvino(folder: Path) -> bool:
    """Whether a folder holds an OpenVINO model (what optimum-intel writes and OpenVINO GenAI reads)."""
    return (Path(folder) / "openvino_model.xml").is_file()


def read_manifest(folder: Path) -> dict:
    """What `export` wrote beside the model (format, precision, source); {} for a folder it did not make."""
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def content_key(folder: Path) -> str:
    """What a model folder is, for the export cache: sha256 over its weights, config and tokenizer files."""

    names = sorted(
        f.name
        for f in folder.iterdir()
        if f.is_file() and (f.suffix in (".safetensors", ".json", ".jinja") and f.name != MANIFEST)
    )
    return hashlib.sha256("".join(f"{name}:{sha256(folder / name)}\n" for name in names).encode()).hexdigest()[:16]


def cached_export(spec: str, format: str = "openvino", precision: str | None = None, progress=print) -> Path:
    """The engine's own folder for a model (a folder, models:/..., tiny, smollm2-135m): exported on first use
    into the user's cache, keyed by the model's content, so `serve --engine openvino --deployment ft=FOLDER`
    needs no `finetune-phi export` first. The exporter's venv is built once, on demand, when none is found."""
    precision = precision or DEFAULT_PRECISION[format]
    source = Path(models.resolve(spec))
    if is_openvino(source):
        return source  # already an export
    if not (source / "config.json").is_file():
        raise ExportError(f"{spec}: not a Hugging Face model folder (no config.json) to export")
    out = cache_dir() / "exports" / f"{source.name}-{format}-{precision}-{content_key(source)}"
    if (out / MANIFEST).is_file():
        return out
    try:
        openvino_exporter()
    except ExportError:
        if os.environ.get("FINETUNE_PHI_OPENVINO_EXPORTER"):
            raise  # an exporter was named and is not there: say so, build nothing
        venv = _venvs()[-1]  # the cache's, whatever project this runs in
        progress(
            f"no OpenVINO exporter venv found: building one at {venv} (once; a few minutes and ~2 GB: torch, "
            "transformers < 5.6, optimum-intel, nncf) ..."
        )
        setup_export_env(venv, os.environ.get("TORCH_INDEX") or None)
    return export(spec, out, format, precision, overwrite=True, progress=progress)


def _replace(new: Path, out: Path):
    """Rename `new` to `out`; an existing `out` (overwrite) is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    try:
        new.rename(out)
    except OSError:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def add_export_parser(sub):
    """`finetune-phi export SPEC OUT --format openvino --precision int8`."""
    p = sub.add_parser(
        "export",
        help="convert a model for a quantized CPU engine (--engine openvino)",
        description="Convert a fine-tuned model (folder, models:/NAME/VERSION, tiny, smollm2-135m) "
        "into an engine's own format; serve the folder with --engine FORMAT.",
    )
    p.add_argument("model", help="model to convert: a fine-tuned folder, models:/NAME/VERSION, tiny or smollm2-135m")
    p.add_argument("out", help="folder to create")
    p.add_argument("--format", default="openvino", choices=sorted(FORMATS), help="target engine (default openvino)")
    p.add_argument(
        "--precision",
        default=None,
        help="weights: int8 (default; held-out loss within 0.1%% of fp32 on SmolLM2), int4 (smaller, "
        "lossier: +7.5%%), fp16, fp32 (exact)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args) -> int:
    export(args.model, args.out, args.format, args.precision, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":  # python -m finetune_phi.modeling.export --setup [VENV]: create the export venv
    if sys.argv[1:2] == ["--setup"]:
        print(
            setup_export_env(Path(sys.argv[2]) if len(sys.argv) > 2 else None, os.environ.get("TORCH_INDEX") or None)
        )
    else:
        sys.exit(
            "usage: python -m finetune_phi.modeling.export --setup [VENV]   (exports: finetune-phi export --help)"
        )
