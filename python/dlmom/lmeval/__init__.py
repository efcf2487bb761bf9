"""dlmom in EleutherAI's lm-evaluation-harness (the ``eval`` extra: ``pip install "dlmom[eval]"``).

``dlmom.lmeval.DLMoMLM`` is the model (registered in lm-eval as "dlmom" when imported); ``dlmom lm-eval`` runs
tasks on it from the command line (dlmom.lmeval.cli); ``python -m dlmom.lmeval`` is lm-eval's own command line
with "dlmom" among its models. Scoring (loglikelihood) is dlmom.lmeval.scoring's.
"""
from __future__ import annotations

__all__ = ["DLMoMLM"]


def __getattr__(name):
    # lm-eval is imported on first use: `dlmom lm-eval --help` works without it.
    if name == "DLMoMLM":
        from .model import DLMoMLM

        return DLMoMLM
    raise AttributeError(f"module 'dlmom.lmeval' has no attribute {name!r}")
