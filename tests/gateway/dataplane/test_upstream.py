import json

from gateway.dataplane.upstream import error_event, is_usage_event, sse_events, usage_of


class FakeContent:
    def __init__(self, chunks):
        self._chunks = chunks

    async def iter_any(self):
        for chunk in self._chunks:
            yield chunk


class FakeResponse:
    def __init__(self, chunks):
        self.content = FakeContent(chunks)


async def collect(chunks):
    return [e async for e in sse_events(FakeResponse(chunks))]


async def test_events_are_split_on_blank_lines_across_chunks():
    chunks = [b'data: {"a"', b': 1}\n\ndata: {"b": 2}\n', b"\ndata: [DONE]\n\n"]
    assert await collect(chunks) == [b'data: {"a": 1}\n\n', b'data: {"b": 2}\n\n', b"data: [DONE]\n\n"]


async def test_several_events_in_one_chunk_and_a_trailing_partial_event():
    assert await collect([b"data: 1\n\ndata: 2\n\ndata: 3"]) == [b"data: 1\n\n", b"data: 2\n\n", b"data: 3"]


def test_usage_chunk_detection_and_parsing():
    event = b'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}}\n\n'
    assert is_usage_event(event)
    assert usage_of(event) == {"prompt_tokens": 5, "completion_tokens": 7}
    assert not is_usage_event(b'data: {"choices": [{"delta": {"content": "x"}}], "usage": null}\n\n')
    assert usage_of(b'{"usage": null}') is None
    assert usage_of(b"not json") is None


def test_error_event_is_openai_shaped_and_ends_the_stream():
    event = error_event("engine died")
    first, done = event.split(b"\n\n")[:2]
    assert json.loads(first.removeprefix(b"data: "))["error"]["message"] == "engine died"
    assert done == b"data: [DONE]"
