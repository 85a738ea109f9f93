"""The data side: labelled image sets and their formats, the batches of each step, the paper's records, leakage and pre-run checks, and the containers an experiment's data travel in."""
