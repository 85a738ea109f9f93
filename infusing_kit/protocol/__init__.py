"""The protocol: one experiment, its presets and config files, searches on validation, the study and the whole comparison, the results registries and the built-in world's export."""
