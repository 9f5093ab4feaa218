"""On the agent's PYTHONPATH when bench/bench.py starts it: turns on only csi.runner's debug lines
("ran [argv] rc=0 in 0.123s", one per external command) for the profile.

Not `--log-level debug`: with protobuf 7 that makes the interceptor's debug dump of requests and responses
(csi/server.py, redact) raise on FieldDescriptor.label, which no longer exists, and every call whose message
has a repeated, nested or secret field fails with UNKNOWN.
"""
import logging

logging.getLogger("csi.runner").setLevel(logging.DEBUG)
