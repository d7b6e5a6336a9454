"""Evaluations: one small module per task (PassKey: ``passkey``)."""
