"""The device agent a board runs (edge-device): its settings, what it probes, its tier, its loop.
"""
