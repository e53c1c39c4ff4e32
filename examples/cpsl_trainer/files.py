"""Files the trainer reads and owns: errors that name the file, and one run per output folder."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import torch

try:
    import fcntl
except ImportError:  # Windows: runs are not locked there
    fcntl = None

T = TypeVar("T")


def read_with_path(path: Path, read: Callable[[Path], T]) -> T:
    """``read(path)``, its errors naming the file (Pillow's "image file is truncated", pypng's and
    numpy's errors on a truncated file do not)."""
    try:
        return read(path)
    except (OSError, SyntaxError, ValueError, EOFError) as error:  # Pillow raises SyntaxError on some corrupt PNGs
        if str(path) in str(error):
            raise
        raise OSError(f"{path}: {error}") from error


def load_torch_file(path: Path, weights_only: bool = True) -> Any:
    """``torch.load`` of a checkpoint or weights file, on the CPU; a missing, truncated, empty or
    foreign file is an error that names it. With ``weights_only`` nothing but tensors, plain
    Python values and the types allowed by an enclosing ``torch.serialization.safe_globals`` is
    unpickled."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except (EOFError, RuntimeError, pickle.UnpicklingError, ValueError, OSError) as error:
        holding = " holding only tensors, numbers and the types allowed here" if weights_only else ""
        raise ValueError(f"{path} is not a readable torch file{holding} (truncated, empty, or not written by "
                         f"torch.save?): {type(error).__name__}: {error}") from error


class OutputLock:
    """An exclusive lock on an output folder, held while a run writes into it: a second trainer
    process on the same folder is refused at once instead of overwriting the first one's
    checkpoints. The lock is the OS's (flock), so a killed run never leaves it behind."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / ".lock"
        self.handle = None

    def __enter__(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "w")
        if fcntl is not None:
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.handle.close()
                raise RuntimeError(
                    f"another trainer process is writing into {self.path.parent} (it holds {self.path}); wait for it "
                    "to end, or set train.output_dir to another folder"
                ) from None
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.handle.close()  # releases the lock


def keep_log_lines(path: Path, keep: Callable[[dict], bool]) -> None:
    """Rewrites the JSON-lines log at ``path`` with only the entries ``keep`` accepts."""
    if not path.is_file():
        return
    entries: Iterable[dict] = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries if keep(entry)))
