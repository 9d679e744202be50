"""``biject_to`` / ``transform_to`` of :func:`~pyro_linconstr.constraints.affine_subspace`.

Kept apart from :mod:`pyro_linconstr.constraints` and
:mod:`pyro_linconstr.transforms`, as ``torch.distributions.constraint_registry``
is, so that neither module imports the other. Importing :mod:`pyro_linconstr`
registers them.

Both give the constraint's cached
:class:`~pyro_linconstr.transforms.AffineSubspaceTransform`: a distribution's
support is built once, and so is its chart (an AutoGuide or NUTS step does not
redo the SVD of a dense ``A``).

Example::

    >>> import torch, pyro_linconstr as plc
    >>> from torch.distributions import biject_to
    >>> c = plc.constraints.affine_subspace(torch.ones(1, 3), torch.zeros(1))
    >>> biject_to(c) is biject_to(c)
    True
"""

from torch.distributions.constraint_registry import biject_to, transform_to

from pyro_linconstr.constraints import _AffineSubspace
from pyro_linconstr.transforms import AffineSubspaceTransform


@biject_to.register(_AffineSubspace)
@transform_to.register(_AffineSubspace)
def _transform_to_affine_subspace(constraint: _AffineSubspace) -> AffineSubspaceTransform:
    # built once per constraint object (a dense A costs an SVD)
    t = constraint.__dict__.get("_chart")
    if t is None:
        t = AffineSubspaceTransform(constraint.A, constraint.b, event_shape=constraint.event_shape)
        constraint._chart = t
    return t
