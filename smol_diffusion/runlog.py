"""The run log: `out_dir/log.jsonl`, one JSON object a line, and TensorBoard when installed.

Every run appends to the log of its folder: a "start" row when it begins or resumes, a "train"
row each time the loss is read (every `log_every` steps), an "eval" row for each evaluation.
Each line is flushed as it is written, so the log can be read (or `tail -f`ed) while the run
goes on, and it outlives a crash or a kill that loses the steps since the last checkpoint.
`read_log` replays it: rows of steps a resume went back over are dropped, so what it returns is
the history of the weights the checkpoint holds.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import math
from pathlib import Path

import torch

LOG_NAME = "log.jsonl"


def _finite(value):
    """`value` with its NaN and infinite numbers, nested ones too, as None: JSON has no NaN,
    and strict readers refuse Python's NaN and Infinity."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class RunLog:
    """Appends rows to `out_dir/log.jsonl` and, where the `tensorboard` package is installed,
    writes the same numbers and the sample grids as TensorBoard events to
    `out_dir/tensorboard/` (`tensorboard --logdir out_dir`). Disabled (`enabled=False`, every
    process but rank 0 under torchrun) it writes nothing."""

    def __init__(self, out_dir: str | Path, enabled: bool = True):
        self.path = Path(out_dir) / LOG_NAME
        self.file = self.board = None
        if not enabled:
            return
        self.file = open(self.path, "a", encoding="utf-8")  # the folder was checked writable
        if self.file.tell():
            with open(self.path, "rb") as f:
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    self.file.write("\n")  # end the line a killed run was writing
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def write(self, kind: str, step: int, **values) -> None:
        """Append one row {"kind", "step", "time", **values}; the numbers of train and eval rows
        also go to TensorBoard as `kind/name` (train/loss, eval/fid)."""
        if self.file is None:
            return
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        row = _finite({"kind": kind, "step": step, "time": now} | values)
        self.file.write(json.dumps(row, allow_nan=False) + "\n")
        self.file.flush()
        if self.board is not None and kind != "start":
            for name, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.board.add_scalar(f"{kind}/{name}", v, step)
            self.board.flush()

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        """A (C, H, W) image in [0, 1] to TensorBoard (the log file keeps only numbers)."""
        if self.board is not None:
            self.board.add_image(tag, grid, step)
            self.board.flush()

    def close(self) -> None:
        """Close the files; later writes do nothing."""
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()
        self.file = self.board = None


def read_log(path: str | Path) -> dict[str, list[dict]]:
    """The rows of a run log (a log.jsonl, or the folder holding one) by kind: {"train": [...],
    "eval": [...], "start": [...]}, in step order.

    A "start" row at step s (a resume from a checkpoint of step s) drops the earlier train and
    eval rows past s: a run killed after its last checkpoint logged steps that the resume then
    trained again. A line cut short by a kill (the last, or one a resume's start row follows)
    is ignored."""
    path = Path(path)
    if path.is_dir():
        path = path / LOG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no run log at {path}; training writes one to its out_dir")
    rows: dict[str, list[dict]] = {"train": [], "eval": [], "start": []}
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) or lines[number].startswith('{"kind": "start"'):
                continue  # the line a kill cut short
            raise ValueError(f"{path}, line {number}, is not JSON: {line[:80]!r}") from None
        if row.get("kind") == "start":
            for kind in ("train", "eval"):
                rows[kind] = [r for r in rows[kind] if r["step"] <= row["step"]]
        rows.setdefault(row.get("kind", "other"), []).append(row)
    return rows
