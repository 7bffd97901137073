import pandas as pd
import pytest

from salience.metrics import LOG_PERPLEXITY_AUC, Metric, area_under_curve, sort_by_metric


def test_area_is_mean_height_over_the_x_range():
    assert area_under_curve([0.5, 1.0], [2.0, 2.0]) == pytest.approx(2.0)
    # unsorted x is sorted first; a straight line from 1 to 3 has mean height 2
    assert area_under_curve([1.0, 0.0, 0.5], [3.0, 1.0, 2.0]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="two distinct"):
        area_under_curve([1.0, 1.0], [1.0, 2.0])


def test_tables_sort_best_first_by_the_metric_direction():
    df = pd.DataFrame({"scorer": ["a", "b", "c"], "log_ppl_auc": [2.5, 2.4, 2.6]})
    assert list(sort_by_metric(df, LOG_PERPLEXITY_AUC).scorer) == ["b", "a", "c"]
    higher = Metric("accuracy", False, 1.0, "task")
    df = pd.DataFrame({"scorer": ["a", "b"], "accuracy": [0.2, 0.9]})
    assert list(sort_by_metric(df, higher).scorer) == ["b", "a"]
