from geomoe.expert_parallel.placement import DeviceNeeds, plan_placement

LAYER = {1: 100}  # bytes per expert of layer 1


def needs(name, budget, per):
    return DeviceNeeds(name, 0.0, 0.0, budget, {1: per})


def test_devices_keep_their_busiest_experts_and_ask_the_nearest_peer():
    devices = [needs("a", 200, {0: 9, 1: 5, 2: 1}), needs("b", 200, {2: 4, 3: 2}), needs("c", 300, {0: 1})]
    rtt = {("a", "b"): 10, ("a", "c"): 50, ("b", "c"): 20}
    plan = plan_placement(devices, rtt, LAYER, {1: 4}, {1: 64})
    assert plan.holds["a"][1] == [0, 1] and plan.holds["b"][1] == [2, 3]
    assert plan.asks["a"] == {1: {2: "b"}}  # b is nearer than c
    assert plan.holds["c"][1] == [0]
    assert plan.bytes_per_image["a"] == {"b": 2 * 1 * 4 * 64 * 4}


def test_an_expert_nobody_holds_goes_to_the_nearest_peer_with_room():
    devices = [needs("a", 100, {0: 5, 1: 3}), needs("b", 0, {}), needs("c", 100, {})]
    plan = plan_placement(devices, {("a", "b"): 1, ("a", "c"): 5}, LAYER, {1: 4}, {1: 64})
    assert plan.holds["a"][1] == [0] and plan.holds["c"][1] == [1] and plan.asks["a"][1] == {1: "c"}


def test_unreachable_or_full_peers_leave_experts_unserved():
    plan = plan_placement([needs("a", 0, {0: 5}), needs("b", 100, {})], {}, LAYER, {1: 4}, {1: 64})
    assert plan.unserved["a"] == {1: [0]}
