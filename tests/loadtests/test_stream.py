import json

from loadtests.stream import StreamTally, parse_response


def chat_chunk(text):
    return "data: " + json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": text}}],
                                  "usage": None})


def usage_chunk(prompt, completion):
    return "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}})


def test_chat_stream_times_first_and_last_token_and_takes_usage():
    tally = StreamTally(api="chat")
    lines = [": keep-alive", "", chat_chunk(""), chat_chunk("Hello"), "", chat_chunk(" there"), chat_chunk(" ."),
             usage_chunk(12, 3), "data: [DONE]"]
    for t, line in enumerate(lines):
        tally.feed_line(line + "\n", now_s=float(t))
    assert tally.first_token_s == 3.0  # the role-only chunk with empty content is no token
    assert tally.last_token_s == 6.0
    assert tally.content_chunks == 3
    assert (tally.usage_prompt_tokens, tally.output_tokens) == (12, 3)
    assert tally.failure() is None


def test_without_usage_each_content_chunk_counts_one_token():
    tally = StreamTally(api="completions")
    for t, text in enumerate(["a", "b", "", "c"]):
        tally.feed_line("data: " + json.dumps({"choices": [{"text": text}]}), now_s=t)
    tally.feed_line("data:[DONE]", now_s=9)
    assert tally.output_tokens == 3 and tally.first_token_s == 0 and tally.failure() is None


def test_error_event_mid_stream_fails_the_request():
    tally = StreamTally(api="chat")
    tally.feed_line(chat_chunk("x"), 0.1)
    tally.feed_line('data: {"error": {"message": "upstream engine died", "type": "upstream_error"}}', 0.2)
    tally.feed_line("data: [DONE]", 0.3)
    assert tally.failure() == "upstream engine died"


def test_a_stream_cut_before_done_fails():
    tally = StreamTally(api="chat")
    tally.feed_line(chat_chunk("x"), 0.1)
    assert tally.failure() == "stream ended before data: [DONE]"


def test_malformed_event_fails():
    tally = StreamTally(api="chat")
    tally.feed_line("data: {not json", 0.1)
    tally.feed_line("data: [DONE]", 0.2)
    assert tally.failure().startswith("malformed SSE event")


def test_non_streamed_response():
    body = {"choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}
    assert parse_response(body) == (4, 9, None)
    assert parse_response({"error": {"message": "bad model"}}) == (0, None, "bad model")
    assert parse_response({"choices": []})[2] == "response has no choices"
    assert parse_response([1, 2])[2] == "response body is not a JSON object"
