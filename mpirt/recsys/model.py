"""The recommender models over sharded tables: matrix factorisation with biases, and a two-tower model.

Both read a user row and an item row of ``dim + 1`` values each from the sharded tables (the
embedding, then the row's bias) and hold only small dense parameters themselves (the global bias;
the towers), which are data-parallel. Predicted rating:

- ``mf``: ``<u, v> + b_u + b_i + mu``;
- ``twotower``: ``<f(u), g(v)> + b_u + b_i + mu``, ``f`` and ``g`` two-layer MLPs (``dim -> hidden -> dim``).

The loss of a step is the squared error summed over its ratings, divided by the step's global batch
(a mean), as ``mpirt train``'s classification loss.
"""

import torch
from torch import nn

MODELS = ("mf", "twotower")
DEFAULTS = {"mf": {"embed_dim": 32}, "twotower": {"embed_dim": 32, "hidden": 64}}


class Dense(nn.Module):
    """The data-parallel part: ``mu`` (initialised to the training ratings' mean), and the towers."""

    def __init__(self, spec):
        super().__init__()
        self.name, d = spec["name"], int(spec["embed_dim"])
        self.mu = nn.Parameter(torch.tensor([float(spec["mean_rating"])]))
        if self.name == "twotower":
            h = int(spec["hidden"])
            self.user_tower = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d))
            self.item_tower = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d))

    def forward(self, u, v):
        """Predictions from user rows ``u`` and item rows ``v`` ((n, dim + 1) each)."""
        eu, ev = u[:, :-1], v[:, :-1]
        if self.name == "twotower":
            eu, ev = self.user_tower(eu), self.item_tower(ev)
        return (eu * ev).sum(1) + u[:, -1] + v[:, -1] + self.mu

    def score(self, u, v):
        """Predictions of every user row in ``u`` for every item row in ``v``: (len(u), len(v))."""
        eu, ev = u[:, :-1], v[:, :-1]
        if self.name == "twotower":
            eu, ev = self.user_tower(eu), self.item_tower(ev)
        return eu @ ev.T + u[:, -1:] + v[:, -1][None, :] + self.mu


def init_rows(dim):
    """Initial table rows: embeddings N(0, 0.1^2), biases 0."""
    def make(rng, shape):
        rows = (0.1 * rng.standard_normal(shape)).astype("float32")
        rows[:, dim] = 0.0
        return rows
    return make
