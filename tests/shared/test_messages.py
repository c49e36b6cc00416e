import msgpack
import pytest

from shared import messages as m


def make_result(**over) -> m.Result:
    fields = dict(id="01JABCDEF0123456789ABCDEFG", ts=1.7e9, site="plant1", device="cam-1",
                  station="line-a", cls="brick", model_version="1.2.0", score=0.42,
                  norm_score=1.3, threshold=0.4, verdict="anomaly", latency_ms=12.5,
                  heatmap=b"\x89PNG...", thumbnail=b"\xff\xd8",
                  crops=(m.Crop(3, 4, 20, 10, 2.1, b"\xff\xd8jpeg"),))
    fields.update(over)
    return m.Result(**fields)


@pytest.mark.parametrize("msg", [
    make_result(),
    m.Status(device="cam-1", online=True, ts=1.0, site="plant1", model_version="1.0.0"),
    m.Metrics(device="cam-1", ts=2.0, fps=30.5, latency_p50_ms=4.0, latency_p95_ms=9.0,
              frames_dropped=3, spool_depth=0),
    m.ModelDesired(model_id="unified", version="1.1.0", url="http://hub/models/x", sha256="ab" * 32),
    m.ModelState(device="cam-1", ts=3.0, state="active", version="1.1.0"),
    m.Receipt(device="cam-1", ts=4.0, ids=("01JABCDEF0123456789ABCDEFG",) * m.MAX_RECEIPT_IDS),
    m.Receipt(device="cam-1", ts=4.0, refused=("01JABCDEF0123456789ABCDEFH",), reason="not an image"),
])
def test_round_trip(msg):
    assert m.decode(m.encode(msg)) == msg


def test_expect_restricts_type():
    with pytest.raises(m.MessageError, match="expected a result"):
        m.decode(m.encode(m.Status(device="d", online=False, ts=1.0)), expect=m.Result)


def body(**over):
    b = {"v": m.SCHEMA_VERSION, "t": "result"}
    r = make_result()
    b.update({k: getattr(r, k) for k in m.Result.__slots__ if k != "crops"})
    b["crops"] = []
    b.update(over)
    return msgpack.packb(b, use_bin_type=True)


@pytest.mark.parametrize("payload, reason", [
    (b"", "not valid msgpack"),
    (b"\xc1\xc1\xc1", "not valid msgpack"),
    (msgpack.packb([1, 2, 3]), "not a msgpack map"),
    (msgpack.packb({"v": 99, "t": "result"}), "unsupported schema version"),
    (msgpack.packb({"v": m.SCHEMA_VERSION, "t": "nope"}), "unknown message type"),
    (body(score="high"), "result.score: expected number"),
    (body(score=float("nan")), "not a finite number"),
    (body(verdict="maybe"), "result.verdict"),
    (body(heatmap="text"), "expected bytes"),
    (body(heatmap=b"x" * (m.MAX_IMAGE + 1)), "over the"),
    (body(crops=[{"x": 1}] ), "missing field"),
    (body(crops=[{"x": 0, "y": 0, "w": 1, "h": 1, "score": 1.0, "jpeg": b""}] * (m.MAX_CROPS + 1)), "items"),
    (body(extra=1), "unknown field"),
    (body(station="s" * 1000), "characters"),
    (body(latency_ms=-5.0), "outside"),
    # an id the hub would cut to its 26-character column (and so could collide) or could not sort
    (body(id="0" * 26 + "X" * 174), "result.id: .* is not a ULID"),
    (body(id="01jabcdef0123456789abcdefg"), "result.id: .* is not a ULID"),
    (body(id="81JABCDEF0123456789ABCDEFG"), "result.id: .* is not a ULID"),   # 130 bits
    (body(id="01JABCDEF0123456789ABCDEF\n"), "result.id: .* is not a ULID"),
    (body(id=""), "result.id: .* is not a ULID"),
    (body(station="line\x00a"), "result.station: contains a NUL character"),
])
def test_malformed_payloads_are_refused_with_a_reason(payload, reason):
    with pytest.raises(m.MessageError, match=reason):
        m.decode(payload)


def test_missing_required_field():
    raw = msgpack.unpackb(body())
    del raw["score"]
    with pytest.raises(m.MessageError, match="missing field 'score'"):
        m.decode(msgpack.packb(raw, use_bin_type=True))


def test_encode_refuses_oversized_payload():
    crops = tuple(m.Crop(0, 0, 1, 1, 1.0, b"x" * m.MAX_IMAGE) for _ in range(5))
    with pytest.raises(m.MessageError, match="over the"):
        m.encode(make_result(crops=crops))


def receipt(**over):
    return msgpack.packb({"v": m.SCHEMA_VERSION, "t": "receipt", "device": "cam-1", "ts": 1.0} | over)


@pytest.mark.parametrize("payload, reason", [
    (receipt(ids=["01JABCDEF0123456789ABCDEFG"] * (m.MAX_RECEIPT_IDS + 1)), "receipt.ids: 1001 items"),
    (receipt(ids=["01JABCDEF0123456789ABCDEFG", "x" * 200]), "receipt.ids: 'xxx"),
    (receipt(refused=["01JABCDEF0123456789ABCDEFU"]), "not a ULID"),   # U is not in the alphabet
    (receipt(ids="01JABCDEF0123456789ABCDEFG"), "expected a list"),
])
def test_receipts_carry_only_ulids_and_a_bounded_number(payload, reason):
    with pytest.raises(m.MessageError, match=reason):
        m.decode(payload)
