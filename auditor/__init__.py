"""lmsan: the LMSanitizer auditor for task-agnostic backdoors in Transformer encoders.

Importing this package imports neither torch nor transformers: the screening path
(scan, monitor, verify) must stay torch-free.
"""

__version__ = "0.1.0"
