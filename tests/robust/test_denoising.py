"""The denoising paper's defence (neighbour loss, embedded auto-encoder) and Reformer / HGD."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastinfluence.models import resnet18, vgg16
from fastinfluence.robust import NaiveTrainer, TrainConfig, denoising
from fastinfluence.robust.denoising import (
    DenoisingConfig,
    DenoisingNet,
    DenoisingTrainer,
    ImageDecoder,
    neighbour_loss,
    noisy_copies,
    reconstruction_loss,
)
from fastinfluence.robust.input_denoisers import (
    ConvDenoiser,
    DenoisedClassifier,
    train_guided_denoiser,
    train_reformer,
)


def colour_split(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB images whose class (0, 1, 2) is the brighter colour channel."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = 0.4 * torch.rand(n, 3, size, size, generator=generator)
    x[torch.arange(n), y] += 0.4
    return x.clamp(0, 1), y


@pytest.fixture
def splits():
    return colour_split(16, 0), colour_split(6, 1), colour_split(6, 2)


def tiny_resnet(decoder: bool = True, stem: str = "imagenet") -> DenoisingNet:
    torch.manual_seed(0)
    return DenoisingNet.from_resnet(resnet18(3, width=4, stem=stem), decoder)


def tiny_vgg(decoder: bool = True) -> DenoisingNet:
    torch.manual_seed(0)
    return DenoisingNet.from_vgg(vgg16(3, width=4), decoder)


def test_neighbour_loss_is_zero_for_identical_features_and_the_mean_squared_distance():
    clean = torch.randn(4, 6, dtype=torch.float64)
    assert float(neighbour_loss(clean.repeat(3, 1), clean)) == 0.0
    noisy = torch.randn(8, 6, dtype=torch.float64)
    expected = sum(float(((noisy[k * 4 + i] - clean[i]) ** 2).sum())
                   for k in range(2) for i in range(4)) / (8 * 6)
    assert float(neighbour_loss(noisy, clean)) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="multiple"):
        neighbour_loss(noisy[:7], clean)


def test_neighbour_loss_sends_no_gradient_into_the_clean_branch(monkeypatch):
    clean = torch.randn(4, 6, requires_grad=True)
    noisy = torch.randn(12, 6, requires_grad=True)
    neighbour_loss(noisy, clean).backward()
    assert clean.grad is None
    assert noisy.grad is not None and noisy.grad.abs().sum() > 0
    # through a shared network: the clean images' gradient is zero, the noisy ones' is not
    # through the trainer's batch loss (train mode, BatchNorm): with the noisy copies cut off
    # from x, the clean images get the gradient of L_c alone, whatever λ_n
    make_copies = denoising.noisy_copies
    monkeypatch.setattr(denoising, "noisy_copies", lambda *a: make_copies(*a).detach())
    gradients = []
    for lambda_n in (0.0, 5.0):
        trainer = DenoisingTrainer(tiny_resnet(decoder=False),
                                   DenoisingConfig(lambda_n=lambda_n, lambda_a=0.0, seed=1))
        trainer.model.train()
        trainer.before_epoch(0)
        x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        x.requires_grad_(True)
        trainer.batch_loss(x, torch.arange(4) % 3, torch.arange(4)).backward()
        gradients.append(x.grad)
    torch.testing.assert_close(gradients[0], gradients[1])


def test_reconstruction_loss_is_the_mean_squared_error_to_the_clean_image():
    clean = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    reconstructions = torch.rand(9, 1, 4, 4, dtype=torch.float64)
    expected = sum(float(((reconstructions[k * 3 + i] - clean[i]) ** 2).mean())
                   for k in range(3) for i in range(3)) / 9
    assert float(reconstruction_loss(reconstructions, clean)) == pytest.approx(expected)
    assert float(reconstruction_loss(clean.repeat(2, 1, 1, 1), clean)) == 0.0


def test_noisy_copies_are_within_sigma_in_range_and_copy_major():
    x = torch.rand(5, 3, 8, 8)
    x[0] = 0.0
    noisy = noisy_copies(x, 3, 0.2, torch.Generator().manual_seed(0))
    assert noisy.shape == (15, 3, 8, 8)
    assert noisy.min() >= 0 and noisy.max() <= 1
    assert ((noisy - x.repeat(3, 1, 1, 1)).abs() <= 0.2 + 1e-6).all()
    assert not torch.equal(noisy[:5], noisy[5:10])  # fresh noise per copy
    assert (noisy - x.repeat(3, 1, 1, 1)).abs().mean() > 0.05


@pytest.mark.parametrize("stem, size", [("imagenet", 32), ("small", 16)])
def test_resnet_split_computes_the_same_logits_and_reconstructs_the_input_size(stem, size):
    torch.manual_seed(0)
    resnet = resnet18(3, width=4, stem=stem).double().eval()
    model = DenoisingNet.from_resnet(resnet).double().eval()
    x = torch.rand(2, 3, size, size, dtype=torch.float64)
    logits, features, reconstruction = model.parts(x)
    torch.testing.assert_close(model(x), resnet(x))
    torch.testing.assert_close(logits, resnet(x))
    assert features.shape[0] == 2 and reconstruction.shape == x.shape
    assert reconstruction.min() >= 0 and reconstruction.max() <= 1
    assert model.body[0] is resnet.layer2  # shared, not copied


def test_vgg16_has_sixteen_weight_layers_and_splits_after_block_two():
    vgg = vgg16(3, width=4).double().eval()
    weights = [m for m in vgg.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weights) == 16
    model = DenoisingNet.from_vgg(vgg).double().eval()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(model(x), vgg(x))
    assert model.encoder(x).shape[-1] == 8 and model.parts(x)[2].shape == x.shape


def test_trainer_minimises_the_weighted_sum_of_the_three_losses(splits):
    model = tiny_resnet().double()
    config = DenoisingConfig(epochs=1, lambda_n=0.7, lambda_a=3.0, copies=2, noise=0.1, seed=5)
    trainer = DenoisingTrainer(model, config)
    x, y = splits[0]
    x = x.double()
    trainer.before_epoch(0)
    loss = trainer.batch_loss(x, y, torch.arange(len(y)))
    noisy = noisy_copies(x, 2, 0.1, torch.Generator().manual_seed(5))
    clean_parts, noisy_parts = model.parts(x), model.parts(noisy)
    logits, features, reconstructions = (torch.cat(pair) for pair in
                                         zip(clean_parts, noisy_parts, strict=True))
    terms = {"L_c": F.cross_entropy(logits, y.repeat(3)),
             "L_n": F.mse_loss(features[16:], features[:16].detach().repeat(2, 1)),
             "L_a": F.mse_loss(reconstructions, x.repeat(3, 1, 1, 1))}
    torch.testing.assert_close(loss, terms["L_c"] + 0.7 * terms["L_n"] + 3.0 * terms["L_a"])
    # the epoch's mean of each term, as the run records them
    recorded = trainer.extras()["loss_terms"]
    assert recorded.keys() == terms.keys()
    for name, value in terms.items():
        assert recorded[name] == pytest.approx([float(value.detach())], rel=1e-12)


def test_auto_encoder_loss_falls_on_a_tiny_set(splits):
    config = DenoisingConfig(epochs=8, lambda_n=0.0, lambda_a=10.0, batch_size=8, flip=False)
    result = DenoisingTrainer(tiny_resnet(), config).fit(*splits)
    reconstruction = result.extras["loss_terms"]["L_a"]
    assert len(reconstruction) == 8
    assert reconstruction[-1] < 0.7 * reconstruction[0]


@pytest.mark.parametrize("build", [tiny_resnet, tiny_vgg])
@pytest.mark.parametrize("lambda_n, lambda_a", [(0.0, 0.0), (1.0, 0.0), (0.0, 10.0),
                                                (1.0, 10.0)])
def test_each_defence_trains_two_epochs(build, lambda_n, lambda_a, splits):
    model = build(decoder=lambda_a > 0)
    before = [p.detach().clone() for p in model.parameters()]
    if lambda_n == lambda_a == 0:
        result = NaiveTrainer(model, TrainConfig(epochs=2, optimizer="sgd", batch_size=8)
                              ).fit(*splits)
    else:
        config = DenoisingConfig(epochs=2, lambda_n=lambda_n, lambda_a=lambda_a, batch_size=8)
        result = DenoisingTrainer(model, config).fit(*splits)
        terms = result.extras["loss_terms"]
        assert all(len(v) == 2 and all(torch.isfinite(torch.tensor(v))) for v in terms.values())
        assert (terms["L_a"][0] > 0) == (lambda_a > 0)
    assert len(result.history) == 2
    assert all(torch.isfinite(torch.tensor(h.train_loss)) for h in result.history)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_reformer_and_hgd_train_two_epochs_and_hgd_leaves_the_classifier_alone(splits):
    x, _ = splits[0]
    torch.manual_seed(0)
    reformer = ConvDenoiser(3, width=8)
    losses = train_reformer(reformer, x, epochs=2, batch_size=8)
    assert len(losses) == 2 and not reformer.training
    with torch.no_grad():
        assert reformer(x).shape == x.shape and 0 <= float(reformer(x).min())

    classifier = tiny_resnet(decoder=False)
    classifier.train()
    state = {k: v.clone() for k, v in classifier.state_dict().items()}
    denoiser = ConvDenoiser(3, width=8, residual=True)
    torch.testing.assert_close(denoiser(x), x)  # starts as the identity
    adversarial = (x + 0.03 * torch.randn(x.shape)).clamp(0, 1)
    losses = train_guided_denoiser(denoiser, classifier, x, adversarial, epochs=2,
                                   batch_size=8)
    assert len(losses) == 2 and all(v >= 0 for v in losses)
    assert classifier.training and all(p.requires_grad for p in classifier.parameters())
    for name, value in classifier.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert not torch.equal(denoiser(adversarial), adversarial)  # it learnt something
    both = DenoisedClassifier(denoiser, classifier.eval())
    torch.testing.assert_close(both(x), classifier(denoiser(x)))


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="lambda_n"):
        DenoisingConfig(lambda_n=-1.0)
    with pytest.raises(ValueError, match="copies"):
        DenoisingConfig(copies=0)
    with pytest.raises(ValueError, match="decoder"):
        DenoisingTrainer(tiny_resnet(decoder=False), DenoisingConfig(lambda_a=1.0))
    with pytest.raises(TypeError, match="DenoisingNet"):
        DenoisingTrainer(nn.Linear(2, 2), DenoisingConfig())
    assert isinstance(ImageDecoder(8, 3, 2)(torch.rand(1, 8, 4, 4)), torch.Tensor)


def plain_denoiser_loop(model, loss_of, images, epochs, batch_size, seed):
    """The oracle: Adam steps on ``loss_of(model, index, generator)`` over shuffled batches
    (a last batch of one joined to the one before), written out by hand."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    model.train()
    for _ in range(epochs):
        batches = list(torch.randperm(len(images), generator=generator).split(batch_size))
        if len(batches[-1]) == 1:
            batches[-2:] = [torch.cat(batches[-2:])]
        total = 0.0
        for index in batches:
            loss = loss_of(model, index, generator)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        losses.append(total / len(batches))
    return losses


def test_reformer_and_hgd_take_the_plain_loops_steps_on_the_shared_trainer():
    x, _ = colour_split(17, 3, size=16)  # 17 = 8 + 9: the last batch of one is joined
    adversarial = (x + 0.03 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
                   ).clamp(0, 1)
    classifier = tiny_resnet(decoder=False).eval()

    def reformer_loss(model, index, generator):
        noisy = (x[index] + 0.1 * torch.randn(x[index].shape, generator=generator)).clamp(0, 1)
        return F.mse_loss(model(noisy), x[index])

    def hgd_loss(model, index, generator):
        with torch.no_grad():
            target = classifier.parts(x[index])[1]
        return F.l1_loss(classifier.parts(model(adversarial[index]))[1], target)

    for residual, train, loss_of in (
            (False, lambda m: train_reformer(m, x, epochs=2, batch_size=8, seed=5),
             reformer_loss),
            (True, lambda m: train_guided_denoiser(m, classifier, x, adversarial, epochs=2,
                                                   batch_size=8, seed=5), hgd_loss)):
        torch.manual_seed(1)
        ours, oracle = ConvDenoiser(3, 4, residual), ConvDenoiser(3, 4, residual)
        oracle.load_state_dict(ours.state_dict())
        if residual:  # a zero output layer would make every step the same: perturb it
            for model in (ours, oracle):
                torch.manual_seed(2)
                nn.init.normal_(model.layers[-1].weight, std=0.01)
        assert train(ours) == plain_denoiser_loop(oracle, loss_of, x, 2, 8, 5)
        for (name, value), expected in zip(ours.state_dict().items(),
                                           oracle.state_dict().values(), strict=True):
            assert torch.equal(value, expected), name
        assert not ours.training
