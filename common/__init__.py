"""What both engines share: progress-aware threshold schedules, results I/O, and training utilities.

The ground floor beside ``diffexit.kernels``: it imports nothing else of diffexit.
"""
