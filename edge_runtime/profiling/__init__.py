"""edge-profile: measure the memory of candidate parts on a board, fit a memory model, cut stages
per tier. Runs on a board or an operator's machine; never on the coordinator's hot path.
"""
