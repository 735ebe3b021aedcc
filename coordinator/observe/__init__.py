"""Looking at a run from its directory: status at a glance (run_status), the run read back typed (run_data),
its plots (plots) and the HTML report (run_report, its page in templates/); and, while it runs, its metrics
for Prometheus (prometheus).
"""
