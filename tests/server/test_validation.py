import pytest
import torch

from geomoe.server.validation import REPLY_ALLOWANCE, RejectedReply, check_size, check_update, spec_of


@pytest.fixture
def sent():
    return spec_of(
        {"moe.1.ids": torch.tensor([0, 3]), "moe.1.w1": torch.zeros(2, 4, 2), "moe.1.centroids": torch.zeros(2, 4)}
    )


def good():
    return {"moe.1.ids": torch.tensor([0, 3]), "moe.1.w1": torch.ones(2, 4, 2), "moe.1.centroids": torch.ones(2, 4)}


def test_a_matching_update_passes(sent):
    check_update(good(), sent)


@pytest.mark.parametrize(
    "change,reason",
    [
        (lambda u: u.update({"head.fc.weight": torch.zeros(1)}), "unknown"),
        (lambda u: u.pop("moe.1.w1"), "missing"),
        (lambda u: u.update({"moe.1.ids": torch.tensor([0, 5])}), "not given"),
        (lambda u: u.update({"moe.1.w1": torch.ones(3, 4, 2)}), "got \\(3, 4, 2\\)"),
        (lambda u: u.update({"moe.1.w1": torch.ones(2, 4, 2, dtype=torch.float64)}), "float64"),
        (lambda u: u["moe.1.centroids"].__setitem__((0, 0), float("nan")), "NaN"),
        (lambda u: u["moe.1.centroids"].__setitem__((1, 1), float("inf")), "Inf"),
    ],
)
def test_each_bad_reply_is_rejected_with_its_reason(sent, change, reason):
    update = good()
    change(update)
    with pytest.raises(RejectedReply, match=reason):
        check_update(update, sent)


def test_absurdly_large_replies_are_rejected(sent):
    check_size(sent.trainable_bytes + REPLY_ALLOWANCE, sent, 1.0)
    with pytest.raises(RejectedReply, match="exceeds"):
        check_size(2 * sent.trainable_bytes + REPLY_ALLOWANCE, sent, 1.5)
