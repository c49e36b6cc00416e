from shared.ids import new_ulid, ulid_time_ms


def test_ulids_are_unique_sortable_and_carry_time():
    ids = [new_ulid() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 26 for i in ids)
    assert ulid_time_ms(new_ulid(now_ms=1_700_000_000_123)) == 1_700_000_000_123
