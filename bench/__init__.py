"""`make bench`: Callflow's performance figures against baselines measured in the same run (bench/run.py)."""
