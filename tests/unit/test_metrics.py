import math

from lmtune.metrics import perplexity


def test_perplexity_is_exp_of_loss_and_overflow_safe():
    assert math.isclose(perplexity(math.log(42.0)), 42.0)
    assert perplexity(0.0) == 1.0
    assert perplexity(800.0) == float("inf")
    assert math.isnan(perplexity(float("nan")))
