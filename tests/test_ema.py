import pytest
import torch

from fastcifar.ema import WeightAverage


def test_the_average_moves_by_one_minus_decay_and_swaps_in_only_inside_its_block():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    average = WeightAverage(model, decay=0.75)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model[1].running_mean.fill_(4.0)
        model[1].num_batches_tracked.fill_(7)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    average.update()

    expected = {k: start[k] + 0.25 * (trained[k] - start[k]) for k in start if start[k].is_floating_point()}
    state = average.averaged_state()
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value)
    assert state["1.num_batches_tracked"] == 7  # an integer counter is not averaged
    for name, value in model.state_dict().items():  # the trained weights are back in the model
        assert torch.equal(value, trained[name])

    with pytest.raises(RuntimeError), average.swapped_in():
        torch.testing.assert_close(model[0].weight, expected["0.weight"])
        raise RuntimeError  # an error inside the block still puts the trained weights back
    assert torch.equal(model[0].weight, trained["0.weight"])
