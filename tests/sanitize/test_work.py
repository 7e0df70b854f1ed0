"""Model FLOPs (sanitize.work): counted per architecture, a training step about three forward passes, and the examples a
run trains on counted from its size, recipe and drops."""

import pytest
import torch

from sanitize.models import list_models
from sanitize.work import example_flops, phase_work, trained_examples


@pytest.mark.parametrize("name", list_models())
def test_a_training_step_costs_about_three_scoring_passes_and_counting_leaves_the_random_stream_alone(name):
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    flops = example_flops(name, 10, (3, 32, 32))
    assert torch.equal(torch.rand(4), expected)
    assert flops.score > 0 and 2.5 < flops.train / flops.score < 3.5  # backward: about twice the forward


def test_flops_grow_with_the_image_and_the_head():
    small, large = example_flops("convnet", 10, (3, 32, 32)), example_flops("convnet", 10, (3, 64, 64))
    assert 3.5 < large.score / small.score < 4.5  # four times the pixels
    assert example_flops("convnet", 100, (3, 32, 32)).score > small.score


def test_trained_examples_leave_out_a_last_batch_of_one_and_dropped_examples_from_their_round_on():
    assert trained_examples(64, 3, 32) == 3 * 64
    assert trained_examples(65, 3, 32) == 3 * 64  # 65 = 2 x 32 + 1: the batch of one is left out
    assert trained_examples(100, 4, 32, drop_rounds=[2, 2, 3]) == 100 + 100 + 98 + 96  # 97 = 3 x 32 + 1
    work = phase_work(example_flops("tiny", 10, (3, 16, 16)), trained=10, scored=4)
    assert work["flops"] == pytest.approx(
        10 * work["flops_per_example"]["train"] + 4 * work["flops_per_example"]["score"]
    )
