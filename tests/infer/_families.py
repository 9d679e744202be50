"""A constrained family without rsample, shared by the objective tests."""

import torch

from pyro_linconstr.distributions import ConstrainedDistribution


class NoRsample(ConstrainedDistribution):
    """A constrained family without rsample (stands in for the discrete ones)."""

    arg_constraints = {}
    has_rsample = False

    def __init__(self, inner):
        self.inner = inner
        self._A, self._b = inner.A, inner.b
        super().__init__(inner.batch_shape, inner.event_shape, validate_args=False)

    @property
    def support(self):
        return self.inner.support

    @property
    def mean(self):
        return self.inner.mean

    def expand(self, batch_shape, _instance=None):
        return NoRsample(self.inner.expand(batch_shape))

    def sample(self, sample_shape=torch.Size()):
        return self.inner.sample(sample_shape)

    def log_prob(self, value):
        return self.inner.log_prob(value)
