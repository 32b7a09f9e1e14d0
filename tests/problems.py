"""Small float64 models and data shared by the engine's tests."""

from __future__ import annotations

import torch
from torch import nn


def logistic(features: int = 5, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(features, classes))


def mlp(features: int = 5, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(features, 8), nn.Tanh(), nn.Linear(8, classes))


def small_cnn(classes: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, classes),
    )


class LSTMClassifier(nn.Module):
    """A sequence classifier; in float32 torch's CPU LSTM kernel has no forward-mode
    derivative."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class TiedEncoderDecoder(nn.Module):
    """An encoder and a decoder sharing one square weight (``decoder.weight is
    encoder.weight``, listed once by ``named_parameters()``, as ``encoder.weight``); the
    decoder's output is the model's. ``output_first`` registers the decoder first, so the
    shared weight is listed under the decoder's name."""

    def __init__(self, features: int = 5, output_first: bool = False) -> None:
        super().__init__()
        if output_first:
            self.decoder = nn.Linear(features, features)
        self.encoder = nn.Linear(features, features)
        if not output_first:
            self.decoder = nn.Linear(features, features)
        self.decoder.weight = self.encoder.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.tanh(self.encoder(x)))

class TransformerClassifier(nn.Module):
    """A float sequence ``[batch, length, 4]`` through one ``nn.TransformerEncoderLayer``
    (2 heads, ``batch_first``), mean-pooled, and a Linear head; with ``key_padding=True`` it
    is called as ``model(x, padding_mask)`` (``True`` marks padding)."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0,
                                           batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=batch_first)
        self.head = nn.Linear(4, 3)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.batch_first:
            return self.head(self.encoder(x.transpose(0, 1)).mean(dim=0))
        encoded = self.encoder(x, src_key_padding_mask=padding_mask)
        if padding_mask is None:
            return self.head(encoded.mean(dim=1))
        kept = (~padding_mask)[..., None].to(x.dtype)
        return self.head((encoded * kept).sum(dim=1) / kept.sum(dim=1))


def transformer_problem(seed: int = 0, n_train: int = 12, n_val: int = 4, length: int = 3,
                        batch_first: bool = True):
    """A float64 :class:`TransformerClassifier` (eval mode) and ``(X, y)`` train and val."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TransformerClassifier(batch_first).double().eval()
    x_train = torch.randn(n_train, length, 4, generator=generator, dtype=torch.float64)
    x_val = torch.randn(n_val, length, 4, generator=generator, dtype=torch.float64)
    y_train = torch.randint(0, 3, (n_train,), generator=generator)
    y_val = torch.randint(0, 3, (n_val,), generator=generator)
    return model, (x_train, y_train), (x_val, y_val)


class Packed(nn.Module):
    """The oracle's single-tensor twin of a model of several inputs: ``model(*args, **kwargs)``
    of ``unpack(X)`` (the functions of ``fastinfluence.reference`` call ``model(X)``)."""

    def __init__(self, model: nn.Module, unpack) -> None:
        super().__init__()
        self.model, self.unpack = model, unpack

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        args, kwargs = self.unpack(X)
        return self.model(*args, **kwargs)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def with_running_statistics(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``model`` in eval mode, its BatchNorm running statistics taken from ``2x + 0.5``
    (non-trivial: neither zero mean nor unit variance)."""
    model.train()
    with torch.no_grad():
        model(x * 2 + 0.5)
    return model.eval()


def make_problem(kind: str, seed: int = 0, n_train: int = 40, n_val: int = 10):
    """A float64 model (eval mode; BatchNorm with non-trivial running statistics) and data."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    shape = (1, 8, 8) if kind == "cnn" else (5,)
    model = {"logistic": logistic, "mlp": mlp, "cnn": small_cnn}[kind]().double()
    x_train = torch.randn(n_train, *shape, generator=generator, dtype=torch.float64)
    x_val = torch.randn(n_val, *shape, generator=generator, dtype=torch.float64)
    y_train = torch.randint(0, 3, (n_train,), generator=generator)
    y_val = torch.randint(0, 3, (n_val,), generator=generator)
    if kind == "cnn":
        with_running_statistics(model, x_train)
    model.eval()
    return model, (x_train, y_train), (x_val, y_val)
