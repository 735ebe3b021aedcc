"""Looking at a run from its directory: status at a glance, the HTML report.
"""
