"""The output folder: its lock, what a run refuses to replace or clears there, and failed writes into it."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError
from .checkpoints import reason
from .config import TrainConfig


try:
    import fcntl
except ImportError:  # Windows: no flock; runs there go without the output-folder lock
    fcntl = None


@contextmanager
def output_lock(out: Path):
    """Hold an flock on <out>/.lock for the whole run, so a second run on the same folder stops at once.

    The kernel drops the lock when the process ends, however it ends: a crash never leaves a stale
    lock. Creating the lock file also proves the folder writable before anything is loaded.
    """

    def unwritable(e: OSError):
        return UserError(f"cannot write to --out {out}: {e.strerror or reason(e)}; choose a folder you can write to")

    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "a+")  # append mode: a run that loses the race can still read the PID
    except OSError as e:
        raise unwritable(e) from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "unknown"
                raise UserError(f"{out} is in use by another training run (PID {holder})") from None
        try:
            lock.seek(0)
            lock.truncate()
            lock.write(f"{os.getpid()}\n")
            lock.flush()
        except OSError as e:  # a full disk, before anything was loaded
            raise unwritable(e) from None
        yield
    finally:
        lock.close()


def refuse_to_replace(out: Path, cfg: TrainConfig, last: Path | None):
    """A finished model or an earlier run's checkpoints in `out` are only replaced on --overwrite.

    Starting afresh over them would overwrite the model and mix the two runs' checkpoints, which
    save_total_limit then deletes.
    """
    if cfg.overwrite or last is not None:  # resuming continues the run these files belong to
        return
    if (out / "finetune_phi.json").exists() or (out / "config.json").exists():
        held = "a trained model"
    elif any(p.is_dir() for p in (out / "checkpoints").glob("checkpoint-*")):
        held = "checkpoints of an earlier run"
    else:
        return
    if cfg.resume:
        raise UserError(
            f"--resume: nothing in {out / 'checkpoints'} to resume from, and {out} holds {held}; "
            "use --overwrite to replace it"
        )
    raise UserError(f"{out} already holds {held}; use --resume to continue its run or --overwrite to replace it")


def clear_previous_run(out: Path):
    """--overwrite: remove what training wrote there before, and nothing else (--out . is a folder of yours)."""
    removed = []
    for stale in (out / "checkpoints", out / "adapter", out / "finetune_phi.json"):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
        else:
            continue
        removed.append(stale.name)
    if removed:
        print(f"--overwrite: removed {', '.join(removed)} from {out}")


@contextmanager
def writing(what: str, path: Path):
    """A failed write (full disk, quota, a folder gone read-only) ends the run with one line saying so.

    torch.save and safetensors report it as "basic_ios::clear: iostream error", "unexpected pos N vs M"
    or "I/O error"; a RuntimeError that looks like none of those, with room on the disk, stays a bug.
    """
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        free = _free_bytes(path)
        io_like = isinstance(e, OSError) or any(
            s in str(e) for s in ("iostream", "unexpected pos", "file write failed", "I/O error", "os error")
        )
        if not io_like and (free is None or free > 64 * 2**20):
            raise
        why = e.strerror if isinstance(e, OSError) and e.strerror else reason(e)
        room = f" ({free / 2**20:.1f} MiB free there)" if free is not None else ""
        raise UserError(
            f"could not write {what} to {path}: {why}{room}; free disk space or choose another --out"
        ) from e


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def explain_failed_checkpoint_writes(trainer):
    """Checkpoints are written inside trainer.train(): wrap Trainer's one method that writes them."""
    save = trainer._save_checkpoint

    def save_checkpoint(model, trial, *args, **kwargs):
        path = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
        with writing("checkpoint", path):
            return save(model, trial, *args, **kwargs)

    trainer._save_checkpoint = save_checkpoint
