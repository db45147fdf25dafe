import math

import pytest
import torch
from monai.engines import SupervisedTrainer
from scripts.losses import PAPER_MAP_WEIGHTS, MaskedWeightedMSELoss


def random_case(seed=0, batch=2, size=(8, 8)):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.rand(batch, 3, *size, generator=gen)
    target = torch.rand(batch, 3, *size, generator=gen)
    mask = (torch.rand(batch, 1, *size, generator=gen) > 0.5).float()
    return pred, target, mask


def test_default_weights_are_the_papers():
    assert MaskedWeightedMSELoss().weights.tolist() == pytest.approx(list(PAPER_MAP_WEIGHTS))
    assert PAPER_MAP_WEIGHTS == (0.1, 0.5, 0.15)


def test_hand_computed_value():
    pred = torch.zeros(1, 3, 2, 2)
    target = torch.tensor([[[1.0, 2.0], [3.0, 100.0]], [[0.5, 0.5], [0.5, 9.0]], [[2.0, 0.0], [0.0, 9.0]]])[None]
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])[None, None]
    # in-mask MSE per map: T1 (1 + 4 + 9) / 3, T2 0.75 / 3, PD 4 / 3
    expected = 0.1 * 14 / 3 + 0.5 * 0.25 + 0.15 * 4 / 3
    assert MaskedWeightedMSELoss()(pred, target, mask).item() == pytest.approx(expected, rel=1e-6)
    assert MaskedWeightedMSELoss(weights=(1.0, 0.0, 0.0))(pred, target, mask).item() == pytest.approx(14 / 3)


def test_pooled_versus_per_sample():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[1.0, 1.0], [1.0, 7.0]]).expand(2, 1, 2, 2).clone()
    target[1] = 3.0
    mask = torch.tensor([[[1.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])[:, None]
    # sample 0: 3 voxels, error 1 each (SE 3); sample 1: 1 voxel, error 3 (SE 9)
    assert MaskedWeightedMSELoss(weights=(1.0,))(pred, target, mask).item() == pytest.approx(12 / 4)
    per_sample = MaskedWeightedMSELoss(weights=(1.0,), batch=False, reduction="none")(pred, target, mask)
    torch.testing.assert_close(per_sample, torch.tensor([1.0, 9.0]))
    assert MaskedWeightedMSELoss(weights=(1.0,), batch=False)(pred, target, mask).item() == pytest.approx(5.0)


@pytest.mark.parametrize("batch", [True, False])
def test_voxels_outside_the_mask_do_not_matter(batch):
    pred, target, mask = random_case()
    loss = MaskedWeightedMSELoss(batch=batch)
    outside = (mask == 0).expand_as(pred)
    noisy_pred = torch.where(outside, pred + 1e3 * torch.randn_like(pred), pred)
    noisy_target = torch.where(outside, -5.0, target)
    assert torch.equal(loss(pred, target, mask), loss(noisy_pred, noisy_target, mask))
    assert loss(noisy_pred, target, torch.ones_like(mask)) > 1e3  # ...which they would without the mask


def test_no_mask_is_the_weighted_mse():
    pred, target, _ = random_case()
    expected = sum(w * torch.mean((pred[:, c] - target[:, c]) ** 2) for c, w in enumerate(PAPER_MAP_WEIGHTS))
    torch.testing.assert_close(MaskedWeightedMSELoss()(pred, target), expected)


def test_per_channel_mask_broadcast_equivalence():
    pred, target, mask = random_case()
    loss = MaskedWeightedMSELoss()
    torch.testing.assert_close(loss(pred, target, mask), loss(pred, target, mask.expand_as(pred)))


@pytest.mark.parametrize("batch", [True, False])
def test_empty_mask_gives_zero_with_gradient(batch):
    pred, target, mask = random_case()
    pred.requires_grad_(True)
    value = MaskedWeightedMSELoss(batch=batch)(pred, target, torch.zeros_like(mask))
    assert value.item() == 0.0
    value.backward()
    assert torch.isfinite(pred.grad).all() and not pred.grad.any()


def test_one_empty_sample_contributes_zero_per_sample():
    pred, target, mask = random_case()
    mask[1] = 0
    per_sample = MaskedWeightedMSELoss(batch=False, reduction="none")(pred, target, mask)
    assert per_sample[0] > 0 and per_sample[1] == 0
    pooled = MaskedWeightedMSELoss()(pred, target, mask)
    torch.testing.assert_close(pooled, MaskedWeightedMSELoss()(pred[:1], target[:1], mask[:1]))


def test_two_argument_form_equals_three_argument_form():
    pred, target, mask = random_case()
    loss = MaskedWeightedMSELoss()
    packed = torch.cat([target, mask], dim=1)
    assert torch.equal(loss(pred, packed), loss(pred, target, mask))
    with pytest.raises(ValueError, match="mask was given twice"):
        loss(pred, packed, mask)


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((2, 3, 4, 4), (2, 2, 4, 4), None), "must match prediction"),
        (((2, 3, 4, 4), (2, 3, 4, 4), (2, 1, 4, 5)), "mask shape"),
        (((2, 3, 4, 4), (2, 3, 4, 4), (2, 2, 4, 4)), "mask shape"),
        (((2, 2, 4, 4), (2, 2, 4, 4), None), "3 weights for 2 channels"),
    ],
)
def test_bad_shapes_are_rejected(shapes, match):
    pred, target, mask = (None if s is None else torch.rand(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        MaskedWeightedMSELoss()(pred, target, mask)


def test_supervised_trainer_uses_the_packed_label():
    """MONAI's trainer calls loss(pred, label): the mask travels as the label's last channel."""
    torch.manual_seed(0)
    pred, target, mask = random_case()
    net = torch.nn.Conv2d(3, 3, kernel_size=1)
    loss = MaskedWeightedMSELoss()
    with torch.no_grad():
        expected = loss(net(pred), target, mask).item()
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[{"image": pred, "label": torch.cat([target, mask], dim=1)}],
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
        loss_function=loss,
        decollate=False,
    )
    trainer.run()
    assert trainer.state.output["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_log_loss_weighs_relative_errors():
    target = torch.tensor([[[[0.016]], [[0.6]], [[0.7]]]])  # WM-like T2 80 ms next to CSF-like values
    pred = target * torch.tensor([1.1, 1.1, 0.9]).reshape(1, 3, 1, 1)
    loss = MaskedWeightedMSELoss(weights=(1.0, 1.0, 1.0), log=True)(pred, target)
    expected = 2 * math.log(1.1) ** 2 + math.log(0.9) ** 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
