"""Run provenance: the run manifest, the badge, and the one-command pipeline that records them."""
