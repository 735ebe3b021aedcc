"""Runs on one machine: the demo, a fleet of real processes, block-by-block training without a network,
fleet data splits, and the simulator of hundreds of devices.
"""
