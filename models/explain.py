"""Where a classifier looked, and whether an image fits any class at all: computed inside the network, so an exported
graph carries both and an app needs no torch to use them.

**Class activation maps.** Every backbone ends in global average pooling and the head is linear, so
``logit_c = W_c . mean_xy(A) + b_c`` for the last feature map ``A``; moving the mean outside gives
``logit_c = mean_xy(W_c . A) + b_c``. The map ``W_c . A`` (a 1x1 convolution with the head's weights) shows how
much each region of the image adds to class ``c``, and its spatial mean *is* the logit, less the bias: exact, not
an approximation, and cheap (one small convolution).

**"Fits no class".** ``ood_score`` is one minus the cosine similarity of the image's pooled features to the nearest
class centroid (the mean direction of that class's training images' features): near 0 for an image like the training
images of some class, larger the further it is from all of them. Cosine, not Euclidean distance, because the scale of
the features varies with an image's contrast while their direction carries what it shows. Not centred on the training
mean: with two classes the centred centroids point in opposite directions, so every image is close to one of them (AUROC
0.89 instead of 0.999-1.000 on the dev cats/dogs against textures, shapes and digits; ``scripts/bench_unfamiliar.py``
measures this and the usual alternatives, max softmax and energy). The threshold is calibrated on the validation split
(``ood_threshold``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .preprocess import ImagePreprocess

OOD_QUANTILE = 0.99  # an image is flagged when it scores above 99% of the validation images: ~1 in 100 look-alikes
_EPS = 1e-12


def class_centroids(features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                    num_classes: int) -> torch.Tensor:
    """Unit-length mean direction of each class's unit-length features: ``[num_classes, feature_dim]``."""
    x = _unit(_float(features))
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    missing = sorted(set(range(num_classes)) - set(y.tolist()))
    if missing:
        raise ValueError(f"class indices {missing} have no training features; every class needs at least one.")
    sums = torch.zeros(num_classes, x.shape[1]).index_add_(0, y, x)
    return _unit(sums)


def _unit(x: torch.Tensor) -> torch.Tensor:
    # x * rsqrt(max(sum x^2, eps)): exports as plain arithmetic (ReduceSum, Clip, Sqrt, Reciprocal). Not "+ eps":
    # torch.onnx drops that addition, and features near zero (an untrained network) then differ from PyTorch's.
    return x * torch.rsqrt(torch.clamp_min((x * x).sum(dim=1, keepdim=True), _EPS))


def _float(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32)


def ood_scores(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``1 - max_c cos(features, centroid_c)`` per row: 0 = on a class's direction, up to 2 = opposite to all."""
    return 1.0 - (_unit(features) @ centroids.T).amax(dim=1)


def ood_threshold(val_scores: np.ndarray | torch.Tensor, quantile: float = OOD_QUANTILE) -> float:
    """The score above which an image is flagged: the ``quantile`` of the validation images' scores."""
    scores = np.asarray(val_scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("no validation scores to calibrate the threshold on.")
    return float(np.quantile(scores, quantile))


@dataclass(frozen=True)
class OodCalibration:
    """What the exported ``ood_score`` needs: the class centroids, and the threshold taken on the validation split."""

    centroids: torch.Tensor  # [num_classes, feature_dim], unit rows
    threshold: float
    quantile: float
    val_scores: np.ndarray  # the validation images' scores the threshold was taken from

    def summary(self) -> dict:
        """JSON-friendly: the threshold, the quantile, and how many validation images score above it."""
        return {"threshold": self.threshold, "quantile": self.quantile, "n_val": int(len(self.val_scores)),
                "val_above": int((self.val_scores > self.threshold).sum()),
                "val_median": float(np.median(self.val_scores)) if len(self.val_scores) else None}


def calibrate_ood(train_features: torch.Tensor | np.ndarray, train_labels: np.ndarray,
                  val_features: torch.Tensor | np.ndarray, num_classes: int,
                  quantile: float = OOD_QUANTILE) -> OodCalibration:
    """Centroids from the training features, the threshold from the validation features' scores."""
    centroids = class_centroids(train_features, train_labels, num_classes)
    scores = ood_scores(_float(val_features), centroids).numpy()
    return OodCalibration(centroids, ood_threshold(scores, quantile), quantile, scores)


def class_activation_maps(classifier: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(maps [N, K, h, w], pooled features [N, D])`` for a normalised batch ``x`` (``models.Classifier``)."""
    feature_map = classifier.backbone.feature_map(x)
    linear = classifier.head[-1]
    maps = F.conv2d(feature_map, linear.weight[:, :, None, None])
    return maps, feature_map.mean(dim=(2, 3))


class ExplainedClassifier(nn.Module):
    """uint8 ``[N, H, W, 3]`` -> ``(logits, probabilities, cam, ood_score)``: a classifier whose outputs also say
    where it looked (``cam`` ``[N, K, h, w]``) and how unlike every class the image is (``ood_score`` ``[N]``).

    ``logits`` come from the head applied to the pooled features, as in ``ImageClassifier``, so the first two
    outputs are the plain model's.
    """

    def __init__(self, classifier: nn.Module, ood: OodCalibration):
        super().__init__()
        spec = classifier.spec
        self.preprocess = ImagePreprocess(spec.mean, spec.std)
        self.classifier = classifier
        self.spec = spec
        k, d = classifier.head[-1].weight.shape
        if tuple(ood.centroids.shape) != (k, d):
            raise ValueError(f"centroids must be [{k}, {d}] (classes x features), got {list(ood.centroids.shape)}.")
        self.register_buffer("centroids", ood.centroids.detach().to(torch.float32).clone())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        maps, pooled = class_activation_maps(self.classifier, self.preprocess(images))
        logits = self.classifier.head(pooled)
        return logits, torch.softmax(logits, dim=1), maps, ood_scores(pooled, self.centroids)


@torch.no_grad()
def pooled_features(classifier: nn.Module, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """The classifier's pooled backbone features ``[N, D]`` for prepared uint8 images ``[N, S, S, 3]``, on CPU."""
    preprocess = ImagePreprocess(classifier.spec.mean, classifier.spec.std)
    was_training = classifier.training
    classifier.eval()
    try:
        parts = [classifier.backbone(preprocess(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size]))))
                 for i in range(0, len(images), batch_size)]
    finally:
        classifier.train(was_training)
    return torch.cat(parts) if parts else torch.zeros(0, classifier.spec.feature_dim)


@torch.no_grad()
def explain(classifier: nn.Module, images: np.ndarray, ood: OodCalibration | None = None,
            batch_size: int = 32) -> dict[str, np.ndarray]:
    """``{"probabilities", "cam", "ood_score"}`` (numpy) for prepared uint8 images, computed in torch by the same
    module the export traces. Without ``ood`` the scores are NaN."""
    k, d = classifier.head[-1].weight.shape
    module = ExplainedClassifier(classifier, ood or OodCalibration(torch.zeros(k, d), 0.0, 0.0, np.zeros(0))).eval()
    was_training = classifier.training
    outputs: dict[str, list[np.ndarray]] = {"probabilities": [], "cam": [], "ood_score": []}
    try:
        for i in range(0, len(images), batch_size):
            _, probs, maps, scores = module(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])))
            for key, value in zip(outputs, (probs, maps, scores)):
                outputs[key].append(value.numpy())
    finally:
        classifier.train(was_training)
    result = {key: np.concatenate(parts) for key, parts in outputs.items() if parts}
    if ood is None:
        result["ood_score"] = np.full(len(images), np.nan, np.float32)
    return result
