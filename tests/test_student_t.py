"""Student's t quantiles in plain Python (engine/student_t.py) against scipy's, the
independent truth; and the normal quantile and the distribution function they rest on."""
import math

import numpy as np
import pytest
from scipy.special import ndtri, stdtr, stdtrit

from diagql.engine.student_t import normal_quantile, t_cdf, t_quantile, t_tail

PROBABILITIES = (0.975, 0.95, 0.995, 0.9995, 0.9, 0.6, 0.025, 0.001)


@pytest.mark.parametrize("p", PROBABILITIES)
def test_t_quantile_matches_scipy(p):
    # Every closed-form df, both sides of the switch to the expansion, and far beyond it.
    for df in list(range(1, 60)) + [99, 250, 999, 1000, 1001, 1500, 10 ** 4, 10 ** 6]:
        ours, theirs = t_quantile(df, p), float(stdtrit(df, p))
        assert ours == pytest.approx(theirs, rel=1e-11, abs=1e-13), (df, p)


def test_t_quantile_far_tails_and_centre_within_their_stated_accuracy():
    for p, rel in ((1e-7, 3e-12), (1 - 1e-7, 3e-12), (1e-10, 1e-10), (1e-12, 2e-9)):
        for df in (1, 2, 3, 5, 8, 30, 200, 999, 1001, 5000):
            assert t_quantile(df, p) == pytest.approx(float(stdtrit(df, p)), rel=rel), (df, p)
    for p in (0.4999, 0.49, 0.5001, 0.51):
        for df in (1, 2, 3, 4, 30, 907, 1500):
            assert abs(t_quantile(df, p) - float(stdtrit(df, p))) < 1e-12, (df, p)


def test_t_quantile_edges():
    assert t_quantile(7, 0.5) == 0.0
    assert t_quantile(0, 0.975) == t_quantile(1, 0.975)  # df below 1 is taken as 1
    assert t_quantile(12, 0.25) == -t_quantile(12, 0.75)  # 1 − 0.75 is exact
    for bad in (0.0, 1.0, -0.2, 1.5, math.nan):
        with pytest.raises(ValueError):
            t_quantile(5, bad)


def test_normal_quantile_matches_scipy():
    for p in np.r_[1e-12, 1e-6, 0.001, 0.02425, 0.2, 0.5, 0.8, 0.97575, 0.999, 1 - 1e-9]:
        assert normal_quantile(p) == pytest.approx(float(ndtri(p)), rel=1e-11, abs=1e-14)


def test_t_cdf_and_its_tail_match_scipy():
    for df in (1, 2, 3, 4, 9, 10, 57, 400, 1000):
        for t in (-40.0, -3.1, -0.2, 0.0, 0.5, 1.96, 12.0):
            assert t_cdf(t, df) == pytest.approx(float(stdtr(df, t)), abs=5e-14)
            if t > 0:  # far into the tail, relative to the tail itself
                assert t_tail(t, df) == pytest.approx(float(stdtr(df, -t)), rel=1e-11)
