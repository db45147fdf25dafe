"""pGAN baseline (Dar et al. 2019): the same generator trained with a conditional PatchGAN discriminator.

MONAI's ``GanTrainer`` draws the generator input from a latent sampler and gives the generator loss
only the fake images, so it cannot express an image-conditioned GAN with a reconstruction term. This
trainer is MONAI's ``SupervisedTrainer`` (same data, prepare_batch, handlers, checkpoints, validation)
whose iteration adds the discriminator step.
"""

from __future__ import annotations

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from scripts.metrics import split_target_mask


class ConditionalGanTrainer(SupervisedTrainer):
    """Least-squares conditional GAN: D sees (weighted images, maps); G minimises
    ``reconstruction + adversarial_weight * (D(x, G(x)) - 1)^2``.

    Args:
        discriminator: e.g. ``monai.networks.nets.PatchDiscriminator`` with ``in_channels`` = images + maps;
            a list output (MONAI's intermediate features) is reduced to its last element.
        d_optimizer: optimizer of the discriminator.
        adversarial_weight: weight of the adversarial term relative to the reconstruction loss.
        other args: as ``SupervisedTrainer``; ``loss_function`` is the reconstruction loss and
            ``network`` the generator (called with the extra inputs of ``prepare_batch``).
    """

    def __init__(self, *args, discriminator, d_optimizer, adversarial_weight: float = 0.01, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.discriminator = discriminator.to(self.state.device)
        self.d_optimizer = d_optimizer
        self.adversarial_weight = adversarial_weight

    def _judge(self, images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        out = self.discriminator(torch.cat([images, maps], dim=1))
        return out[-1] if isinstance(out, (list, tuple)) else out

    def _iteration(self, engine: ConditionalGanTrainer, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        inputs, targets, args, kwargs = engine.prepare_batch(
            batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs
        )
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        engine.network.train()
        engine.discriminator.train()
        fake = engine.inferer(inputs, engine.network, *args, **kwargs)
        real, _ = split_target_mask(fake, targets)
        engine.state.output[Keys.PRED] = fake
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)

        # discriminator step: real maps -> 1, generated maps -> 0
        engine.d_optimizer.zero_grad(set_to_none=True)
        d_real, d_fake = engine._judge(inputs, real), engine._judge(inputs, fake.detach())
        d_loss = 0.5 * (((d_real - 1) ** 2).mean() + (d_fake**2).mean())
        d_loss.backward()
        engine.d_optimizer.step()

        # generator step: reconstruction + fool the discriminator
        engine.optimizer.zero_grad(set_to_none=True)
        reconstruction = engine.loss_function(fake, targets).mean()
        adversarial = ((engine._judge(inputs, fake) - 1) ** 2).mean()
        loss = reconstruction + engine.adversarial_weight * adversarial
        engine.state.output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
        engine.state.output.update(d_loss=d_loss.detach(), adversarial=adversarial.detach())
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # MONAI decollates the output here
        return engine.state.output
