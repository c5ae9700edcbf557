from loadtests.records import (
    ClientLoad,
    Phase,
    RecordReader,
    RecordWriter,
    RequestRecord,
    Sent,
    from_line,
    read_entries,
    to_line,
)


def record(**fields):
    base = dict(index=0, start_s=100.0, e2e_s=2.0, ttft_s=0.5, output_tokens=4, prompt_tokens=10, ok=True)
    return RequestRecord(**{**base, **fields})


def test_tpot_is_the_time_after_the_first_token_per_later_token():
    assert record(e2e_s=2.0, ttft_s=0.5, output_tokens=4).tpot_s == 0.5
    assert record(output_tokens=1).tpot_s is None
    assert record(ttft_s=None).tpot_s is None
    assert record(start_s=10.0, e2e_s=2.5).end_s == 12.5


def test_lines_round_trip():
    failed = record(error="HTTP 500: boom", ok=False, status=500, cause="HTTP 500")
    for entry in (failed, Phase("stop", 5.0, "duration"), Sent(3.5, 12), ClientLoad(4.0, cpu_ratio=0.5, lag_s=0.01)):
        line = to_line(entry)
        assert line.endswith("\n") and line.count("\n") == 1
        assert from_line(line) == entry
    assert '"type":"sent"' in to_line(Sent(3.5, 12))


def test_a_request_line_without_a_cause_still_reads():
    line = ('{"type":"request","index":0,"start_s":1.0,"e2e_s":0.0,"ttft_s":null,"output_tokens":0,'
            '"prompt_tokens":5,"ok":false,"status":0,"error":"connection failed"}')
    assert from_line(line) == record(start_s=1.0, e2e_s=0.0, ttft_s=None, output_tokens=0, prompt_tokens=5, ok=False,
                                     status=0, error="connection failed")


def test_reader_follows_a_growing_file_and_waits_for_half_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    reader = RecordReader(path)
    assert reader.read_new() == []  # not there yet
    with path.open("w") as stream:
        writer = RecordWriter(stream)
        writer.write(Phase("measure", 1.0))
        writer.write(record(index=1))
        assert reader.read_new() == [Phase("measure", 1.0), record(index=1)]
        line = to_line(record(index=2))
        stream.write(line[:10])
        stream.flush()
        assert reader.read_new() == []
        stream.write(line[10:])
        stream.flush()
        assert reader.read_new() == [record(index=2)]
    assert len(read_entries(path)) == 3


def test_writer_ignores_entries_after_close(tmp_path):
    path = tmp_path / "r.jsonl"
    writer = RecordWriter(path.open("w"))
    writer.write(record())
    writer.close()
    writer.write(record(index=9))
    assert read_entries(path) == [record()]
