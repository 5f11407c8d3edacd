"""A node on a budgeted link packs its update to fit a window: as the run packs it when it fits, with the largest
top-k that fits when it does not, and deferred (several windows) when even the tightest top-k allowed is too large;
it says which in its reply, and what top-k leaves out stays in its error feedback."""

import math

import pytest
import torch
from flwr.app import MetricRecord, RecordDict

from geomoe.client.link_budget import pack_to_fit, window_budget
from geomoe.wire import messages as msg
from geomoe.wire.compression import ErrorFeedback, Pipeline


def update() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {f"moe.{layer}.w1": torch.randn(8, 64, 32, generator=generator) for layer in (1, 3)}


def reply() -> RecordDict:
    return RecordDict({msg.METRICS: MetricRecord({"examples": 10.0, "train_loss": 1.0})})


def size_with(pipeline: str) -> int:
    content = reply()
    content[msg.METRICS]["link-windows"] = 1.0
    msg.pack(content, msg.UPDATE, update(), pipeline, ErrorFeedback())
    return msg.content_traffic(content)["total"]


def fit(pipeline: str, budget: int | None, min_topk: float = 0.01, feedback: ErrorFeedback | None = None):
    content = reply()
    result = pack_to_fit(content, update(), pipeline, feedback or ErrorFeedback(), budget, min_topk)
    return content, result


def test_without_a_budget_or_within_it_the_update_goes_as_the_run_packs_it():
    for budget in (None, size_with("int8+zstd")):
        content, result = fit("int8+zstd", budget)
        assert (result.pipeline, result.choice, result.windows) == ("int8+zstd", "fits", 1)
        assert result.reply_bytes == msg.content_traffic(content)["total"] == size_with("int8+zstd")
        assert content[msg.METRICS]["link-windows"] == 1.0


def test_over_budget_the_node_keeps_the_largest_top_k_that_fits():
    budget = size_with("int8") // 4
    content, result = fit("int8", budget)
    packed_with = Pipeline.parse(result.pipeline)
    assert result.choice == "compressed" and result.windows == 1
    assert result.reply_bytes == msg.content_traffic(content)["total"] <= budget
    assert Pipeline.parse("int8").admits(packed_with) and 0.01 <= packed_with.topk < 1
    assert size_with(str(Pipeline(packed_with.topk * 1.05, "int8"))) > budget  # a wider one would not fit
    decoded = msg.unpack(content, msg.UPDATE, max_bytes=10**8)
    assert set(decoded) == set(update())


def test_an_update_too_large_even_at_the_tightest_top_k_is_deferred_over_windows():
    floor = size_with("topk0.05+int8+zstd")
    content, result = fit("int8+zstd", floor // 3, min_topk=0.05)
    assert result.choice == "deferred" and result.pipeline == "topk0.05+int8+zstd"
    assert result.windows == math.ceil(result.reply_bytes / (floor // 3)) >= 3
    assert content[msg.METRICS]["link-windows"] == float(result.windows)


def test_what_the_tighter_top_k_leaves_out_stays_in_the_error_feedback():
    feedback = ErrorFeedback()
    _, result = fit("int8", size_with("int8") // 4, feedback=feedback)
    expected = ErrorFeedback()
    expected.compress(update(), Pipeline.parse(result.pipeline), msg.key_category)  # only the packing sent
    assert set(feedback.residuals) == set(update())
    for name, residual in feedback.residuals.items():
        assert torch.equal(residual, expected.residuals[name])


def test_a_device_names_its_own_link_and_a_bad_one_names_the_setting():
    assert window_budget({}, "lora@10kB") == 10_000
    assert window_budget({"link": "lora@2kB"}, "wifi") == 2_000
    assert window_budget({}, "wifi") is None
    with pytest.raises(ValueError, match="node config link: bad link budget"):
        window_budget({"link": "lora@lots"}, "wifi")
