"""The JSON log format (chart value logFormat: json): one JSON object per line, time, level, logger, message."""

from __future__ import annotations

import datetime
import io
import json
import logging

import pytest

from csi import cli, logformat


def emit(fmt: str, fn) -> str:
    stream = io.StringIO()
    logger = logging.getLogger("csi.test.logformat")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    h = logformat.handler(fmt, stream)
    logger.addHandler(h)
    try:
        fn(logger)
    finally:
        logger.removeHandler(h)
    return stream.getvalue()


def test_one_object_per_line_with_time_level_logger_and_message():
    text = emit("json", lambda log: (log.info("volume %s is %s", "pvc-1", "v1:s1:vg:lv"),
                                     log.warning("two\nlines ünïcode")))
    lines = text.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert set(first) == {"time", "level", "logger", "message"}
    assert (first["level"], first["logger"], first["message"]) == ("INFO", "csi.test.logformat",
                                                                   "volume pvc-1 is v1:s1:vg:lv")
    assert second["level"] == "WARNING" and second["message"] == "two\nlines ünïcode"
    when = datetime.datetime.fromisoformat(first["time"].replace("Z", "+00:00"))
    assert first["time"].endswith("Z") and abs(datetime.datetime.now(datetime.timezone.utc) - when).total_seconds() < 60


def test_a_traceback_stays_inside_its_object():
    def fail(log):
        try:
            raise RuntimeError("agent went away")
        except RuntimeError:
            log.exception("CreateVolume failed")
    [line] = emit("json", fail).splitlines()
    obj = json.loads(line)
    assert obj["level"] == "ERROR" and obj["message"] == "CreateVolume failed"
    assert "Traceback" in obj["exception"] and "RuntimeError: agent went away" in obj["exception"]


def test_only_the_formatted_message_is_written():
    """Record arguments and extra attributes are not logged: what the interceptor did not put into the message
    (after redacting it) never reaches the log."""
    text = emit("json", lambda log: log.info("call %s", "CreatVolume", extra={"chap_secret": "s3cr3t"}))
    assert "s3cr3t" not in text and set(json.loads(text)) == {"time", "level", "logger", "message"}


def test_text_stays_the_default_format():
    text = emit("text", lambda log: log.info("hello"))
    assert text.rstrip().endswith("INFO csi.test.logformat: hello") and not text.startswith("{")
    with pytest.raises(ValueError):
        logformat.handler("yaml", io.StringIO())


@pytest.mark.parametrize("argv,fmt", [
    (["node", "--node-name", "w1"], "text"),
    (["--log-format", "json", "node", "--node-name", "w1"], "json"),
    (["node", "--node-name", "w1", "--log-format=json"], "json"),
    (["agent", "--node-name", "s1", "--config", "c", "--tls-dir", "t", "--portal", "10.0.0.1:3260",
      "--log-format=json"], "json"),
    (["controller", "--storage-nodes", "n", "--tls-dir", "t", "--log-format=json"], "json"),
])
def test_every_daemon_takes_the_flag(argv, fmt):
    assert cli.parser().parse_args(argv).log_format == fmt
