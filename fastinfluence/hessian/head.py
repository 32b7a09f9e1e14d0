"""The closed-form softmax-cross-entropy Linear head on cached features (:mod:`.softmax_head`),
for ``params="last"`` on a final ``nn.Linear`` that the probe (:mod:`.probe`) showed is the
model's map: features cached by one forward pass through an inference copy of the network
(:mod:`fastinfluence.feature_pass`), everything else in closed form."""

from __future__ import annotations

import torch

from fastinfluence import ops
from fastinfluence.feature_pass import FeaturePass, head_feature_pass
from fastinfluence.functional import FunctionalModel
from fastinfluence.hessian import softmax_head
from fastinfluence.hessian.protocol import HEAD_CLOSED_FORM, Capability, CurvatureBackend
from fastinfluence.labelled_data import LabelledData
from fastinfluence.progress import progress_bar


class HeadBackend(CurvatureBackend):
    """The closed-form softmax-cross-entropy Linear head on cached features.

    ``C`` is the exact Hessian of the head, which equals its Gauss-Newton matrix (the logits
    are linear in θ_S). The training features are computed once, when the backend is built.
    """

    name = HEAD_CLOSED_FORM
    curvature = "exact"
    scoring = HEAD_CLOSED_FORM
    positive_semidefinite = True
    capabilities = frozenset({Capability.MINIBATCH_LISSA})

    def __init__(
        self,
        fmodel: FunctionalModel,
        train: LabelledData,
        progress: bool = False,
        features: softmax_head.HeadFeatures | None = None,
        feature_pass: FeaturePass | None = None,
    ) -> None:
        self.fmodel = fmodel
        self.train = train
        self.progress = progress
        self._feature_pass = feature_pass
        module = fmodel.selection.head
        self.layout = softmax_head.HeadLayout(module.out_features, module.in_features,
                                              module.bias is not None)
        self.train_features = self._read_features(train) if features is None else features
        self.dim = self.layout.dim
        self.dtype = fmodel.dtype
        self.device = fmodel.device
        self.num_samples = len(self.train_features)
        self.passes = 0

    def features(self, data: LabelledData) -> softmax_head.HeadFeatures:
        """Inputs of the head and softmax outputs over ``data`` (cached for the training set)."""
        return self.train_features if data is self.train else self._read_features(data)

    @property
    def feature_pass(self) -> str | None:
        """How the head's inputs were read (:mod:`fastinfluence.feature_pass`)."""
        return None if self._feature_pass is None else self._feature_pass.description

    def _read_features(self, data: LabelledData) -> softmax_head.HeadFeatures:
        """One no-grad forward pass over ``data``, capturing the head's inputs."""
        if self._feature_pass is None:
            self._feature_pass = head_feature_pass(self.fmodel)
        features, probs, labels = [], [], []
        batches = data.batches(self.fmodel.device, self.fmodel.dtype)
        for x, y in progress_bar(batches, self.progress, f"features ({data.name})",
                                 data.num_batches()):
            inputs, logits = self._feature_pass(x)
            features.append(inputs)
            probs.append(torch.softmax(logits, dim=1))
            labels.append(y)
        return softmax_head.HeadFeatures(torch.cat(features), torch.cat(probs),
                                         torch.cat(labels))

    def mean_gradient(self, data: LabelledData) -> torch.Tensor:
        return softmax_head.mean_gradient(self.features(data), self.layout)

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        return softmax_head.hvp(self.train_features, self.layout, vectors)

    def dense(self, chunk: int = 32) -> torch.Tensor:
        return softmax_head.dense_hessian(self.train_features, self.layout)

    def directional(self, data: LabelledData, directions: torch.Tensor) -> torch.Tensor:
        return -softmax_head.scores(self.features(data), self.layout, directions)

    def per_sample_gradients(self, data: LabelledData) -> torch.Tensor:
        return softmax_head.per_sample_gradients(self.features(data), self.layout)

    def restrict(self, indices: torch.Tensor) -> HeadBackend:
        features = self.train_features.subset(indices.to(self.device))
        return HeadBackend(self.fmodel, self.train, features=features,
                           feature_pass=self._feature_pass)

    def lissa_recursion(
        self,
        rhs: torch.Tensor,
        damping: float,
        scale: float,
        depth: int,
        minibatch_size: int,
        seed: int,
    ) -> torch.Tensor:
        """A whole minibatch LiSSA recursion for all right-hand sides in one native call
        (:func:`fastinfluence.ops.head_lissa`). Full-batch recursions are the solver's own,
        so that it can stop early on the residual."""
        weights, biases = self.layout.split(rhs)
        xw, xb = ops.head_lissa(self.train_features.features, self.train_features.probs,
                                weights, biases, damping, scale, depth, minibatch_size, seed)
        return self.layout.join(xw, xb)
