import torch

from geomoe.server.aggregation import RowUpdate, mean_row_delta, noisy_row_mean, robust_row_delta
from geomoe.server.server_optimizer import ServerOptimizer


def test_an_expert_held_by_one_client_takes_its_update():
    delta, touched = mean_row_delta(4, [RowUpdate(torch.tensor([2]), torch.tensor([[5.0, -1.0]]), torch.tensor([3.0]))])
    assert touched.tolist() == [False, False, True, False]
    assert delta[2].tolist() == [5.0, -1.0]


def test_an_expert_held_by_nobody_is_unchanged():
    updates = [RowUpdate(torch.tensor([0, 1]), torch.ones(2, 3), torch.ones(2))]
    delta, touched = mean_row_delta(3, updates)
    target = torch.zeros(3, 3)
    ServerOptimizer("fedavg", 1.0).apply("x", target, delta, touched)
    assert torch.equal(target[2], torch.zeros(3)) and torch.equal(target[:2], torch.ones(2, 3))


def test_weights_normalise_per_expert_over_its_holders():
    updates = [
        RowUpdate(torch.tensor([0, 1]), torch.tensor([[1.0], [10.0]]), torch.tensor([1.0, 1.0])),
        RowUpdate(torch.tensor([1]), torch.tensor([[20.0]]), torch.tensor([3.0])),
    ]
    delta, touched = mean_row_delta(2, updates)
    assert delta[0].item() == 1.0  # only client 1 holds expert 0: its delta, not a fraction of it
    assert delta[1].item() == (10.0 * 1 + 20.0 * 3) / 4


def test_zero_weight_rows_count_as_untouched():
    delta, touched = mean_row_delta(2, [RowUpdate(torch.tensor([0, 1]), torch.ones(2, 1), torch.tensor([0.0, 2.0]))])
    assert touched.tolist() == [False, True]


def test_a_shared_tensor_as_one_row_takes_the_example_weighted_mean():
    updates = [RowUpdate(torch.tensor([0]), torch.tensor([[1.0]]), torch.tensor([w])) for w in (1.0, 2.0)]
    updates[1].delta = torch.tensor([[4.0]])
    assert mean_row_delta(1, updates)[0].item() == 3.0


def test_fedadam_moves_only_touched_rows_and_keeps_their_state():
    optimizer = ServerOptimizer("fedadam", 0.1)
    target = torch.zeros(3, 2)
    touched = torch.tensor([True, False, True])
    optimizer.apply("w", target, torch.ones(3, 2), touched)
    assert torch.all(target[1] == 0) and torch.all(target[0] > 0)
    m, _ = optimizer.moments["w"]
    assert torch.all(m[1] == 0)


def test_fedyogi_steps_in_the_direction_of_the_delta():
    optimizer = ServerOptimizer("fedyogi", 0.1)
    target = torch.zeros(2)
    optimizer.apply("w", target, torch.tensor([1.0, -1.0]), torch.tensor([True, True]))
    assert target[0] > 0 > target[1]


def row(ids, values):
    return RowUpdate(torch.tensor(ids), torch.tensor(values, dtype=torch.float32), torch.ones(len(ids)))


def test_without_noise_the_private_mean_is_the_sum_over_the_expected_holders():
    updates = [row([0, 1], [[1.0], [10.0]]), row([1], [[20.0]])]
    delta, touched = noisy_row_mean((3, 1), updates, torch.tensor([1.0, 2.0, 0.0]), 0.0, torch.Generator())
    assert delta[:, 0].tolist() == [1.0, 15.0, 0.0]  # weights 1: the row's mean over its expected holders
    assert touched.tolist() == [True, True, False]  # a row nobody could hold stays as it is


def test_a_rarely_sampled_holder_is_not_amplified_past_its_own_update():
    delta, _ = noisy_row_mean((1, 1), [row([0], [[4.0]])], torch.tensor([0.25]), 0.0, torch.Generator())
    assert delta.item() == 4.0  # expected holders 0.25 (q = 0.25, one holder): divided by 1, not by 0.25


def test_private_noise_reaches_every_row_some_node_could_hold_even_when_none_did():
    generator = torch.Generator().manual_seed(1)
    delta, touched = noisy_row_mean((3, 20000), [], torch.tensor([2.0, 1.0, 0.0]), 0.5, generator)
    assert touched.tolist() == [True, True, False]
    assert abs(float(delta[0].std()) - 0.25) < 0.01 and abs(float(delta[1].std()) - 0.5) < 0.02  # sigma / expected
    assert torch.equal(delta[2], torch.zeros(20000))


HONEST = [1.0, 2.0]


def test_median_keeps_an_expert_honest_when_its_two_hostile_holders_disagree():
    """Expert 0: one honest holder, one scaled (x100) and one sign-flipped; expert 1: honest majority."""
    updates = [
        row([0, 1], [HONEST, HONEST]),
        row([0, 1], [[100.0, 200.0], HONEST]),
        row([0, 1], [[-1.0, -2.0], [-100.0, -100.0]]),
    ]
    delta, touched = robust_row_delta(2, updates, "median", 0.2, 3)
    assert delta[0].tolist() == HONEST and delta[1].tolist() == HONEST
    mean, _ = mean_row_delta(2, updates)
    assert mean[0].tolist() != HONEST  # what plain averaging would have done


def test_median_of_an_even_number_of_holders_is_the_mean_of_the_middle_two():
    updates = [row([0], [[v]]) for v in (1.0, 2.0, 4.0, 100.0)]
    assert robust_row_delta(1, updates, "median", 0.2, 3)[0].item() == 3.0


def test_trimmed_mean_drops_the_extremes_of_each_coordinate():
    values = [[1.0, -50.0], [2.0, 1.0], [3.0, 2.0], [4.0, 3.0], [90.0, 4.0]]
    updates = [row([0], [v]) for v in values]
    delta, _ = robust_row_delta(1, updates, "trimmed_mean", 0.2, 3)  # floor(0.2 x 5) = 1 dropped at each end
    assert delta[0].tolist() == [3.0, 2.0]


def test_a_row_with_too_few_holders_takes_a_norm_bounded_mean():
    """Expert 1 has a single (hostile) holder: its update is scaled to the median row norm of the tensor."""
    updates = [
        row([0, 1], [[3.0, 4.0], [300.0, 400.0]]),  # row norms 5 and 500
        row([0], [[0.0, 5.0]]),  # 5
        row([0, 2], [[5.0, 0.0], [0.6, 0.8]]),  # 5 and 1
    ]
    delta, touched = robust_row_delta(3, updates, "median", 0.2, 3)
    assert touched.tolist() == [True, True, True]
    torch.testing.assert_close(delta[1], torch.tensor([3.0, 4.0]))  # 500 scaled down to the median norm, 5
    torch.testing.assert_close(delta[2], torch.tensor([0.6, 0.8]))  # under the bound: unchanged
    torch.testing.assert_close(delta[0], torch.tensor([3.0, 4.0]))  # three holders: the coordinate-wise median


def test_robust_rows_may_be_scalars():
    """Head biases: one number per row."""
    updates = [RowUpdate(torch.tensor([0, 1]), torch.tensor([v, 1.0]), torch.ones(2)) for v in (1.0, 2.0, 50.0)]
    delta, touched = robust_row_delta(2, updates, "median", 0.2, 3)
    assert delta.tolist() == [2.0, 1.0] and touched.all()
