"""Reading sweep tables: the columns that label rows, the effective dimension of a cutoff sweep."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..results import SAMPLE_COLUMNS
from .run import RESULT_COLUMNS

__all__ = ["label_columns", "effective_dimension"]


def label_columns(frame, exclude=()):
    """The columns of a sweep (or samples) table that label rows: model and grid parameters.

    Taken from ``frame.attrs["volsk_param_columns"]`` when pandas kept it (``merge`` drops
    it), else every column that is neither a result nor a per-direction column and is not
    per-model information added to the table (a column with one value per model, such as an
    epoch or an accuracy). Only columns that take more than one value are returned.

    Parameters
    ----------
    frame : pandas.DataFrame
        A table returned by :func:`~volsk.sweeps.sweep` (either of the two with
        ``return_samples``), possibly with columns added.
    exclude : iterable of str, default=()
        Columns never returned.

    Returns
    -------
    list of str

    Examples
    --------
    >>> import pandas as pd
    >>> from volsk.sweeps import label_columns
    >>> frame = pd.DataFrame({"model": ["a", "a", "b", "b"], "cutoff": [0.1, 0.01] * 2,
    ...                       "epoch": [1, 1, 2, 2], "log_volume": [-3.0, -5.0, -4.0, -6.0]})
    >>> label_columns(frame)
    ['model', 'cutoff']
    """
    known = frame.attrs.get("volsk_param_columns")
    if known is not None:
        candidates = ["model", *known]
    else:
        candidates = [c for c in frame.columns
                      if c not in RESULT_COLUMNS and c not in SAMPLE_COLUMNS]
        if "model" in frame.columns:
            per_model = frame.astype({c: str for c in candidates}).groupby("model", sort=False)
            candidates = [c for c in candidates
                          if c == "model" or (per_model[c].nunique() > 1).any()]
    return [c for c in candidates if c in frame.columns and c not in exclude
            and frame[c].astype(str).nunique() > 1]


def effective_dimension(frame, by=None):
    """Twice the least-squares slope of log-volume against log cutoff: 2 d log µ / d log ε.

    For a small cutoff the neighbourhood is an ellipsoid of the directions the data pins
    down, and its measure scales as ε^(d/2), d their number; flat directions do not count.
    So this is the number of parameters the cutoff's level of fit actually constrains
    (≤ ``n_parameters``).

    It is the slope of *estimates*, so it inherits their errors, and it depends on the
    preconditioner. An estimate falls short of the true log-volume (it exceeds it by more
    than t nats with probability at most e^−t), and when the shortfall changes with the
    cutoff, the slope changes with it. With an effective sample size near 1 the estimate is
    its best direction's, so the slope is how fast that direction's share of the
    neighbourhood grows. Naive sampling almost never draws the directions that the prior, not
    the cutoff, bounds: every direction it sees grows as ε^(n/2), its shortfall shrinks as
    the cutoff grows, and it reports d close to n. A preconditioner that stretches flat
    directions too far is exact at small cutoffs and falls short at large ones, and reports
    too small a d. So take the effective dimension from the preconditioner whose estimates
    are the largest — hence, by Markov's inequality, the most accurate — at every cutoff of
    the fit (or from the per-cutoff maximum over preconditioners), and compare effective
    dimensions only between rows estimated with the same preconditioner.

    Parameters
    ----------
    frame : pandas.DataFrame
        A sweep table with ``cutoff`` and ``log_volume`` columns, at least two cutoffs per
        group. Non-finite log-volumes are left out.
    by : list of str, optional
        Columns that define groups (one slope each). Default: the label columns (model and
        grid parameters other than ``cutoff``) that take more than one value.

    Returns
    -------
    float or pandas.Series
        A float when there is a single group, else a Series indexed by the groups.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> import volsk
    >>> cutoffs = np.array([1e-3, 1e-2, 1e-1])
    >>> frame = pd.DataFrame({"model": "a", "cutoff": cutoffs,
    ...                       "log_volume": -100 + 3.0 * np.log(cutoffs)})
    >>> round(volsk.effective_dimension(frame), 6)
    6.0
    """
    for column in ("cutoff", "log_volume"):
        if column not in frame.columns:
            raise ValueError(f"frame needs a {column!r} column (a sweep over cutoffs)")
    by = label_columns(frame, exclude=("cutoff",)) if by is None else list(by)

    def slope(group):
        ok = np.isfinite(group["log_volume"].to_numpy(float)) & (group["cutoff"] > 0).to_numpy()
        x = np.log(group["cutoff"].to_numpy(float)[ok])
        if np.unique(x).size < 2:
            return float("nan")
        return float(2.0 * np.polyfit(x, group["log_volume"].to_numpy(float)[ok], 1)[0])

    if not by:
        return slope(frame)
    keys, values = [], []
    for key, group in frame.groupby(by, sort=False, dropna=False):
        keys.append(key)
        values.append(slope(group))
    if len(by) == 1:
        index = pd.Index([k[0] if isinstance(k, tuple) else k for k in keys], name=by[0])
    else:
        index = pd.MultiIndex.from_tuples(keys, names=by)
    return pd.Series(values, index=index, name="effective_dimension")
