"""How the supervisor deals the engine's actors over the nodes of a cluster
(actors/supervisor.py, `dealt_node`). On a real cluster of two hosts the
deal is test_two_nodes.py's: shards on both, the count per node even."""

import collections

from dailydoco.actors.supervisor import dealt_node

RELAY_AND_VIDEO = 2  # the actors dealt after the chains


def test_chain_0_goes_to_a_node_other_than_the_supervisors_and_the_deal_stays_even():
    for node_count in (2, 3, 4):
        nodes = [f"node-{i}" for i in range(node_count)]
        for supervisor_node in nodes:
            for shards in range(1, 7):
                for chains in (1, 2, 3):
                    dealt = [dealt_node(position, shards, nodes, supervisor_node)
                             for position in range(shards + chains + RELAY_AND_VIDEO)]
                    case = (nodes, supervisor_node, shards, chains, dealt)
                    # With one chain, a lost host leaves the chain or the
                    # supervisor, which writes purchases while every chain is silent.
                    assert dealt[shards] != supervisor_node, case
                    # Chains and shards each spread over as many nodes as they can.
                    assert len(set(dealt[shards:shards + chains])) == min(chains, node_count), case
                    assert len(set(dealt[:shards])) == min(shards, node_count), case
                    per_node = collections.Counter(dealt)
                    assert max(per_node[n] for n in nodes) - min(per_node[n] for n in nodes) <= 1, case


def test_a_supervisor_off_the_dealt_nodes_leaves_the_deal_in_node_order_from_chain_0():
    # Its node offers no CPUs, or has just been lost: the deal is over the others.
    nodes = ["node-0", "node-1"]
    assert [dealt_node(p, 2, nodes, "node-gone") for p in range(5)] == ["node-0", "node-1", "node-0", "node-1",
                                                                       "node-0"]
