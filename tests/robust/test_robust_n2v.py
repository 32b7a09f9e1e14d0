"""Noise2Void: blind-spot masking, masked loss, U-Net shapes, and N2V-Training end to end."""

from __future__ import annotations

import pytest
import torch
from conftest import make_split

from fastinfluence.robust import N2VConfig, N2VTrainer, blind_spot_mask
from fastinfluence.robust.n2v import (
    Denoiser,
    UNet,
    masked_mse,
    random_patches,
    train_denoiser,
)


def test_masks_the_documented_fraction_from_the_neighbourhood_never_the_pixel_itself():
    n, side, radius = 50, 64, 5
    # Every pixel value is unique, so each replacement reveals where it came from.
    patches = torch.arange(n * side * side, dtype=torch.float64).reshape(n, 1, side, side)
    masked, mask = blind_spot_mask(patches, 0.002, radius, torch.Generator().manual_seed(0))
    assert mask.shape == (n, 1, side, side)
    assert (mask.flatten(1).sum(1) == round(0.002 * side * side)).all()  # 8 of 4096 (0.2 %)
    assert torch.equal(masked[~mask], patches[~mask])
    image, row, col = mask[:, 0].nonzero(as_tuple=True)
    source = masked[image, 0, row, col].long() - image * side * side
    source_row, source_col = source // side, source % side
    assert ((source_row - row).abs() <= radius).all() and ((source_col - col).abs() <= radius).all()
    assert ((source_row != row) | (source_col != col)).all()
    # Replacements cover the whole window: rows and columns at every offset in [−ρ, ρ].
    assert set((source_row - row).tolist()) == set(range(-radius, radius + 1))


def test_corner_pixels_draw_from_inside_the_patch():
    patches = torch.arange(4 * 4, dtype=torch.float32).reshape(1, 1, 4, 4).repeat(400, 1, 1, 1)
    masked, mask = blind_spot_mask(patches, 0.5, 5, torch.Generator().manual_seed(1))
    assert (mask.flatten(1).sum(1) == 8).all()
    changed = masked[mask] != patches[mask]
    assert changed.all()  # values are unique within a patch: never the pixel's own value


def test_masked_mse_ignores_unmasked_pixels():
    target = torch.rand(2, 1, 8, 8)
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[0, 0, 1, 2] = mask[1, 0, 5, 5] = True
    prediction = target.clone()
    prediction[0, 0, 1, 2] += 1.0
    prediction[1, 0, 5, 5] += 3.0
    noisy = prediction + 10.0 * (~mask)
    assert masked_mse(noisy, target, mask) == pytest.approx(5.0)


def test_unet_shapes_and_size_check():
    net = UNet(depth=2, channels=4)
    assert net(torch.rand(2, 1, 16, 24)).shape == (2, 1, 16, 24)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.rand(1, 1, 18, 16))


@pytest.mark.parametrize(("field", "value"), [
    ("patch_size", 30), ("mask_fraction", 1.0), ("radius", 0), ("depth", 0),
    ("denoiser_epochs", 0),
])
def test_bad_config(field, value):
    with pytest.raises(ValueError, match=field):
        N2VConfig(**{field: value})


def test_trainer_two_epochs_on_denoised_images(model, splits):
    config = N2VConfig(epochs=2, lr=1e-3, batch_size=8, denoiser_epochs=2,
                       denoiser_batch_size=8, patch_size=16, channels=4, mask_fraction=0.02)
    trainer = N2VTrainer(model, config)
    result = trainer.fit(*splits)
    assert len(result.history) == 2 and len(result.extras["denoiser_losses"]) == 2
    denoised = trainer.train_data[0]
    assert denoised.shape == splits[0][0].shape
    assert not torch.equal(denoised, splits[0][0])
    assert denoised.min() >= 0 and denoised.max() <= 1
    torch.testing.assert_close(denoised, trainer.denoiser.denoise(splits[0][0]))
    assert result.seconds >= trainer.denoiser_seconds + sum(r.seconds for r in result.history)


def test_patch_larger_than_images(model, splits):
    config = N2VConfig(epochs=1, denoiser_epochs=1, patch_size=64)
    with pytest.raises(ValueError, match="patch_size"):
        N2VTrainer(model, config).fit(*splits)


def test_every_named_test_set_is_denoised(model, splits):
    config = N2VConfig(epochs=1, lr=1e-3, batch_size=8, denoiser_epochs=1,
                       denoiser_batch_size=8, patch_size=16, channels=4, mask_fraction=0.02)
    train, val, test = splits
    noisy = ((test[0] + 0.2 * torch.rand_like(test[0])).clamp(0, 1), test[1])
    trainer = N2VTrainer(model, config)
    result = trainer.fit(train, val, {"clean": test, "noisy": noisy})
    for name, (x, y) in (("clean", test), ("noisy", noisy)):
        denoised = (trainer.denoiser.denoise(x, config.eval_batch_size), y)
        assert result.final_test_accuracies[name] == trainer.accuracy(denoised)


def plain_n2v_loop(images, config, generator):
    """The oracle: the denoiser loop N2V ran before the shared loop took it over, written out
    by hand (plain batches, a last batch of one trained alone; every draw from
    ``generator``)."""
    denoiser = Denoiser(UNet(config.depth, config.channels, images.shape[1]),
                        float(images.mean()), max(float(images.std()), 1e-6))
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=config.denoiser_lr)
    losses = []
    denoiser.train()
    for _ in range(config.denoiser_epochs):
        total, batches = 0.0, 0
        order = torch.randperm(len(images), generator=generator)
        for index in order.split(config.denoiser_batch_size):
            patches = random_patches(images[index], config.patch_size, generator)
            standard = (patches - denoiser.mean) / denoiser.std
            masked, mask = blind_spot_mask(standard, config.mask_fraction, config.radius,
                                           generator)
            optimizer.zero_grad()
            loss = masked_mse(denoiser.net(masked), standard, mask)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            batches += 1
        losses.append(total / batches)
    denoiser.eval()
    return denoiser, losses


def test_denoiser_on_the_shared_loop_takes_the_plain_loops_steps_and_draws():
    images = make_split(17, 3, size=16)[0]  # 17 = 8 + 8 + 1: the last batch of one trains alone
    config = N2VConfig(denoiser_epochs=2, denoiser_batch_size=8, denoiser_lr=1e-2,
                       patch_size=8, channels=2, depth=1, mask_fraction=0.05, radius=2)
    ours_stream, oracle_stream = (torch.Generator().manual_seed(5) for _ in range(2))
    torch.manual_seed(1)
    ours, our_losses = train_denoiser(images, config, ours_stream, torch.device("cpu"))
    torch.manual_seed(1)
    oracle, oracle_losses = plain_n2v_loop(images, config, oracle_stream)
    assert our_losses == oracle_losses
    for (name, value), expected in zip(ours.state_dict().items(),
                                       oracle.state_dict().values(), strict=True):
        assert torch.equal(value, expected), name
    assert not ours.training
    # the stream continues where the oracle's does: the classifier then trains on the same draws
    assert torch.equal(ours_stream.get_state(), oracle_stream.get_state())
