"""``diffexit bench kernels|text|images``: each method beside its baselines, measured side by side in one run.

Each bench prints a markdown table and writes ``DIR/results.json`` (``diffexit.common.results.write_results``)
and its plots as PNG files.
"""
