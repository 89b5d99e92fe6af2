"""The Availability Manager: one agent per host that mirrors protected disks to its peer and guards promotion
with a witness. It imports nothing of the console or of xapisim, so it can run on a real host (see README.md)."""
