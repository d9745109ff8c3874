"""Training: a new head on a frozen pretrained backbone vs the same network from scratch.

Read top to bottom: ``TrainConfig`` (in ``core.config``) -> ``prepare_images`` (decode + resize once) ->
``train_pretrained`` (features cached once, then the head trains on them) and ``train_from_scratch`` (every layer,
with augmentation; ``train_finetune`` trains the last blocks of the pretrained backbone the same way) ->
``summarize_run`` (best epoch, scikit-learn metrics with 95% intervals, verdict). ``run_compare`` drives both arms on
one split and adds the paired test between them (``compare_arms``) and the pitfall diagnostics; ``core.report``
writes the artifacts.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

import models
from models.classifier import make_head
from models.explain import OodCalibration, calibrate_ood, pooled_features
from models.preprocess import ImagePreprocess

from . import diagnostics, duplicates, shortcuts, stats
from .config import TrainConfig
from .data import Dataset
from .decoded import DecodedImages, crop_file, decode_once, take, trim
from .device import resolve_device
from .features import extract_all, make_feature_extractor, wait_for_warm_up
from .metrics import classification_metrics, misclassified, verdict
from .runtime.devices import GPU_PROVIDERS
from .runtime.images import slices

ARMS = ("pretrained", "scratch")


class TrainingCancelled(Exception):
    """Raised between batches when the caller sets the cancel event."""


@dataclass
class Callbacks:
    """Hooks for a UI. ``progress(stage, fraction, message)``; ``epoch(arm, record)`` after every epoch."""

    progress: Callable[[str, float, str], None] | None = None
    epoch: Callable[[str, dict], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def report(self, stage: str, fraction: float, message: str = "") -> None:
        if self.cancel.is_set():
            raise TrainingCancelled("Training was cancelled.")
        if self.progress is not None:
            self.progress(stage, min(max(fraction, 0.0), 1.0), message)


@dataclass
class PreparedImages:
    """Every image decoded once and resized (shorter side = ``resize_size``), plus its centre crop. Both live on disk
    (``core.decoded``): a run's memory does not grow with its dataset."""

    resized: DecodedImages  # uint8 [H, W, 3] each, min(H, W) == resize_size (scratch-arm augmentation source)
    crops: np.ndarray  # uint8 [N, S, S, 3], memory-mapped: exactly what the exported model's caller feeds it
    labels: np.ndarray  # int64 [N]
    files: list[str]
    hashes: list[str]


def prepare_images(items, image_size: int, spec: models.BackboneSpec, *, callbacks: Callbacks | None = None,
                   stage: str = "decode", memo: dict | None = None) -> PreparedImages:
    """Decode each image into the on-disk cache unless it is there already (``core.decoded``: keyed by content hash
    and resize rule, so repeats, arms and later runs reuse it). ``memo`` is accepted for the callers that keep
    features between calls; decoded images need no memo."""
    resize = spec.resize_for(image_size)

    def load(item) -> Path:
        return decode_once(item.path, item.sha256, resize, spec.interpolation)

    files: list[Path] = []
    with ThreadPoolExecutor(max_workers=4) as pool:  # Pillow releases the GIL while decoding
        for i, path in enumerate(pool.map(load, items)):
            files.append(path)
            if callbacks is not None and (i % 16 == 0 or i == len(items) - 1):
                callbacks.report(stage, (i + 1) / len(items), f"decoded {i + 1}/{len(items)} images")
    decoded = DecodedImages(files, [(i.path, i.sha256, resize, spec.interpolation) for i in items])
    crops = crop_file(decoded, image_size) if files else np.zeros((0, image_size, image_size, 3), np.uint8)
    trim(keep=[*files, Path(getattr(crops, "filename", "") or ".")])
    return PreparedImages(decoded, crops, np.array([i.label for i in items], dtype=np.int64),
                          [str(i.path) for i in items], [i.sha256 for i in items])


@dataclass
class RunResult:
    arm: str
    model: models.Classifier  # best-epoch weights, on CPU
    history: list[dict]
    best_epoch: int
    train_seconds: float
    val_probabilities: np.ndarray
    test_probabilities: np.ndarray | None = None
    extra: dict = field(default_factory=dict)  # engine names, feature timings ...
    trainer: NetworkTrainer | None = None  # the arms trained end to end: to go on training (``continue_arm``)
    ood: OodCalibration | None = None  # "fits no class" (``calibrate_unfamiliar``), for the export


def _seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return torch.Generator().manual_seed(seed)


def selection_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray | None:
    """Training images held out to choose the epoch that is kept: ``fraction`` of each class (at least one), drawn
    with ``seed``. None (no hold-out: the last epoch is kept) when ``fraction`` is 0 or a class has fewer than 3
    training images, which cannot spare one."""
    classes = np.unique(labels)
    if fraction <= 0 or any(np.sum(labels == c) < 3 for c in classes):
        return None
    rng = np.random.default_rng([seed, 0x5E1EC7])  # its own stream: the split's and training's draws are unchanged
    chosen = [rng.choice(np.flatnonzero(labels == c), max(1, round(fraction * np.sum(labels == c))), replace=False)
              for c in classes]
    return np.sort(np.concatenate(chosen))


def _index(p: PreparedImages, idx: np.ndarray) -> PreparedImages:
    return PreparedImages(p.resized[idx], take(p.crops, idx), p.labels[idx], [p.files[i] for i in idx],
                          [p.hashes[i] for i in idx])


def _without(n: int, idx: np.ndarray | None) -> np.ndarray:
    keep = np.ones(n, dtype=bool)
    if idx is not None:
        keep[idx] = False
    return keep


class _EpochLog:
    """What both arms do after every epoch: record it, keep the chosen epoch's weights, tell the callbacks, and say
    whether the time budget is spent. The epoch kept has the highest accuracy (then lowest loss) on the selection
    images held out from training; without them, it is the last epoch. The validation split is recorded for the
    learning curves and reported, and never chooses."""

    def __init__(self, arm: str, cfg: TrainConfig, callbacks: Callbacks, start: float):
        self.arm, self.cfg, self.callbacks, self.start = arm, cfg, callbacks, start
        self.limit = cfg.budget_seconds  # seconds of training allowed (``NetworkTrainer.extend`` raises it)
        self.granted = cfg.budget_seconds  # the budget plus any more time given: what the report calls the budget
        self.history: list[dict] = []
        self.best: dict | None = None
        self.best_state: dict | None = None
        self.stopped_by_budget = False

    def out_of_time(self, ahead: float = 0.0) -> bool:
        """Whether the budget is spent, or would be ``ahead`` seconds from now (the next batch and evaluation: an
        arm stops before a batch it has no time for, rather than overrunning its budget by one)."""
        return self.limit is not None and time.perf_counter() - self.start + ahead >= self.limit

    def summary(self) -> dict:
        """For the report: how much training happened (epochs, fractional when the budget cut one short)."""
        def at(record: dict) -> float:  # epochs of training behind a record
            return record["epoch"] - 1 + record.get("epoch_fraction", 1.0)

        last = self.history[-1] if self.history else {"epoch": 0}
        return {"epochs_done": round(at(last), 2), "kept_at_epochs": round(at(self.best), 2) if self.best else None,
                "stopped_by_budget": self.stopped_by_budget, "budget_seconds": self.granted}

    def end_epoch(self, epoch: int, train_loss: float, train_accuracy: float, val_loss: float, val_accuracy: float,
                  state: Callable[[], dict], selection: tuple[float, float] | None = None,
                  fraction: float = 1.0, stopped: bool = False) -> bool:
        """``selection``: (loss, accuracy) on the held-out selection images, or None when there are none.
        ``fraction``: the share of the epoch's batches that ran (below 1 when the budget stopped it midway). Returns
        whether the time budget is spent (training stops)."""
        record = {"epoch": epoch, "seconds": time.perf_counter() - self.start, "train_loss": train_loss,
                  "train_accuracy": train_accuracy, "val_loss": val_loss, "val_accuracy": val_accuracy}
        if fraction < 1.0:
            record["epoch_fraction"] = round(fraction, 3)
        if selection is not None:
            record.update(selection_loss=selection[0], selection_accuracy=selection[1])
        self.history.append(record)
        if selection is None or self.best is None or (
                (selection[1], -selection[0]) > (self.best["selection_accuracy"], -self.best["selection_loss"])):
            self.best, self.best_state = record, state()
        if self.callbacks.epoch is not None:
            self.callbacks.epoch(self.arm, record)
        spent = stopped or (self.limit is not None and record["seconds"] >= self.limit)
        self.stopped_by_budget = (spent and epoch < self.cfg.epochs) or fraction < 1.0
        return spent


def _evaluate_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    return float(F.cross_entropy(logits, labels)), float((logits.argmax(1) == labels).float().mean())


# ----------------------------------------------------------------------------------------------------------
# Pretrained arm: frozen backbone, features cached once, head trained on the cache.
# ----------------------------------------------------------------------------------------------------------

def train_pretrained(cfg: TrainConfig, classes: list[str], train: PreparedImages, val: PreparedImages,
                     test: PreparedImages | None, device: torch.device, callbacks: Callbacks,
                     selection: np.ndarray | None = None, memo: dict | None = None,
                     build_model: bool = True) -> RunResult:
    """``selection``: indices into ``train`` held out to choose the epoch (see ``selection_indices``). ``memo``:
    features kept between calls (repeats), by backbone, size, view and content hash. ``build_model=False``: the
    result's ``model`` is only the trained head (``Classifier.head``'s weights), for callers that only score it."""
    image_size = train.crops.shape[1]
    # The feature engine is built once per machine, backbone and size (an ONNX export, cached on disk, like
    # downloaded weights): its setup time is reported on its own, not as training time.
    setup = time.perf_counter()
    engine_key = ("engine", cfg.backbone, image_size, str(device), cfg.feature_engine)
    extractor = memo.get(engine_key) if memo is not None else None
    if extractor is None:
        extractor = make_feature_extractor(cfg.backbone, image_size, device, engine=cfg.feature_engine)
        if memo is not None:
            memo[engine_key] = extractor
    setup_seconds = time.perf_counter() - setup
    start = time.perf_counter()

    # Features: pure inference, once per image (and per view).
    views = [train.crops] + ([train.crops[:, :, ::-1]] if cfg.views == 2 else [])
    blocks = views + [val.crops] + ([test.crops] if test is not None else [])
    total, done = sum(len(b) for b in blocks), 0
    hashes = [train.hashes] * len(views) + [val.hashes] + ([test.hashes] if test is not None else [])
    flipped = [False, True][: len(views)] + [False] * (len(blocks) - len(views))
    feats = []
    for block, block_hashes, flip in zip(blocks, hashes, flipped):
        def on_batch(n: int, _total: int, base=done) -> None:
            callbacks.report("features", (base + n) / total, f"pretrained features {base + n}/{total} images")
        keys = [("features", cfg.backbone, image_size, flip, h) for h in block_hashes]
        todo = [i for i, k in enumerate(keys) if memo is None or k not in memo]
        fresh = extract_all(extractor, block[todo] if len(todo) < len(keys) else block, batch_size=cfg.batch_size,
                            on_batch=on_batch) if todo else None
        if memo is None or not keys:
            feats.append(torch.from_numpy(fresh if fresh is not None else extract_all(extractor, block)))
        else:
            memo.update((keys[i], row) for i, row in zip(todo, fresh if fresh is not None else []))
            feats.append(torch.from_numpy(np.stack([memo[k] for k in keys])))
        done += len(block)
    fit = torch.from_numpy(_without(len(train.labels), selection))
    x_train = torch.cat([f[fit] for f in feats[: len(views)]])
    y_train = torch.from_numpy(np.concatenate([train.labels[fit.numpy()]] * len(views)))
    if selection is not None:
        x_sel, y_sel = feats[0][torch.from_numpy(selection)], torch.from_numpy(train.labels[selection])
    x_val, y_val = feats[len(views)], torch.from_numpy(val.labels)
    x_test = feats[len(views) + 1] if test is not None else None
    feature_seconds = time.perf_counter() - start

    # Head: dropout + linear, trained on cached features (on CPU: a matrix this small gains nothing on a GPU).
    # Seeded here, after the features: building a torch backbone (torch engine, or an ONNX cache miss) draws from
    # the global RNG, and the head's initial weights must not depend on which engine ran or whether it was cached.
    gen = _seed_everything(cfg.seed)
    head = make_head(models.get_backbone_spec(cfg.backbone).feature_dim, len(classes))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.head_lr, weight_decay=cfg.head_weight_decay)
    log = _EpochLog("pretrained", cfg, callbacks, start)
    for epoch in range(1, cfg.epochs + 1):
        # forward/backward over shuffled mini-batches
        head.train()
        perm = torch.randperm(len(x_train), generator=gen)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            logits = head(x_train[idx])
            loss = F.cross_entropy(logits, y_train[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y_train[idx]).sum())
        # evaluate
        head.eval()
        with torch.no_grad():
            val_loss, val_acc = _evaluate_logits(head(x_val), y_val)
            chosen_on = _evaluate_logits(head(x_sel), y_sel) if selection is not None else None
        # log / stop
        out_of_time = log.end_epoch(epoch, loss_sum / len(perm), correct / len(perm), val_loss, val_acc,
                                    state=lambda: copy.deepcopy(head.state_dict()), selection=chosen_on)
        callbacks.report("pretrained", epoch / cfg.epochs,
                         f"pretrained epoch {epoch}/{cfg.epochs}: val acc {val_acc:.1%}")
        if out_of_time:
            break
    train_seconds = time.perf_counter() - start

    best_state = log.best_state
    head.load_state_dict(best_state)
    head.eval()
    with torch.no_grad():
        val_prob = torch.softmax(head(x_val), 1).numpy()
        test_prob = torch.softmax(head(x_test), 1).numpy() if x_test is not None else None
    if build_model:
        model = models.build_classifier(cfg.backbone, len(classes), pretrained=True)
        model.head.load_state_dict(best_state)
        model.freeze_backbone()
    else:
        model = head
    return RunResult("pretrained", model.eval(), log.history, log.best["epoch"], train_seconds, val_prob, test_prob,
                     extra={"feature_engine": extractor.engine, "device": _engine_device(extractor.engine),
                            "feature_seconds": feature_seconds,
                            "feature_engine_setup_seconds": setup_seconds, **log.summary(),
                            "features": {"train": feats[0].numpy(), "other": torch.cat(feats[len(views):]).numpy()}})


def _engine_device(engine: str) -> str:
    """Where a feature engine computes: "torch-cuda" and onnxruntime's GPU providers are "cuda", the rest "cpu"."""
    return "cuda" if engine == "torch-cuda" or engine.removeprefix("onnxruntime-") in GPU_PROVIDERS else "cpu"


# ----------------------------------------------------------------------------------------------------------
# Networks trained end to end on augmented images: the scratch arm (every layer, random init) and the
# pretrained arm when some backbone blocks are unfrozen (fine-tuning; no feature cache then).
# ----------------------------------------------------------------------------------------------------------

def _augment(image_size: int) -> v2.Compose:
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.6, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
    ])


def _track_batchnorm_faster(module: torch.nn.Module) -> None:
    """Some checkpoints' BatchNorm uses TF's slow decay (momentum 0.01): with a few dozen steps the running
    statistics would still be near their start and eval-mode predictions meaningless. Track them faster."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1


def train_from_scratch(cfg: TrainConfig, classes: list[str], train: PreparedImages, val: PreparedImages,
                       test: PreparedImages | None, device: torch.device, callbacks: Callbacks,
                       selection: np.ndarray | None = None) -> RunResult:
    gen = _seed_everything(cfg.seed)
    model = models.build_classifier(cfg.backbone, len(classes), pretrained=False)
    _track_batchnorm_faster(model)
    groups = [{"params": list(model.parameters()), "lr": cfg.scratch_lr}]
    return _train_network("scratch", model, groups, cfg.scratch_weight_decay, cfg, train, val, test, device,
                          callbacks, gen, selection)


def train_finetune(cfg: TrainConfig, classes: list[str], train: PreparedImages, val: PreparedImages,
                   test: PreparedImages | None, device: torch.device, callbacks: Callbacks,
                   selection: np.ndarray | None = None) -> RunResult:
    """The pretrained arm with the backbone's last ``cfg.unfreeze_blocks`` blocks trained along with the head."""
    gen = _seed_everything(cfg.seed)
    model = models.build_classifier(cfg.backbone, len(classes), pretrained=True)
    blocks = model.unfreeze_last_blocks(cfg.unfreeze_blocks)
    for block in blocks:
        _track_batchnorm_faster(block)
    groups = [{"params": [p for b in blocks for p in b.parameters()], "lr": cfg.backbone_lr},
              {"params": list(model.head.parameters()), "lr": cfg.head_lr}]
    result = _train_network("pretrained", model, groups, cfg.head_weight_decay, cfg, train, val, test, device,
                            callbacks, gen, selection)
    result.extra.update(unfrozen_blocks=cfg.unfreeze_blocks, backbone_blocks=len(model.blocks()),
                        trainable_parameters=sum(p.numel() for g in groups for p in g["params"]))
    return result


def _train_network(arm: str, model: models.Classifier, groups: list[dict], weight_decay: float, cfg: TrainConfig,
                   train: PreparedImages, val: PreparedImages, test: PreparedImages | None, device: torch.device,
                   callbacks: Callbacks, gen: torch.Generator, selection: np.ndarray | None = None) -> RunResult:
    trainer = NetworkTrainer(arm, model, groups, weight_decay, cfg, train, val, test, device, gen, selection)
    trainer.run(callbacks)
    result = trainer.result()
    result.trainer = trainer
    return result


class NetworkTrainer:
    """Trains ``model``'s parameters in ``groups`` (each with its peak ``lr``) with AdamW and a one-cycle schedule
    on augmented images; AMP and channels_last on CUDA. The training images at ``selection`` are held out and
    choose the epoch whose weights are kept.

    ``run`` trains until ``cfg.epochs`` are done or the time budget is spent, and can be called again after
    ``extend(seconds)``: it goes on from the batch where it stopped with the same optimizer, schedule, shuffling and
    history, so the learning curve simply continues (``can_continue`` says whether epochs are left)."""

    def __init__(self, arm: str, model: models.Classifier, groups: list[dict], weight_decay: float, cfg: TrainConfig,
                 train: PreparedImages, val: PreparedImages, test: PreparedImages | None, device: torch.device,
                 gen: torch.Generator, selection: np.ndarray | None = None):
        self.arm, self.cfg, self.device, self.gen, self.val, self.test = arm, cfg, device, gen, val, test
        self.held_out = None
        if selection is not None:
            self.held_out = _index(train, selection)
            train = _index(train, np.flatnonzero(_without(len(train.labels), selection)))
        self.train = train
        self.cuda = device.type == "cuda"
        self.model = model.to(device)
        self.trained_on = next(self.model.parameters()).device.type  # for the report: where the weights trained
        self.preprocess = ImagePreprocess(model.spec.mean, model.spec.std).to(device)
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
        self.steps_per_epoch = math.ceil(len(train.resized) / cfg.batch_size)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=[g["lr"] for g in groups],
                                                         total_steps=cfg.epochs * self.steps_per_epoch, pct_start=0.15)
        self.amp_dtype = torch.bfloat16 if self.cuda and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.cuda and self.amp_dtype == torch.float16)
        self.augment = _augment(train.crops.shape[1])
        self.log = _EpochLog(arm, cfg, Callbacks(), time.perf_counter())
        self.trained_seconds = 0.0  # training time so far (the pauses between ``run`` calls not counted)
        # where the next batch starts: the epoch, its shuffled order, the next batch's offset and the running sums
        self.epoch, self.perm, self.offset, self.sums = 1, None, 0, (0.0, 0, 0)
        self.batch_seconds = self.eval_seconds = 0.0  # recent costs: is there time for one more?

    @property
    def can_continue(self) -> bool:
        """Whether epochs are left (the time budget stopped the arm before it finished them)."""
        return self.epoch <= self.cfg.epochs

    def extend(self, seconds: float) -> None:
        """Give ``run`` ``seconds`` more of training time than it has used so far."""
        self.log.limit = self.trained_seconds + seconds
        self.log.granted = (self.log.granted or 0.0) + seconds

    def _forward(self, batch_nhwc: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(batch_nhwc.to(self.device, non_blocking=True))
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=self.amp_dtype) if self.cuda else contextlib.nullcontext():
            return self.model(x).float()

    def predict(self, images: np.ndarray) -> torch.Tensor:
        self.model.eval()
        with torch.inference_mode():  # a memory-mapped crop file: one batch resident
            return torch.cat([self._forward(torch.from_numpy(batch)).cpu()
                              for batch in slices(images, self.cfg.batch_size * 2)])

    def _weights(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def run(self, callbacks: Callbacks) -> None:
        cfg, train, log = self.cfg, self.train, self.log
        log.callbacks, log.start = callbacks, time.perf_counter() - self.trained_seconds
        y_val = torch.from_numpy(self.val.labels)
        at = self.epoch - 1 + (self.offset / len(self.perm) if self.perm is not None else 0.0)
        callbacks.report(self.arm, at / cfg.epochs, f"{self.arm}: starting at epoch {at:.2f} of {cfg.epochs}")
        try:
            while self.epoch <= cfg.epochs:
                # forward/backward with augmentation, from where the last call stopped
                self.model.train()
                if self.perm is None:
                    self.perm, self.offset, self.sums = torch.randperm(len(train.resized), generator=self.gen), 0, (
                        0.0, 0, 0)
                loss_sum, correct, seen = self.sums
                stopped = False
                while self.offset < len(self.perm) and not stopped:
                    began = time.perf_counter()
                    idx = self.perm[self.offset : self.offset + cfg.batch_size].tolist()
                    batch = torch.stack([self.augment(torch.from_numpy(train.resized[j]).permute(2, 0, 1))
                                         .permute(1, 2, 0) for j in idx])
                    y = torch.from_numpy(train.labels[idx]).to(self.device)
                    logits = self._forward(batch)
                    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                    self.opt.zero_grad(set_to_none=True)
                    self.scaler.scale(loss).backward()
                    self.scaler.step(self.opt)
                    self.scaler.update()
                    self.sched.step()
                    loss_sum += loss.item() * len(idx)
                    correct += int((logits.argmax(1) == y).sum())
                    seen += len(idx)
                    self.offset += len(idx)
                    self.sums = (loss_sum, correct, seen)
                    step = math.ceil(self.offset / cfg.batch_size)
                    callbacks.report(self.arm, (self.epoch - 1 + step / self.steps_per_epoch) / cfg.epochs,
                                     f"{self.arm} epoch {self.epoch}/{cfg.epochs}, batch {step}/{self.steps_per_epoch}")
                    took = time.perf_counter() - began
                    self.batch_seconds = took if not self.batch_seconds else 0.7 * self.batch_seconds + 0.3 * took
                    # after every batch: no batch starts that the budget has no room for (nor its evaluation)
                    stopped = log.out_of_time(ahead=self.batch_seconds + self.eval_seconds)
                # evaluate
                began = time.perf_counter()
                val_loss, val_acc = _evaluate_logits(self.predict(self.val.crops), y_val)
                chosen_on = (_evaluate_logits(self.predict(self.held_out.crops), torch.from_numpy(self.held_out.labels))
                             if self.held_out is not None else None)
                self.eval_seconds = time.perf_counter() - began
                finished = self.offset >= len(self.perm)
                epoch = self.epoch
                if finished:
                    self.epoch, self.perm = self.epoch + 1, None
                # log / stop
                if log.end_epoch(epoch, loss_sum / seen, correct / seen, val_loss, val_acc, state=self._weights,
                                 selection=chosen_on, fraction=seen / len(train.resized), stopped=stopped):
                    break
        finally:
            self.trained_seconds = time.perf_counter() - log.start

    def result(self) -> RunResult:
        """The run so far, with the kept epoch's weights (the trainer keeps its own to go on from)."""
        model = copy.deepcopy(self.model)
        current = self._weights()
        self.model.load_state_dict(self.log.best_state)
        val_prob = torch.softmax(self.predict(self.val.crops), 1).numpy()
        test_prob = torch.softmax(self.predict(self.test.crops), 1).numpy() if self.test is not None else None
        model.load_state_dict(self.log.best_state)
        self.model.load_state_dict(current)
        model = model.to("cpu", memory_format=torch.contiguous_format).eval()
        return RunResult(self.arm, model, list(self.log.history), self.log.best["epoch"], self.trained_seconds,
                         val_prob, test_prob,
                         extra={"amp": str(self.amp_dtype).replace("torch.", "") if self.cuda else None,
                                "device": self.trained_on, **self.log.summary()})


# ----------------------------------------------------------------------------------------------------------
# Metrics for one arm, and the whole comparison.
# ----------------------------------------------------------------------------------------------------------

def time_to_target(history: list[dict], target: float) -> float | None:
    return next((h["seconds"] for h in history if h["val_accuracy"] >= target), None)


def _scored(labels: np.ndarray, probabilities: np.ndarray, classes: list[str], seed: int) -> dict:
    """scikit-learn metrics of one split, each headline metric with its 95% interval (``<metric>_ci``)."""
    pred = probabilities.argmax(1)
    return {**classification_metrics(labels, pred, classes),
            **stats.headline_intervals(labels, pred, len(classes), seed=seed)}


def summarize_run(result: RunResult, classes: list[str], val: PreparedImages, test: PreparedImages | None,
                  target: float, *, seed: int = 0) -> dict:
    """One arm's report: metrics with intervals (bootstrap seeded with ``seed``), timings, verdict, history."""
    metrics = _scored(val.labels, result.val_probabilities, classes, seed)
    probs = result.val_probabilities
    wrong = [{"file": val.files[i], "true": classes[val.labels[i]], "predicted": classes[int(probs[i].argmax())],
              "probability": float(probs[i].max())} for i in misclassified(val.labels, probs, limit=50)]
    run = {
        **metrics,
        "misclassified": wrong,  # validation images, the most confidently wrong first (at most 50)
        "train_seconds": result.train_seconds,
        "time_to_target_seconds": time_to_target(result.history, target),
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "verdict": verdict(metrics),
        "history": result.history,
    }
    if test is not None and result.test_probabilities is not None:
        run["test"] = _scored(test.labels, result.test_probabilities, classes, seed)
    run.update({k: v for k, v in result.extra.items() if k != "features"})
    return run


def speedup(pretrained: dict, scratch: dict) -> float | dict | None:
    """How much sooner the pretrained arm reached the target; a lower bound if scratch never did."""
    t_pre, t_scr = pretrained["time_to_target_seconds"], scratch["time_to_target_seconds"]
    if t_pre is None:
        return None
    if t_scr is None:
        return {"lower_bound": scratch["train_seconds"] / max(t_pre, 1e-9)}
    return t_scr / max(t_pre, 1e-9)


@dataclass
class CompareResult:
    report: dict
    runs: dict[str, RunResult]
    train: PreparedImages
    val: PreparedImages
    test: PreparedImages | None
    dataset: Dataset
    selection_files: list[str] = field(default_factory=list)  # training images held out to choose the epoch
    cfg: TrainConfig | None = None
    selection: np.ndarray | None = None  # indices into ``train`` of the selection images (None: none held out)
    duplicates: dict | None = None  # core.duplicates.check_dataset with the features (report: its public part)


def run_compare(dataset: Dataset, cfg: TrainConfig | None = None, callbacks: Callbacks | None = None,
                *, arms: tuple[str, ...] | None = None) -> CompareResult:
    """Train the requested arms (both by default) on the dataset's split and build the report.

    With ``cfg.repeats`` K > 1 the whole comparison runs K times (seeds ``seed`` .. ``seed + K - 1``, and a new
    random split each time unless the folders fixed it); the first run is the result (its models are the ones
    exported) and ``report["repeats"]`` summarises all K (``summarize_repeats``)."""
    cfg = (cfg or TrainConfig()).validated()
    callbacks = callbacks or Callbacks()
    arms = arms or (ARMS if cfg.train_scratch else ("pretrained",))
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise ValueError(f"Unknown arm(s) {sorted(unknown)}: use pretrained and/or scratch.")
    memo: dict | None = {} if cfg.repeats > 1 else None
    result = _compare_once(dataset, cfg, callbacks, arms, memo, label="")
    if cfg.repeats == 1:
        return result
    reports = [result.report]
    for r in range(1, cfg.repeats):
        seed = cfg.seed + r
        again = _compare_once(dataset.resplit(seed), dataclasses.replace(cfg, seed=seed), callbacks, arms, memo,
                              label=f"repeat {r + 1}/{cfg.repeats}: ", dataset_checks=False)
        reports.append(again.report)
    result.report["repeats"] = summarize_repeats(reports, redrawn=bool(dataset.fractions)
                                                 and not dataset.predefined_split)
    return result


def summarize_repeats(reports: list[dict], *, redrawn: bool) -> dict:
    """Mean, spread and every value per arm over repeated comparisons, how often each arm met its target, and
    its time to target in each repeat (None: never)."""
    def spread(values: list[float]) -> dict:
        return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                "min": float(np.min(values)), "max": float(np.max(values)), "values": [float(v) for v in values]}

    target = reports[0]["target_accuracy"]
    arms = {}
    for arm in reports[0]["runs"]:
        runs = [rep["runs"][arm] for rep in reports]
        arms[arm] = {
            **{key: spread([run[key] for run in runs]) for key in ("val_accuracy", "balanced_accuracy", "f1_macro")},
            "met_target": float(np.mean([run["val_accuracy"] >= target for run in runs])),
            "time_to_target_seconds": [run["time_to_target_seconds"] for run in runs],
            "train_seconds": [run["train_seconds"] for run in runs],
            "best_epoch": [run["best_epoch"] for run in runs],
        }
    return {"count": len(reports), "seeds": [rep["seed"] for rep in reports],
            "splits": "a new random split per repeat" if redrawn else "the same split (fixed by the folders)",
            "target_accuracy": target, "arms": arms}


def _compare_once(dataset: Dataset, cfg: TrainConfig, callbacks: Callbacks, arms: tuple[str, ...],
                  memo: dict | None, label: str, build_models: bool = True,
                  dataset_checks: bool = True) -> CompareResult:
    """One comparison. ``dataset_checks=False`` leaves out the checks of the dataset itself (near-duplicates,
    shortcuts): repeats and the efficiency curve's points train on the same images again, and use only the scores."""
    device = resolve_device(cfg.device)
    spec = models.get_backbone_spec(cfg.backbone)
    image_size = cfg.resolved_image_size(device)
    classes = dataset.classes

    callbacks.report("decode", 0.0, f"{label}preparing the feature engine")
    wait_for_warm_up()  # a server's start-up export must not run beside training (see warm_up_feature_engine)

    callbacks.report("decode", 0.0, f"{label}decoding images")
    train_items, val_items, test_items = (dataset.split(s) for s in ("train", "val", "test"))
    all_items = train_items + val_items + test_items
    prepared = prepare_images(all_items, image_size, spec, callbacks=callbacks, memo=memo)
    n_tr, n_va = len(train_items), len(val_items)
    train = _subset(prepared, 0, n_tr)
    val = _subset(prepared, n_tr, n_tr + n_va)
    test = _subset(prepared, n_tr + n_va, len(all_items)) if test_items else None

    results: dict[str, RunResult] = {}
    pretrained = (train_finetune if cfg.unfreeze_blocks
                  else functools.partial(train_pretrained, memo=memo, build_model=build_models))
    trainers = {"pretrained": pretrained, "scratch": train_from_scratch}
    selection = selection_indices(train.labels, cfg.selection_fraction, cfg.seed)
    for arm in arms:
        results[arm] = trainers[arm](cfg, classes, train, val, test, device, callbacks, selection)

    report, found = _report(dataset, cfg, device, image_size, results, train, val, test, selection, dataset_checks)
    callbacks.report("done", 1.0, "training finished")
    held_out = [train.files[i] for i in selection] if selection is not None else []
    return CompareResult(report, results, train, val, test, dataset, held_out, cfg=cfg, selection=selection,
                         duplicates=found)


def _report(dataset: Dataset, cfg: TrainConfig, device: torch.device, image_size: int, results: dict[str, RunResult],
            train: PreparedImages, val: PreparedImages, test: PreparedImages | None,
            selection: np.ndarray | None, dataset_checks: bool = True) -> tuple[dict, dict | None]:
    """The comparison's report from its arms' results (each arm summarised, the paired test, the diagnostics), and
    the near-duplicate finding with its files (None without ``dataset_checks``; the report keeps its public part)."""
    classes = dataset.classes
    spec = models.get_backbone_spec(cfg.backbone)
    runs = {arm: summarize_run(r, classes, val, test, cfg.target_accuracy, seed=cfg.seed)
            for arm, r in results.items()}
    for run in runs.values():  # visitors download report.json: files relative to the dataset root, no server path
        for wrong in run["misclassified"]:
            wrong["file"] = dataset.relpath(wrong["file"])
    diagnostics, found = _diagnostics(dataset, classes, train, val, test, results, runs, dataset_checks)
    return {
        "dataset": {**dataset.to_dict(), "classes": classes,  # no server path: visitors download report.json
                    "counts": dataset.counts(), "skipped": [dataclasses.asdict(s) for s in dataset.skipped]},
        "device": device.type,
        "backbone": cfg.backbone,
        "backbone_spec": spec.metadata(),
        "image_size": image_size,
        "resize_size": spec.resize_for(image_size),
        "seed": cfg.seed,
        "target_accuracy": cfg.target_accuracy,
        "config": cfg.to_dict(),
        "runs": runs,
        "speedup_time_to_target": speedup(runs["pretrained"], runs["scratch"]) if len(runs) == 2 else None,
        "intervals": stats.interval_method(cfg.seed),
        "selection": _selection_summary(selection, cfg, train, val, test),
        "comparison": compare_arms(results, val) if len(results) == 2 else None,
        "diagnostics": diagnostics,
    }, found


def continue_arm(result: CompareResult, seconds: float, callbacks: Callbacks | None = None,
                 arm: str = "scratch") -> CompareResult:
    """Give ``arm`` (trained end to end, stopped by its time budget) ``seconds`` more: it goes on from where it
    stopped, on the same split with the same optimizer and schedule, and its history continues. Returns a new result
    whose report has that arm re-scored (the other arm is unchanged) and ``continued[arm]`` (the seconds added).
    Raises ValueError when the arm cannot go on (all its epochs done, repeats, or not trained here)."""
    callbacks = callbacks or Callbacks()
    run = result.runs.get(arm)
    trainer = run.trainer if run is not None else None
    if trainer is None or result.cfg is None:
        raise ValueError(f"The {arm} arm of this run cannot go on: train again.")
    if result.cfg.repeats > 1:
        raise ValueError("A run with repeats cannot go on (the repeats would no longer match): train again.")
    if not trainer.can_continue:
        raise ValueError(f"The {arm} arm already trained all its {result.cfg.epochs} epochs: to train it longer, "
                         "raise the epochs and train again.")
    if not seconds > 0:
        raise ValueError(f"More time must be a positive number of seconds, not {seconds!r}.")
    trainer.extend(seconds)
    trainer.run(callbacks)
    fresh = trainer.result()
    fresh.trainer = trainer
    results = {**result.runs, arm: fresh}
    report, found = _report(result.dataset, result.cfg, trainer.device, result.report["image_size"], results,
                            result.train, result.val, result.test, result.selection)
    before = (result.report.get("continued") or {}).get(arm, {})
    report["continued"] = {**(result.report.get("continued") or {}),
                           arm: {"extra_seconds": before.get("extra_seconds", 0.0) + seconds,
                                 "times": before.get("times", 0) + 1}}
    callbacks.report("done", 1.0, "training finished")
    return dataclasses.replace(result, report=report, runs=results, duplicates=found)


def _selection_summary(selection: np.ndarray | None, cfg: TrainConfig, train: PreparedImages, val: PreparedImages,
                       test: PreparedImages | None) -> dict:
    """Which images chose the epoch kept, and which were scored: never the same ones."""
    scored = {"val": len(val.labels), **({"test": len(test.labels)} if test is not None else {})}
    if selection is None:
        why = ("--selection-fraction is 0" if cfg.selection_fraction <= 0
               else "a class has fewer than 3 training images, too few to hold any out")
        return {"chosen_on": "last epoch", "reason": why, "images": 0, "fraction": cfg.selection_fraction,
                "scored_on": scored}
    return {"chosen_on": "selection", "images": int(len(selection)), "from": "train",
            "fraction": cfg.selection_fraction, "seed": cfg.seed, "trained_on": int(len(train.labels) - len(selection)),
            "scored_on": scored}


# Centroids from 100 of each class's images: on the 400 dev cat/dog photos (160 per class) they point 4.0 and 4.3
# degrees away from those of all, validation scores move by 0.013 at most and the threshold from 0.581 to 0.586; the
# scratch arm's pass over the images costs seconds on a CPU (5.4 s there, scripts/bench_checks.py).
CENTROID_IMAGES = 100


def calibrate_unfamiliar(results: dict[str, RunResult], train: PreparedImages, val: PreparedImages,
                         num_classes: int) -> dict:
    """Each arm's "fits no class" calibration (``models.explain.calibrate_ood``: class centroids of its training
    features, threshold on its validation scores), kept as each result's ``ood`` for the export; returns the summaries.
    The frozen backbone's features were computed for training already; other arms run their backbone once more, on
    the validation images and at most ``CENTROID_IMAGES`` training images of each class."""
    summaries = {}
    for arm, run in results.items():
        if run.ood is None:
            features = run.extra.get("features")
            if features is not None:
                fit, labels, scored = features["train"], train.labels, features["other"][: len(val.labels)]
            elif isinstance(run.model, models.Classifier):
                some = np.concatenate([np.flatnonzero(train.labels == c)[:CENTROID_IMAGES] for c in range(num_classes)])
                fit, labels = pooled_features(run.model, train.crops[some]), train.labels[some]
                scored = _pooled_in_slices(run.model, val.crops)
            else:  # only a head was kept (build_models=False): nothing to explain
                continue
            run.ood = calibrate_ood(fit, labels, scored, num_classes)
        summaries[arm] = run.ood.summary()
    return summaries


def _pooled_in_slices(model: models.Classifier, crops: np.ndarray, size: int = 512) -> torch.Tensor:
    """``pooled_features`` of a memory-mapped crop file a slice at a time, each slice's pages handed back after."""
    parts = [pooled_features(model, part) for part in slices(crops, size)]
    return torch.cat(parts) if parts else pooled_features(model, crops)


def compare_arms(results: dict[str, RunResult], val: PreparedImages) -> dict:
    """McNemar's test of the two arms on the same validation images (their best-epoch predictions)."""
    correct = {arm: r.val_probabilities.argmax(1) == val.labels for arm, r in results.items()}
    test = stats.mcnemar(correct["pretrained"], correct["scratch"], names=("pretrained", "scratch"))
    return {"test": "McNemar", "split": "val", **test.to_dict()}


def _subset(p: PreparedImages, lo: int, hi: int) -> PreparedImages:
    return PreparedImages(p.resized[lo:hi], p.crops[lo:hi], p.labels[lo:hi], p.files[lo:hi], p.hashes[lo:hi])


def _diagnostics(dataset: Dataset, classes, train, val, test, results: dict[str, RunResult], runs: dict,
                 dataset_checks: bool = True) -> tuple[dict, dict | None]:
    train_counts = dataset.counts()["train"]
    chance = float(np.bincount(val.labels).max() / len(val.labels))  # always answering the most common class
    main_arm = "pretrained" if "pretrained" in runs else next(iter(runs))
    features = results["pretrained"].extra.get("features") if "pretrained" in results else None
    train_features, other_features = (features["train"], features["other"]) if features else (None, None)
    other_files = val.files + (test.files if test is not None else [])
    other_hashes = val.hashes + (test.hashes if test is not None else [])

    def rel(files: list[str]) -> list[str]:
        return [dataset.relpath(f) for f in files]

    checks, found = {}, None
    if dataset_checks:
        items = dataset.split("train") + dataset.split("val") + dataset.split("test")  # the order of the features
        both = np.concatenate([train_features, other_features]) if features else None
        found = duplicates.check_dataset(dataset, both, items=items)
        checks = {"duplicates": duplicates.public(found),
                  "shortcuts": shortcuts.check_dataset(dataset),
                  "unfamiliar": calibrate_unfamiliar(results, train, val, len(classes))}
    return {
        "imbalance": diagnostics.imbalance(train_counts, val.labels, runs[main_arm], classes),
        **checks,
        "leakage": diagnostics.leakage(rel(train.files), train.hashes, rel(other_files), other_hashes,
                                       train_features, other_features),
        "overfitting": {arm: diagnostics.overfitting(run["history"], chance=chance, reported=run["val_accuracy"])
                        for arm, run in runs.items()},
    }, found
