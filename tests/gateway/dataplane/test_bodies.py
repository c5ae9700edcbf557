import json

import pytest

from gateway.dataplane.bodies import json_depth, parse_json_object
from gateway.errors import ApiError


@pytest.mark.parametrize(("value", "depth"), [(1, 0), ([], 1), ({"a": [1, {"b": 2}]}, 3), ([[[[]]], []], 4)])
def test_json_depth(value, depth):
    assert json_depth(value, stop_at=100) == depth


def test_json_depth_stops_counting_at_the_bound():
    deep: list = []
    for _ in range(50):
        deep = [deep]
    assert json_depth(deep, stop_at=10) == 10


def nested(levels: int) -> bytes:
    return b'{"model": "m", "x": ' + b"[" * levels + b"]" * levels + b"}"


def test_nesting_up_to_the_limit_passes_and_deeper_is_a_400():
    assert parse_json_object(nested(7), max_depth=8)["model"] == "m"
    with pytest.raises(ApiError) as info:
        parse_json_object(nested(8), max_depth=8)
    assert info.value.status == 400 and "deeper than the limit of 8" in info.value.message


def test_nesting_beyond_pythons_own_recursion_limit_is_a_400_not_a_crash():
    with pytest.raises(ApiError) as info:
        parse_json_object(nested(200_000), max_depth=64)
    assert info.value.status == 400


def test_many_brackets_side_by_side_are_not_depth():
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "[{" * 100}] * 100}).encode()
    assert len(parse_json_object(body, max_depth=8)["messages"]) == 100


@pytest.mark.parametrize(("body", "message"), [
    (b"{nope", "not valid JSON"), (b"[1]", "must be a JSON object"), (b"\xff\xfe", "not valid JSON"),
])
def test_not_an_object(body, message):
    with pytest.raises(ApiError) as info:
        parse_json_object(body, max_depth=8)
    assert info.value.status == 400 and message in info.value.message
