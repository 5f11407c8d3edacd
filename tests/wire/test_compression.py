import json

import numpy as np
import pytest
import torch

from geomoe.wire.compression import ErrorFeedback, Pipeline, decode_all, encode_all, group_layouts


def decode(arrays, description, pipeline):
    return decode_all(arrays, group_layouts(description, pipeline), pipeline)


def round_trip(tensors, text):
    pipeline = Pipeline.parse(text)
    arrays, description = encode_all(tensors, pipeline)
    return decode(arrays, description, pipeline), sum(a.nbytes for a in arrays.values())


@pytest.fixture
def tensors():
    generator = torch.Generator().manual_seed(0)
    return {"moe.1.w1": torch.randn(16, 64, 2, generator=generator), "moe.1.ids": torch.arange(16)}


@pytest.mark.parametrize("text", ["zstd", "none"])
def test_lossless_pipelines_are_exact(tensors, text):
    back, _ = round_trip(tensors, text)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_ids_travel_exactly_through_lossy_pipelines(tensors):
    back, _ = round_trip(tensors, "topk0.1+int8+zstd")
    assert torch.equal(back["moe.1.ids"], tensors["moe.1.ids"]) and back["moe.1.ids"].dtype == torch.int64


def test_fp16_error_bound(tensors):
    back, size = round_trip(tensors, "fp16")
    x = tensors["moe.1.w1"]
    assert (back["moe.1.w1"] - x).abs().max() <= x.abs().max() * 2**-10
    assert back["moe.1.w1"].dtype == torch.float32


@pytest.mark.parametrize("text", ["int8", "int8c"])
def test_int8_error_is_at_most_half_a_step(tensors, text):
    back, size = round_trip(tensors, text)
    x = tensors["moe.1.w1"]
    rows = x.reshape(16, -1) if text == "int8c" else x.reshape(1, -1)
    step = rows.abs().max(dim=1, keepdim=True).values / 127
    error = (back["moe.1.w1"].reshape(rows.shape) - rows).abs()
    assert torch.all(error <= step / 2 + 1e-7)
    assert size < 0.3 * x.numel() * 4 + 16 * 8 + 64


def test_per_row_int8_is_tighter_on_rows_of_different_scale():
    x = {"w": torch.cat([torch.randn(1, 100) * 100, torch.randn(1, 100) * 0.01])}
    per_tensor, _ = round_trip(x, "int8")
    per_row, _ = round_trip(x, "int8c")
    assert (per_row["w"][1] - x["w"][1]).abs().max() < (per_tensor["w"][1] - x["w"][1]).abs().max()


def test_topk_keeps_exactly_the_largest_entries():
    x = {"w": torch.tensor([0.1, -5.0, 0.2, 3.0, -0.05, 0.0, 1.0, 0.3, -0.2, 0.01])}
    back, _ = round_trip(x, "topk0.3")
    assert back["w"].tolist() == pytest.approx([0, -5.0, 0, 3.0, 0, 0, 1.0, 0, 0, 0])


def test_error_feedback_carries_the_residual_to_the_next_round():
    pipeline = Pipeline.parse("topk0.5")
    feedback = ErrorFeedback()
    first = {"w": torch.tensor([4.0, 1.0])}
    arrays, description = feedback.compress(first, pipeline)
    assert decode(arrays, description, pipeline)["w"].tolist() == [4.0, 0.0]
    assert feedback.residuals["w"].tolist() == [0.0, 1.0]
    arrays, description = feedback.compress({"w": torch.tensor([0.0, 0.5])}, pipeline)
    assert decode(arrays, description, pipeline)["w"].tolist() == [0.0, 1.5]  # 0.5 + last round's 1.0
    assert feedback.residuals["w"].tolist() == [0.0, 0.0]


def test_zstd_shrinks_redundant_data():
    _, raw = round_trip({"w": torch.zeros(1000)}, "none")
    _, packed = round_trip({"w": torch.zeros(1000)}, "zstd")
    assert packed < raw / 20


@pytest.mark.parametrize("text", ["int9", "topk", "topk1.5", "gzip"])
def test_bad_pipelines_are_refused(text):
    with pytest.raises(ValueError):
        Pipeline.parse(text)


def test_error_feedback_ignores_residuals_of_another_shape():
    feedback = ErrorFeedback({"w": torch.ones(3)})
    arrays, description = feedback.compress({"w": torch.zeros(2)}, Pipeline.parse("int8"))
    assert np.allclose(decode(arrays, description, Pipeline.parse("int8"))["w"].numpy(), 0)


def test_each_group_travels_as_one_array_whose_size_its_description_fixes(tensors):
    pipeline = Pipeline.parse("topk0.25+int8")
    group_of = {"moe.1.w1": "experts", "moe.1.ids": "experts", "head.fc.bias": "head"}.get
    arrays, description = encode_all({**tensors, "head.fc.bias": torch.ones(5)}, pipeline, group_of)
    assert sorted(arrays) == ["experts", "head"]
    kept = round(0.25 * 16 * 64 * 2)
    assert arrays["experts"].nbytes == 16 * 8 + 16 * 64 * 2 // 8 + 4 + kept  # ids, bitmap, one scale, int8 values
    for wrong in (arrays["experts"][:-1], np.concatenate([arrays["experts"], [0]]).astype(np.uint8)):
        with pytest.raises(ValueError, match="their description says|its description allows"):
            decode({**arrays, "experts": wrong}, description, pipeline)


def test_a_bitmap_bit_past_the_last_tensor_is_refused():
    pipeline = Pipeline.parse("topk0.5")
    arrays, description = encode_all({"w": torch.arange(4.0)}, pipeline)  # 4 bits of one byte
    tampered = arrays["tensors"].copy()
    tampered[0] |= 0b1  # bit 8 of the byte: no tensor position
    with pytest.raises(ValueError, match="past its last tensor"):
        decode({"tensors": tampered}, description, pipeline)


@pytest.mark.parametrize("meta", [[[2], "object"], [[-1], "float32"], "w", [[2]]])
def test_descriptions_that_are_not_a_shape_and_numeric_dtype_are_refused(meta):
    arrays, _ = encode_all({"w": torch.zeros(2)}, Pipeline.parse("int8"))
    with pytest.raises(ValueError, match="w:"):
        decode(arrays, json.dumps({"tensors": {"w": meta}}), Pipeline.parse("int8"))


@pytest.mark.parametrize("text", ["topk0.1+int8c+zstd", "int8c", "fp16+zstd"])
def test_empty_and_scalar_tensors_round_trip(text):
    back, _ = round_trip({"empty": torch.zeros(0, 3), "scalar": torch.tensor(2.0)}, text)
    assert back["empty"].shape == (0, 3) and back["scalar"].item() == pytest.approx(2.0, rel=1e-2)


@pytest.mark.parametrize(
    ("description", "reason"),
    [
        ("[" * 5000, "nests 5000 levels"),  # json.loads would raise RecursionError
        ('{"tensors": {"w": [[' + "9" * 5000 + '], "float32"]}}', "number of 5000 characters"),
        ('{"tensors": {"w": [[NaN], "float32"]}}', "NaN"),
        ('{"tensors": {"w": [[1099511627777], "float32"]}}', "cannot carry shape"),
    ],
    ids=["deep", "long number", "NaN", "axis beyond 2^40"],
)
def test_a_description_is_parsed_within_bounds(description, reason):
    with pytest.raises(ValueError, match=reason):
        group_layouts(description, Pipeline.parse("int8+zstd"))


def test_a_zstd_frame_is_decompressed_no_further_than_its_description_and_a_claim_beyond_max_bytes_is_refused():
    pipeline = Pipeline.parse("zstd")
    arrays, description = encode_all({"w": torch.zeros(1000)}, pipeline)
    groups = group_layouts(description, pipeline)
    assert decode_all(arrays, groups, pipeline, max_bytes=4000)["w"].shape == (1000,)
    with pytest.raises(ValueError, match="more than the 3999 expected"):
        decode_all(arrays, groups, pipeline, max_bytes=3999)
    claim = group_layouts(json.dumps({"tensors": {"w": [[10**12], "float32"]}}), pipeline)  # 4 TB described
    with pytest.raises(ValueError, match="more than the"):
        decode_all(arrays, claim, pipeline, max_bytes=1 << 30)
