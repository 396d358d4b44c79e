"""On-call commands: `dispatcher sessions list|show|stop`, `dispatcher trace ID` and
`dispatcher pool status` (commands.py), a session's timeline (trace.py)."""

from dispatcher.oncall.clients import Clients, clients
from dispatcher.oncall.commands import add_commands, duration, run
from dispatcher.oncall.trace import trace

__all__ = ["Clients", "add_commands", "clients", "duration", "run", "trace"]
