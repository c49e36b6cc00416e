from shared.ids import is_ulid, new_ulid, ulid_time_ms


def test_ulids_are_unique_sortable_and_carry_time():
    ids = [new_ulid() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 26 for i in ids)
    assert ulid_time_ms(new_ulid(now_ms=1_700_000_000_123)) == 1_700_000_000_123


def test_is_ulid_accepts_what_new_ulid_makes_and_nothing_else():
    assert all(is_ulid(new_ulid()) for _ in range(100))
    assert is_ulid(new_ulid(now_ms=0)) and is_ulid(new_ulid(now_ms=(1 << 48) - 1))
    for bad in ("", "01ARZ3NDEKTSV4RRFFQ69G5FA", "01ARZ3NDEKTSV4RRFFQ69G5FAVX", "01arz3ndektsv4rrffq69g5fav",
                "01ARZ3NDEKTSV4RRFFQ69G5FAI", "81ARZ3NDEKTSV4RRFFQ69G5FAV", "01ARZ3NDEKTSV4RRFFQ69G5FA\n",
                "01ARZ3NDEKTSV4RRFFQ69G5FA\x00", None, 12):
        assert not is_ulid(bad), bad
