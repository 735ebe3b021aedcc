"""What both sides speak: topics and messages, the MQTT link, chunked content-addressed blobs,
the block manifest and the weight encoding. Runs on a board and on the coordinator.
"""
