"""``corral.yaml``: the typed configuration, and the team's tools module it names."""
