"""One connection's state: its observation history and its noise generator. One connection is one robot.

The history keeps the last To control steps of every observation key. A one-step frame is appended; at the
start of a connection, or with `reset`, the history is first filled with To copies of that step (Diffusion
Policy's padding at an episode's start). A whole-history frame replaces the history. Nothing is shared between
sessions: each has its own history and its own generator, seeded with the server's `seed` when the connection
opens (a request's `seed` restarts it), so a connection's chunks depend only on what that connection sent.
"""
from __future__ import annotations

from collections import deque

import numpy as np
import torch

from pcm_policy.serving.frames import Frame, ObservationSpec


class Session:
    """The state of one connection.

    Args:
        spec: the observation keys and To.
        seed: the noise generator's seed (the server's `seed`).

    Attributes:
        generator: the CPU generator this connection's chunk noise is drawn from.
        requests: chunk requests served so far.
    """

    def __init__(self, spec: ObservationSpec, seed: int):
        self.spec = spec
        self.generator = torch.Generator().manual_seed(seed)
        self._steps: deque[dict[str, np.ndarray]] = deque(maxlen=spec.n_obs_steps)
        self.requests = 0

    def observe(self, frame: Frame) -> dict[str, np.ndarray]:
        """Add a checked frame to the history (see the module docstring) and restart the generator when it asks.

        Args:
            frame: a `Frame` from `ObservationSpec.parse`.

        Returns:
            The history to plan from: key -> (To, ...) array, oldest first (float32 low-dim, uint8 cameras).
        """
        if frame.seed is not None:
            self.generator.manual_seed(frame.seed)
        if frame.history:
            self._steps.clear()
            self._steps.extend({k: v[i] for k, v in frame.steps.items()} for i in range(self.spec.n_obs_steps))
        elif frame.reset or not self._steps:
            self._steps.clear()
            self._steps.extend([frame.steps] * self.spec.n_obs_steps)
        else:
            self._steps.append(frame.steps)
        return {k.name: np.stack([step[k.name] for step in self._steps]) for k in self.spec.keys}
