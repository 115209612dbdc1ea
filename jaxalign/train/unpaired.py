"""Unpaired trainer (`trainer="unpaired"`) data plumbing: which pipeline feeds which loss, and the
optional retain set.

- kto / bco (the loss takes `labels`): `{prompt, completion, label}` records
  (`make_unpaired_pipeline`); KTO (a loss taking `kl_*_logps`) also gets the mismatched
  (prompt_i, completion_j) sequences of its KL baseline (``kl_sequences=True``).
- npo (no labels): the forget set as SFT records `{prompt, completion}` (`make_sft_pipeline`).
- `data.retain` (optional): an SFT file read alongside, a batch of the same size per step, its
  arrays under "retain/<key>" (`WithRetain`); the objective turns them into the `retain_logps` /
  `retain_lengths` inputs that a mix term renames, e.g. NPO+GD:

      c.loss = {"name": "mix", "terms": (("npo", 1.0, {"beta": 0.1}),
                ("sft", 1.0, {}, {"policy_logps": "retain_logps", "lengths": "retain_lengths"}))}

  The retain stream is endless (it never ends an evaluation early) and its position is saved
  with the run's data state.
"""

from __future__ import annotations

from jaxalign.train.steps import RETAIN_PREFIX


class WithRetain:
    """Iterator of main batches with the retain set's batch merged in under "retain/<key>"."""

    def __init__(self, main, retain):
        self.main = main
        self.retain = retain

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.main)
        return batch | {RETAIN_PREFIX + k: v for k, v in next(self.retain).items()}

    def get_state(self) -> dict:
        return {"main": self.main.get_state(), "retain": self.retain.get_state()}

    def set_state(self, state: dict) -> None:
        self.main.set_state(state["main"])
        self.retain.set_state(state["retain"])

    @property
    def num_bad_records(self) -> int:
        return self.main.num_bad_records + self.retain.num_bad_records
