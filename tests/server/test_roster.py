"""The roster, without Flower: node ids and parsed query replies."""

from geomoe.server.replies import QueryReply
from geomoe.server.roster import Roster


def node(location: int, cell: str, examples: int = 10, has_base: bool = True) -> QueryReply:
    return QueryReply(location, cell, has_base, [0], examples)


def test_two_nodes_reporting_one_cell_are_named_apart():
    roster = Roster(max_examples_factor=10)
    roster.add(1, node(0, "0/"))
    roster.add(2, node(0, "0/"))
    assert [roster.name(n) for n in (1, 2, 3)] == ["0/", "0/~2", "3"]


def test_a_device_back_under_a_new_id_takes_the_place_of_its_gone_self():
    roster = Roster(max_examples_factor=10)
    roster.add(1, node(0, "0/"))
    roster.add(2, node(0, "0/"), connected={1, 2})  # node 1 still listed: a second device in the cell
    roster.add(3, node(0, "0/"), connected={2, 3})  # node 1 gone: node 3 is it, rebooted
    assert roster.name(3) == "0/" and 1 not in roster.nodes and roster.name(2) == "0/~2"


def test_a_device_that_says_who_it_is_takes_its_old_place_even_while_its_old_id_is_listed():
    roster = Roster(max_examples_factor=10)
    roster.add(1, QueryReply(0, "0/", True, [0], 10, device="cam-a"))
    roster.add(2, QueryReply(0, "0/", True, [0], 10, device="cam-a"), connected={1, 2})
    assert roster.name(2) == "0/" and 1 not in roster.nodes


def test_online_is_the_registered_nodes_still_listed_in_location_order():
    roster = Roster(max_examples_factor=10)
    roster.add(5, node(2, "2/"))
    roster.add(6, node(0, "0/"))
    roster.add(7, node(1, "1/"))
    assert roster.online([7, 5, 6, 99]) == [6, 7, 5] and roster.online([5]) == [5]


def test_declared_examples_are_capped_at_a_factor_of_the_others_median():
    roster = Roster(max_examples_factor=10)
    for node_id, examples in ((1, 100), (2, 120), (3, 10**9)):
        roster.add(node_id, node(node_id, f"{node_id}/", examples))
    assert roster.examples_cap(3) == 1100 and roster.examples_cap(1) == 100


def test_the_base_counts_as_held_only_once_a_reply_confirms_it():
    roster = Roster(max_examples_factor=10)
    roster.add(1, node(0, "0/", has_base=False))
    roster.confirm_base(1)
    assert not roster.nodes[1].has_base  # never sent it
    roster.base_goes_to(1)
    roster.confirm_base(1)
    assert roster.nodes[1].has_base
