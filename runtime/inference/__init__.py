"""Inference: a verified bundle loaded into its engines, and scans turned into reports or answers (the pipeline, the
prompt layout training shares, the attention evidence a result carries)."""
