"""Alert conditions raised and cleared, recipients, delivery: see the Level 1 issue."""
