"""Accounts: users and API keys, token quotas, rate limits and usage metering.

`Accounts` (service) answers who is asking and whether they may start; a `Meter` per
request reserves tokens at admission and writes one usage row when the request ends.
The SQL lives in `orchestrator.store.accounts`; the admin CLI is `orchestrator.admin`.
"""

from orchestrator.accounts.identity import LOCAL, LOCAL_USER, Identity
from orchestrator.accounts.meter import Meter
from orchestrator.accounts.service import Accounts, Reservation

__all__ = ["LOCAL", "LOCAL_USER", "Accounts", "Identity", "Meter", "Reservation"]
