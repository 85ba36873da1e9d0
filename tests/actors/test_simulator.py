from dailydoco.cluster.simulator import ViralNetwork


def test_same_seed_same_network_and_referrers_come_first():
    a, b = ViralNetwork(7, 1.5), ViralNetwork(7, 1.5)
    regs_a, regs_b = list(a.registrations(500)), list(b.registrations(500))
    assert regs_a == regs_b and len(regs_a) == 500
    seen = set()
    for reg in regs_a:
        assert reg.referrer_id is None or reg.referrer_id in seen
        seen.add(reg.user_id)
    assert list(a.purchases(50)) == list(b.purchases(50))


def test_viral_coefficient_shapes_the_network():
    def referred_share(k):
        regs = list(ViralNetwork(1, k).registrations(3_000))
        return sum(r.referrer_id is not None for r in regs) / len(regs)

    assert referred_share(0.3) < referred_share(1.5)


def test_another_run_buys_the_same_things_under_new_ids():
    a, b = ViralNetwork(7, 1.5), ViralNetwork(7, 1.5)
    list(a.registrations(100)), list(b.registrations(100))
    first, again = list(a.purchases(50, "run1-")), list(b.purchases(50, "run2-"))
    assert [(p.user_id, p.amount_micros) for p in first] == [(p.user_id, p.amount_micros) for p in again]
    assert not {p.transaction_id for p in first} & {p.transaction_id for p in again}
