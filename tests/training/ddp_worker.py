"""Run by test_ddp under torchrun: train, then report this rank's weights and the items it read."""

import hashlib
import json
import sys
from pathlib import Path

from ldm.data.datasets import EpochSampler
from ldm.train.config import load_config
from ldm.train.loop import Trainer
from train import sampler

seen: list[list[int]] = []  # the (epoch, index) pairs the sampler dealt to this process
deal = EpochSampler.__iter__


def recording(self):
    for pair in deal(self):
        seen.append(list(pair))
        yield pair


EpochSampler.__iter__ = recording

recipe, report = sys.argv[1], Path(sys.argv[2])
config = load_config(recipe, [])
trainer = Trainer(config, validate=sampler(config))  # as train.py does
model = trainer.run()
weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.unet.parameters())).hexdigest()
rank = trainer.accelerator.process_index
world = trainer.accelerator.num_processes
(report / f"rank{rank}.json").write_text(json.dumps({"world": world, "weights": weights, "seen": seen}))
