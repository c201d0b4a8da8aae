"""Commands registered on lmsan.auditor.cli.app."""
