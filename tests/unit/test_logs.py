import json
import logging

from rollproof.logs import JsonLinesFormatter, setup_logging


def test_json_lines_carry_message_level_and_extra_fields():
    record = logging.LogRecord("rollproof.node", logging.WARNING, __file__, 1, "lease %s expired", ("L1",), None)
    record.node_id = "12D3KooWx"
    entry = json.loads(JsonLinesFormatter().format(record))
    assert entry["msg"] == "lease L1 expired"
    assert entry["level"] == "warning"
    assert entry["logger"] == "rollproof.node"
    assert entry["node_id"] == "12D3KooWx"
    assert entry["ts"].endswith("Z")


def test_setup_replaces_handlers(capsys):
    setup_logging("DEBUG", json_lines=True)
    setup_logging("INFO", json_lines=True)
    logging.getLogger("x").info("hello")
    lines = capsys.readouterr().err.strip().splitlines()
    assert [json.loads(line)["msg"] for line in lines] == ["hello"]
