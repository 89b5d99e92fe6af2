"""Protection of VMs (Level 1, 2, 3): see the Level 1 issue."""
