import torch

from geomoe.server.aggregation import RowUpdate, mean_row_delta
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
