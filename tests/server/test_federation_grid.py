"""What the server reads from Flower's node list (the Grid), without a SuperLink: protobuf NodeInfo as Flower's
grids return it."""

from flwr.proto.node_pb2 import NodeInfo

from geomoe.server.federation import registered_locations


class NodeList:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_nodes(self):
        return self.nodes


def test_only_nodes_registered_with_a_location_are_placed_by_it():
    grid = NodeList([NodeInfo(node_id=7, location="-1.404,35.009", name="cam-07"), NodeInfo(node_id=8)])
    assert registered_locations(grid) == {7: (-1.404, 35.009)}
