import pytest

from shared import topics


def test_topic_and_parse_round_trip():
    t = topics.topic("plant-1", "cam_07", topics.RESULT)
    assert t == "kdfleet/v1/plant-1/cam_07/result"
    assert topics.parse(t) == topics.Address("plant-1", "cam_07", "result")
    assert topics.parse(topics.topic("s", "d", topics.MODEL_DESIRED)).kind == "model/desired"
    assert topics.parse(topics.topic("s", "d", topics.RECEIPT)) == topics.Address("s", "d", "receipt")


def test_every_kind_travels_one_way():
    assert sorted(topics.UPSTREAM + topics.DOWNSTREAM) == sorted(topics.KINDS)
    assert topics.RECEIPT in topics.DOWNSTREAM and topics.RESULT in topics.UPSTREAM


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "x" * 65, "sp ace"])
def test_names_with_wildcards_or_slashes_are_refused(bad):
    with pytest.raises(topics.TopicError):
        topics.topic(bad, "d", topics.STATUS)


def test_subscriptions():
    assert topics.subscription(topics.RESULT) == "kdfleet/v1/+/+/result"
    assert topics.subscription(topics.STATUS, shared_group="hub") == "$share/hub/kdfleet/v1/+/+/status"
    with pytest.raises(topics.TopicError):
        topics.subscription("nope")


@pytest.mark.parametrize("bad", ["other/v1/s/d/result", "kdfleet/v1/s/d", "kdfleet/v1/s/d/unknown"])
def test_parse_refuses_foreign_topics(bad):
    with pytest.raises(topics.TopicError):
        topics.parse(bad)
