"""geomoe's own ONNX Runtime operator (camera/ops/folded_moe.cc), built here from source, computes what the folded
MoE layer computes in torch, for every routing and absent-expert policy; a fused export classifies as torch does."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from geomoe.camera.export import export_onnx, write_onnx
from geomoe.camera.fused_moe import FusedMoE, fuse_for_export
from geomoe.camera.inference import load_exported, onnx_session
from geomoe.camera.native_ops import DOMAIN, LIBRARY_ENV, ops_library
from geomoe.model.config import ModelConfig
from geomoe.model.experts import prune_model
from geomoe.model.folded_moe import FoldedMoE, fold_for_inference
from geomoe.model.moe_layer import MoEMlp
from geomoe.model.network import GeoMoENet
from tests.camera.species import species_labels
from tests.model.test_folded_moe import trained_like_layer


@pytest.fixture(autouse=True)
def built_library(ops_built):
    """Built once per session by the explicit step (or found in the cache) for this machine."""
    return ops_built


def fused_nodes(path) -> list[onnx.NodeProto]:
    return [node for node in onnx.load(str(path)).graph.node if node.domain == DOMAIN]


@pytest.mark.parametrize("routing", ["patch", "image"])
@pytest.mark.parametrize("policy", ["best_present", "remove"])
@pytest.mark.parametrize("gate_rank", [None, 4])
def test_the_operator_gives_the_folded_layers_output(tmp_path, routing, policy, gate_rank):
    """3 held experts of 3 units and a rank-4 (or full, 12) query: unit counts that are not whole register tiles,
    on patches and pixels that are not either; a batch of 6 routed apart."""
    layer = trained_like_layer(routing, policy, gate_rank)
    folded = FoldedMoE(layer)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 12, 5, 7, generator=generator) + 3 * torch.randn(6, 12, 1, 1, generator=generator)
    path = write_onnx(FusedMoE(folded), x[:1], tmp_path / "layer.onnx", "x", "y")
    assert [node.op_type for node in onnx.load(str(path)).graph.node] == ["FoldedMoE"]
    with torch.no_grad():
        expected, _ = folded(x), layer(x)
    got = onnx_session(path, threads=1).run(None, {"x": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-5)
    choice = layer.last_choice
    assert len(choice.unique()) > 1, "one decision for every patch and image: routing went untested"
    if policy == "remove":
        assert (choice == -1).any() and (choice != -1).any(), "removal went untested"


def test_a_fused_export_classifies_as_the_model_does(tmp_path):
    torch.manual_seed(0)
    model = GeoMoENet(ModelConfig(num_classes=5, num_experts=4, gate_rank=8)).eval()
    model = prune_model(model, {1: [0, 2], 3: [1], 5: [3], 7: [0, 1]}, absent_policy="remove").eval()
    path = export_onnx(model, tmp_path / "cell.onnx", 64, species_labels(model), fused=True)
    assert len(fused_nodes(path)) == 4  # one node per MoE layer, in place of its 23 operations
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        expected = fold_for_inference(model)(images)
    exported = load_exported(path, threads=1)
    torch.testing.assert_close(torch.from_numpy(exported.predict(images.numpy())), expected, rtol=1e-4, atol=1e-4)
    assert exported.class_ids == model.head.class_ids.tolist()


def test_fusing_leaves_the_model_as_it_is():
    torch.manual_seed(0)
    model = GeoMoENet(ModelConfig(num_classes=5, num_experts=4)).eval()
    fused = fuse_for_export(model)
    assert sum(isinstance(m, FusedMoE) for m in fused.modules()) == 4
    assert len(model.moe_layers()) == 4 and all(isinstance(m, MoEMlp) for m in model.moe_layers().values())
    with pytest.raises(RuntimeError, match="ONNX Runtime only"):  # torch never runs the operator itself
        fused(torch.rand(1, 3, 64, 64))


def test_weights_that_do_not_fit_the_tokens_are_refused_with_the_operators_name(tmp_path):
    """A hand-made node whose first layer has 5 input channels for tokens of 4."""
    weights = {"weight1": np.zeros((5, 6), np.float32), "bias1": np.zeros(6, np.float32),
               "keys": np.zeros((2, 3), np.float32), "weight2": np.zeros((6, 4), np.float32)}  # fmt: skip
    node = helper.make_node("FoldedMoE", ["x", *weights], ["y"], domain=DOMAIN, num_held=2, hidden=2, eps=1e-5,
                            image_routing=0, remove_absent=0)  # fmt: skip
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "bad.onnx"))
    session = onnx_session(tmp_path / "bad.onnx", threads=1)
    with pytest.raises(Exception, match="FoldedMoE: weights do not match"):
        session.run(None, {"x": np.zeros((1, 4, 2, 3), np.float32)})


def test_a_named_library_that_is_not_there_is_said_so(monkeypatch, tmp_path):
    monkeypatch.setenv(LIBRARY_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(FileNotFoundError, match="missing.so"):
        ops_library()


def test_a_fused_export_without_the_library_is_one_error_naming_the_build_step(tmp_path, monkeypatch):
    model = prune_model(GeoMoENet(ModelConfig(num_classes=4, num_experts=4)), {1: [0, 1], 3: [2], 5: [3], 7: [0]})
    path = export_onnx(model, tmp_path / "fused.onnx", 64, species_labels(model), fused=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))  # nothing built there, nothing to build
    monkeypatch.delenv(LIBRARY_ENV, raising=False)
    with pytest.raises(RuntimeError, match="run `geomoe device build-ops`"):
        load_exported(path)
    assert not (tmp_path / "empty-cache").exists()  # loading compiled and fetched nothing
