"""Where a run's numbers go: TensorBoard event files, a progress bar, a JSON summary."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from metazo.errors import MetazoError


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so a reader never sees half a file: temporary file, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_run_dir(path: Path, overwrite: bool) -> Path:
    """Create the run folder; an existing one is refused unless ``overwrite``."""
    path = Path(path)
    if path.exists():
        if not overwrite:
            raise MetazoError(f"output folder {path} already exists; choose another --output or pass --overwrite")
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True)
    except OSError as error:
        raise MetazoError(f"cannot create output folder {path}: {error.strerror}") from None
    return path


class Tracker:
    """TensorBoard scalars under ``run_dir`` plus a tqdm progress bar on stderr."""

    def __init__(self, run_dir: Path, total_steps: int, progress: bool = True, start_step: int = 0):
        """``start_step``: a resumed run's step; TensorBoard drops what an earlier attempt logged after it."""
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=start_step + 1 if start_step else None)
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not progress, file=sys.stderr, unit="step",
                        dynamic_ncols=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def histogram(self, step: int, tag: str, values) -> None:
        self.writer.add_histogram(tag, values, step)

    def figure(self, step: int, tag: str, figure) -> None:
        """A matplotlib figure as an image (closed afterwards)."""
        self.writer.add_figure(tag, figure, step, close=True)

    def advance(self, loss: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}")
        self.bar.update(1)

    def message(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        self.writer.flush()
        self.writer.close()


class NullTracker:
    """A Tracker that records nothing: every rank but rank 0 of a distributed run."""

    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def histogram(self, step: int, tag: str, values) -> None: ...
    def figure(self, step: int, tag: str, figure) -> None: ...
    def advance(self, loss: float) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...
