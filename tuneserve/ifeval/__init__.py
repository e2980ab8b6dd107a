"""IFEval (Zhou et al. 2023): its 25 verifiable instructions and the reference's strict and loose scoring.

A faithful port of google-research's `instruction_following_eval` that runs offline: `instructions` holds
the checkers, `evaluation` loading and scoring. Shared because the client's benchmarks and the fine-tuning
run's task evaluation score replies with the same checkers.
"""
