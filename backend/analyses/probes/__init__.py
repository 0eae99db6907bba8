"""The probe studies of `probe-study` (backend/analyses/probe_study.py): one module per study."""
