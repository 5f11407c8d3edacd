"""What a node is sent, without Flower."""

import torch

from geomoe.model.network import GeoMoENet
from geomoe.server.replies import QueryReply
from geomoe.server.slicing import Slicer
from geomoe.wire import messages as msg
from geomoe.wire.run_config import from_dict

KEEP = {0: {1: [0, 1], 3: [2], 5: [3], 7: [0]}}


def slicer(strategy: str = "expert", trainable: str = "experts+head") -> Slicer:
    cfg = from_dict({"model": {"num_experts": 4}, "federation": {"strategy": strategy, "trainable": trainable}})
    torch.manual_seed(0)
    return Slicer(cfg, GeoMoENet(cfg.model), KEEP)


NODE = QueryReply(0, "0/", True, [1, 2], 50)


def test_a_node_gets_its_keep_set_the_others_centroids_and_its_species_rows():
    piece = slicer().slice_for(NODE)
    assert piece.experts["moe.1.ids"].tolist() == [0, 1] and piece.experts["moe.3.ids"].tolist() == [2]
    assert piece.router["moe.1.absent_centroids"].shape[0] == 2 and piece.router["moe.3.absent_centroids"].shape[0] == 3
    assert piece.head[msg.HEAD_IDS].tolist() == [1, 2] and piece.head["head.fc.weight"].shape[0] == 2
    assert piece.shared == {} and set(piece.trained()) == set(piece.experts) | set(piece.head)


def test_dense_fedavg_sends_everything_and_trainable_all_adds_the_shared_tensors():
    cut = slicer("fedavg", "all")
    piece = cut.slice_for(QueryReply(9, "9/", True, [1], 5))  # a location without a keep set
    assert piece.experts["moe.1.ids"].tolist() == [0, 1, 2, 3] and piece.router["moe.1.absent_centroids"].shape[0] == 0
    assert piece.head[msg.HEAD_IDS].tolist() == list(range(cut.cfg.model.num_classes))
    assert piece.shared and not any(name.startswith(("moe.", "head.fc")) for name in piece.shared)


def test_a_location_without_a_keep_set_is_not_known_and_holders_count_per_row():
    cut = slicer()
    assert cut.keep_known(NODE) and not cut.keep_known(QueryReply(9, "9/", True, [1], 5))
    holders = cut.row_holders([NODE, NODE])
    assert holders["moe.1"].tolist() == [2, 2, 0, 0] and holders["head"][[0, 1, 2]].tolist() == [0, 2, 2]
