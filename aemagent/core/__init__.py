"""The core: profiles, their tokens and the refresh policy. Imports no IMS, daemon or CLI code."""
