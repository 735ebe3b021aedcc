"""Operator tools: device bundles, the embedded and production Mosquitto, the fleet's ACL.
"""
