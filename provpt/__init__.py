"""provpt: PRO-VPT (distribution-adaptive visual prompt tuning via prompt relocation) on timm ViTs.

Importing the package is cheap (no torch): the workflow imports :mod:`provpt.config` at DAG
construction time.
"""

__version__ = "0.1.0"
