"""On the PYTHONPATH of the daemons bench/run profiles (the agent; the node plugin in the stage part): turns on
only the debug lines the profiles read: csi.runner's ("ran [argv] rc=0 in 0.123s", one per external command)
and csi.node.iscsi's (when a new disk appeared after a login, and how long its scheduler took).

Not `--log-level debug`: that also dumps every request and response (csi/server.py), which the measured calls
would pay for.
"""
import logging

logging.getLogger("csi.runner").setLevel(logging.DEBUG)
logging.getLogger("csi.node.iscsi").setLevel(logging.DEBUG)
