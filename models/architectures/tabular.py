"""A flow for small real tabular data that starts as the best Gaussian it contains.

``x → YeoJohnson → GaussianWhitening(shrinkage="cv") → [Permutation → AffineCoupling]×steps → z``

* :class:`~models.flows.YeoJohnson` fits each column's marginal (scale, skew, constant columns);
  integer-valued columns arrive dequantized (``DataSpec.discrete_features``).
* :class:`~models.flows.GaussianWhitening` is the shrinkage-covariance whitening of the
  transformed columns, the intensity chosen by cross-validated likelihood. Up to here the model
  is a Gaussian copula with Yeo-Johnson marginals: the flow's *initial model*.
* The affine couplings (soft-clamped scales, MLP conditioners whose last layer starts at zero)
  start at the identity and learn what is left. Training evaluates the initial model as a
  candidate, stops early on held-out likelihood, and keeps whichever is better
  (``metrics.selected`` in the manifest: ``gaussian`` or ``flow``).

Affine couplings, not splines or logistic mixtures: after the marginal fit the residual structure
in a few hundred records is mostly in pairwise dependence, which an affine coupling represents
with the fewest parameters (``docs/benchmarks.md``, "Tabular records", gives the measurement).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError
from ..flows import AffineCoupling, Bijector, GaussianWhitening, Permutation, Sequential, YeoJohnson
from ..spec import DataSpec

PARAMETERS_PER_RECORD = 0.25  # the couplings' size: about this many parameters per training cell (record × feature)


class TabularFlowConfig(BaseModel):
    """Sizes left as ``None`` are set from the training data by :meth:`sized_for` (``flowserve train`` does this)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["tabular"] = "tabular"
    steps: int | None = Field(None, ge=1, description="couplings (default: 2 below 500 records, 4 below 5,000, else 6)")
    hidden: int | None = Field(None, ge=1, description="conditioner width (default: about 0.25 parameters per training "
                               "cell, 4 to 128)")
    depth: int = Field(1, ge=1, description="hidden layers per conditioner")
    soft_clamp: float = Field(2.0, gt=0, description="|log scale| of a coupling stays below this")
    initial_model: ClassVar[str] = "gaussian"  # the closed-form model it starts as; training evaluates it as a candidate

    def sized_for(self, records: int, features: int) -> TabularFlowConfig:
        """This config with ``steps`` and ``hidden`` set for ``records`` training records of ``features`` columns.

        A coupling with width ``h`` has about ``1.5·D·h`` weights (depth 1), so ``h ≈ N / (6·steps)``
        keeps the couplings near :data:`PARAMETERS_PER_RECORD` parameters per training cell.
        """
        steps = self.steps if self.steps is not None else 2 if records < 500 else 4 if records < 5000 else 6
        per_cell = PARAMETERS_PER_RECORD * records * features
        hidden = self.hidden or int(min(128, max(4, per_cell / (1.5 * features * max(steps, 1)))))
        return self.model_copy(update={"steps": steps, "hidden": hidden})


def build_tabular(cfg: TabularFlowConfig, spec: DataSpec) -> Bijector:
    if len(spec.shape) != 1 or spec.shape[0] < 2:
        raise ConfigError(f"the tabular flow needs records of shape (D,) with D ≥ 2, got {spec.shape}")
    if cfg.steps is None or cfg.hidden is None:
        raise ConfigError("tabular flow: steps and hidden must be set (TabularFlowConfig.sized_for sets them from the data)")
    d = spec.shape[0]
    layers: list[Bijector] = [YeoJohnson(d), GaussianWhitening((d,), shrinkage="cv")]
    for i in range(cfg.steps):
        layers += [Permutation(d, seed=i), AffineCoupling((d,), cfg.hidden, "channel", parity=i % 2, depth=cfg.depth,
                                                          soft_clamp=cfg.soft_clamp)]
    return Sequential(layers)
