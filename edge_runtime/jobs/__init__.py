"""Jobs in child processes: spawning a child under a hard memory limit, the worker a job runs in,
and fitting a job into a budget by calibration.
"""
