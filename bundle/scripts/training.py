"""Glue between the bundle configs and ignite: progress bar, metric history, resumable training."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.handlers import CheckpointLoader, CheckpointSaver, from_engine


class LossProgressBar:
    """tqdm progress bar over the iterations of each epoch, showing the running loss (rank 0 only)."""

    def __init__(self, persist: bool = False) -> None:
        self.persist = persist

    def attach(self, engine: Engine) -> None:
        loss = from_engine(["loss"], first=True)
        ProgressBar(persist=self.persist).attach(engine, output_transform=lambda output: {"loss": loss(output)})


class MetricsHistory:
    """Append one CSV row per validation round: epoch, training wall time so far, every metric.

    A validator run by ``ValidationHandler`` carries the trainer's epoch in its own state. A resumed run
    continues the file and its clock from the last row (the unfinished epoch of a stop is not counted).
    """

    def __init__(self, filename: str) -> None:
        self.path = Path(filename)
        self.start = time.time()
        if self.path.exists():
            with self.path.open() as f:
                rows = list(csv.DictReader(f))
            self.start -= float(rows[-1]["seconds"]) if rows else 0.0

    def attach(self, evaluator: Engine) -> None:
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, evaluator: Engine) -> None:
        row = {"epoch": evaluator.state.epoch, "seconds": round(time.time() - self.start, 1)}
        row.update({name: float(value) for name, value in sorted(evaluator.state.metrics.items())})
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)


class _BestRecord:
    """The best-model saver's record of its best score, in a form the per-epoch checkpoint can hold.

    MONAI's ``CheckpointSaver`` can load this record but not give it (it saves it only inside ``model.pt``,
    which must stay the network's plain state dict), so the record is read from its key-metric checkpointer.
    """

    def __init__(self, saver: CheckpointSaver) -> None:
        self.saver = saver

    def state_dict(self) -> dict:
        return self.saver._key_metric_checkpoint.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.saver.load_state_dict(state)


def resumable(
    trainer: Engine,
    checkpoint_dir: str,
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    best_model_saver: CheckpointSaver,
    device: torch.device | str = "cpu",
    save: bool = True,
    extra_state: dict | None = None,
    init_weights: str | None = None,
) -> Path | None:
    """Make training survive a stop: save its full state every epoch and resume from the newest one.

    Every epoch ``checkpoint_epoch=N.pt`` (network, optimizer, trainer epoch/iteration and the best-model
    saver's record; only the newest is kept) is written to ``checkpoint_dir``. If one is there at start,
    training continues from it, so a resumed run only replaces the best ``model.pt`` (the network's plain
    state dict, as the model zoo expects) with a better one. ``save=False`` (DDP ranks > 0) only resumes;
    ``extra_state`` adds objects to the saved state (e.g. a GAN's discriminator). This is Python, not
    config, because the trainer cannot appear in its own handler list in a bundle config.
    ``init_weights`` (a network state dict such as a shipped ``model.pt``, or a checkpoint holding it under
    ``"model"``) starts a new run from those weights, for fine-tuning; a run that resumes ignores it.
    Returns the checkpoint resumed from.
    """
    state = {
        "model": network,
        "optimizer": optimizer,
        "trainer": trainer,
        "checkpointer": _BestRecord(best_model_saver),
        **(extra_state or {}),
    }
    checkpoints = sorted(Path(checkpoint_dir).glob("checkpoint_epoch=*.pt"), key=lambda p: int(p.stem.split("=")[1]))
    if checkpoints:
        CheckpointLoader(str(checkpoints[-1]), state, map_location=device).attach(trainer)
    elif init_weights:
        CheckpointLoader(str(init_weights), {"model": network}, map_location=device).attach(trainer)
    if save:
        CheckpointSaver(checkpoint_dir, state, save_interval=1, n_saved=1).attach(trainer)
        # the new saver keeps only its own newest file; drop the one resumed from once it is superseded
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: [p.unlink(missing_ok=True) for p in checkpoints])
    return checkpoints[-1] if checkpoints else None
