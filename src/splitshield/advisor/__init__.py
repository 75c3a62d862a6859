"""Where should I cut? Every legal split point of a model, scored for leakage, edge cost and bandwidth.

>>> import splitshield as ss
>>> advice = ss.advise(trained_model, ss.load_dataset("mnist-5k"), max_kbytes=2)  # doctest: +SKIP
>>> advice.sentence()  # doctest: +SKIP

One module per job: :mod:`.costs` (multiply-adds, parameters, latency), :mod:`.wire` (bytes per image, accuracy
on decoded 8-bit features), :mod:`.leakage` (fast attacks, CE floor, GPZ statistic), :mod:`.recommend` (Pareto
fronts, budgets), :mod:`.table` (:class:`Advice`), :mod:`.pages` (Markdown/HTML report), :mod:`.run`
(:func:`advise`).
"""

from .leakage import FastAttack, FastWhiteBox, gpz_radius
from .recommend import RANKINGS, pareto_front
from .run import advise
from .table import Advice, PointAdvice

__all__ = ["RANKINGS", "Advice", "FastAttack", "FastWhiteBox", "PointAdvice", "advise", "gpz_radius", "pareto_front"]
