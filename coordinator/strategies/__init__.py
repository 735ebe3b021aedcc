"""Training schedules: one file per method, each saying only what differs (see base.py for the contract)."""
