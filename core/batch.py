"""Batch prediction over any number of image files: one CSV row per file, streamed (one batch decoded at a time),
in this process or on Ray Data (local, or a cluster through ``RAY_ADDRESS``). Torch-free.

Both engines run the same unit, ``BatchClassifier``: it decodes a batch of files (bounded, see ``MAX_PIXELS``),
classifies the readable ones and gives one row per file, with the reason in ``error`` for a file it could not read.
On Ray each actor holds one onnxruntime session (``map_batches`` with an actor pool) and reads its files itself;
the model travels through Ray's object store, so workers need not see the model file, but they must see the
images (this machine, or a filesystem every node mounts).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.runtime.files import atomic_write
from core.runtime.images import ImageDecodeError, is_image_file, open_rgb
from core.runtime.predictor import OnnxFeatureExtractor, Predictor, prepare_image

COLUMNS = ("path", "label", "probability", "top_k", "error")
BATCH_SIZE = 64  # files decoded and classified together: ~64 x 0.3 MB of prepared pixels, plus one decode
MAX_PIXELS = 100_000_000  # per file, as decoded (JPEGs at their reduced draft scale): bigger ones get an error row
DIGITS = 6  # probabilities in the CSV: enough to rank, and equal between engines that batch differently


def find_images(inputs: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Image files named in ``inputs`` (files, or folders searched recursively), sorted, without repeats. Raises
    FileNotFoundError naming an input that does not exist."""
    found: dict[str, None] = {}
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    if is_image_file(name) and not name.startswith("."):
                        found.setdefault(str(Path(root) / name))
        elif path.is_file():
            found.setdefault(str(path))
        else:
            raise FileNotFoundError(f"{path}: no such file or folder; pass image files or folders of them.")
    return list(found)


class _BatchRunner:
    """One ONNX model applied to batches of files; ``model`` is a path or the file's bytes (how Ray ships it)."""

    def __init__(self, model: str | os.PathLike[str] | bytes, *, device: str = "cpu", threads: int | None = None):
        self._tmp = None
        if isinstance(model, bytes):  # a Ray worker: the model came through the object store
            self._tmp = tempfile.NamedTemporaryFile(suffix=".onnx")  # noqa: SIM115 - lives as long as the actor
            self._tmp.write(model)
            self._tmp.flush()
            model = self._tmp.name
        self.runner = self._load(model, device, threads)

    def _load(self, model: str | os.PathLike[str], device: str, threads: int | None) -> Any:
        raise NotImplementedError

    def _decode(self, files: Iterable[tuple[str, Any]]) -> tuple[list[dict[str, Any]], list[int], np.ndarray]:
        """Rows (an ``error`` row for a file that cannot be read), the rows that were read, and their model input."""
        rows, prepared, where = [], [], []
        reduce_to = 2 * self.runner.info.resize_size
        for path, source in files:
            try:
                image = open_rgb(source, reduce_to=reduce_to, max_pixels=MAX_PIXELS)
            except ImageDecodeError as exc:
                rows.append({"path": path, "error": exc.reason})
                continue
            except OSError as exc:  # gone or unreadable since it was listed
                rows.append({"path": path, "error": exc.strerror or type(exc).__name__})
                continue
            where.append(len(rows))
            rows.append({"path": path, "error": ""})
            prepared.append(prepare_image(image, self.runner.info))
        size = self.runner.info.image_size
        return rows, where, np.stack(prepared) if prepared else np.zeros((0, size, size, 3), np.uint8)

    columns: tuple[str, ...] = ()

    def rows(self, files: Iterable[tuple[str, Any]]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        """Ray Data's ``map_batches``: a ``path`` column in, ``columns`` out."""
        rows = self.rows((str(p), str(p)) for p in batch["path"])
        return {c: [r[c] for r in rows] for c in self.columns}


class BatchClassifier(_BatchRunner):
    """A classifier's rows: ``COLUMNS``."""

    columns = COLUMNS

    def __init__(self, model: str | os.PathLike[str] | bytes, *, top_k: int = 3, device: str = "cpu",
                 threads: int | None = None):
        super().__init__(model, device=device, threads=threads)
        self.predictor = self.runner
        self.top_k = min(top_k, len(self.predictor.classes))

    def _load(self, model: str | os.PathLike[str], device: str, threads: int | None) -> Predictor:
        return Predictor(model, device=device, intra_op_threads=threads)

    def rows(self, files: Iterable[tuple[str, Any]]) -> list[dict[str, Any]]:
        """One row per ``(path, source)``; ``source`` is a path or a binary file object."""
        rows, where, prepared = self._decode(files)
        for row in rows:
            row.update(label="", probability="", top_k="")
        if len(prepared):
            probs = self.predictor.predict_arrays(prepared)
            classes = self.predictor.classes
            for i, row in zip(where, probs):
                order = np.argsort(-row, kind="stable")[:self.top_k]
                top = [[classes[j], round(float(row[j]), DIGITS)] for j in order]
                rows[i].update(label=top[0][0], probability=top[0][1], top_k=json.dumps(top, ensure_ascii=False))
        return rows


class BatchFeatures(_BatchRunner):
    """A backbone's features (``path``, ``error``, ``features``: float32 ``[feature_dim]``, NaN for a file that could
    not be read)."""

    columns = ("path", "error", "features")

    def _load(self, model: str | os.PathLike[str], device: str, threads: int | None) -> OnnxFeatureExtractor:
        return OnnxFeatureExtractor(model, device=device, intra_op_threads=threads)

    def rows(self, files: Iterable[tuple[str, Any]]) -> list[dict[str, Any]]:
        rows, where, prepared = self._decode(files)
        for row in rows:
            row["features"] = np.full(self.runner.info.feature_dim, np.nan, np.float32)
        if len(prepared):
            for i, vector in zip(where, self.runner.extract(prepared)):
                rows[i]["features"] = vector
        return rows


def run_local(runner: _BatchRunner, paths: Sequence[str], *, batch_size: int = BATCH_SIZE
              ) -> Iterator[dict[str, Any]]:
    """Rows in the order of ``paths``, one batch at a time, in this process."""
    for start in range(0, len(paths), batch_size):
        yield from runner.rows((p, p) for p in paths[start:start + batch_size])


def predict_local(model: str | os.PathLike[str], paths: Sequence[str], *, top_k: int = 3, device: str = "auto",
                  batch_size: int = BATCH_SIZE) -> Iterator[dict[str, Any]]:
    """A classifier's rows, in this process."""
    return run_local(BatchClassifier(model, top_k=top_k, device=device), paths, batch_size=batch_size)


def run_ray(runner: type[_BatchRunner], model: str | os.PathLike[str], paths: Sequence[str], *,
            options: dict[str, Any] | None = None, device: str = "auto", batch_size: int = BATCH_SIZE,
            actors: int | None = None, cpus_per_actor: int = 1) -> Iterator[dict[str, Any]]:
    """The same rows, in the same order, from Ray Data: a pool of ``actors`` (default: one per CPU of the
    cluster, or one per GPU when it has GPUs and ``device`` allows), each with one onnxruntime session. Connects to
    ``RAY_ADDRESS`` when it is set, else starts Ray on this machine."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows come back in the order of ``paths``
    ctx.enable_progress_bars = False  # the caller shows one bar for the whole job
    resources = ray.cluster_resources()
    gpu = device == "cuda" or (device == "auto" and resources.get("GPU", 0) > 0)
    device = "cuda" if gpu else "cpu"
    if actors is None:
        actors = max(1, int(resources.get("GPU", 0)) if gpu else int(resources.get("CPU", 1) // cpus_per_actor))
    # The actors read the files themselves (they must see the paths: this machine, or a filesystem every node
    # mounts): no separate read tasks to compete with them for the CPUs.
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=max(1, -(-len(paths) // batch_size)))
    ds = ds.map_batches(runner, fn_constructor_args=(Path(model).read_bytes(),),
                        fn_constructor_kwargs={**(options or {}), "device": device, "threads": cpus_per_actor},
                        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
                        num_cpus=cpus_per_actor, num_gpus=1 if gpu else 0, max_restarts=0)
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # Ray Data's per-run notes; the caller reports the run
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        yield from batch[list(runner.columns)].to_dict("records")


def predict_ray(model: str | os.PathLike[str], paths: Sequence[str], *, top_k: int = 3, device: str = "auto",
                batch_size: int = BATCH_SIZE, actors: int | None = None) -> Iterator[dict[str, Any]]:
    """A classifier's rows, on Ray (``run_ray``)."""
    return run_ray(BatchClassifier, model, paths, options={"top_k": top_k}, device=device, batch_size=batch_size,
                   actors=actors)


@dataclass
class BatchSummary:
    rows: int
    errors: int
    out: Path


def write_csv(rows: Iterable[dict[str, Any]], out: str | os.PathLike[str], *, total: int | None = None,
              progress: bool = True) -> BatchSummary:
    """Write ``rows`` to ``out`` as CSV (``COLUMNS``) with a progress bar and time left on stderr; atomic: ``out``
    appears only when every row is written, and an earlier file is kept if the job fails."""
    from tqdm import tqdm

    counts = {"rows": 0, "errors": 0}

    def produce(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f, \
                tqdm(total=total, unit="img", disable=not progress, desc="predict") as bar:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow(row)
                counts["rows"] += 1
                counts["errors"] += bool(row["error"])
                bar.update(1)

    atomic_write(out, produce)
    return BatchSummary(counts["rows"], counts["errors"], Path(out))


def write_features(rows: Iterable[dict[str, Any]], out: str | os.PathLike[str], *, total: int, dim: int,
                   progress: bool = True) -> BatchSummary:
    """Features to ``out`` (``.npy``, float32 ``[total, dim]``, written through a memory map: any number of rows in
    bounded memory; NaN for a file that could not be read) and ``out`` with ``.csv`` (``path``, ``error``, one row
    per file, in the same order), each written whole or not at all: a failed job keeps the earlier files."""
    from tqdm import tqdm

    out = Path(out)
    table = out.with_suffix(".csv")
    counts = {"rows": 0, "errors": 0}

    def produce(tmp_table: Path) -> None:
        def fill(tmp_array: Path) -> None:
            array = np.lib.format.open_memmap(tmp_array, mode="w+", dtype=np.float32, shape=(total, dim))
            with open(tmp_table, "w", newline="", encoding="utf-8") as f, \
                    tqdm(total=total, unit="img", disable=not progress, desc="features") as bar:
                writer = csv.DictWriter(f, fieldnames=("path", "error"), extrasaction="ignore")
                writer.writeheader()
                for i, row in enumerate(rows):
                    array[i] = row["features"]
                    writer.writerow(row)
                    counts["rows"] += 1
                    counts["errors"] += bool(row["error"])
                    bar.update(1)
            if counts["rows"] != total:
                raise RuntimeError(f"{counts['rows']} rows came back for {total} files")
            array.flush()
            del array

        atomic_write(out, fill)

    atomic_write(table, produce)
    return BatchSummary(counts["rows"], counts["errors"], out)
