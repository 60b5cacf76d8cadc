"""Review queue web app for fraud analysts (`seqguard review`); see app.py."""
